"""The step's pieces on hand-built trees and logits: accept_greedy and accept_sample walk the tree by
parent pointers and take exactly the rule's decisions; compact moves the accepted path's cache
slots; the engine refuses a step whose predecessor's count was never read."""

import math

import pytest
import torch

import minitree
from minitree.accept import accept_greedy, accept_sample
from minitree.kv import compact
from minitree.tree import StepTree

V = 16
# root (token 10) -> node 1 (11), node 2 (12); node 1 -> node 3 (13); node 2 -> node 4 (14)
TREE = StepTree.build(tokens=torch.tensor([10, 11, 12, 13, 14]), parents=torch.tensor([0, 0, 0, 1, 2]),
                      depth=torch.tensor([0, 1, 1, 2, 2]), rank=torch.tensor([0, 0, 1, 0, 0]),
                      conf=torch.ones(5), draft_row=torch.tensor([0, 1, 2, 0, 0]), max_depth=2, k=2)


def one_hot(tokens: list[int]) -> torch.Tensor:
    """[len, V]: row i certain of tokens[i]."""
    return torch.nn.functional.one_hot(torch.tensor(tokens), V).float()


def greedy(choices: list[int]) -> tuple[list[int], int, int]:
    path, n_acc, bonus = accept_greedy(TREE, one_hot(choices))
    return path.tolist(), int(n_acc), int(bonus)


def test_greedy_follows_the_target_down_the_tree():
    # the target's argmax at root, node 1, node 2, node 3, node 4
    assert greedy([12, 0, 14, 0, 7]) == ([0, 2, 4], 2, 7)  # down the second branch, bonus after node 4
    assert greedy([11, 13, 0, 9, 0]) == ([0, 1, 3], 2, 9)
    assert greedy([12, 0, 9, 0, 0]) == ([0, 2, 2], 1, 9)  # node 4 rejected: the bonus is the target's token at 2
    assert greedy([5, 13, 14, 0, 0]) == ([0, 0, 0], 0, 5)  # nothing accepted below a rejected root choice


def test_greedy_never_accepts_a_node_whose_ancestor_was_rejected():
    """Node 4 carries what the target wants after node 1 (14), but hangs under node 2: a flat walk
    over depths would accept it."""
    assert greedy([11, 14, 0, 0, 0]) == ([0, 1, 1], 1, 14)


def sample(p: torch.Tensor, q: torch.Tensor, u: list[float], one_hot_draft: bool):
    path, n_acc, bonus = accept_sample(TREE, p, q, torch.tensor(u), one_hot_draft)
    return path.tolist(), int(n_acc), int(bonus)


def mix(weights: dict[int, float]) -> torch.Tensor:
    p = torch.zeros(V)
    for token, w in weights.items():
        p[token] = w
    return p


def test_top_k_is_torchs_with_equal_values_by_lower_index():
    """The argmax of greedy acceptance and the draft's top-k children (minitree's kernel on CPUs): the
    k largest of each row, largest first, equal values by lower index (k = 1: argmax's first largest),
    a NaN counted as -inf; on logits of a real vocabulary's width and on rows of ties."""
    from minitree.kernels import kernels, top_k
    torch.manual_seed(0)
    for rows, width, k in [(1, 151936, 1), (2, 151936, 4), (16, 1000, 1), (3, 70, 8), (1, 8, 8)]:
        x = torch.randn(rows, width)
        assert torch.equal(top_k(x, k), x.topk(k, dim=-1).indices)
        values, _ = kernels().top_k(x, k)
        assert torch.equal(values, x.topk(k, dim=-1).values)
    x = torch.randint(0, 4, (50, 300)).float()  # many equal values
    x[torch.rand(x.shape) < 0.05] = float("nan")
    for k in (1, 3, 8):
        key = lambda row: sorted(range(len(row)), key=lambda i: (-(row[i] if row[i] == row[i] else -math.inf), i))
        assert top_k(x, k).tolist() == [key(row)[:k] for row in x.tolist()]
    assert torch.equal(top_k(x.nan_to_num(-1.0), 1)[:, 0], x.nan_to_num(-1.0).argmax(-1))


