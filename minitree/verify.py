"""Step 2: the target scores every node of this step's tree in one forward pass.

Node i sits at cache slot base + i and RoPE position base + depth(i), and sees the committed
prefix plus itself and its ancestors (attention.py).
"""

from __future__ import annotations

import torch

from .tree import StepTree


def verify(run, tree: StepTree, base: torch.Tensor) -> torch.Tensor:
    """-> target logits [n, V] at every node. `run` is the target's runner (runner.py)."""
    nodes = torch.arange(tree.tokens.numel(), device=tree.tokens.device)
    return run(tree.tokens.clamp(min=0), positions=base + tree.depth, slots=base + nodes, q_node=nodes, base=base,
               anc_bits=tree.anc_bits)
