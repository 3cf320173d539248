"""What a decode did: one step's named result, and the statistics of a generate call."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .tree import StepTree

PHASES = ("catch_up", "draft", "verify", "accept", "compact")


class Step(NamedTuple):
    """One engine step (Engine.step). Tensors stay on the device; `count` is the step's one host read.

    tokens  [D+1]  the committed tokens: the accepted nodes', then the bonus token, then junk
    count   []     how many of them count: accepted nodes + 1
    path    [D+1]  the accepted path, root first, padded by repeating its last node
    tree    StepTree: what was drafted and verified
    levels  int    draft forwards run (0: plain decoding, or drafting stopped before level 1)
    times   dict   phase -> seconds, when the engine times its steps (Engine.timed; else empty)
    """
    tokens: torch.Tensor
    count: torch.Tensor
    path: torch.Tensor
    tree: StepTree
    levels: int
    times: dict


class Clock:
    """Times the phases of a step: `lap(phase)` adds the seconds since the last lap. With
    sync=True (a GPU), it waits for the device first; when not timing, it does nothing."""

    def __init__(self, enabled: bool, sync: bool):
        self.enabled, self.sync, self.times = enabled, sync, {}
        self.last = self.now() if enabled else 0.0

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.enabled:
            now = self.now()
            self.times[phase] = self.times.get(phase, 0.0) + now - self.last
            self.last = now


@dataclass
class Stats:
    new_tokens: int = 0
    target_forwards: int = 0  # verify passes (one per step)
    draft_forwards: int = 0
    configs: Counter = field(default_factory=Counter)  # tree auto: configuration -> steps
    compile_s: float = 0.0  # compiling shapes first used mid-decode (tree auto), not in decode_s
    accepted: Counter = field(default_factory=Counter)  # accepted draft nodes per step -> count
    accepted_ranks: Counter = field(default_factory=Counter)  # child rank of each accepted node -> count
    from_ngram: int = 0  # accepted nodes that n-gram branches proposed (the others: the draft's)
    prefill_s: float = 0.0
    first_token_s: float = 0.0  # from the call to the first committed token (prefill + first step)
    # phases of decoding; catch_up: the draft caching the tokens committed while it did not draft
    # (the prompt, deferred from prefill; tree auto's plain steps)
    time_s: dict = field(default_factory=lambda: dict.fromkeys(PHASES + ("other",), 0.0))

    def record(self, step: Step, n: int, ngram_from: int) -> None:
        """Count one step that committed n tokens; its tree's nodes from `ngram_from` on were n-gram branches."""
        self.target_forwards += 1
        self.draft_forwards += step.levels
        self.accepted[n - 1] += 1
        path = step.path[1:n]
        self.accepted_ranks.update(step.tree.rank[path].tolist())
        self.from_ngram += sum(node >= ngram_from for node in path.tolist())
        for phase, seconds in step.times.items():
            self.time_s[phase] += seconds

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
                    accepted_ranks={int(k): v for k, v in sorted(self.accepted_ranks.items())}, from_ngram=self.from_ngram,
                    prefill_s=self.prefill_s, first_token_s=self.first_token_s, decode_s=self.decode_s,
                    tokens_per_s=self.new_tokens / max(self.decode_s, 1e-9), time_s=dict(self.time_s))


@dataclass
class Result:
    tokens: list[int]
    stats: Stats
