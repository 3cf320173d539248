"""The references exactness tests compare with: plain decoding, and a plain causal forward."""

from __future__ import annotations

import torch

import minitree
from minitree.attention import TreeMask


def plain(model, prompt: list[int], n: int, max_seq_len: int = 512, **kw) -> list[int]:
    """Plain greedy (or seeded) decoding of `model`, eager, dense SDPA masks: the reference."""
    engine = minitree.Engine(model, compile=False, attention="sdpa", max_seq_len=max_seq_len)
    return engine.generate(prompt, n, **kw).tokens


def causal(model, flex: bool = False, cache_len: int = 256):
    """forward(ids, start=0) -> fp32 logits of ids at slots start.., through a runner of its own whose
    cache keeps what earlier calls wrote (eager; every row in the weights' own form)."""
    runner = minitree.Runner(model, compile=False, attention="flex" if flex else "sdpa", plan="none",
                             cache_len=cache_len)

    def forward(ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        slots = torch.arange(start, start + len(ids))
        mask = TreeMask.causal(len(ids), "cpu")
        with torch.inference_mode():
            return runner(torch.as_tensor(ids), slots, slots, mask.q_node, mask.base, mask.anc_bits)

    return forward