@pytest.mark.parametrize("u", [[0.0] * 5, [0.99] * 5, [0.3, 0.7, 0.1, 0.9, 0.5]])
def test_sampling_from_a_certain_target_is_greedy(u):
    """p one-hot at every node: whatever the uniforms and q, the path is the greedy one."""
    choices = [12, 0, 14, 0, 7]
    q = torch.softmax(torch.randn(3, V, generator=torch.Generator().manual_seed(0)), -1)
    for one_hot_draft in (True, False):
        assert sample(one_hot(choices), q, u, one_hot_draft) == greedy(choices)


def test_a_rejected_child_leaves_the_residual_to_its_sibling():
    """One-hot draft: node 1 (11) is accepted with probability p(11) = 0.5; with u = 0.7 it is
    rejected, p without 11 is certain of 12, so node 2 is accepted; its child node 4 (14) meets a
    target certain of 3: rejected, and the bonus is 3."""
    p = torch.stack([mix({11: 0.5, 12: 0.5})] + [one_hot([0])[0]] + [one_hot([3])[0]] * 3)
    q = torch.full((3, V), 1 / V)  # not read with a one-hot draft
    assert sample(p, q, [0.7, 0.0, 0.0, 0.0, 0.0], True) == ([0, 2, 2], 1, 3)
    assert sample(p, q, [0.3, 0.0, 0.0, 0.0, 0.0], True) == ([0, 1, 1], 1, 0)  # u < 0.5: node 1 accepted


def test_drawn_children_use_the_ratio_and_the_draft_without_the_rejected_token():
    """q at the root's draft row: 0.8 on 11, 0.2 on 12; p: 0.4 on 11, 0.6 on 12. Node 1 is accepted
    iff u * 0.8 < 0.4. Rejected, the residual max(p - q, 0) is certain of 12 and the next draw's q
    (q without 11) too, so node 2 is accepted."""
    p = torch.stack([mix({11: 0.4, 12: 0.6})] + [one_hot([0])[0]] * 4)
    q = torch.stack([mix({11: 0.8, 12: 0.2}), one_hot([0])[0], one_hot([0])[0]])
    assert sample(p, q, [0.45, 0.0, 0.0, 0.0, 0.0], False)[:2] == ([0, 1, 1], 1)
    assert sample(p, q, [0.55, 0.99, 0.0, 0.0, 0.0], False)[:2] == ([0, 2, 2], 1)


def test_the_bonus_is_drawn_from_the_residual_when_every_child_is_rejected():
    p = torch.stack([mix({5: 0.25, 11: 0.75})] + [one_hot([0])[0]] * 4)
    q = torch.stack([mix({11: 1.0})] + [one_hot([0])[0]] * 2)
    # node 1 (11) rejected (u * 1.0 >= 0.75); the residual max(p - q, 0) is certain of 5
    assert sample(p, q, [0.8, 0.0, 0.0, 0.0, 0.9], False) == ([0, 0, 0], 0, 5)


def random_tree(gen: torch.Generator, k: int, n: int, depth: int) -> StepTree:
    """A tree of up to n nodes, k children at most per node, distinct tokens among siblings; a tenth
    of the nodes UNDRAFTED leaves (an early stop)."""
    parents, depths, ranks, tokens, kids = [0], [0], [0], [1], [[]]
    for i in range(1, n):
        open_ = [j for j in range(i) if len(kids[j]) < k and depths[j] < depth and tokens[j] >= 0]
        if not open_:
            break
        par = open_[int(torch.randint(len(open_), (), generator=gen))]
        free = [t for t in range(V) if t not in {tokens[c] for c in kids[par]}]
        token = -1 if torch.rand((), generator=gen) < 0.1 else free[int(torch.randint(len(free), (), generator=gen))]
        parents.append(par), depths.append(depths[par] + 1), ranks.append(len(kids[par])), tokens.append(token)
        kids[par].append(i)
        kids.append([])
    size = len(parents)
    return StepTree.build(tokens=torch.tensor(tokens), parents=torch.tensor(parents), depth=torch.tensor(depths),
                          rank=torch.tensor(ranks), conf=torch.ones(size),
                          draft_row=torch.zeros(size, dtype=torch.long), max_depth=max(depths), k=k)


