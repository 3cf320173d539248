"""Cheaper drafts that keep the output exact.

The draft only proposes; the target decides. So the draft may be approximated in any way:
the output stays the target's, only acceptance (and so speed) can change.

- `quantize_int8(model)`: every linear (decoder layers and lm_head) gets an int8 copy of its
  weight (per-output-channel scales) for forwards of at most INT8_MAX_ROWS rows, the draft
  levels: there the fused int8 kernel reads half the bytes. Longer forwards (prefill, wide
  levels) keep the bf16 weight, because on CPU that kernel slows down with every extra row
  (measured on the 0.5B draft's lm_head: 13.4 ms int8 vs 19.6 ms bf16 at 4 rows, 48.8 vs
  23.6 ms at 16 rows, 424 vs 107 ms at 128 rows).
- `restrict_vocab(model, k)`: the lm_head computes logits for token ids < k only (BPE
  vocabularies are ordered by merge rank, so low ids are the frequent tokens); the other
  logits are -inf, so the draft never proposes them. For the 0.5B Qwen2.5 draft the full
  lm_head is 136M of its 494M parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .engine import EngineError
from .model import Transformer


INT8_MAX_ROWS = 4


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0  # [out, 1]
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale.squeeze(1).to(linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]  # static under torch.compile: one branch per graph
        if x.device.type != "cpu" or rows > INT8_MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, -1), self.qweight, self.scale)
        y = y.view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def quantize_int8(model: Transformer) -> Transformer:
    """Give every nn.Linear of the decoder layers and the lm_head an int8 copy (in place)."""
    for parent in [model, *model.model.layers.modules()]:
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    return model


def cheapen(draft: Transformer, int8: bool | None = None, vocab: int = 0) -> Transformer:
    """The draft made cheaper without changing the output: ids below `vocab` only (0: all), and
    int8 copies (None: on CPU only, where the fused kernel exists)."""
    if vocab:
        restrict_vocab(draft, vocab)
    if int8 if int8 is not None else draft.lm_head.weight.device.type == "cpu":
        quantize_int8(draft)
    return draft


def restrict_vocab(model: Transformer, k: int) -> Transformer:
    """Compute logits only for token ids < k (in place); the rest are -inf. Before quantize_int8."""
    if not 0 < k <= model.args.vocab_size:
        raise EngineError(f"draft vocabulary subset must be in 1..{model.args.vocab_size}, got {k}")
    if isinstance(model.lm_head, Int8Linear):
        raise EngineError("restrict the draft vocabulary before quantizing it")
    model.lm_head.weight = nn.Parameter(model.lm_head.weight[:k].detach(), requires_grad=False)
    model.lm_head.out_features = k
    return model
