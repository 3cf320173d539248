"""A step is capture-safe (graphs.py): no host read, no data-dependent shape and no host-device copy
between its first and last kernel. Proven on the CPU by recording every op a step dispatches."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import minitree
import minitree.engine

# Ops that read a tensor on the host, or make a shape from a tensor's values, or bring host data in.
HOST = ("aten.item", "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique",
        "aten._unique", "aten.repeat_interleave.Tensor", "aten.lift_fresh", "aten.equal", "aten.is_nonzero")


class HostSyncs(TorchDispatchMode):
    """Records the ops above, and copies between devices, dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        if str(func).startswith(HOST) or len(devices) > 1 or ("device" in kwargs and func.__name__ == "_to_copy"):
            self.found.append(str(func))
        return func(*args, **kwargs)


CASES = [("2,2,1", minitree.Sampling(), 0.0), ("dynamic:depth=4,width=2,k=2,nodes=6", minitree.Sampling(), 0.0),
         ("2,2,1", minitree.Sampling(temperature=1.0, top_k=20, top_p=0.9), 0.0),
         ("dynamic:depth=4,width=2,k=2,nodes=6", minitree.Sampling(temperature=0.7), 0.0),
         ("2,2,1,1", minitree.Sampling(), 0.05), (None, minitree.Sampling(), 0.0)]


def steps_under(engine, sampling, n=3) -> list[str]:
    """Ops recorded over n steps after the first (which catches the draft up, outside any graph)."""
    generator = None if sampling.greedy else engine.generator.manual_seed(0)
    with torch.inference_mode():
        engine.prefill(list(range(1, 60)))
        engine.advance(engine.step(sampling, generator))
        mode = HostSyncs()
        for _ in range(n):
            with mode:
                step = engine.step(sampling, generator)
            engine.advance(step)  # the one host read per step, outside
    return mode.found


@pytest.mark.parametrize("tree, sampling, cutoff", CASES,
                         ids=["static", "dynamic", "sampling", "dynamic-sampling", "masked-early-stop", "plain"])
def test_a_step_reads_nothing_on_the_host(pair, tree, sampling, cutoff):
    """Eager, with the dense attention mask (every op dispatches one by one). The early stop runs as
    on a GPU: masked on the device instead of read on the host."""
    engine = minitree.Engine(pair[0], pair[1] if tree else None, tree, compile=False, attention="sdpa",
                             max_seq_len=256, draft_cutoff=cutoff, masked_stop=True)
    assert steps_under(engine, sampling) == []


def test_a_planted_host_read_is_caught(pair, monkeypatch):
    real = minitree.engine.accept_greedy

    def reads(tree, logits):
        path, n_acc, bonus = real(tree, logits)
        return path, n_acc + int(n_acc) * 0, bonus  # an .item() in the middle of the step

    monkeypatch.setattr(minitree.engine, "accept_greedy", reads)
    engine = minitree.Engine(pair[0], pair[1], "2,2,1", compile=False, attention="sdpa", max_seq_len=256)
    found = steps_under(engine, minitree.Sampling())
    assert len(found) == 3 and all(op.startswith(("aten.item", "aten._local_scalar_dense")) for op in found)


def test_the_host_early_stop_is_a_host_read(pair):
    """On the CPU the early stop reads each level's best confidence (and drafts nothing more after a
    stop); that is what masking replaces on a GPU."""
    engine = minitree.Engine(pair[0], pair[1], "2,2,1,1", compile=False, attention="sdpa", max_seq_len=256,
                             draft_cutoff=0.05)
    assert engine.masked_stop is False
    assert steps_under(engine, minitree.Sampling())


@pytest.mark.parametrize("tree", ["2,2,1,1", "dynamic:depth=5,width=2,k=2,nodes=8"])
def test_the_masked_early_stop_verifies_the_same_trees(pair, tree):
    """Masked (GPU) or read on the host (CPU), the early stop verifies the same trees: same tokens, same
    acceptance, step for step."""
    results = []
    for masked in (False, True):
        engine = minitree.Engine(pair[0], pair[1], tree, compile=False, attention="sdpa", max_seq_len=256,
                                 draft_cutoff=2e-3, masked_stop=masked)
        results.append(engine.generate(list(range(1, 60)), 40))
    (host, masked) = results
    assert host.tokens == masked.tokens and host.stats.accepted == masked.stats.accepted
    assert host.stats.draft_forwards < masked.stats.draft_forwards  # masking drafts every level
