"""The engine: prefill, then step() = draft -> verify -> accept -> compact, until done.

The engine runs two models through their runners (runner.py: cache, compiled layers, plan) and
knows nothing about text: it takes and returns token ids. Plain decoding is the same loop with a
root-only tree and no draft. Every step is sync-free until its one host read (how many tokens
it committed), so a steady-state decode never waits on the device mid-step and never recompiles.
"""

from __future__ import annotations

import contextlib
import gc
import time

import torch

from . import tp
from .accept import accept_greedy, accept_sample
from .attention import BLOCK
from .auto import AUTO_SPECS, Auto, Config, family
from .costs import PREFILL_CHUNKS
from .draft import draft_tree
from .errors import EngineError
from .graphs import StepGraphs
from .kv import compact
from .machine import release_free_memory
from .model import Transformer
from .runner import Runner
from .sampling import Sampling, probs
from .stats import Clock, Result, Stats, Step
from .tree import EarlierTexts, MixedTree, NgramTree, Tree, TreeSpec, parse_tree
from .verify import verify


class Committed:
    """The committed tokens, and how far each model has cached them.

    tokens        [S]  committed token ids (device)
    n             []   how many (device): steps advance it without a host read
    length        int  the same count on the host, updated after each step's one read
    history       list the same tokens on the host (n-gram trees look them up)
    draft_cached  int  the draft has cached every committed slot below this one
    pending       bool a step moved n and its count is not read yet: no other step may start
    """

    def __init__(self, size: int, device):
        self.tokens = torch.zeros(size, dtype=torch.long, device=device)
        self.n = torch.zeros((), dtype=torch.long, device=device)
        self.length = self.draft_cached = 0
        self.history: list[int] = []
        self.pending = False

    def stepping(self) -> None:
        """A step starts: it will move n, and `advanced` must note its count before the next one."""
        if self.pending:
            raise EngineError("the last step's count was not read: call engine.advance(step) before the next step")
        self.pending = True

    def reset(self, prompt: list[int]) -> None:
        self.tokens.zero_()
        self.tokens[: len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=self.tokens.device)
        self.n.fill_(len(prompt))
        self.length, self.draft_cached, self.pending = len(prompt), 0, False
        self.history = list(prompt)

    def advanced(self, tokens: list[int], expanded: list[int] | None) -> None:
        """A step committed `tokens` (already written on the device). `expanded`: when the draft
        drafted, its cache rows of the accepted nodes but the last (0: a node it did not expand, an
        n-gram branch's): it cached the root and those nodes up to the first it did not expand, and
        at most every committed slot but the last two (the next step's window recomputes those)."""
        base = self.length - 1
        self.history += tokens
        self.length, self.pending = self.length + len(tokens), False
        if expanded is not None:
            leading = next((i for i, row in enumerate(expanded) if row == 0), len(expanded))
            self.draft_cached = min(base + 1 + leading, self.length - 2)

    @property
    def uncached(self) -> int:
        """Committed slots the draft must cache before it drafts (every one but the last two)."""
        return max(self.length - 2 - self.draft_cached, 0)

    def rewind(self, length: int) -> None:
        """Forget the committed tokens after the first `length`."""
        self.n.fill_(length)
        self.length, self.draft_cached, self.pending = length, min(self.draft_cached, length - 2), False
        del self.history[length:]


