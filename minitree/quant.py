"""Weight-only quantization: cheaper drafts that keep the output exact, and quantized targets.

The draft only proposes; the target decides. So the draft may be approximated in any way:
the output stays the target's, only acceptance (and so speed) can change.

- `quantize_int8(model)`: every linear (decoder layers and lm_head) gets an int8 copy of its
  weight (per-output-channel scales; `CopiedLinear`), used by the forwards whose row count
  this machine measured it cheapest for (costs.py): the fused int8 kernel reads half the
  bytes, but on some CPUs it slows down with every extra row faster than the float kernels
  do; the other forwards keep the float weight (or its packed copy).
- `restrict_vocab(model, k)`: the lm_head computes logits for token ids < k only (BPE
  vocabularies are ordered by merge rank, so low ids are the frequent tokens); the other
  logits are -inf, so the draft never proposes them. For the 0.5B Qwen2.5 draft the full
  lm_head is 136M of its 494M parameters.

A quantized *target* is another model: `quantize(model, "int8" | "int4")` replaces every
linear by its weight-only quantized form, used at every row count (plain decoding, verify and
prefill alike), and drops the float weights. Speculative decoding is then lossless with
respect to that quantized model, and its output is what plain decoding of it gives.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .engine import EngineError
from .model import Transformer

INT4_GROUP = 32  # int4: one scale and zero point per 32 input features
PACK_ROWS = 16  # the batch size oneDNN packs weights for: near its best from 2 to 128 rows (1: only 1 row)


def int8_weights(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> int8 weights [out, in] and per-output-channel scales [out] (in the weight's dtype)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    return torch.round(w / scale).to(torch.int8), scale.squeeze(1).to(weight.dtype)


def int8_linear(x, qweight, scale, bias):
    rows = x.numel() // x.shape[-1]
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, -1), qweight, scale).view(*x.shape[:-1], -1)
    return y if bias is None else y + bias


class Int8Linear(nn.Module):
    """Weight-only int8 at every row count, the float weight dropped (a quantized target; CPU kernel)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.bias = linear.bias
        self.out_features, self.in_features = linear.weight.shape
        qweight, scale = int8_weights(linear.weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.scale, self.bias)


@torch.library.custom_op("minitree::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x @ W^T with W held in oneDNN's blocked layout (an opaque tensor, so an op of its own in
    compiled graphs): oneDNN otherwise reorders a plain weight into that layout at every call."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


@packed_linear.register_fake
def _(x, packed):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def packed_linear_bias(x, packed, bias):
    y = packed_linear(x, packed)
    return y if bias is None else y + bias


@functools.lru_cache(maxsize=None)
def packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs weights of this dtype here (bf16 needs avx512bw/vl/dq or avx_ne_convert,
    and ONEDNN_MAX_CPU_ISA=AVX2 rules them out; fp32 packs on any x86 oneDNN supports)."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
        return True
    except RuntimeError:
        return False


class CopiedLinear(nn.Module):
    """A float linear with copies of its weight in other forms, each used by the forwards whose row
    count is in `rows[form]` (costs.Plan.apply sets them from this machine's measurements):

    - "packed": the weight in oneDNN's blocked layout, reordered once. oneDNN's bf16 GEMM otherwise
      reorders the whole weight at every call: on an avx512_bf16 CPU a forward of 2-16 rows then
      costs about twice one row on the matrix-vector kernel; packed, close to one row.
    - "fp32": an fp32 copy (packed in oneDNN's layout where oneDNN packs fp32). Where bf16 is
      emulated (AVX2), fp32 GEMMs cost far less per row; the same weights computed at higher
      precision, the output cast back.
    - "int8": weight-only int8 (quantize_int8; for drafts only: it changes the output).
    """

    def __init__(self, linear: nn.Linear, rows: dict[str, frozenset]):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.out_features, self.in_features = linear.weight.shape
        self.serve(rows)

    def serve(self, rows: dict[str, frozenset]) -> None:
        """Use each form for its row counts (making the copies not made yet)."""
        self.rows = rows
        w = self.weight.detach()
        if rows.get("fp32") and not hasattr(self, "weight32"):
            w32, self.packed32 = w.float(), packs(torch.float32)  # a Python bool: static when compiled
            self.weight32 = torch.ops.mkldnn._reorder_linear_weight(w32, PACK_ROWS) if self.packed32 else w32
            self.bias32 = None if self.bias is None else self.bias.detach().float()
        if rows.get("packed") and not hasattr(self, "packed"):  # an opaque oneDNN tensor, not a buffer
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
        if rows.get("int8") and not hasattr(self, "qweight"):
            qweight, scale = int8_weights(w)
            self.register_buffer("qweight", qweight)
            self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]  # static under torch.compile: one branch per graph
        if rows in self.rows.get("int8", ()):
            return int8_linear(x, self.qweight, self.scale, self.bias)
        if rows in self.rows.get("fp32", ()):
            linear = packed_linear_bias if self.packed32 else F.linear
            return linear(x.float(), self.weight32, self.bias32).to(x.dtype)
        if rows in self.rows.get("packed", ()):
            return packed_linear_bias(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)


