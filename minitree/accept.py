"""Step 3: which drafted nodes does the target agree with? -> accepted path + bonus token.

Both rules walk the tree by parent pointers (never a flat prefix walk, which would turn a
tree into a chain) and are sync-free: they return tensors, and index with tensors of one
element, never with 0-dim ones (Python indexing reads those on the host).

    path   [D+1]  node indices root -> last accepted node, padded by repeating the last one
    n_acc  []     number of accepted draft nodes (0..D); the step commits n_acc + 1 tokens
    bonus  []     the target's token after the last accepted node
"""

from __future__ import annotations

import torch

from .kernels import top_k
from .sampling import draw
from .tree import StepTree


def at(t: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """t[i] for a 0-dim index tensor i, on the device (t[i] would read i on the host)."""
    return t.index_select(0, i.view(1))[0]


def accept_greedy(tree: StepTree, target_logits: torch.Tensor):
    """target_logits [n, V]: a node is accepted iff it and each ancestor is the target's argmax
    at its parent; the deepest accepted node ends the path."""
    choice = top_k(target_logits, 1)[:, 0]  # [n]: argmax, the first largest
    correct = (tree.tokens == choice[tree.parents]) | (tree.depth == 0)  # the root is given
    accepted = correct[tree.paths].all(1)  # all ancestors (and self) correct
    last = (tree.depth * accepted).argmax()  # siblings carry distinct tokens: one path at most
    return at(tree.paths, last), at(tree.depth, last), at(choice, last)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(p - q, 0)): what is left of p once q's proposal was rejected. q a mask of tokens
    (bool [V]): what is left once drafts certain of each of them were rejected, norm(p without them)."""
    r = p.masked_fill(q, 0) if q.dtype == torch.bool else (p - q).clamp(min=0)
    return r / r.sum().clamp(min=1e-30)


def accept_sample(tree: StepTree, p: torch.Tensor, q: torch.Tensor, u: torch.Tensor, one_hot_draft: bool):
    """Recursive rejection sampling over siblings, without replacement.

    p [n, V]: target probabilities at every node; q [rows, V]: the draft distribution the
    children of each expanded node were drawn from (in rank order, without replacement), at
    the node's draft row; u [D * K + 1]: uniforms. At a node, child i with token x is accepted with probability
    min(1, p_i(x) / q_i(x)); on rejection p_{i+1} = norm(max(p_i - q_i, 0)) and q_{i+1} =
    norm(q_i without x). With one_hot_draft (children are the draft's top-k, not draws)
    q_i is one-hot at x: accept with probability p_i(x), then p_{i+1} = norm(p_i without x); so a
    level is decided at once: child i is accepted iff its elder siblings were rejected and
    u_i * (mass of p left after them) < p(x_i).
    If no child is accepted, the bonus is drawn from the residual p; after a leaf, from p.
    Then the output is distributed exactly as p, whatever q is.
    """
    K, tokens = tree.children.shape[1], tree.tokens
    u_accept, u_bonus = u[:-1].view(max(tree.max_depth, 1), K), u[-1]
    cur = torch.zeros((), dtype=torch.long, device=p.device)
    alive = torch.ones((), dtype=torch.bool, device=p.device)
    n_acc = torch.zeros((), dtype=torch.long, device=p.device)
    stop_p = p[0]
    for d in range(tree.max_depth):
        res, children = at(p, cur), at(tree.children, cur)  # [V], [K]
        x = tokens.index_select(0, children.clamp(min=0))  # UNDRAFTED (< 0) below an early stop: no child
        tried = alive & (children >= 0) & (x >= 0)  # [K]
        x = x.clamp(min=0)
        if one_hot_draft:
            px = res.index_select(0, x) * tried  # [K]
            left = (res.sum() - (px.cumsum(0) - px)).clamp(min=0)  # what the elder siblings, rejected, leave
            ok = tried & (u_accept[d] * left < px)
            moved, nxt = ok.any(), at(children, ok.long().argmax())  # the first accepted child
            gone = torch.zeros_like(res).index_add_(0, x, tried.to(res.dtype)) > 0  # the tried children's tokens
            res = residual(res, gone)  # read only when none was accepted
        else:  # drawn children: one at a time, q losing each rejected token
            qq, nxt = at(q, at(tree.draft_row, cur)), cur
            moved = torch.zeros((), dtype=torch.bool, device=p.device)
            for r in range(K):
                qx, px, valid = at(qq, x[r]), at(res, x[r]), tried[r] & ~moved
                ok = valid & (qx > 0) & (u_accept[d, r] * qx < px)
                rejected = valid & ~ok
                res = torch.where(rejected, residual(res, qq), res)
                q_next = qq.index_fill(0, x[r].view(1), 0)  # the next draw excludes x
                qq = torch.where(rejected, q_next / q_next.sum().clamp(min=1e-30), qq)
                moved = moved | ok
                nxt = torch.where(ok, children[r], nxt)
        stop_p = torch.where(alive & ~moved, res, stop_p)
        alive = alive & moved
        cur = torch.where(moved, nxt, cur)
        n_acc = n_acc + moved.long()
    stop_p = torch.where(alive, at(p, cur), stop_p)
    return at(tree.paths, cur), n_acc, draw(stop_p, u_bonus)