class Engine:
    """Lossless tree speculative decoding of `target`, drafted by `draft` along `tree` (a static
    Tree, a DynamicTree, an NgramTree, a MixedTree, their text specs: "2,2,1", "dynamic:depth=6,
    width=2,k=4,nodes=10", "ngram", "dynamic+ngram", or "auto": chosen every few steps for this
    machine and this text, auto.py; "auto:draft" chooses without n-gram branches).

    `target` and `draft` are models (each gets a Runner of its own, built from `compile`,
    `attention`, `plan` and `prefill_chunks`: runner.py) or Runners (shared with other engines,
    as bench.py does). With tree=None the engine decodes plainly; with draft=None, so do trees the
    draft grows, n-gram trees propose from the text and "auto" chooses between the two. `draft_lossy`:
    lossy weight forms may serve the draft where measured cheaper (default: on CPU); the output
    does not change. `draft_cutoff`: stop drafting a step once no node of the next level reaches
    this draft confidence. Prompt + output must fit in max_seq_len. `cuda_graphs`: on a GPU, each
    configuration's step is captured once as a CUDA graph and replayed (graphs.py; default on).
    `masked_stop`: the draft's early stop as a device mask instead of a host read (draft.py;
    default: on a GPU). Every setting is a constructor argument: nothing outside this class
    assigns its attributes.
    """

    def __init__(self, target: Transformer | Runner, draft: Transformer | Runner | None = None,
                 tree: "TreeSpec | str | None" = None, *, max_seq_len: int = 2048, compile: bool = True,
                 attention: str | None = None, prefill_chunks: tuple[int, ...] = PREFILL_CHUNKS, draft_cutoff: float = 0.0,
                 plan: str | None = None, draft_lossy: bool | None = None, cuda_graphs: bool = True,
                 masked_stop: bool | None = None):
        if draft is not None and draft is target and isinstance(draft, Runner):
            raise EngineError("the draft needs a runner of its own (each runner holds its own KV cache)")
        if draft is not None and draft.args.vocab_size != target.args.vocab_size:
            raise EngineError(f"draft vocabulary ({draft.args.vocab_size} tokens) differs from the target's "
                              f"({target.args.vocab_size} tokens); they must share a tokenizer")
        if not 0 <= draft_cutoff < 1:
            raise EngineError(f"draft_cutoff must be in [0, 1), got {draft_cutoff}")
        auto = isinstance(tree, str) and tree in AUTO_SPECS  # without a draft: plain decoding or n-gram branches
        if tree == "auto:draft" and draft is None:
            raise EngineError("tree auto:draft chooses among the draft's trees: it needs a draft")
        spec = None if tree is None or auto else parse_tree(tree)
        if isinstance(spec, NgramTree) and draft is not None:
            raise EngineError("an n-gram tree proposes without a draft model: pass draft=None, or mix the "
                              "draft's tree with n-gram branches (\"dynamic+ngram\")")
        if isinstance(spec, MixedTree) and draft is None:
            raise EngineError(f"tree {spec.name} mixes the draft's tree with n-gram branches: it needs a draft")
        draft = draft if tree is not None else None
        configs = family(drafts=draft is not None, lookups=tree != "auto:draft") if auto else []
        specs = [c.spec for c in configs] if auto else \
            [spec if spec is not None and (draft is not None or not spec.drafts) else Tree([])]

        def runner(model, name: str, lossy: bool) -> Runner:
            if isinstance(model, Runner):
                return model
            return Runner(model, compile=compile, attention=attention, plan=plan, lossy=lossy,
                          prefill_chunks=prefill_chunks, name=name)

        self.target = runner(target, "the target", False)
        self.device = self.target.device
        lossy = self.device.type == "cpu" if draft_lossy is None else draft_lossy
        self.draft = runner(draft, "the draft", lossy) if draft is not None else None
        self.tree, self.specs = specs[0].to(self.device), {}
        self.max_seq_len, self.draft_cutoff = max_seq_len, draft_cutoff
        self.max_depth = max(s.max_depth for s in specs)
        runners = [r for r in (self.target, self.draft) if r is not None]
        pad = max(*(c for r in runners for c in r.prefill_chunks), *(s.n for s in specs),
                  *(s.n_rows for s in specs), *(s.max_depth + 1 for s in specs)) + 1
        cache_len = -(-(max_seq_len + pad) // BLOCK) * BLOCK
        for r in runners:
            r.reserve(cache_len)
        draft_cost = self.draft.plan.cost if self.draft else lambda rows: 0.0
        measured = bool(self.target.plan.costs) and (self.draft is None or bool(self.draft.plan.costs))
        self.auto = Auto(draft_cost, self.target.plan.cost, seconds=measured, configs=configs) if auto else None
        self.seq = Committed(cache_len, self.device)
        self.earlier = EarlierTexts()  # the texts generate() decoded before: n-gram branches look there too
        gpu = self.device.type == "cuda"
        self.generator = torch.Generator(device=self.device)  # one object: a captured graph keeps its state
        self.graphs = StepGraphs(self._state, self.generator) if gpu and cuda_graphs else None
        self.timed = not gpu  # time each step's phases (on a GPU: a sync per phase, none inside a graph)
        self.masked_stop = gpu if masked_stop is None else masked_stop

    # ------------------------------------------------------------------------------------
    def prefill(self, prompt: list[int]) -> None:
        """Cache prompt[:-1] in the target; prompt[-1] becomes the first root. The draft catches up
        when it first drafts (step), so that tree auto decoding plainly never pays for it."""
        self.seq.reset(prompt)
        self.target.cache(self.seq.tokens, 0, len(prompt) - 1)

    def rewind(self, length: int) -> None:
        """Forget the committed tokens after the first `length` (>= 1): the next step continues from
        there. Cached slots below length - 1 stay valid in both models."""
        if not 1 <= length <= self.seq.length:
            raise EngineError(f"cannot rewind to {length} tokens; {self.seq.length} are committed")
        self.seq.rewind(length)

    def _shapes(self, spec: TreeSpec) -> list[tuple[Runner, int]]:
        """(runner, rows) of every forward a step along `spec` runs: verify; the draft's window and levels."""
        return [(self.target, rows) for rows in spec.sizes] + \
            ([(self.draft, r) for r in (2, *spec.widths[1:])] if spec.drafts else [])

    def _compile(self, shapes: list[tuple[Runner, int]]) -> float:
        """Run, once, a forward of each (runner, rows) shape on scratch slots past the committed
        tokens, so that compiling lands here -> seconds taken."""
        t = time.perf_counter()
        first = (self.seq.n - 1).clamp(min=0)
        ran = [runner.compile_rows(rows, self.seq.tokens, first) for runner, rows in shapes]
        if any(ran):
            release_free_memory()  # what loading and compiling freed
        return time.perf_counter() - t

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile every shape this engine starts with (each prefill chunk shape of each model,
        every draft level and verify), so that no compilation lands in a timed decode -> seconds.
        Tree auto compiles the shapes of other configurations when it first chooses them. Once
        they are compiled this does nothing (and leaves the committed tokens alone)."""
        runners = [r for r in (self.target, self.draft) if r is not None]
        shapes = [(r, c) for r in runners for c in r.prefill_chunks] + self._shapes(self.tree)
        shapes += self._shapes(self._spec(self.auto.current)) if self.auto else []
        if self._all_compiled(shapes):
            return 0.0
        self.seq.reset([0])
        return self._compile(shapes)

    @staticmethod
    def _all_compiled(shapes: list[tuple[Runner, int]]) -> bool:
        return all(rows in runner.compiled for runner, rows in shapes)

    def _spec(self, config: Config) -> TreeSpec:
        if config.name not in self.specs:
            self.specs[config.name] = config.spec.to(self.device)
        return self.specs[config.name]

    @contextlib.contextmanager
    def every_level_timed(self, graphs: bool = False):
        """Within: the draft drafts every level (no early stop), and unless `graphs` each step runs
        without its CUDA graph, each phase timed: for measuring what a step costs (bench/cost_only.py)."""
        saved = self.draft_cutoff, self.graphs, self.timed
        self.draft_cutoff = 0.0
        if not graphs:
            self.graphs, self.timed = None, True
        try:
            yield
        finally:
            self.draft_cutoff, self.graphs, self.timed = saved

    def _choose_tree(self, stats: Stats, left: int) -> Config | None:
        """Tree auto: this step's configuration (rank 0's under tensor parallelism; `left`: tokens the
        text may still take) as self.tree, its shapes compiled (seconds to stats) -> the configuration;
        other trees: None."""
        if self.auto is None:
            return None
        config = tp.broadcast(self.auto.choose(self.seq.uncached, self.seq.history, self.earlier, left))
        self.tree = self._spec(config)
        stats.compile_s += self._compile(self._shapes(self.tree))
        return config

    def _observe(self, config: Config | None, step: Step, n: int, stats: Stats) -> None:
        """Tree auto: what the step along `config` drafted, committed and cost, to auto and to stats."""
        if config is not None:
            stats.configs[config.name] += 1
            self.auto.observe(config, step, n, self.seq.history, self.earlier)

    # ------------------------------------------------------------------------------------
    def _state(self) -> list[torch.Tensor]:
        """The tensors a step writes (graphs.py)."""
        return [self.seq.tokens, self.seq.n, self.target.kv_cache] + ([self.draft.kv_cache] if self.draft else [])

    def step(self, sampling: Sampling, generator: torch.Generator | None = None, one_hot_draft: bool = False) -> Step:
        """One speculative step along self.tree (_step: draft -> verify -> accept -> compact), after
        the draft catches up with tokens it has not cached; on a GPU, replayed from a CUDA graph."""
        clock = Clock(self.timed, self.timed and self.device.type == "cuda")
        seq = self.seq
        seq.stepping()
        if self.tree.drafts and seq.uncached:  # after the prompt, or plain steps of auto
            self.draft.cache(seq.tokens, seq.draft_cached, seq.length - 2)
            clock.lap("catch_up")
        if self.graphs is None or self.tree.looks_up:  # proposals made on the host: not capturable
            return Step(*self._step(sampling, generator, one_hot_draft, clock), clock.times)
        key = (self.tree.name, sampling, one_hot_draft, generator is not None)
        return Step(*self.graphs(key, lambda: self._step(sampling, generator, one_hot_draft, clock)), {})

    def _step(self, sampling: Sampling, generator: torch.Generator | None, one_hot_draft: bool, clock: Clock):
        """draft -> verify -> accept -> compact: (committed tokens, count, path, tree, levels)."""
        seq, base, spec = self.seq, self.seq.n - 1, self.tree
        tree, q, levels = None, None, 0
        if spec.drafts:
            tree, q, levels = draft_tree(self.draft, spec.grown, seq.tokens, seq.n, sampling, one_hot_draft,
                                         generator, self.draft_cutoff, self.masked_stop)
        elif not spec.looks_up:  # plain decoding: the root alone
            tree = spec.step._replace(tokens=seq.tokens[base.view(1)])
        if spec.looks_up:  # branches continuing the committed text (tree.py), beside the draft's or alone
            tree = spec.extend(seq.history, tree, self.earlier)
            q = q if q is not None else tree.conf.new_zeros(1, 1)  # read by nothing: proposals take the one-hot rule
        clock.lap("draft")
        logits = verify(self.target, tree, base)
        clock.lap("verify")
        if sampling.greedy:
            path, n_acc, bonus = accept_greedy(tree, logits)
        else:
            u = torch.rand(max(tree.max_depth, 1) * tree.children.shape[1] + 1, generator=generator,
                           device=self.device)
            path, n_acc, bonus = accept_sample(tree, probs(logits, sampling), q, u, one_hot_draft)
        # [D+1]: the accepted nodes' tokens, the bonus at index n_acc, then junk
        out = torch.cat([tree.tokens[path[1:]], bonus.view(1)]).scatter(0, n_acc.view(1), bonus.view(1))
        clock.lap("accept")
        compact(self.target.kv_cache, base, path)
        if levels:
            compact(self.draft.kv_cache, base, tree.draft_row[path])
        seq.tokens.index_copy_(0, seq.n + torch.arange(tree.max_depth + 1, device=self.device), out)
        seq.n += n_acc + 1
        clock.lap("compact")
        return out, n_acc + 1, path, tree, levels

    def advance(self, step: Step) -> int:
        """Read which tokens `step` committed, and the draft's cache rows of its path (the one host
        read per step), and note them -> their count."""
        n, *rest = torch.cat([step.count.view(1), step.tokens, step.tree.draft_row[step.path]]).tolist()
        rows = rest[len(step.tokens):]
        self.seq.advanced(rest[:n], rows[1:n - 1] if step.levels else None)
        return n

    # ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(), *,
                 seed: int | None = None, eos_token_ids=None, one_hot_draft: bool = False,
                 on_tokens=None) -> Result:
        """Decode up to max_new_tokens after `prompt` (token ids). Stops after an EOS token
        (included in the output) or when the context is full. `on_tokens(list)` is called
        with each step's committed tokens, for streaming. `one_hot_draft`: when sampling, draft the
        top-k tokens instead of drawing them (always so for dynamic trees)."""
        if not prompt:
            raise EngineError("the prompt is empty")
        if len(prompt) + 1 > self.max_seq_len:
            raise EngineError(f"the prompt has {len(prompt)} tokens; the context holds {self.max_seq_len} "
                              f"(raise max_seq_len, or shorten the prompt)")
        eos = set(self.target.args.eos_token_ids if eos_token_ids is None else eos_token_ids)
        one_hot_draft = one_hot_draft or self.tree.topk_children or self.auto is not None
        generator = None
        if not sampling.greedy:  # with tensor parallelism, every rank draws the same numbers
            generator = self.generator
            generator.manual_seed(tp.broadcast(seed if seed is not None else torch.seed()))
        stats = Stats()
        start = time.perf_counter()
        self.prefill(prompt)
        stats.prefill_s = time.perf_counter() - start
        out: list[int] = []
        room = self.max_seq_len - self.max_depth - 1
        t0 = time.perf_counter()
        # Python's cycle collector waits until the end: a full collection walks every object of torch
        # and the models (milliseconds), and decoding makes no cycles worth collecting sooner.
        with _collector_paused():
            while len(out) < max_new_tokens and len(prompt) + len(out) <= room:
                config = self._choose_tree(stats, max_new_tokens - len(out))
                step = self.step(sampling, generator, one_hot_draft)
                n = self.advance(step)
                stats.first_token_s = stats.first_token_s or time.perf_counter() - start - stats.compile_s
                stats.record(step, n, self.tree.ngram_from)
                self._observe(config, step, n, stats)
                new = self.seq.history[-n:][: max_new_tokens - len(out)]  # read by advance
                stop = next((i for i, tok in enumerate(new) if tok in eos), None)
                new = new if stop is None else new[: stop + 1]
                out += new
                if on_tokens is not None:
                    on_tokens(new)
                if stop is not None:
                    break
        stats.new_tokens = len(out)
        self.earlier.add(self.seq.history)
        stats.time_s["other"] = time.perf_counter() - t0 - sum(stats.time_s.values()) - stats.compile_s
        return Result(out, stats)


@contextlib.contextmanager
def _collector_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
