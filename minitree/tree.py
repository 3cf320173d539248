"""Token trees: what the draft proposes each step, and the one tree type every step consumes.

A tree spec says how the draft grows a tree; `StepTree` is the tree one step actually verifies,
as device tensors, consumed alike by draft, verify, accept and compact.

- `Tree` (static): a branching spec ("2,2,1": the root has 2 children, each of those 2, each
  of those 1) or a path list in the vLLM `speculative_token_tree` / Medusa `choices` format
  ([(0,), (1,), (0, 0)]: each tuple is the child ranks from the root). Rank r is the draft's
  r-th most likely token (greedy) or its r-th draw without replacement (sampling), so the
  children of a node must be ranks 0..k-1 without gaps. Every step verifies the same tree.
- `DynamicTree` (EAGLE-2 style): "dynamic:depth=6,width=4,k=4,nodes=16". The root's top-k
  children form level 1; at every further level the `width` most confident nodes (confidence:
  the product of the draft's probabilities along the path) each get their top-k children;
  then the `nodes` most confident drafted nodes are verified. The shape changes every step,
  inside fixed sizes (width rows per draft level, nodes + 1 rows per verify), so compiled
  graphs never change.

Both are grown the same way (draft.py): level by level, each level's frontier nodes get their
K children ("candidates", laid out level by level). A spec only decides which candidates form
the next frontier (`frontier`) and which are verified, in which order (`select`): a static
tree's choices are constant tensors, a dynamic tree's come from the confidences.

Node 0 is the root (the last committed token). The draft's first-choice path (rank 0 at every
depth) is numbered first, nodes 1..D, the other nodes follow by depth, so every ancestor has a
smaller index than its descendants. A node's index is also its cache slot offset during
verify, so the first-choice path sits where plain decoding would put its tokens (with exact
attention every node rounds as in plain decoding anyway: README, "What is exact").
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import TreeError

MAX_NODES = 64  # root included: the ancestor relation is an int64 bitmask per node
UNDRAFTED = -1  # token of a node the draft did not reach (early stop): never accepted


# ----------------------------------------------------------------------------------------
class StepTree(NamedTuple):
    """One step's tree, device tensors (n nodes with the root; D: deepest level; K: most children).

    tokens     [n]       token per node (UNDRAFTED where the draft stopped early)
    parents    [n]       parent node (the root's is 0)
    depth      [n]       0 for the root; a node's RoPE position is base + depth
    rank       [n]       child rank under its parent (0 for the root)
    conf       [n]       draft confidence: product of draft probabilities along the path
    anc_bits   [n]       int64, bit j set iff node j is the node or one of its ancestors
    paths      [n, D+1]  root-to-node path, padded by repeating the node
    children   [n, K]    children by rank, -1 padded
    draft_row  [n]       the draft's cache row (slot - base) of nodes it expanded, 0 for the others
    candidates [M]       confidence of every candidate the draft proposed (-1: not drafted; [0]: root)
    """
    tokens: torch.Tensor
    parents: torch.Tensor
    depth: torch.Tensor
    rank: torch.Tensor
    conf: torch.Tensor
    anc_bits: torch.Tensor
    paths: torch.Tensor
    children: torch.Tensor
    draft_row: torch.Tensor
    candidates: torch.Tensor

    @classmethod
    def build(cls, tokens, parents, depth, rank, conf, draft_row, max_depth: int, k: int,
              candidates: torch.Tensor | None = None) -> "StepTree":
        """Derive ancestors, paths and children from parent pointers (no host sync)."""
        n = parents.numel()
        nodes = torch.arange(n, device=parents.device)
        chain = [nodes]  # the node, its parent, grandparent, ... (the root's parent is the root)
        for _ in range(max_depth):
            chain.append(parents[chain[-1]])
        chain = torch.stack(chain, 1)  # [n, D+1]
        steps_up = (depth[:, None] - torch.arange(max_depth + 1, device=parents.device)).clamp(min=0)
        paths = chain.gather(1, steps_up)
        anc = torch.zeros(n, n, dtype=torch.bool, device=parents.device).scatter_(1, chain, True)
        anc_bits = (anc.long() << nodes).sum(1)
        slot = torch.where(nodes > 0, parents * k + rank, n * k)  # the root goes to a spare slot
        children = torch.full((n * k + 1,), -1, dtype=torch.long, device=parents.device).scatter_(0, slot, nodes)
        return cls(tokens, parents, depth, rank, conf, anc_bits, paths, children[: n * k].view(n, k), draft_row,
                   conf if candidates is None else candidates)

    @property
    def max_depth(self) -> int:
        return self.paths.shape[1] - 1


# ----------------------------------------------------------------------------------------
class TreeSpec:
    """How the draft grows a tree; shared by static and dynamic trees.

    Draft level d (d = 0..D-1) runs the draft on widths[d] frontier nodes (level 0: the root)
    and gives each its top-k children: candidates cand_offset[d+1] .. + widths[d] * k. The
    draft caches frontier nodes at rows row_offset[d] .. + widths[d] (slot = base + row).
    Subclasses choose the frontier of each level and the candidates to verify.
    """

    name: str
    topk_children = False  # children are always the draft's top-k (sampling uses the one-hot rule)
    n: int  # nodes verified per step, root included
    k: int  # children per frontier node
    widths: list[int]  # frontier nodes per draft level; widths[0] = 1, the root

    def _layout(self) -> None:
        D, K = self.max_depth, self.k
        sizes = [1] + [w * K for w in self.widths]  # candidates per depth
        self.cand_offset = [sum(sizes[:d]) for d in range(D + 2)]
        self.row_offset = [sum(self.widths[:d]) for d in range(D + 1)]
        self.n_candidates, self.n_rows = self.cand_offset[-1], self.row_offset[-1]
        self.cand_depth = torch.repeat_interleave(torch.arange(D + 1), torch.tensor(sizes))
        self.cand_rank = torch.cat([torch.zeros(1, dtype=torch.long)] + [torch.arange(s) % K for s in sizes[1:]])
        if self.n_rows > MAX_NODES:
            raise TreeError(f"tree {self.name} drafts {self.n_rows} rows; at most {MAX_NODES} are supported")

    @property
    def max_depth(self) -> int:
        return len(self.widths)

    looks_up = False  # no branches from the committed text (NgramTree, MixedTree)
    ngram_from = MAX_NODES  # a step tree's nodes from this index on are n-gram branches: none

    @property
    def drafts(self) -> bool:
        """Whether a step along this spec runs the draft (the empty tree: plain decoding)."""
        return self.max_depth > 0

    @property
    def grown(self) -> "TreeSpec":
        """What the draft grows (draft.py): this tree; a MixedTree's draft part."""
        return self

    @property
    def sizes(self) -> tuple[int, ...]:
        """The row counts a verify along this spec may have (each one compiled target graph)."""
        return (self.n,)

    def frontier(self, d: int, conf: torch.Tensor) -> torch.Tensor:
        """Candidate ids [widths[d]] that draft level d expands (d >= 1), given all confidences."""
        raise NotImplementedError

    def select(self, tokens, conf, parent, row) -> StepTree:
        """This step's tree from the candidates' tokens, confidences, parents and draft rows."""
        raise NotImplementedError

    def to(self, device) -> "TreeSpec":
        """A copy whose tensors live on `device`."""
        def move(v):
            if torch.is_tensor(v):
                return v.to(device)
            if isinstance(v, StepTree):
                return StepTree(*map(move, v))
            return [move(e) for e in v] if isinstance(v, list) else v
        t = object.__new__(type(self))
        t.__dict__.update({k: move(v) for k, v in self.__dict__.items()})
        return t

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}: {self.n - 1} draft nodes verified, depth {self.max_depth})"


