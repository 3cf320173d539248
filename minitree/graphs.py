"""CUDA graphs: on a GPU, each tree configuration's step is captured once and replayed.

A step on a GPU is bound by kernel launches, not by arithmetic: the point of trees there is
that extra verify rows are nearly free, and a replayed graph launches the whole step (every
draft level, verify, accept, compact) at once. The step is capture-safe: no host read, no
data-dependent shape, no host-device copy inside it (tests/test_capture_safe.py checks it on the
CPU); everything it reads or writes lives at fixed addresses (the committed tokens and their
count, both KV caches, the tree's tensors, the random generator's state), so a graph captured
once serves every later step of its configuration. What stays outside: the draft catching up
with tokens decoded plainly (its length varies), and the one host read per step (how many
tokens the step committed).

torch.cuda.CUDAGraph rather than torch.compile(mode="reduce-overhead"): the layers are compiled
one region each, and the step's own tensor work (tree selection, acceptance, compaction) runs
between them; reduce-overhead would graph each compiled region and still launch the rest one
kernel at a time, where one manual graph holds the whole step.
"""

from __future__ import annotations

from typing import Callable

import torch


class StepGraphs:
    """Captured steps by configuration key; `state` are the tensors a step mutates."""

    def __init__(self, state: Callable[[], list[torch.Tensor]], generator: torch.Generator | None):
        self.state, self.generator, self.graphs = state, generator, {}

    def __call__(self, key, step: Callable[[], tuple]):
        """Run `step` (a function of no arguments returning tensors) through its captured graph ->
        the graph's output tensors, overwritten by every replay."""
        if key not in self.graphs:
            self.graphs[key] = self.capture(step)
        graph, outputs = self.graphs[key]
        graph.replay()
        return outputs

    def capture(self, step) -> tuple[torch.cuda.CUDAGraph, tuple]:
        """Warm `step` up once on a side stream (first launches allocate and pick kernels), undo what
        it changed, then capture it (capturing records kernels without running them)."""
        state = self.state()
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(state, saved):
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:
            graph.register_generator_state(self.generator)
        with torch.cuda.graph(graph):
            outputs = step()
        return graph, outputs
