"""Step 1: the draft grows the tree, level by level.

Level 0 runs the draft on a two-token window [committed[L-2], root]: the first token is the
last accepted node of the previous step, which the draft has not cached when it was a leaf
(recomputing it otherwise is harmless). Level d > 0 runs the draft on the nodes at depth d
that have children, under the tree mask. At each level every expanded node gets its
children: the top-k draft tokens (greedy, or `one_hot` sampling) or k draws without
replacement from the draft distribution, in rank order.
"""

from __future__ import annotations

import torch

from .sampling import Sampling, draw_without_replacement, probs
from .tree import Tree


def draft_tree(run, tree: Tree, seq: torch.Tensor, L: torch.Tensor, sampling: Sampling, one_hot: bool,
               generator: torch.Generator | None):
    """-> node tokens [n] (node 0 = root = seq[L-1]) and the draft distributions q [n, V]
    the children were chosen from (None when greedy). `run` is the draft's masked forward."""
    base = L - 1
    window = torch.stack([(L - 2).clamp(min=0), base])  # slots (= positions) of the catch-up window
    tokens = seq[base].repeat(tree.n)
    q = None
    logits = run(seq[window], window, window, torch.zeros_like(window), base, tree.anc_bits)[1:]
    K = tree.children.shape[1]
    for d, nodes in enumerate(tree.expand):
        if d > 0:
            logits = run(tokens[nodes], base + tree.depth[nodes], base + nodes, nodes, base, tree.anc_bits)
        if sampling.greedy:
            picks = logits.topk(K, dim=-1).indices
        else:
            p = probs(logits, sampling)
            q = p.new_zeros(tree.n, p.shape[-1]) if q is None else q
            q[nodes] = p
            picks = p.topk(K, dim=-1).indices if one_hot else draw_without_replacement(p, K, generator)
        children, flat = tree.grow[d]
        tokens[children] = picks.flatten()[flat]
    return tokens, q