# ----------------------------------------------------------------------------------------
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


class Tree(TreeSpec):
    """A static draft tree: the same nodes every step. Host tensors built once:

    parents, depth, rank [n]   as in StepTree
    node_paths                 the rank path of each node, in node order
    expand[d]                  nodes at depth d that have children (the draft's frontier at level d)
    step                       the StepTree structure (tokens and confidences are filled per step)

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
        self.n = len(self.node_paths)
        D = max(len(p) for p in self.node_paths)
        self.parents = torch.tensor([index[p[:-1]] if p else 0 for p in self.node_paths])
        self.depth = torch.tensor([len(p) for p in self.node_paths])
        self.rank = torch.tensor([p[-1] if p else 0 for p in self.node_paths])
        kids = [[i for i, q in enumerate(self.node_paths) if q and q[:-1] == p] for p in self.node_paths]
        self.k = max(len(c) for c in kids)  # 0 for the root-only tree of plain decoding
        self.expand = [[i for i, p in enumerate(self.node_paths) if len(p) == d and kids[i]] for d in range(D)]
        self.widths = [len(e) for e in self.expand]
        self._layout()
        # Each node's candidate: the children of the j-th frontier node of level d are candidates
        # cand_offset[d+1] + j * k + rank. Frontier nodes are cached at rows row_offset[d] + j.
        cand, row = [0] * self.n, [0] * self.n
        for d, level in enumerate(self.expand):
            for j, node in enumerate(level):
                row[node] = self.row_offset[d] + j
                for child in kids[node]:
                    cand[child] = self.cand_offset[d + 1] + j * self.k + int(self.rank[child])
        self.cand = torch.tensor(cand)
        self.frontiers = [self.cand[level] for level in self.expand]
        self.step = StepTree.build(torch.zeros(self.n, dtype=torch.long), self.parents, self.depth, self.rank,
                                   torch.ones(self.n), torch.tensor(row), D, self.k)

    def frontier(self, d: int, conf: torch.Tensor) -> torch.Tensor:
        return self.frontiers[d]

    def select(self, tokens, conf, parent, row) -> StepTree:
        return self.step._replace(tokens=tokens[self.cand], conf=conf[self.cand], candidates=conf)

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

    def draw(self) -> str:
        """An ASCII drawing, one node per line, labelled with its index and rank path."""
        lines = []
        for i, p in enumerate(self.node_paths):
            lines.append("  " * len(p) + (f"{i} {list(p)}" if p else "0 root"))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------
def _keyed(spec: str, head: str, kind: str, defaults: dict, syntax: str) -> dict[str, int]:
    """'head' or 'head:key=N,...' (any subset of the keys of `defaults`) -> every key's integer."""
    found, _, body = spec.strip().partition(":")
    if found != head:
        raise TreeError(f"tree '{spec}' is not {kind} tree spec; write {syntax}")
    params = dict(defaults)
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, eq, value = item.partition("=")
        if key not in params or not eq or not re.fullmatch(r"\d+", value.strip()):
            raise TreeError(f"tree '{spec}': cannot read '{item}'; write {syntax}")
        params[key] = int(value)
    return params


