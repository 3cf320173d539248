"""Logits -> probabilities and draws, shared by plain decoding and every speculative path.

The target's distribution is always processed by `probs` with the user's temperature,
top-k and top-p (in that order, as Hugging Face applies them); speculative decoding is
lossless with respect to exactly this distribution. Draws take their randomness as tensors
of uniforms or come from a torch.Generator, never from a host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import SamplingError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    def __post_init__(self):
        if not self.temperature >= 0:
            raise SamplingError(f"temperature must be >= 0, got {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise SamplingError(f"top-k must be an integer >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """logits [..., V] -> probabilities [..., V] after temperature, top-k and top-p (fp32)."""
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    p = logits.softmax(-1)
    if s.top_p < 1:
        sorted_p, order = p.sort(-1, descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= s.top_p  # mass before a token already reaches top_p
        p = p.masked_fill(drop.scatter(-1, order, drop), 0.0)
        p = p / p.sum(-1, keepdim=True)
    return p


def draw(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One draw per row of p [..., V] by inverse CDF with uniforms u [...] in [0, 1): token i iff
    cdf[i-1] <= u * total < cdf[i], so a token of probability 0 is never drawn, even at u = 0."""
    cdf = p.cumsum(-1)
    idx = (cdf <= u[..., None] * cdf[..., -1:]).sum(-1)
    return idx.clamp(max=p.shape[-1] - 1)


def draw_without_replacement(p: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k ordered draws without replacement per row of p [R, V] -> [R, k] (exponential race)."""
    e = torch.empty_like(p).exponential_(generator=generator)
    return (p / e).topk(k, dim=-1).indices
