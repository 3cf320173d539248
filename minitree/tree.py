"""Token trees: the shape of what the draft proposes each step.

A tree is given as a branching spec ("2,2,1": the root has 2 children, each of those 2, each
of those 1) or as a path list in the vLLM `speculative_token_tree` / Medusa `choices` format
([(0,), (1,), (0, 0)]: each tuple is the child ranks from the root). Rank r is the draft's
r-th most likely token (greedy) or its r-th draw without replacement (sampling), so the
children of a node must be ranks 0..k-1 without gaps.

Node 0 is the root (the last committed token). Nodes 1..D are the all-rank-0 path, the
draft's first choice at every depth, and the other nodes follow breadth-first, so every
ancestor has a smaller index than its descendants. A node's index is also its cache slot
offset during verify, so the first-choice path sits where plain decoding would put its
tokens and is computed with bit-identical rounding (model.py's note on MIN_ROWS; off that
path, keys at other slots are summed in another order). All structure is built once, here,
as named tensors; nothing downstream computes indices from formulas.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import torch

MAX_NODES = 64  # root included: the ancestor relation is an int64 bitmask per node


class TreeError(ValueError):
    """A malformed tree (message is meant for users)."""


def _paths_from_branching(spec: str) -> list[tuple[int, ...]]:
    parts = [p.strip() for p in spec.split(",")]
    if any(p == "" for p in parts):
        raise TreeError(f"tree '{spec}' has an empty level; write branching factors like 2,2,1")
    widths = []
    for p in parts:
        try:
            w = int(p)
        except ValueError:
            raise TreeError(f"tree '{spec}': '{p}' is not an integer; write branching factors like 2,2,1") from None
        if w < 1:
            raise TreeError(f"tree '{spec}': branching factors must be >= 1, got {w}")
        widths.append(w)
    paths, level = [], [()]
    for w in widths:
        level = [p + (r,) for p in level for r in range(w)]
        paths += level
        if len(paths) >= MAX_NODES:
            break  # too large; reported by Tree below without building the rest
    return paths


def _read_path_list(text: str) -> list[tuple[int, ...]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise TreeError("tree path list is neither JSON nor a Python literal like [(0,), (1,), (0, 0)]") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in value):
        raise TreeError("tree path list must be a list of paths like [(0,), (1,), (0, 0)]")
    if not all(isinstance(r, int) and not isinstance(r, bool) for p in value for r in p):
        raise TreeError("tree path list entries must be integers")
    return [tuple(p) for p in value]


class Tree:
    """A static draft tree. Tensors (all on the host, built once):

    parents   [n]        parent node of each node (the root's is 0)
    depth     [n]        0 for the root
    rank      [n]        child rank under its parent (0 for the root)
    anc       [n, n]     bool, anc[i, j]: j is i or an ancestor of i
    anc_bits  [n]        int64, bit j set iff anc[i, j]
    paths     [n, D+1]   root-to-node path of each node, padded by repeating the node
    children  [n, K]     children of each node by rank, -1 padded (K: the widest node)
    expand[d]            nodes at depth d that have children (the draft's frontier at level d)
    grow[d]              (children of expand[d], their index into that level's [len(expand[d]) * K] draws)

    Tree([]) is the root alone: plain decoding is a speculative step with nothing drafted.
    """

    def __init__(self, paths: list[tuple[int, ...]], name: str | None = None):
        if len(paths) + 1 > MAX_NODES:
            raise TreeError(f"tree has {len(paths) if len(paths) < MAX_NODES else 'at least %d' % MAX_NODES} "
                            f"draft nodes; at most {MAX_NODES - 1} are supported")
        if len(set(paths)) != len(paths):
            raise TreeError("tree path list has duplicate paths")
        for p in paths:
            if not p:
                raise TreeError("tree path list has an empty path (the root is implicit)")
            if any(r < 0 for r in p):
                raise TreeError(f"tree path {p} has a negative rank")
        known = set(paths) | {()}
        for p in paths:
            if p[:-1] not in known:
                raise TreeError(f"tree path {p} has no parent path {p[:-1]}")
            if p[-1] > 0 and p[:-1] + (p[-1] - 1,) not in known:
                raise TreeError(f"tree path {p} needs its lower-ranked sibling {p[:-1] + (p[-1] - 1,)}")
        first = [p for p in paths if not any(p)]  # the all-rank-0 path
        self.node_paths = [()] + sorted(first, key=len) + sorted(set(paths) - set(first), key=lambda p: (len(p), p))
        self.name = name or str([p for p in self.node_paths[1:]])
        index = {p: i for i, p in enumerate(self.node_paths)}
        n = self.n = len(self.node_paths)
        self.max_depth = max(len(p) for p in self.node_paths)
        self.parents = torch.tensor([index[p[:-1]] if p else 0 for p in self.node_paths])
        self.depth = torch.tensor([len(p) for p in self.node_paths])
        self.rank = torch.tensor([p[-1] if p else 0 for p in self.node_paths])
        self.anc = torch.zeros(n, n, dtype=torch.bool)
        for i, p in enumerate(self.node_paths):
            for k in range(len(p) + 1):
                self.anc[i, index[p[:k]]] = True
        self.anc_bits = (self.anc.long() << torch.arange(n)).sum(1)
        self.paths = torch.tensor([[index[p[:k]] for k in range(len(p) + 1)] + [i] * (self.max_depth - len(p))
                                   for i, p in enumerate(self.node_paths)])
        kids = [[index[p + (r,)] for r in range(n) if p + (r,) in index] for p in self.node_paths]
        width = max(len(k) for k in kids)  # 0 for the root-only tree of plain decoding
        self.children = torch.tensor([k + [-1] * (width - len(k)) for k in kids])
        self.expand = [torch.tensor([i for i, p in enumerate(self.node_paths) if len(p) == d and kids[i]])
                       for d in range(self.max_depth)]
        # grow[d] = (child nodes at depth d+1, their index in the flattened [len(expand[d]), width] draws)
        self.grow = [(self.children[e][self.children[e] >= 0],
                      torch.arange(len(e) * width).view(len(e), width)[self.children[e] >= 0]) for e in self.expand]

    @classmethod
    def parse(cls, spec: "str | Path | list | Tree") -> "Tree":
        """A Tree from "2,2,1", a path list (Python list, or its JSON/literal text), or a JSON file."""
        if isinstance(spec, Tree):
            return spec
        if isinstance(spec, (list, tuple)):
            return cls([tuple(p) for p in _read_path_list(json.dumps([list(p) for p in spec]))])
        text = str(spec).strip()
        if not text:
            raise TreeError("tree is empty; write branching factors like 2,2,1 or a path list")
        if text.endswith(".json") or Path(text).is_file():
            try:
                text = Path(text).read_text()
            except OSError as e:
                raise TreeError(f"cannot read tree file {spec}: {e.strerror}") from None
            return cls(_read_path_list(text), name=Path(str(spec)).name)
        if text.startswith(("[", "(")):
            paths = _read_path_list(text)
            if not paths:
                raise TreeError("tree path list is empty")
            return cls(paths)
        return cls(_paths_from_branching(text), name=text.replace(" ", ""))

    def to(self, device) -> "Tree":
        """A copy whose tensors live on `device`."""
        t = object.__new__(Tree)
        t.__dict__.update({k: v.to(device) if torch.is_tensor(v) else v for k, v in self.__dict__.items()})
        t.expand = [e.to(device) for e in self.expand]
        t.grow = [(a.to(device), b.to(device)) for a, b in self.grow]
        return t

    def __repr__(self) -> str:
        return f"Tree({self.name}: {self.n - 1} draft nodes, depth {self.max_depth})"

    def draw(self) -> str:
        """An ASCII drawing, one node per line, labelled with its index and rank path."""
        lines = []
        for i, p in enumerate(self.node_paths):
            lines.append("  " * len(p) + (f"{i} {list(p)}" if p else "0 root"))
        return "\n".join(lines)