DYNAMIC_DEFAULTS = dict(depth=6, width=2, k=4, nodes=10)
DYNAMIC_SYNTAX = "dynamic:depth=D,width=W,k=K,nodes=N (all optional; default " + \
                 ",".join(f"{k}={v}" for k, v in DYNAMIC_DEFAULTS.items()) + ")"


class DynamicTree(TreeSpec):
    """A tree chosen every step from the draft's confidence (EAGLE-2), within fixed sizes:
    depth D draft levels, `width` nodes expanded per level, `k` children each, `nodes` verified.
    Children are the draft's top-k (confidences rank them), so sampling uses the one-hot rule."""

    topk_children = True

    def __init__(self, depth: int, width: int, k: int, nodes: int):
        self.name = f"dynamic:depth={depth},width={width},k={k},nodes={nodes}"
        for key, value in dict(depth=depth, width=width, k=k, nodes=nodes).items():
            if not (isinstance(value, int) and value >= 1):
                raise TreeError(f"tree {self.name}: {key} must be an integer >= 1")
        self.k, self.width = k, width
        self.widths = [1]
        for _ in range(depth - 1):
            self.widths.append(min(width, self.widths[-1] * k))
        self._layout()
        if nodes > self.n_candidates - 1:
            raise TreeError(f"tree {self.name}: only {self.n_candidates - 1} nodes are drafted, fewer than nodes={nodes}")
        if nodes + 1 > MAX_NODES:
            raise TreeError(f"tree {self.name}: nodes must be at most {MAX_NODES - 1}")
        self.n = nodes + 1

    @classmethod
    def parse(cls, spec: str) -> "DynamicTree":
        """'dynamic' or 'dynamic:depth=6,width=4,k=4,nodes=16' (any subset of the keys)."""
        return cls(**_keyed(spec, "dynamic", "a dynamic", DYNAMIC_DEFAULTS, DYNAMIC_SYNTAX))

    def frontier(self, d: int, conf: torch.Tensor) -> torch.Tensor:
        start = self.cand_offset[d]
        level = conf[start:self.cand_offset[d + 1]]
        return start + level.topk(self.widths[d]).indices

    def select(self, tokens, conf, parent, row) -> StepTree:
        # The N most confident candidates. A child is never more confident than its parent and
        # candidates are laid out by depth, so a stable sort keeps every selection ancestor-closed.
        chosen = conf[1:].sort(descending=True, stable=True).indices[: self.n - 1] + 1
        # Renumber: the first-choice path (rank 0 all the way down) first, then by depth.
        first = (self.cand_rank == 0) & (tokens != UNDRAFTED)
        for _ in range(self.max_depth):
            first = first & first[parent]
        depth = self.cand_depth[chosen]
        key = torch.where(first[chosen], depth, depth + self.max_depth + 1) * self.n + torch.arange(
            self.n - 1, device=conf.device)
        cand = torch.cat([chosen.new_zeros(1), chosen[key.argsort()]])  # node -> candidate
        node = torch.zeros_like(parent).scatter_(0, cand, torch.arange(self.n, device=conf.device))
        return StepTree.build(tokens[cand], node[parent[cand]], self.cand_depth[cand], self.cand_rank[cand],
                              conf[cand], row[cand], self.max_depth, self.k, conf)


