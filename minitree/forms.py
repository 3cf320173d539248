"""Linear layer forms: the ways one linear layer's weights can be held and multiplied.

A model's linear layers hold their weights as loaded: float (`nn.Linear`) or quantized (a
`QuantLinear`: the weight-only int8/int4 forms `quantize` makes, or a GGUF file's own blocks,
gguf.py). A runner serves every linear layer through a `FormLinear`, which may hold copies of
the weights in other forms, each used by the forwards of some row counts: the plan measures
which kernel setting is cheapest for which row count (costs.py). The copies belong to the
runner; the model is never changed.

Kernel settings, and the form each layer uses for them:

  native  the weights as loaded: a float weight through oneDNN, or the quantized layer's kernel (a
          GGUF file's weights: minitree's integer kernel, one rounding for every row count)
  gemv    a float weight with oneDNN off (torch's matrix-vector kernels, the fast one-row kernel
          on some CPUs)
  packed  the float weight packed once in oneDNN's blocked layout: oneDNN otherwise reorders a
          plain weight at every call
  fp32    an fp32 copy, packed where oneDNN packs fp32: where bf16 is emulated (AVX2), many rows
          cost far less in fp32; the same weights at higher precision, the output cast back
  int8    lossy: weight-only int8, one scale per output channel (drafts only: a draft proposes)
  int4    lossy: weight-only int4, a scale and a zero per 32 input features (drafts only)
  tiles   a GGUF layer's own weights on the integer kernel's AMX-INT8 path (CPUs with AMX; Q4_K on
          tiles, other types on AVX512-VNNI): the same bits as its vector path, which serves "native";
          the plan measures which is cheaper per row count (on the AMX Xeon: 16 rows and more)
  q4      lossy: the weights requantized to GGUF's Q4_1 (min-max levels per 32 inputs, fp16 scale and
          minimum) on minitree's integer kernel (drafts only; inputs in multiples of 32, else int4)

A quantized model (a GGUF file, `--quantize`) has no float forms: its integer kernel is exact and
rounds alike at every row count, which a float copy would not; a quantized draft may still take the
lossy forms. Among float forms, kernels and precisions differ, so bf16 rounds differently from one
to another (README, "What is exact").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import EngineError, LoadError
from .kernels import kernels, source_version
from .machine import packs

INT4_GROUP = 32  # int4: one scale and zero point per 32 input features
PACK_ROWS = 16  # the batch size oneDNN packs weights for: near its best from 2 to 128 rows (1: only 1 row)
LOSSY = ("int8", "int4", "q4")


# ----------------------------------------------------------------------------------------
# Kernels

def int8_weights(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> int8 weights [out, in] and per-output-channel scales [out] (in the weight's dtype)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    return torch.round(w / scale).to(torch.int8), scale.squeeze(1).to(weight.dtype)


def int8_linear(x, qweight, scale, bias):
    rows = x.numel() // x.shape[-1]
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, -1), qweight, scale).view(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def int4_pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype):
    """Torch's CPU int4 layout of w = (q - 8) * scale + zero, q [out, in] in 0..15, scale and zero
    [out, in / INT4_GROUP] -> (packed weights, scales and zeros [in / group, out, 2] in `dtype`)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
    return packed, torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(dtype)


