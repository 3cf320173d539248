"""Step 1: the draft grows the tree, level by level.

Level 0 runs the draft on a two-token window [committed[L-2], root]: the first token is the
last accepted node of the previous step, which the draft has not cached when it was a leaf
(recomputing it otherwise is harmless). Level d > 0 runs the draft on the nodes at depth d
that have children, under the tree mask. At each level every expanded node gets its
children: the top-k draft tokens (greedy, or `one_hot` sampling) or k draws without
replacement from the draft distribution, in rank order.

Early stop (`cutoff` > 0): a node's confidence is the product of the draft probabilities
along its path. Before each level, if no node of the frontier reaches `cutoff`, drafting
stops; the deeper nodes keep the token UNDRAFTED and are never accepted (verify still
scores them, so the target's graph keeps one shape). A level costs a draft forward, so
unlikely continuations are not drafted at all. This is one host read per level.
"""

from __future__ import annotations

import torch

from .sampling import Sampling, draw_without_replacement, probs
from .tree import Tree

UNDRAFTED = -1  # token of a node the draft did not reach


def draft_tree(run, tree: Tree, seq: torch.Tensor, L: torch.Tensor, sampling: Sampling, one_hot: bool,
               generator: torch.Generator | None, cutoff: float = 0.0):
    """-> node tokens [n] (node 0 = root = seq[L-1]; UNDRAFTED below an early stop), the draft
    distributions q [n, V] the children were chosen from (None when greedy), and the number
    of draft forwards run. `run` is the draft's masked forward."""
    base = L - 1
    window = torch.stack([(L - 2).clamp(min=0), base])  # slots (= positions) of the catch-up window
    tokens = torch.full((tree.n,), UNDRAFTED, dtype=torch.long, device=seq.device)
    tokens[0] = seq[base]
    conf = torch.ones(tree.n, device=seq.device)
    q = None
    logits = run(seq[window], window, window, torch.zeros_like(window), base, tree.anc_bits)[1:]
    K = tree.children.shape[1]
    for d, nodes in enumerate(tree.expand):
        if d > 0:
            if cutoff > 0 and float(conf[nodes].max()) < cutoff:
                return tokens, q, d
            logits = run(tokens[nodes], base + tree.depth[nodes], base + nodes, nodes, base, tree.anc_bits)
        if sampling.greedy:
            picks = logits.topk(K, dim=-1).indices
            p = logits.softmax(-1) if cutoff > 0 else None  # only the confidences need it
        else:
            p = probs(logits, sampling)
            q = p.new_zeros(tree.n, p.shape[-1]) if q is None else q
            q[nodes] = p
            picks = p.topk(K, dim=-1).indices if one_hot else draw_without_replacement(p, K, generator)
        children, flat = tree.grow[d]
        tokens[children] = picks.flatten()[flat]
        if cutoff > 0:
            conf[children] = conf[nodes][flat // K] * p.gather(1, picks).flatten()[flat]
    return tokens, q, len(tree.expand)
