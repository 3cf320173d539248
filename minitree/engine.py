"""The engine: prefill, then step() = draft -> verify -> accept -> compact, until done.

Plain decoding is the same loop with a root-only tree and no draft. Every model forward
gets its attention rule as tensors (attention.TreeMask); each decoder layer builds the mask
from them inside its compiled region. Layers are compiled with fullgraph=True and
dynamic=False, one graph per (model shape, query length), so a steady-state decode never
recompiles. The engine knows nothing about text: it takes
and returns token ids.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from .attention import BLOCK, TreeMask
from .accept import accept_greedy, accept_sample
from .costs import PREFILL_CHUNKS, Plan
from .draft import draft_tree
from .kv import compact
from .model import Transformer
from .sampling import Sampling, probs
from . import tp
from .auto import Auto, family
from .tree import MAX_NODES, Tree, TreeSpec, parse_tree
from .verify import verify

# The shared layer function gets one graph per (model shape, query length); a bench run with
# several trees needs more than Dynamo's default of 8 before it would silently run eagerly.
torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 512)


class EngineError(ValueError):
    """Bad input to the engine (message is meant for users)."""


def masked_forward(model: Transformer, flex: bool, tokens, positions, slots, q_node, base, anc_bits,
                   logits: bool = True):
    """One forward of `model` over tokens [T] at `slots`, under the tree mask (attention.py). The
    ancestor bits are padded to MAX_NODES, so that compiled graphs depend on the row count only."""
    anc_bits = torch.nn.functional.pad(anc_bits, (0, MAX_NODES - anc_bits.numel()))
    return model(tokens, positions, slots, TreeMask(q_node, base, anc_bits, flex), logits)


# ----------------------------------------------------------------------------------------
@dataclass
class Stats:
    new_tokens: int = 0
    target_forwards: int = 0  # verify passes (one per step)
    draft_forwards: int = 0
    configs: Counter = field(default_factory=Counter)  # tree auto: configuration -> steps
    compile_s: float = 0.0  # compiling shapes first used mid-decode (tree auto), not in decode_s
    accepted: Counter = field(default_factory=Counter)  # accepted draft nodes per step -> count
    accepted_ranks: Counter = field(default_factory=Counter)  # child rank of each accepted node -> count
    prefill_s: float = 0.0
    first_token_s: float = 0.0  # from the call to the first committed token (prefill + first step)
    # phases of decoding; catch_up: the draft caching the tokens committed while it did not draft
    # (the prompt, deferred from prefill; tree auto's plain steps)
    time_s: dict = field(default_factory=lambda: dict(catch_up=0.0, draft=0.0, verify=0.0, accept=0.0, compact=0.0,
                                                       other=0.0))

    @property
    def tau(self) -> float:
        """Mean tokens committed per target forward (accepted + bonus)."""
        return sum((m + 1) * c for m, c in self.accepted.items()) / max(self.target_forwards, 1)

    def acceptance_per_depth(self, max_depth: int) -> list[float]:
        """Fraction of steps that accepted a node at depth d, for d = 1..max_depth."""
        steps = max(self.target_forwards, 1)
        return [sum(c for m, c in self.accepted.items() if m >= d) / steps for d in range(1, max_depth + 1)]

    @property
    def mean_accepted_rank(self) -> float:
        """Mean child rank of the accepted nodes, plus one: 1.0 when only first choices were accepted."""
        return 1 + sum(r * c for r, c in self.accepted_ranks.items()) / max(sum(self.accepted_ranks.values()), 1)

    @property
    def decode_s(self) -> float:
        return sum(self.time_s.values())

    def as_dict(self, max_depth: int) -> dict:
        return dict(new_tokens=self.new_tokens, target_forwards=self.target_forwards,
                    draft_forwards=self.draft_forwards, tau=self.tau,
                    accepted_histogram={int(k): v for k, v in sorted(self.accepted.items())},
                    acceptance_per_depth=self.acceptance_per_depth(max_depth), configs=dict(self.configs),
                    compile_s=self.compile_s,
                    accepted_ranks={int(k): v for k, v in sorted(self.accepted_ranks.items())},
                    prefill_s=self.prefill_s, first_token_s=self.first_token_s, decode_s=self.decode_s,
                    tokens_per_s=self.new_tokens / max(self.decode_s, 1e-9), time_s=dict(self.time_s))


@dataclass
class Result:
    tokens: list[int]
    stats: Stats


# ----------------------------------------------------------------------------------------
class Engine:
    """Lossless tree speculative decoding of `target`, drafted by `draft` along `tree` (a static
    Tree, a DynamicTree, their text specs: "2,2,1", "dynamic:depth=6,width=2,k=4,nodes=10", or
    "auto": chosen every few steps for this machine and this text, auto.py).

    With draft=None (or tree=None) it decodes plainly. Both models get a static KV cache
    of `max_seq_len` tokens plus room for one tree; prompt + output must fit in max_seq_len.
    `attention`: "flex" (FlexAttention BlockMask) or "sdpa" (dense mask, the reference).
    `plan`: execution shapes (costs.py): "measure" (rows, kernels and prefill chunks chosen
    from this machine's measured costs; the default when compiled), "exact" (every forward at
    least 4 rows: bf16 chains round like plain decoding), or "none" (forwards as they come;
    the default when not compiled). Prompts are prefilled in chunks of `prefill_chunks` shapes.
    """

    def __init__(self, target: Transformer, draft: Transformer | None = None, tree: "TreeSpec | str | None" = None, *,
                 max_seq_len: int = 2048, compile: bool = True, attention: str = "flex",
                 prefill_chunks: tuple[int, ...] = PREFILL_CHUNKS, draft_cutoff: float = 0.0, plan: str | None = None):
        if attention not in ("flex", "sdpa"):
            raise EngineError(f"attention must be 'flex' or 'sdpa', got {attention!r}")
        if draft is target:
            raise EngineError("the draft must be another model instance than the target (each holds its own KV cache)")
        if draft is not None and draft.args.vocab_size != target.args.vocab_size:
            raise EngineError(f"draft vocabulary ({draft.args.vocab_size} tokens) differs from the target's "
                              f"({target.args.vocab_size} tokens); they must share a tokenizer")
        if not 0 <= draft_cutoff < 1:
            raise EngineError(f"draft_cutoff must be in [0, 1), got {draft_cutoff}")
        if not prefill_chunks or not all(0 < c <= BLOCK for c in prefill_chunks):
            raise EngineError(f"prefill chunks must be in 1..{BLOCK}, got {prefill_chunks}")
        plan = plan or ("measure" if compile else "none")
        if plan not in ("measure", "exact", "none"):
            raise EngineError(f"plan must be 'measure', 'exact' or 'none', got {plan!r}")
        self.device = target.model.embed_tokens.weight.device
        self.target, self.draft = target, draft if tree is not None else None
        auto = self.draft is not None and tree == "auto"
        specs = [c.spec() for c in family()] if auto else [parse_tree(tree) if self.draft else Tree([])]
        self.tree, self.specs = specs[0].to(self.device), {}
        self.max_seq_len, self.prefill_chunks, self.draft_cutoff = max_seq_len, tuple(prefill_chunks), draft_cutoff
        self.max_depth = max(s.max_depth for s in specs)
        pad = max(*prefill_chunks, *(s.n for s in specs), *(s.n_rows for s in specs)) + 1
        cache_len = -(-(max_seq_len + pad) // BLOCK) * BLOCK
        self.models = [m for m in (target, self.draft) if m is not None]
        self.runs = []
        for m, name in zip(self.models, ("the target", "the draft")):
            m.setup_cache(cache_len)
            m.compile_layers(compile)
            (Plan.measured(m, name) if plan == "measure" else Plan.exact() if plan == "exact" else Plan()).apply(m)
            self.runs.append(functools.partial(masked_forward, m, attention == "flex"))
        self.auto = Auto(draft.plan.cost, target.plan.cost) if auto else None
        self.seq = torch.zeros(cache_len, dtype=torch.long, device=self.device)  # committed tokens
        self.L = torch.zeros((), dtype=torch.long, device=self.device)  # how many
        self.length = 0  # the same, on the host
        self.draft_upto = 0  # the draft has cached every committed slot below this one
        self.compiled: set[tuple[int, int]] = set()  # (model, rows) forwards run at least once

    # ------------------------------------------------------------------------------------
    def prefill(self, prompt: list[int]) -> None:
        """Cache prompt[:-1] in the target; prompt[-1] becomes the first root. The draft catches up
        when it first drafts (step), so that tree auto decoding plainly never pays for it."""
        self.seq.zero_()
        self.seq[: len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=self.device)
        self.L.fill_(len(prompt))
        self.length, self.draft_upto = len(prompt), 0
        self._cache(self.target, self.runs[0], 0, len(prompt) - 1)

    def _cache(self, model: Transformer, run, start: int, end: int) -> None:
        """Cache committed slots start..end-1 in `model`, in the chunk shapes its plan measured to be
        the cheapest for this length. Padding rows write token 0 to later slots, which are always
        written again before anything attends to them."""
        for c in model.plan.chunks(end - start, self.prefill_chunks):
            slots = torch.arange(start, start + c, device=self.device)
            causal = TreeMask.causal(c, self.device)
            run(self.seq[slots] * (slots < end), slots, slots, causal.q_node, causal.base, causal.anc_bits,
                logits=False)
            start += c

    @staticmethod
    def _shapes(spec: TreeSpec) -> list[tuple[int, int]]:
        """(model, rows) of every forward a step along `spec` runs: verify; the draft's window and levels."""
        return [(0, spec.n)] + ([(1, r) for r in (2, *spec.widths[1:])] if spec.max_depth else [])

    def _compile(self, shapes: list[tuple[int, int]]) -> float:
        """Run, once, a forward of each (model, rows) shape on scratch slots past the committed
        tokens, so that compiling lands here -> seconds taken."""
        t = time.perf_counter()
        for i, rows in shapes:
            if (i, rows) not in self.compiled:
                self.compiled.add((i, rows))
                slots = (self.L - 1).clamp(min=0) + torch.arange(rows, device=self.device)
                self.runs[i](self.seq[slots], slots, slots, torch.zeros_like(slots), slots[0],
                             torch.ones(1, dtype=torch.long, device=self.device))
        return time.perf_counter() - t

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile every shape this engine starts with (each prefill chunk shape of each model,
        every draft level and verify), so that no compilation lands in a timed decode -> seconds.
        Tree auto compiles the shapes of other configurations when it first chooses them."""
        self.seq.zero_()
        self.L.zero_()
        shapes = [(i, c) for i in range(len(self.models)) for c in self.prefill_chunks] + self._shapes(self.tree)
        return self._compile(shapes + (self._shapes(self._spec(self.auto.current)) if self.auto else []))

    def _spec(self, config) -> TreeSpec:
        if config.name not in self.specs:
            self.specs[config.name] = config.spec().to(self.device)
        return self.specs[config.name]

    def step(self, sampling: Sampling, generator: torch.Generator | None, one_hot_draft: bool):
        """One speculative step along self.tree -> (committed tokens [D+1], how many of them count:
        n_acc + 1, the accepted path [D+1], this step's StepTree, draft forwards run)."""
        L, base = self.L, self.L - 1
        t = self._clock()
        if self.tree.max_depth:
            if self.draft_upto < self.length - 2:  # after the prompt, or when tree auto decoded plainly
                self._cache(self.draft, self.runs[1], self.draft_upto, self.length - 2)
                t = self._clock("catch_up", t)
            tree, q, levels = draft_tree(self.runs[1], self.tree, self.seq, L, sampling, one_hot_draft, generator,
                                         self.draft_cutoff)
        else:  # plain decoding: the root alone
            tree, q, levels = self.tree.step._replace(tokens=self.seq[base].view(1)), None, 0
        t = self._clock("draft", t)
        logits = verify(self.runs[0], tree, base)
        t = self._clock("verify", t)
        if sampling.greedy:
            path, n_acc, bonus = accept_greedy(tree, logits)
        else:
            u = torch.rand(max(tree.max_depth, 1) * tree.children.shape[1] + 1, generator=generator,
                           device=self.device)
            path, n_acc, bonus = accept_sample(tree, probs(logits, sampling), q, u, one_hot_draft)
        # [D+1]: the accepted nodes' tokens, the bonus at index n_acc, then junk
        out = torch.cat([tree.tokens[path[1:]], bonus.view(1)]).scatter(0, n_acc.view(1), bonus.view(1))
        t = self._clock("accept", t)
        compact(self.target.kv_cache, base, path)
        if levels:
            compact(self.draft.kv_cache, base, tree.draft_row[path])
        self.seq.index_copy_(0, L + torch.arange(tree.max_depth + 1, device=self.device), out)
        self.L += n_acc + 1
        self._clock("compact", t)
        return out, n_acc + 1, path, tree, levels

    def _clock(self, phase: str | None = None, since: float = 0.0) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if phase is not None:
            self._times[phase] += now - since
        return now

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
            generator = torch.Generator(device=self.device)
            generator.manual_seed(tp.broadcast(seed if seed is not None else torch.seed()))
        stats = Stats()
        self._times = stats.time_s
        start = time.perf_counter()
        self.prefill(prompt)
        stats.prefill_s = time.perf_counter() - start
        out: list[int] = []
        room = self.max_seq_len - self.max_depth - 1
        t0 = time.perf_counter()
        while len(out) < max_new_tokens and len(prompt) + len(out) <= room:
            if self.auto is not None:
                config = tp.broadcast(self.auto.choose())  # with tensor parallelism, rank 0 decides
                self.tree = self._spec(config)
                stats.compile_s += self._compile(self._shapes(self.tree))
                before = dict(stats.time_s)
            committed, count, path, tree, levels = self.step(sampling, generator, one_hot_draft)
            n = int(count)  # the one host sync per step
            new = committed[:n].tolist()
            stats.first_token_s = stats.first_token_s or time.perf_counter() - start - stats.compile_s
            self.length += n
            if levels:
                self.draft_upto = self.length - 2
            stats.target_forwards += 1
            stats.draft_forwards += levels
            stats.accepted[n - 1] += 1
            stats.accepted_ranks.update(tree.rank[path[1:n]].tolist())
            if self.auto is not None:
                stats.configs[config.name] += 1
                self.auto.observe(config, tree.conf.tolist(), set(path[:n].tolist()), tree.candidates.tolist(),
                                  self.tree.cand_depth.tolist(), levels, stats.time_s["draft"] - before["draft"],
                                  stats.time_s["verify"] - before["verify"])
            new = new[: max_new_tokens - len(out)]
            stop = next((i for i, tok in enumerate(new) if tok in eos), None)
            new = new if stop is None else new[: stop + 1]
            out += new
            if on_tokens is not None:
                on_tokens(new)
            if stop is not None:
                break
        stats.new_tokens = len(out)
        stats.time_s["other"] = time.perf_counter() - t0 - sum(stats.time_s.values()) - stats.compile_s
        return Result(out, stats)