# ----------------------------------------------------------------------------------------
# Draft-free trees: what followed the committed text's last tokens where they occurred before.
# Edits, renames and answers about a pasted file repeat what is already in front of the model.
# An NgramTree finds the longest suffix of the committed tokens (at most `match` tokens) that
# occurred earlier in them (prompt and output) and proposes what followed its most recent
# occurrences: `branches` distinct continuations, merged where they share a prefix (a trie), at
# most `nodes` nodes and `depth` levels; a match shorter than `match` tokens (a guess) proposes
# at most `short` tokens, a full one (a copy under way) up to `depth`. Where the text has no
# match, the texts decoded before in the same process (EarlierTexts: answers repeat their own
# phrasing) are searched the same way. The target verifies the tree like any step tree and
# accept.py takes the longest agreed path, so the output is the target's own; proposals are
# deterministic, so sampling takes the one-hot rule. No model runs: the lookup reads the
# committed tokens on the host (engine.Committed.history). A MixedTree adds the same branches
# to the draft's tree of each step: a continuation follows the draft's nodes while they hold its
# tokens and branches off where they stop, so one verify checks both, and siblings still carry
# distinct tokens.
# Measured on the bench's recorded outputs (README): one continuation; a guess from a 2-7 token
# match costs a 4-row verify, a copy from an 8-token match up to 16 rows (one AMX tile of rows).
NGRAM_DEFAULTS = dict(depth=15, nodes=15, branches=1, match=8, min=2, short=3)
NGRAM_SYNTAX = "ngram or ngram:" + ",".join(f"{k}={v}" for k, v in NGRAM_DEFAULTS.items()) + " (any subset of the keys)"
EARLIER_TOKENS = 1 << 16  # the most tokens of earlier texts kept for lookups
SCAN = 64  # the most recent occurrences of a suffix read per lookup