def int4_weights(weight: torch.Tensor):
    """Min-max int4 quantization of a float weight in groups of INT4_GROUP -> int4_pack's pair."""
    out_f, in_f = weight.shape
    w = weight.detach().float().view(out_f, in_f // INT4_GROUP, INT4_GROUP)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).view(out_f, in_f)
    return int4_pack(q, scale, lo + 8 * scale, weight.dtype)


def int4_linear(x, qweight, scales_zeros, bias):
    rows = x.numel() // x.shape[-1]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(rows, -1), qweight, INT4_GROUP, scales_zeros)
    y = y.view(*x.shape[:-1], -1)
    return y if bias is None else y + bias


@torch.library.custom_op("minitree::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x @ W^T with W held in oneDNN's blocked layout (an opaque tensor, so an op of its own in
    compiled graphs)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


@packed_linear.register_fake
def _(x, packed):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


GGML_TYPES = dict(Q4_0=2, Q4_1=3, Q5_0=6, Q5_1=7, Q8_0=8, Q4_K=12, Q6_K=14)  # ggml's numbers of the kernel's types
Q4_1 = GGML_TYPES["Q4_1"]  # the q4 form's type
PATHS = ("portable", "avx2", "avx_vnni", "avx512_vnni", "amx")  # the integer kernel's paths (csrc/integer.cpp)
AMX = PATHS.index("amx")


def q4_runs() -> bool:
    """Whether the q4 form runs here (minitree's kernels, built with the machine's C++ compiler;
    without one, the other lossy forms serve)."""
    try:
        kernels()
        return True
    except LoadError:
        return False


def packed_linear_bias(x, packed, bias):
    y = packed_linear(x, packed)
    return y if bias is None else y + bias


# ----------------------------------------------------------------------------------------
# Quantized layers: what a quantized model holds instead of nn.Linear

class QuantLinear(nn.Module):
    """A linear layer whose weights are held quantized, used at every row count by its own kernel
    (`forward`), and dequantized exactly (in fp32) on request. `kind` names the format; `code` the
    kernel's version, where it has one of its own (costs measured with another are measured again)."""
    kind: str
    code: str = ""
    dtype: torch.dtype  # the activations' dtype
    in_features: int
    out_features: int
    bias: torch.Tensor | None

    def dequantize(self) -> torch.Tensor:
        """The weights [out, in] in fp32."""
        raise NotImplementedError

    def first_outputs(self, k: int) -> "QuantLinear":
        """The layer of its first k outputs only, where its format keeps output rows apart."""
        raise EngineError(f"a draft vocabulary subset needs a float or GGUF lm_head, not {self.kind}")


class Int8Linear(QuantLinear):
    """Weight-only int8 per output channel (torch's CPU kernel), from a float layer."""
    kind = "int8"

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.bias, self.dtype = linear.bias, linear.weight.dtype
        self.out_features, self.in_features = linear.weight.shape
        qweight, scale = int8_weights(linear.weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.scale, self.bias)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]