class Int4Linear(nn.Module):
    """Weight-only int4, asymmetric per group of INT4_GROUP input features (torch's CPU kernel)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        out_f, in_f = linear.weight.shape
        if in_f % INT4_GROUP:
            raise EngineError(f"int4 needs input sizes divisible by {INT4_GROUP}, got {in_f}")
        self.bias, dtype = linear.bias, linear.weight.dtype
        self.out_features, self.in_features = out_f, in_f
        w = linear.weight.detach().float().view(out_f, in_f // INT4_GROUP, INT4_GROUP)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q = torch.round((w - lo) / scale).clamp(0, 15).to(torch.int32).view(out_f, in_f)
        zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
        self.register_buffer("scales_zeros", torch.stack([scale, zero], -1).squeeze(-2).transpose(0, 1)
                             .contiguous().to(dtype))  # [in / group, out, 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(rows, -1), self.qweight, INT4_GROUP,
                                                      self.scales_zeros)
        y = y.view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def _replace_linears(model: Transformer, make) -> Transformer:
    for parent in [model, *model.model.layers.modules()]:
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(child))
    return model


def quantize_int8(model: Transformer) -> Transformer:
    """Give every nn.Linear of the decoder layers and the lm_head an int8 copy for few-row
    forwards (in place; the plan then decides which); the float weights stay. For drafts."""
    return _replace_linears(model, lambda linear: CopiedLinear(linear, {"int8": frozenset(range(1, 5))}))


def has_int8_copies(model: Transformer) -> bool:
    return hasattr(model.lm_head, "qweight") and isinstance(model.lm_head, CopiedLinear)


QUANTIZE = {"int8": Int8Linear, "int4": Int4Linear}


def quantize(model: Transformer, kind: str) -> Transformer:
    """Replace every linear by its weight-only `kind` ("int8" or "int4") form, used at every row
    count, and drop the float weights (in place). Weight-only kernels exist for the CPU."""
    if kind not in QUANTIZE:
        raise EngineError(f"quantization must be one of {', '.join(QUANTIZE)}, got {kind!r}")
    if model.lm_head.weight.device.type != "cpu":
        raise EngineError(f"--quantize {kind} uses torch's CPU kernels; this model is on "
                          f"{model.lm_head.weight.device.type}")
    model.quantized = kind
    return _replace_linears(model, QUANTIZE[kind])


def cheapen(draft: Transformer, int8: bool | None = None, vocab: int = 0) -> Transformer:
    """The draft made cheaper without changing the output: ids below `vocab` only (0: all), and
    int8 copies (None: on CPU only, where the fused kernel exists; never on a quantized draft)."""
    if vocab:
        restrict_vocab(draft, vocab)
    float_head = isinstance(draft.lm_head, nn.Linear)
    if float_head and (int8 if int8 is not None else draft.lm_head.weight.device.type == "cpu"):
        quantize_int8(draft)
    return draft


def restrict_vocab(model: Transformer, k: int) -> Transformer:
    """Compute logits only for token ids < k (in place); the rest are -inf. Before quantize_int8."""
    if not 0 < k <= model.args.vocab_size:
        raise EngineError(f"draft vocabulary subset must be in 1..{model.args.vocab_size}, got {k}")
    if not isinstance(model.lm_head, nn.Linear):
        raise EngineError("restrict the draft vocabulary before quantizing it")
    model.lm_head.weight = nn.Parameter(model.lm_head.weight[:k].detach(), requires_grad=False)
    model.lm_head.out_features = k
    return model