class EarlierTexts:
    """Texts decoded before in this process (prompt and output), at most `limit` tokens (when full,
    the oldest go, down to half), indexed by token pair: n-gram trees look there for matches of at
    least two tokens when the current text has none (SuffixDecoding's global corpus)."""

    def __init__(self, limit: int = EARLIER_TOKENS):
        self.limit, self.texts, self.tokens = limit, [], []  # tokens: the texts, each ended by UNDRAFTED
        self.at: dict[tuple[int, int], list[int]] = {}  # (token, next token) -> positions of the next

    def add(self, text: list[int]) -> None:
        text = list(text)[-(self.limit - 1):]
        if len(self.tokens) + len(text) + 1 > self.limit:  # the oldest go: keep the newest texts in half the room
            keep, size = [], 0
            for t in reversed(self.texts):
                if size + len(t) + 1 > self.limit // 2:
                    break
                keep, size = [t, *keep], size + len(t) + 1
            self.texts, self.tokens, self.at = [], [], {}
            for t in keep:
                self._append(t)
        if text:
            self._append(text)

    def _append(self, text: list[int]) -> None:
        start = len(self.tokens)
        self.texts.append(text)
        self.tokens += [*text, UNDRAFTED]
        for j in range(max(start, 1), len(self.tokens)):
            self.at.setdefault((self.tokens[j - 1], self.tokens[j]), []).append(j)

    def ends(self, tokens: list[int]) -> list[int]:
        """Where the last two of `tokens` occurred (their second), most recent first."""
        return self.at.get(tuple(tokens[-2:]), [])[-4 * SCAN:][::-1] if len(tokens) >= 2 else []


