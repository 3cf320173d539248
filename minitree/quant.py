"""Cheaper drafts that keep the output exact.

The draft only proposes; the target decides. So the draft may be approximated in any way:
the output stays the target's, only acceptance (and so speed) can change.

- `quantize_int8(model)`: int8 weight-only linears in the decoder layers (per-output-channel
  scales), dequantized on the fly: about half the weight bytes read per token.
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


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0  # [out, 1]
        self.register_buffer("weight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale.squeeze(1).to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":  # a fused int8 kernel; the generic form below reads more bytes
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scale)
            y = y.view(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias


def quantize_int8(model: Transformer) -> Transformer:
    """Replace every nn.Linear inside the decoder layers by an Int8Linear (in place)."""
    for layer in model.model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child))
    return model


def restrict_vocab(model: Transformer, k: int) -> Transformer:
    """Compute logits only for token ids < k (in place); the rest are -inf."""
    if not 0 < k <= model.args.vocab_size:
        raise EngineError(f"draft vocabulary subset must be in 1..{model.args.vocab_size}, got {k}")
    model.lm_head.weight = nn.Parameter(model.lm_head.weight[:k].detach(), requires_grad=False)
    model.lm_head.out_features = k
    return model
