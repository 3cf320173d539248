"""Step 2: the target scores every node of the tree in one forward pass.

Node i sits at cache slot base + i and RoPE position base + depth(i), and sees the committed
prefix plus itself and its ancestors (attention.py).
"""

from __future__ import annotations

import torch

from .tree import Tree


def verify(run, tree: Tree, tokens: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """tokens [n] -> target logits [n, V]. `run` is the target's masked forward."""
    nodes = torch.arange(tree.n, device=tokens.device)
    return run(tokens, base + tree.depth, base + nodes, nodes, base, tree.anc_bits)