class NgramTree:
    """Per-step trees of continuations found in the committed text (above). Like a TreeSpec it
    has a name, n (the most nodes verified, root included) and max_depth; it drafts nothing. A
    step verifies the smallest of `sizes` rows that holds its proposals: one row (plain decoding)
    when the last `min` tokens occurred nowhere before."""

    drafts = False  # no draft model runs
    looks_up = True
    ngram_from = 1  # every node but the root
    topk_children = True  # deterministic proposals: sampling takes the one-hot rule
    widths: list[int] = []
    n_rows = 0  # draft cache rows

    def __init__(self, depth: int = NGRAM_DEFAULTS["depth"], nodes: int = NGRAM_DEFAULTS["nodes"],
                 branches: int = NGRAM_DEFAULTS["branches"], match: int = NGRAM_DEFAULTS["match"],
                 min_match: int = NGRAM_DEFAULTS["min"], short: int = NGRAM_DEFAULTS["short"]):
        if not 1 <= min_match <= match or min(depth, nodes, branches, short) < 1 or nodes + 1 > MAX_NODES:
            raise TreeError(f"ngram tree: depth, nodes, branches and short must be >= 1, 1 <= min <= match, "
                            f"nodes < {MAX_NODES}")
        self.max_depth, self.n, self.branches, self.match, self.min_match = depth, nodes + 1, branches, match, min_match
        self.short = min(short, depth)
        self.sizes = tuple(sorted({1, min(self.short * branches + 1, self.n), self.n}))  # rows a step may verify
        given = dict(depth=depth, nodes=nodes, branches=branches, match=match, min=min_match, short=short)
        changed = ",".join(f"{k}={v}" for k, v in given.items() if v != NGRAM_DEFAULTS[k])
        self.name = "ngram" + (":" + changed if changed else "")
        self.device = torch.device("cpu")

    @classmethod
    def parse(cls, spec: str) -> "NgramTree":
        params = _keyed(spec, "ngram", "an n-gram", NGRAM_DEFAULTS, NGRAM_SYNTAX)
        params["min_match"] = params.pop("min")
        return cls(**params)

    def to(self, device) -> "NgramTree":
        t = object.__new__(type(self))
        t.__dict__.update(self.__dict__, device=torch.device(device))
        return t

    def continuations(self, tokens: list[int], earlier: EarlierTexts | None = None) -> list[list[int]]:
        """Up to `branches` continuations (most recent occurrence first, none a prefix of another:
        a longer one replaces it) of the longest suffix of `tokens`, `min` to `match` long, that
        occurred earlier in them, or else in the `earlier` texts; the SCAN most recent occurrences
        are read. A suffix shorter than `match` continues at most `short` tokens."""
        return self._look_up(tokens, earlier)[1]

    def copying(self, tokens: list[int], earlier: EarlierTexts | None = None) -> bool:
        """Whether the text is being copied: its last `match` tokens occurred before."""
        return self._look_up(tokens, earlier)[0] == self.match

    def _look_up(self, tokens: list[int], earlier: EarlierTexts | None) -> tuple[int, list[list[int]]]:
        """(length of the suffix matched, its continuations)."""
        found = self._follow(tokens, [j for j in range(len(tokens) - 2, -1, -1) if tokens[j] == tokens[-1]], tokens)
        if not found[1] and earlier is not None and self.match >= 2:
            found = self._follow(earlier.tokens, earlier.ends(tokens), tokens)
        return found

    def _follow(self, text: list[int], ends: list[int], tokens: list[int]) -> tuple[int, list[list[int]]]:
        """The continuations in `text` of the longest suffix of `tokens` that ends at one of `ends`."""
        n = len(tokens)
        for m in range(min(self.match, n), self.min_match - 1, -1):
            suffix, found = tokens[n - m:], []
            length = self.max_depth if m == self.match else self.short
            for j in [j for j in ends if j + 1 >= m and text[j + 1 - m:j + 1] == suffix][:SCAN]:
                cont = text[j + 1:j + 1 + length]
                cont = cont[:cont.index(UNDRAFTED)] if UNDRAFTED in cont else cont  # an earlier text ends
                if not cont or any(f[:len(cont)] == cont for f in found):
                    continue
                found = [f for f in found if cont[:len(f)] != f]  # those it extends
                if len(found) < self.branches:
                    found.append(cont)
            if found:
                return m, found
        return 0, []

    def extend(self, tokens: list[int], tree: StepTree | None = None, earlier: EarlierTexts | None = None,
               sizes: tuple[int, ...] | None = None, max_depth: int | None = None) -> StepTree:
        """This step's tree: `tree` (the draft's; None: the root alone, the last committed token)
        with the continuations of `tokens` added as branches (a trie merged into it), at most
        sizes[-1] nodes, padded with UNDRAFTED nodes (never accepted) to the smallest of `sizes`
        that holds them. The draft's tree comes back as it is when nothing is added."""
        sizes, max_depth = sizes or self.sizes, max_depth or self.max_depth
        fields = ("tokens", "parents", "depth", "rank", "conf", "draft_row")
        if tree is None:
            node = dict(tokens=[tokens[-1]], parents=[0], depth=[0], rank=[0], conf=[1.0], draft_row=[0])
        else:
            node = {f: getattr(tree, f).tolist() for f in fields}
        drafted = len(node["tokens"])
        child = {(p, t): i for i, (p, t) in enumerate(zip(node["parents"], node["tokens"])) if i and t >= 0}
        kids = [0] * drafted  # children per node
        for p in node["parents"][1:]:
            kids[p] += 1
        conts, counts = self.continuations(tokens, earlier), {}
        for cont in conts:
            at = 0
            for tok in cont:
                if (at, tok) not in child:
                    if len(node["tokens"]) == sizes[-1]:
                        break
                    child[at, tok] = len(node["tokens"])
                    for f, v in zip(fields, (tok, at, node["depth"][at] + 1, kids[at], 0.0, 0)):
                        node[f].append(v)
                    kids[at] += 1
                    kids.append(0)
                at = child[at, tok]
                counts[at] = counts.get(at, 0) + 1
        if tree is not None and len(node["tokens"]) == drafted:
            return tree
        for i in range(drafted, len(node["tokens"])):  # a branch's confidence: the share of continuations through it
            node["conf"][i] = counts[i] / len(conts)
        pad = next(s for s in sizes if s >= len(node["tokens"])) - len(node["tokens"])
        for f, v in zip(fields, (UNDRAFTED, 0, 1, None, 0.0, 0)):  # padding: undrafted children of the root
            node[f] += list(range(kids[0], kids[0] + pad)) if f == "rank" else [v] * pad
        kids[0] += pad
        t = lambda v, dtype=torch.long: torch.tensor(v, dtype=dtype, device=self.device)
        return StepTree.build(*(t(node[f], torch.float32 if f == "conf" else torch.long) for f in fields),
                              max_depth, max(max(kids), 1),
                              candidates=None if tree is None else tree.candidates)

    def __repr__(self) -> str:
        return f"NgramTree({self.name})"


