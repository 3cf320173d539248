"""On a GPU: steps replayed from CUDA graphs decode exactly what eager steps do (scripts/gpu_check.sh
runs these on a lent GPU; CI is CPU-only, where they are skipped)."""

import random

import pytest
import torch

import minitree
from minitree.auto import Auto
from reference import plain, prompt

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")]

PROMPT = prompt(100, 3)
CASES = [("2,2,1", minitree.Sampling()), ("dynamic:depth=4,width=2,k=2,nodes=6", minitree.Sampling()),
         ("2,2,1", minitree.Sampling(temperature=1.0, top_p=0.9))]


@pytest.fixture(scope="module")
def gpu_pair(pair_dirs):
    return [minitree.load(d, device="cuda") for d in pair_dirs]


@pytest.fixture(scope="module")
def reference(pair):
    return plain(pair[0], PROMPT, 64)  # on the CPU, eager, dense masks


@pytest.mark.parametrize("tree, sampling", CASES, ids=["static", "dynamic", "sampling"])
def test_graph_replay_equals_eager(gpu_pair, reference, tree, sampling):
    """The same engine settings with and without CUDA graphs: the same tokens (greedy: also those of
    plain decoding on the CPU); each configuration captured once and replayed."""
    runs = []
    for graphs in (True, False):
        engine = minitree.Engine(*gpu_pair, tree, max_seq_len=512, cuda_graphs=graphs, draft_cutoff=0.01)
        engine.warm_up()
        runs.append(engine.generate(PROMPT, 64, sampling, seed=5).tokens)
        if graphs:
            assert len(engine.graphs.graphs) == 1
    assert runs[0] == runs[1]
    if sampling.greedy:
        assert runs[0] == reference


def test_no_recompiles_in_steady_state(gpu_pair, reference):
    engine = minitree.Engine(*gpu_pair, "2,2,1", max_seq_len=512)
    engine.warm_up()
    engine.generate(PROMPT, 16)
    torch._dynamo.config.error_on_recompile = True
    try:
        tokens = engine.generate(PROMPT, 64).tokens
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert tokens == reference


def test_auto_switches_between_captured_configurations(gpu_pair, reference, monkeypatch):
    rng = random.Random(0)
    monkeypatch.setattr(Auto, "choose", lambda self: rng.choice(self.configs[:12]))
    engine = minitree.Engine(*gpu_pair, "auto", max_seq_len=512)
    assert engine.generate(PROMPT, 64).tokens == reference
    assert len(engine.graphs.graphs) >= 3
