"""Step 1: the draft grows this step's tree, level by level.

Level 0 runs the draft on a two-token window [committed[L-2], root]: the first token is the
last accepted node of the previous step, which the draft has not cached when it was not
expanded (recomputing it otherwise is harmless). Level d > 0 runs the draft on that level's
frontier (chosen by the tree spec: fixed for a static tree, the most confident nodes for a
dynamic one) under the tree mask, at the draft's own cache rows. Every frontier node gets k
children: the draft's top-k tokens (greedy, or `one_hot` sampling) or k draws without
replacement from its distribution, in rank order. Then the spec selects the nodes to verify.

Confidence: a node's is the product of the draft probabilities along its path. Early stop
(`cutoff` > 0): before each level, if no frontier node reaches `cutoff`, drafting stops; the
deeper nodes keep the token UNDRAFTED and are never accepted (verify still scores them, so
the target's graph keeps one shape). That costs one host read per level; with `masked` (on a
GPU, where a step is one CUDA graph) every level is drafted and the levels after a stop are
masked as UNDRAFTED on the device instead: the same tree, no host read.
"""

from __future__ import annotations

import torch

from .kernels import top_k
from .sampling import Sampling, draw_without_replacement, probs
from .tree import UNDRAFTED, TreeSpec


def draft_tree(run, spec: TreeSpec, seq: torch.Tensor, L: torch.Tensor, sampling: Sampling, one_hot: bool,
               generator: torch.Generator | None, cutoff: float = 0.0, masked: bool = False):
    """-> this step's StepTree, the draft distributions q [rows, V] each frontier node's children
    were chosen from (None when greedy), and the number of draft forwards run.
    `run` is the draft's runner (runner.py)."""
    base, dev, K = L - 1, seq.device, spec.k
    M = spec.n_candidates
    tokens = torch.full((M,), UNDRAFTED, dtype=torch.long, device=dev)
    tokens[:1] = seq[base.view(1)]  # indexing with a 0-dim tensor would read it on the host
    conf = torch.full((M,), -1.0, device=dev)  # below every drafted node's
    conf[:1].fill_(1.0)  # a scalar assigned would be copied from the host
    parent = torch.zeros(M, dtype=torch.long, device=dev)  # undrafted candidates hang off the root
    row = torch.zeros(M, dtype=torch.long, device=dev)  # the draft's cache row of expanded candidates
    bits = torch.ones(spec.n_rows, dtype=torch.long, device=dev)  # ancestor bits of the draft's rows
    q = None
    window = torch.stack([(L - 2).clamp(min=0), base])  # slots (= positions) of the catch-up window
    logits = run(seq[window], positions=window, slots=window, q_node=torch.zeros_like(window), base=base,
                 anc_bits=bits)[1:]
    frontier = torch.zeros(1, dtype=torch.long, device=dev)
    stopped = torch.zeros((), dtype=torch.bool, device=dev)
    levels = 0
    for d in range(spec.max_depth):
        rows = spec.row_offset[d] + torch.arange(spec.widths[d], device=dev)
        if d > 0:
            frontier = spec.frontier(d, conf)
            if cutoff > 0 and masked:
                stopped = stopped | (conf[frontier].max() < cutoff)
            elif cutoff > 0 and float(conf[frontier].max()) < cutoff:
                break
            row[frontier] = rows
            bits[rows] = bits[row[parent[frontier]]] | (1 << rows)
            logits = run(tokens[frontier].clamp(min=0), positions=base + spec.cand_depth[frontier], slots=base + rows,
                         q_node=rows, base=base, anc_bits=bits)
        levels += 1
        p = logits.softmax(-1) if sampling.greedy else probs(logits, sampling)
        if not sampling.greedy:
            q = p.new_zeros(spec.n_rows, p.shape[-1]) if q is None else q
            q[rows] = p
        picks = top_k(p, K) if sampling.greedy or one_hot else draw_without_replacement(p, K, generator)
        children = spec.cand_offset[d + 1] + torch.arange(spec.widths[d] * K, device=dev)
        tokens[children] = torch.where(stopped, UNDRAFTED, picks.flatten())
        conf[children] = torch.where(stopped, -1.0, (conf[frontier][:, None] * p.gather(1, picks)).flatten())
        parent[children] = frontier.repeat_interleave(K)
    return spec.select(tokens, conf, parent, row), q, levels