class MixedTree:
    """The draft's tree (a Tree or DynamicTree: `grown`) and n-gram branches (`ngram`) in one
    verify, "<draft tree>+ngram[:...]". A step verifies the draft's nodes alone when the text
    proposes nothing, else the two merged, padded to n = the draft's nodes + ngram's nodes + 1."""

    drafts = looks_up = topk_children = True  # sampling takes the one-hot rule (n-gram proposals are not draws)

    def __init__(self, grown: "TreeSpec", ngram: NgramTree):
        if not grown.drafts:
            raise TreeError("a mixed tree needs a draft tree beside its n-gram branches")
        self.grown, self.ngram = grown, ngram
        self.name = f"{grown.name}+{ngram.name}"
        self.n = grown.n + ngram.n - 1
        self.sizes, self.ngram_from = (grown.n, self.n), grown.n
        self.max_depth = max(grown.max_depth, ngram.max_depth)
        self.widths, self.n_rows = grown.widths, grown.n_rows

    def to(self, device) -> "MixedTree":
        return MixedTree(self.grown.to(device), self.ngram.to(device))

    def extend(self, tokens: list[int], tree: StepTree, earlier: EarlierTexts | None = None) -> StepTree:
        return self.ngram.extend(tokens, tree, earlier, self.sizes, self.max_depth)

    def __repr__(self) -> str:
        return f"MixedTree({self.name})"


# ----------------------------------------------------------------------------------------
def parse_tree(spec: "str | Path | list | TreeSpec | NgramTree | MixedTree") -> "TreeSpec | NgramTree | MixedTree":
    """A static Tree ("2,2,1", a path list, a JSON file), a DynamicTree ("dynamic:..."), an
    NgramTree ("ngram:...") or a MixedTree ("<static or dynamic tree>+ngram[:...]")."""
    if isinstance(spec, (TreeSpec, NgramTree, MixedTree)):
        return spec
    if isinstance(spec, str) and "+" in spec:
        grown, _, ngram = spec.rpartition("+")
        return MixedTree(parse_tree(grown.strip()), NgramTree.parse(ngram))
    if isinstance(spec, str) and spec.strip().startswith("ngram"):
        return NgramTree.parse(spec)
    if isinstance(spec, str) and spec.strip().startswith("dynamic"):
        return DynamicTree.parse(spec)
    return Tree.parse(spec)