def one_hot_rule(tree: StepTree, p: torch.Tensor, u: torch.Tensor) -> tuple[list[int], int, int, float]:
    """The one-hot rule as its definition reads, one child at a time, in float64: from node 0, child
    i (token x) is accepted iff u < res(x), res = p at the node without its rejected elder siblings'
    tokens, normalized; with none accepted the bonus is drawn from res, after a leaf or the last
    level from p at the node. -> (path, accepted, bonus, the smallest distance of a uniform to the
    threshold it was compared with)."""
    K, p, node, margin = tree.children.shape[1], p.double(), 0, math.inf
    for d in range(tree.max_depth):
        res, moved = p[node].clone(), False
        for r in range(K):
            child = int(tree.children[node, r])
            x = int(tree.tokens[child]) if child >= 0 else -1
            if x < 0:
                continue
            threshold, ur = float(res[x] / res.sum()), float(u[d * K + r])
            margin = min(margin, abs(ur - threshold))
            if ur < threshold:
                node, moved = child, True
                break
            res[x] = 0
        if not moved:
            break
    else:
        res = p[node]
    cdf = (res / res.sum()).cumsum(0)
    bonus = int((cdf <= float(u[-1])).sum().clamp(max=V - 1))
    margin = min(margin, float((cdf - float(u[-1])).abs().min()))
    return tree.paths[node].tolist(), int(tree.depth[node]), bonus, margin


def test_the_one_hot_rule_decides_a_level_at_once_as_one_child_at_a_time():
    """accept_sample decides a level of children certain of their tokens in one pass (a child accepted
    iff u_i * the mass its rejected elder siblings leave < p(x_i)): the same path, count and bonus as
    the rule applied child by child, on random trees and targets, wherever a uniform is not within
    float rounding of its threshold."""
    gen, compared = torch.Generator().manual_seed(3), 0
    for case in range(300):
        k = 1 + case % 4
        tree = random_tree(gen, k, n=2 + case % 13, depth=1 + case % 5)
        n = tree.tokens.numel()
        p = torch.softmax(3 * torch.randn(n, V, generator=gen), -1)
        agree = torch.rand(n, generator=gen) < 0.6  # make some drafted tokens the target's likely choice
        for i in range(1, n):
            if agree[i] and tree.tokens[i] >= 0:
                p[tree.parents[i]] = 0.2 * p[tree.parents[i]] + 0.8 * one_hot([int(tree.tokens[i])])[0]
        u = torch.rand(max(tree.max_depth, 1) * k + 1, generator=gen)
        path, n_acc, bonus, margin = one_hot_rule(tree, p, u)
        if margin < 1e-5:
            continue
        compared += 1
        got = accept_sample(tree, p, torch.zeros(1, V), u, True)
        assert (got[0].tolist(), int(got[1]), int(got[2])) == (path, n_acc, bonus), case
    assert compared > 250


def test_compact_moves_the_accepted_slots_down():
    cache = torch.arange(10.0).view(1, 1, 1, 1, 10, 1).expand(2, 2, 1, 3, 10, 4).clone()
    compact(cache, torch.tensor(2), torch.tensor([0, 2, 4]))  # path root, node 2, node 4 at base 2
    assert cache[0, 0, 0, 0, :, 0].tolist() == [0, 1, 2, 4, 6, 5, 6, 7, 8, 9]
    assert torch.equal(cache, cache[:1, :1, :, :1, :, :1].expand_as(cache))  # every layer, head, dim alike
    compact(cache, torch.tensor(0), torch.tensor([0, 0, 0]))  # nothing accepted: the root's slot stays
    assert cache[0, 0, 0, 0, :3, 0].tolist() == [0, 0, 0]


def test_a_step_must_be_read_before_the_next(pair):
    engine = minitree.Engine(pair[0], pair[1], "2,1", compile=False, attention="sdpa", max_seq_len=128)
    engine.prefill(list(range(1, 20)))
    step = engine.step(minitree.Sampling())
    with pytest.raises(minitree.EngineError, match="advance"):
        engine.step(minitree.Sampling())
    n = engine.advance(step)
    assert engine.seq.length == 19 + n == int(engine.seq.n)
    engine.advance(engine.step(minitree.Sampling()))  # read: the next step runs
