"""`--tree auto`: the engine picks the tree for this machine and this text, online.

Tokens per second of a configuration = expected committed tokens per step / seconds per step.
Both factors are learned here, and the best configuration of a small family is re-chosen
every few steps:

- seconds per step: the forward costs measured on this machine (costs.py: the linear layers
  at each row count, cached on disk), plus what the probe does not see (attention, norms,
  logits, Python) learned from the measured phase times: per draft forward, and per row count
  of a verify (it grows with the rows: charged to plain decoding, an 8-row verify's extra made
  auto price plain decoding 35% too dear and never choose it on MT-bench, docs/bench-amx-ngram.json);
- acceptance: a calibration table over the draft's confidence (the product of its
  probabilities along a node's path): how often the target accepted nodes of that confidence,
  started from the prior that the draft is calibrated (acceptance = confidence);
- expected committed tokens of a configuration = 1 + the calibrated acceptance summed over the
  nodes it would verify. The draft proposes many candidates each step; a configuration of
  depth D and N nodes verifies the N most confident candidates of depth <= D, so one step's
  candidates score every configuration at once. Levels deeper than the ones drafted are
  extrapolated from the draft's mean child probability per rank; while the deepest level is
  often accepted, every DEEPER-th step drafts deeper, so that those levels are seen too;
- what a configuration did when it ran: its committed tokens and seconds per step (the draft's
  catch-up included), which outweigh the model's prediction once it has run a few steps (TRUST);
- the draft's catch-up: a drafting configuration chosen after steps without the draft first
  caches the tokens those steps committed (the prompt too, at a text's start: priced in 32-row
  draft forwards, spread over the steps the text has left, at most HORIZON), and beside n-gram branches
  it catches up on every accepted n-gram node (learned per step: `mixed_catch_up`);
- n-gram branches: at every step's root, what LOOKUP's continuations would have had accepted,
  once the text after it is known (a histogram by length); N n-gram nodes beside a draft tree
  expected to have D nodes accepted add what they would have accepted beyond D, at most N.

The family: plain decoding, and dynamic trees of k children, width 1 (the first-choice path
with its siblings: one draft row per level) or 2, with every depth in DEPTHS and verify budget
in NODES (one target graph per budget, compiled when first chosen). A step drafted at one
width scores the other too: a tree of width w has, at each level, the children of the w most
confident nodes of the level above; those the step drafted are read, the others extrapolated.
Plain decoding is chosen when no tree is predicted to pay (a useless draft); while decoding
plainly, one speculative step in EXPLORE (RARELY, when no tree is predicted to be as fast)
keeps the statistics fresh; such a step first pays for the draft catching up with the tokens
decoded plainly, which is why it is rare. The choice only decides
what is drafted and verified; every step is lossless, whatever is chosen.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass, field

from .tree import DynamicTree, EarlierTexts, MixedTree, NgramTree, Tree, TreeSpec

DEPTHS = (1, 2, 3, 4, 5, 6, 8)
NODES = (1, 3, 5, 7, 10, 15)
WIDTHS, K = (1, 2), 4
EDGES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.01)  # confidence buckets
PRIOR_WEIGHT = 4.0  # pseudo-observations per bucket behind the prior
DECAY = 0.93  # per step: how fast old steps are forgotten (~15 steps of memory: a new prompt takes over fast)
RECHOOSE = 4  # steps between choices
SWITCH_GAIN = 1.03  # switch only for a predicted gain of 3%
DRAFT_SWITCH_GAIN = 1.10  # ... of 10% between drafting and not drafting (the draft then catches up on the text)
EXPLORE = 16  # while decoding plainly, one speculative step in this many (when a tree is close: CLOSE) ...
RARELY = 64  # ... or in this many (when none is)
CLOSE = 1.0  # predicted speed of the best tree relative to plain decoding that makes it worth a look
DEEPER = 8  # while the deepest level is often accepted, one step in this many drafts deeper
TRUST = 3.0  # a configuration's prediction counts as this many measured steps
HORIZON = 16 * RECHOOSE  # most steps a switch to drafting is priced over (its catch-up spread across them)
AUTO_SPECS = ("auto", "auto:draft")  # every configuration; or no n-gram branches (family's lookups=False)
NGRAM_ONLY = (10, 15)  # n-gram-only configurations' nodes (verify 1, 4, 11 or 16 rows: shapes of the family)
MIXED_TOTALS = (10, 15)  # a mixed configuration verifies the draft's nodes plus n-gram nodes up to these
LOOKUP = NgramTree(nodes=max(MIXED_TOTALS))  # the continuations auto scores at every step's root


@dataclass
class Config:
    depth: int  # 0: no draft (plain decoding, or n-gram branches alone)
    nodes: int  # the draft's nodes
    width: int = 2
    ngram: int = 0  # n-gram nodes beside them (0: none)

    @functools.cached_property
    def spec(self) -> TreeSpec | NgramTree | MixedTree:
        """The tree this configuration verifies (built once: choosing reads every configuration's name)."""
        ngram = NgramTree(nodes=self.ngram) if self.ngram else None
        if self.depth == 0:
            return ngram or Tree([], name="plain")
        grown = DynamicTree(self.depth, self.width, K, self.nodes)
        return MixedTree(grown, ngram) if ngram else grown

    @property
    def name(self) -> str:
        return self.spec.name


@functools.lru_cache(maxsize=None)
def _widths(depth: int, width: int) -> tuple[int, ...]:
    """Rows per draft level of a dynamic tree (cached: choosing prices every configuration)."""
    return tuple(DynamicTree(depth, width, K, 1).widths)


@functools.lru_cache(maxsize=None)
def _cand_depth(depth: int, width: int) -> tuple[int, ...]:
    """The depth of each candidate a dynamic tree drafts, in slot order."""
    return tuple(DynamicTree(depth, width, K, 1).cand_depth.tolist())


def family(drafts: bool = True, lookups: bool = True) -> list[Config]:
    """Plain decoding, the dynamic trees, n-gram branches alone, and each dynamic tree with n-gram
    branches up to MIXED_TOTALS nodes (verify shapes the dynamic trees compile too); without a
    draft (drafts=False), plain decoding and n-gram branches alone; without lookups ("auto:draft"),
    plain decoding and the dynamic trees."""
    configs = [Config(0, 0)]
    if not drafts:
        return configs + [Config(0, 0, ngram=n) for n in NGRAM_ONLY]
    for w in WIDTHS:
        for d in DEPTHS[w == 1:]:  # at depth 1, every width drafts the same tree
            spec = DynamicTree(d, w, K, 1)
            configs += [Config(d, n, w) for n in NODES if n <= spec.n_candidates - 1]
    if not lookups:
        return configs
    mixed = [Config(c.depth, c.nodes, c.width, total - c.nodes) for c in configs[1:] for total in MIXED_TOTALS
             if total - c.nodes >= 5]
    return configs + [Config(0, 0, ngram=n) for n in NGRAM_ONLY] + mixed


@dataclass
class Auto:
    """Chooses each step's configuration; `observe` feeds it what each step drafted, accepted and cost."""
    draft_cost: callable  # rows -> seconds of one draft forward (measured probe)
    verify_cost: callable  # rows -> seconds of one target forward
    seconds: bool = True  # whether those costs are seconds (measured): then steps' timings may outweigh them
    configs: list[Config] = field(default_factory=family)
    hits: list[float] = field(default_factory=list)  # per confidence bucket: accepted (prior included)
    seen: list[float] = field(default_factory=list)  # per confidence bucket: verified (prior included)
    scores: dict = field(default_factory=dict)  # (width, depth, nodes) -> decayed sum of expected accepted nodes
    weight: float = 0.0  # decayed number of scored steps
    child_p: list[float] = field(default_factory=lambda: [0.6, 0.1, 0.05, 0.03])  # mean child probability by rank
    draft_extra: float = 0.0  # seconds per draft forward beyond the probe's linear layers
    verify_extra: dict = field(default_factory=dict)  # rows -> the same for a target forward (grows with rows)
    extra_prior: float = 0.3  # extra seconds of a forward not timed yet, as a fraction of its probed cost
    runs: dict = field(default_factory=dict)  # config name -> decayed [steps, tokens, seconds] it ran
    saturated: float = 0.5  # decayed fraction of steps that accepted down to the deepest level
    # n-gram branches, scored at every step's root once the text after it is known (decayed sums):
    lookups: float = 0.0  # roots scored
    found: float = 0.0  # ... with a continuation
    agreed: list = field(default_factory=lambda: [0.0] * (LOOKUP.max_depth + 1))  # ... by tokens they had accepted
    trie: float = 0.0  # their nodes, where found
    pending: list = field(default_factory=list)  # (root position, continuations)
    mixed_catch_up: float | None = None  # seconds per step of the draft catching up beside n-gram branches
    behind: int = 0  # committed tokens the draft has not cached, as this step is chosen
    left: int | None = None  # tokens the text may still take, as this step is chosen (None: unknown)
    drafted_last: bool = False  # whether the last step observed ran the draft
    current: Config | None = None
    steps: int = 0

    def __post_init__(self):
        mids = [(a + min(b, 1.0)) / 2 for a, b in zip(EDGES, EDGES[1:])]
        self.hits = [PRIOR_WEIGHT * m for m in mids]
        self.seen = [PRIOR_WEIGHT] * len(mids)
        # the start: a middling tree, or without a draft, n-gram branches (as cheap as plain decoding when none is found)
        self.current = next((c for c in self.configs if c.depth == 4 and c.nodes == 7), self.configs[-1])
        self.draft_extra = self.extra_prior * self.draft_cost(1)  # a prior, until steps are timed

    @functools.cached_property
    def drafts(self) -> bool:
        """Whether any configuration runs the draft (not without one)."""
        return any(c.depth for c in self.configs)

    @functools.cached_property
    def looks_up(self) -> bool:
        """Whether any configuration has n-gram branches (not "auto:draft")."""
        return any(c.ngram for c in self.configs)

    @functools.cached_property
    def copier(self) -> Config:
        """The most n-gram branches alone: every step while the text is being copied (the draft would
        only cost, and a copy runs long)."""
        return max((c for c in self.configs if c.ngram and not c.depth), key=lambda c: c.ngram)

    # ------------------------------------------------------------------------------------
    def acceptance(self, conf: float) -> float:
        b = min(max(bisect.bisect_right(EDGES, conf) - 1, 0), len(self.seen) - 1)
        return self.hits[b] / self.seen[b]

    def draft_seconds(self, c: Config, levels: int | None = None) -> float:
        widths = _widths(c.depth, c.width)[:levels]  # level 0: the 2-token window
        return sum(self.draft_cost(w) for w in (2, *widths[1:])) + len(widths) * self.draft_extra

    def verify_extra_at(self, rows: int) -> float:
        """Seconds a verify of `rows` rows takes beyond its linear layers: learned; for a row count not
        timed yet, the nearest timed one's share of its probed cost (none timed: the prior's)."""
        if rows in self.verify_extra:
            return self.verify_extra[rows]
        near = min(self.verify_extra, key=lambda r: abs(r - rows), default=None)
        share = self.extra_prior if near is None else self.verify_extra[near] / max(self.verify_cost(near), 1e-9)
        return share * self.verify_cost(rows)

    def verify_seconds(self, rows: int) -> float:
        return self.verify_cost(rows) + self.verify_extra_at(rows)

    def catch_up_seconds(self, c: Config, tokens: float) -> float:
        """Per step: the draft catching up on the tokens steps without it committed (after a switch,
        spread over the steps left in the text at `tokens` a step, at most HORIZON: a switch near the
        text's end does not pay for the prompt's catch-up), and on accepted n-gram nodes beside its own."""
        behind = self.behind
        full, rest = divmod(behind, 32)
        steps = HORIZON if self.left is None else min(max(self.left / tokens, 1.0), HORIZON)
        switch = (full * self.draft_cost(32) + (self.draft_cost(rest) if rest else 0.0)
                  + -(-behind // 32) * self.draft_extra) / steps
        if not c.ngram:
            return switch
        found = self.found / max(self.lookups, 1e-9)
        if self.mixed_catch_up is None:  # not seen yet: a 4-row draft forward wherever a continuation is found
            return switch + found * (self.draft_cost(4) + self.draft_extra)
        return switch + self.mixed_catch_up

    def modelled(self, c: Config) -> tuple[float, float]:
        """(committed tokens, seconds) per step, from the acceptance and cost models; n-gram branches
        from what they would have added at the roots scored (none scored yet: nothing)."""
        rows = c.nodes + 1 if c.depth else 1
        found = self.found / max(self.lookups, 1e-9)
        if c.depth == 0 and c.ngram:  # the smallest size holding the mean trie (NgramTree.sizes)
            trie = min(self.trie / max(self.found, 1e-9), c.ngram) + 1
            size = min(s for s in c.spec.sizes if s >= trie)
            seconds = (1 - found) * self.verify_seconds(1) + found * self.verify_seconds(size)
            return 1.0 + self.ngram_tokens(c.ngram), seconds
        verify = self.verify_seconds(rows)
        if c.depth == 0:
            return 1.0, verify
        drafted = self.scores.get((c.width, c.depth, c.nodes), 0.0) / max(self.weight, 1e-9)
        tokens = 1.0 + drafted
        if c.ngram:  # beside the draft's nodes: what the branches add to them, verified with them
            tokens += self.ngram_tokens(c.ngram, drafted)
            verify = (1 - found) * verify + found * self.verify_seconds(rows + c.ngram)
        return tokens, verify + self.draft_seconds(c) + self.catch_up_seconds(c, tokens)

    def ngram_tokens(self, nodes: int, drafted: float = 0.0) -> float:
        """Tokens n-gram branches of `nodes` nodes would have had accepted at the roots scored, beyond
        `drafted` accepted draft nodes (the continuation runs along them, then adds its own)."""
        return sum(w * min(max(k - drafted, 0.0), nodes) for k, w in enumerate(self.agreed)) / max(self.lookups, 1e-9)

    def predicted(self, c: Config) -> float:
        """Tokens per second: the model's prediction, outweighed by what the configuration did."""
        tokens, seconds = self.modelled(c)
        steps, ran_tokens, ran_seconds = self.runs.get(c.name, (0.0, 0.0, 0.0))
        return (ran_tokens + TRUST * tokens) / (ran_seconds + TRUST * seconds)

    def choose(self, behind: int = 0, history: list[int] | None = None, earlier: EarlierTexts | None = None,
               left: int | None = None) -> Config:
        """This step's configuration; `behind`: committed tokens the draft has not cached; `history`:
        the committed tokens (and `earlier` texts): while they are being copied, n-gram branches alone;
        `left`: tokens the text may still take (None: unknown)."""
        fresh = behind > self.behind + 32  # a new text: the draft has its prompt to cache (or not)
        self.steps, self.behind, self.left = self.steps + 1, behind, left
        if self.looks_up and history is not None and LOOKUP.copying(history, earlier):
            return self.copier
        if self.weight and (self.steps % RECHOOSE == 0 or fresh):
            best = self.best()
            gain = SWITCH_GAIN if (best.depth > 0) == (self.current.depth > 0) else DRAFT_SWITCH_GAIN
            if self.predicted(best) > gain * self.predicted(self.current):
                self.current = best
        if self.current.depth == 0 and self.steps % EXPLORE == 0 and self.drafts:
            tree = self.best(speculative=True)
            close = self.predicted(tree) >= CLOSE * self.predicted(self.current)
            if close or (self.steps % RARELY == 0 and behind <= 32):  # a look at what the draft would do now
                # (unless it must first cache more than a forward's worth of text: then only when close)
                return tree
        elif self.steps % DEEPER == 0 and self.saturated > 0.3 and 0 < self.current.depth < max(DEPTHS):
            deeper = min([d for d in DEPTHS if d >= self.current.depth + 2] or [max(DEPTHS)])
            nodes = self.current.nodes + deeper - self.current.depth  # room to accept the deeper levels too
            return min((c for c in self.configs if c.depth == deeper and c.width == self.current.width
                        and not c.ngram and c.nodes >= min(nodes, max(NODES))), key=lambda c: c.nodes)
        return self.current

    def best(self, speculative: bool = False) -> Config:
        return max((c for c in self.configs if c.depth or not speculative), key=self.predicted)

    # ------------------------------------------------------------------------------------
    def observe(self, config: Config, step, n: int, history: list[int], earlier: EarlierTexts | None = None) -> None:
        """One step (stats.Step) along `config` that committed n tokens, the last of `history` (the
        committed tokens; `earlier`: the texts n-gram branches also search): the confidences of the
        verified nodes and which were accepted, the confidence of every drafted candidate, the draft
        levels run, what n-gram branches would have proposed at its root, and (when the engine times
        its steps) what drafting, verifying and the draft's catch-up cost."""
        tree, levels = step.tree, step.levels
        path = step.path[:n].tolist()
        accepted, drafted = set(path), config.spec.ngram_from  # nodes below it are the draft's
        if self.looks_up:  # scored only where n-gram branches may be chosen
            self._look_up(history, earlier, len(history) - n - 1)
        timed = "verify" in step.times and self.seconds  # timings and unmeasured costs are not comparable
        draft_s, verify_s = step.times.get("draft", 0.0), step.times.get("verify", 0.0)
        for run in self.runs.values():
            run[:] = [DECAY * v for v in run]
        if timed:
            run = self.runs.setdefault(config.name, [0.0, 0.0, 0.0])
            run[0] += 1
            run[1] += n  # the accepted nodes with the root: the committed tokens
            # and the draft catching up on tokens it did not cache (after steps without it, or an accepted
            # n-gram branch), up to one 32-row draft forward: a longer one is the prompt's, paid once per text
            run[2] += draft_s + verify_s + min(step.times.get("catch_up", 0.0), self.draft_cost(32))
            # per row count: what a verify costs beyond its linear layers (attention, logits, norms)
            # grows with its rows, so eight rows' extra must not be charged to plain decoding's one
            rows = tree.tokens.numel()
            extra = max(verify_s - self.verify_cost(rows), 0.0)
            self.verify_extra[rows] = 0.9 * self.verify_extra_at(rows) + 0.1 * extra
        drafted_last, self.drafted_last = self.drafted_last, bool(levels)
        if timed and levels and config.ngram and drafted_last:  # the steady state beside n-gram branches
            catch_up = step.times.get("catch_up", 0.0)
            seen = catch_up if self.mixed_catch_up is None else self.mixed_catch_up
            self.mixed_catch_up = 0.9 * seen + 0.1 * catch_up
        if config.depth == 0:
            return
        if timed and levels:
            extra = (draft_s - self.draft_seconds(config, levels) + levels * self.draft_extra) / levels
            self.draft_extra = 0.9 * self.draft_extra + 0.1 * max(extra, 0.0)
        self.saturated = 0.9 * self.saturated + 0.1 * (n - 1 >= config.depth)
        # calibration: each verified node's confidence, and whether it was accepted
        for i, conf in enumerate(tree.conf.tolist()[1:drafted], 1):  # the draft's nodes
            b = min(max(bisect.bisect_right(EDGES, conf) - 1, 0), len(self.seen) - 1)
            self.seen[b] += 1
            self.hits[b] += i in accepted
        self._score(tree.candidates.tolist(), _cand_depth(config.depth, config.width), config.width)

    def _look_up(self, history: list[int], earlier: EarlierTexts | None, root: int) -> None:
        """Note the continuations at this step's root; score the roots whose next LOOKUP.max_depth
        tokens are now committed."""
        if self.pending and self.pending[-1][0] >= root:  # a new text
            self.pending.clear()
        self.pending.append((root, LOOKUP.continuations(history[:root + 1], earlier)))
        while self.pending and len(history) > self.pending[0][0] + LOOKUP.max_depth:
            at, conts = self.pending.pop(0)
            text = history[at + 1:at + 1 + LOOKUP.max_depth]
            agreed = max((next((i for i, (a, b) in enumerate(zip(c, text)) if a != b), len(c)) for c in conts), default=0)
            self.lookups, self.found = DECAY * self.lookups + 1, DECAY * self.found + bool(conts)
            self.agreed = [DECAY * w + (k == agreed) for k, w in enumerate(self.agreed)]
            self.trie = DECAY * self.trie + len({tuple(c[:i]) for c in conts for i in range(1, len(c) + 1)})

    def _score(self, candidates: list[float], cand_depth: tuple[int, ...], drafted_width: int) -> None:
        """Expected accepted nodes of every (width, depth, nodes) configuration, from this step's
        candidates (in slot order: each level holds the children of the level above's frontier,
        most confident parent first)."""
        drafted = {}
        for conf, d in zip(candidates[1:], cand_depth[1:]):
            if conf >= 0:
                drafted.setdefault(d, []).append(conf)
        if not drafted:
            return
        for r, p in enumerate(sorted(drafted[1], reverse=True)[: len(self.child_p)]):  # the root's children
            self.child_p[r] = 0.95 * self.child_p[r] + 0.05 * p
        self.weight = DECAY * self.weight + 1
        for key in self.scores:
            self.scores[key] *= DECAY
        for width in WIDTHS:
            level, pool = drafted[1], []
            for d in range(1, max(DEPTHS) + 1):
                pool += level
                if d in DEPTHS:
                    gain = [0.0]  # gain[n]: expected accepted nodes among the n most confident
                    for conf in sorted(pool, reverse=True)[: max(NODES)]:
                        gain.append(gain[-1] + self.acceptance(conf))
                    for n in NODES:
                        self.scores[(width, d, n)] = self.scores.get((width, d, n), 0.0) + gain[min(n, len(gain) - 1)]
                # the next level: the children of this level's `width` most confident nodes; those of
                # the first `drafted_width` were drafted (if this step got that deep), the rest extrapolated
                read = min(width, drafted_width) * K if d + 1 in drafted else 0
                frontier = sorted(level, reverse=True)[read // K:width]
                level = drafted.get(d + 1, [])[:read] + [f * p for f in frontier for p in self.child_p]