class Int4Linear(QuantLinear):
    """Weight-only int4, asymmetric per group of INT4_GROUP input features (torch's CPU kernel)."""
    kind = "int4"

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.in_features % INT4_GROUP:
            raise EngineError(f"int4 needs input sizes divisible by {INT4_GROUP}, got {linear.in_features}")
        self.bias, self.dtype = linear.bias, linear.weight.dtype
        self.out_features, self.in_features = linear.weight.shape
        qweight, scales_zeros = int4_weights(linear.weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales_zeros", scales_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.qweight, self.scales_zeros, self.bias)

    def dequantize(self) -> torch.Tensor:
        """The kernel's own reading of its packed layout, in fp32: its products with the identity."""
        sz, eye = self.scales_zeros.float(), torch.eye(self.in_features, device=self.qweight.device)
        cols = [int4_linear(eye[i:i + 512], self.qweight, sz, None) for i in range(0, self.in_features, 512)]
        return torch.cat(cols).T.contiguous()


class GGUFLinear(QuantLinear):
    """A linear layer on a GGUF tensor's weights of `kind` (a ggml type), held as the integer kernel's
    groups of 16 outputs (`groups`: the file's blocks regrouped, the same bytes per weight)."""

    def __init__(self, groups: torch.Tensor, kind: str, in_features: int, out_features: int,
                 bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.kind, self.qtype, self.dtype = f"gguf-{kind}", GGML_TYPES[kind], dtype
        self.code = source_version()
        self.out_features, self.in_features = out_features, in_features
        self.register_buffer("groups", groups)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.mm = kernels().int_mm

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, kind: str, in_features: int, bias: torch.Tensor | None,
                    dtype: torch.dtype) -> GGUFLinear:
        """From the file's blocks [out, bytes per row]."""
        groups = kernels().int_repack(blocks, GGML_TYPES[kind], in_features)
        return cls(groups, kind, in_features, blocks.shape[0], bias, dtype)

    def forward(self, x: torch.Tensor, path: int = -1) -> torch.Tensor:
        """x @ W^T (+ bias); `path`: an instruction-set path of the kernel (PATHS), -1 for its own choice.
        Every path gives the same bits."""
        rows = x.numel() // x.shape[-1]
        y = self.mm(x.reshape(rows, -1), self.groups, self.qtype, self.out_features, path).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def dequantize(self, outputs: torch.Tensor | None = None) -> torch.Tensor:
        """Its weights [out, in] in fp32, exactly as the file defines them; or only those of `outputs` [n]."""
        outputs = torch.arange(self.out_features) if outputs is None else outputs
        return kernels().int_dequantize(self.groups, self.qtype, self.in_features, outputs)

    @classmethod
    def quantized(cls, linear: nn.Linear, kind: str) -> GGUFLinear:
        """A float layer's weights quantized to `kind` (Q8_0 or Q4_1: ggml's reference quantizers)."""
        w = linear.weight.detach()
        blocks = kernels().int_quantize(w, GGML_TYPES[kind])
        return cls.from_blocks(blocks, kind, w.shape[1], linear.bias, w.dtype)

    def first_outputs(self, k: int) -> GGUFLinear:
        """Its first k outputs (the groups that hold them; the last one's extra outputs are computed, then dropped)."""
        bias = None if self.bias is None else self.bias[:k].detach()
        return GGUFLinear(self.groups[: -(-k // 16)].clone(), self.kind.removeprefix("gguf-"), self.in_features, k,
                          bias, self.dtype)


class GGUFEmbedding(nn.Module):
    """A token embedding held as a GGUF tensor's blocks (`table`: a GGUFLinear whose outputs are the
    vocabulary; a tied model's lm_head is that same layer): a lookup dequantizes only the rows it reads,
    as the file defines them, in the activations' dtype. The table is never held in floats."""

    def __init__(self, table: GGUFLinear):
        super().__init__()
        self.table = table

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.dequantize(tokens).to(self.table.dtype)


# ----------------------------------------------------------------------------------------
# A runner's layer: the model's layer, plus copies of its weights in other forms

class FormLinear(nn.Module):
    """The model's linear layer (`source`, shared, never written) served in the form each row count
    was given (`serve`); the copies are made when first needed."""

    def __init__(self, source: nn.Linear | QuantLinear):
        super().__init__()
        self.source, self.bias = source, source.bias
        self.in_features, self.out_features = source.in_features, source.out_features
        self.quantized = isinstance(source, QuantLinear)
        self.dtype = source.dtype if self.quantized else source.weight.dtype  # the activations'
        self.form_of: dict[int, str] = {}  # rows -> form; rows not listed: "native"

    def form(self, setting: str) -> str:
        """The form this layer uses for a kernel setting (module docstring)."""
        if setting == "gemv":
            return "native"
        if setting == "tiles":
            return "tiles" if self.quantized and hasattr(self.source, "groups") else "native"
        if setting == "q4":
            return "q4" if self.q4_fits else "int4" if self.in_features % INT4_GROUP == 0 else "native"
        return setting

    @property
    def q4_fits(self) -> bool:
        return self.in_features % 32 == 0

    def serve(self, rows: dict[str, frozenset]) -> None:
        """Serve the forwards of each row count in `rows[setting]` in that setting's form."""
        self.form_of = {r: self.form(s) for s, rs in rows.items() for r in rs if self.form(s) != "native"}
        for form in set(self.form_of.values()) - set(self.copies()):
            self.make(form)

    def copies(self) -> dict[str, list[torch.Tensor]]:
        """The copies made so far: form -> its tensors."""
        names = dict(packed=("packed",), fp32=("weight32", "bias32"), int8=("qweight", "scale"),
                     int4=("qweight4", "scales_zeros"), q4=("q4",))
        return {form: [getattr(self, n) for n in ns if getattr(self, n, None) is not None]
                for form, ns in names.items() if hasattr(self, ns[0])}

    def float_weight(self) -> torch.Tensor:
        """The weights in the activations' dtype: the source's own, or dequantized from it."""
        return self.source.dequantize().to(self.dtype) if self.quantized else self.source.weight.detach()

    def make(self, form: str) -> None:
        if form == "packed":  # an opaque oneDNN tensor: an attribute, not a buffer
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.float_weight(), PACK_ROWS)
        elif form == "fp32":
            w32 = self.source.dequantize() if self.quantized else self.source.weight.detach().float()
            self.packed32 = packs(torch.float32)  # a Python bool: static when compiled
            self.weight32 = torch.ops.mkldnn._reorder_linear_weight(w32, PACK_ROWS) if self.packed32 else w32
            self.bias32 = None if self.bias is None else self.bias.detach().float()
        elif form == "int8":
            self.qweight, self.scale = int8_weights(self.float_weight())
        elif form == "int4":
            self.qweight4, self.scales_zeros = int4_weights(self.float_weight())
        elif form == "tiles":
            pass  # the source's own groups
        elif form == "q4":
            w = self.source.dequantize() if self.quantized else self.source.weight.detach()
            self.q4 = kernels().int_repack(kernels().int_quantize(w, Q4_1), Q4_1, self.in_features)
            self.int_mm = kernels().int_mm
        else:
            raise ValueError(f"unknown weight form {form!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        form = self.form_of.get(x.numel() // x.shape[-1], "native")  # rows are static when compiled
        if form == "native":
            return self.source(x)
        if form == "packed":
            return packed_linear_bias(x, self.packed, self.bias)
        if form == "fp32":
            linear = packed_linear_bias if self.packed32 else F.linear
            return linear(x.float(), self.weight32, self.bias32).to(x.dtype)
        if form == "tiles":
            return self.source(x, AMX)
        if form == "q4":
            y = self.int_mm(x.reshape(-1, x.shape[-1]), self.q4, Q4_1, self.out_features).view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        if form == "int8":
            return int8_linear(x, self.qweight, self.scale, self.bias)
        return int4_linear(x, self.qweight4, self.scales_zeros, self.bias)


# ----------------------------------------------------------------------------------------
# Whole-model transformations (in place): another model, or a cheaper draft

def replace_linears(model: nn.Module, make) -> nn.Module:
    """Replace every linear layer of the decoder layers and the lm_head by make(layer), in place."""
    for parent in [model, *model.model.layers.modules()]:
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Linear, QuantLinear)):
                setattr(parent, name, make(child))
    return model


QUANTIZE = {"int8": Int8Linear, "int4": Int4Linear, "q8_0": lambda m: GGUFLinear.quantized(m, "Q8_0"),
            "q4_1": lambda m: GGUFLinear.quantized(m, "Q4_1")}


def quantize(model: nn.Module, kind: str) -> nn.Module:
    """Replace every float linear by its weight-only `kind` form and drop the float weights (in place):
    another model, whose output speculative decoding then keeps. "int8", "int4": torch's CPU kernels;
    "q8_0", "q4_1": GGUF blocks on minitree's integer kernel (exact at every row count, README)."""
    if kind not in QUANTIZE:
        raise EngineError(f"quantization must be one of {', '.join(QUANTIZE)}, got {kind!r}")
    if quant_kinds(model):
        raise EngineError(f"--quantize {kind} makes a quantized model of a float one; this one holds "
                          f"{', '.join(quant_kinds(model))} weights already (load it with --dequantize)")
    if model.lm_head.weight.device.type != "cpu":
        raise EngineError(f"--quantize {kind} uses torch's CPU kernels; this model is on "
                          f"{model.lm_head.weight.device.type}")
    return replace_linears(model, QUANTIZE[kind])


def restrict_vocab(model: nn.Module, k: int) -> nn.Module:
    """Compute logits only for token ids < k (in place); the rest are -inf (the runner pads them).
    For drafts: BPE vocabularies are ordered by merge rank, so low ids are the frequent tokens."""
    if not 0 < k <= model.args.vocab_size:
        raise EngineError(f"draft vocabulary subset must be in 1..{model.args.vocab_size}, got {k}")
    if isinstance(model.lm_head, QuantLinear):
        model.lm_head = model.lm_head.first_outputs(k)
    else:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight[:k].detach(), requires_grad=False)
        model.lm_head.out_features = k
    return model


def quant_kinds(model: nn.Module, code: bool = False) -> list[str]:
    """The quantized formats a model's linear layers hold (empty for a float model); with `code`,
    each with its kernel's version."""
    return sorted({m.kind + (f"@{m.code}" if code and m.code else "") for m in model.modules()
                   if isinstance(m, QuantLinear)})
