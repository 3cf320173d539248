"""What the tests share: the references exactness tests compare with (plain decoding, a plain
causal forward), their prompts, generate.py as a user runs it, and the distribution test of
lossless sampling (test_sampling_lossless.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from scipy.stats import chi2

import minitree
from gguf import GGMLQuantizationType

from minitree.attention import TreeMask
from minitree.kernels import kernels
from minitree.sampling import probs


ROOT = Path(__file__).resolve().parent.parent
FAST = ["--no-compile", "--dtype", "float32", "--no-chat", "--max-seq-len", "256"]  # generate.py on tiny models


def generate(*args, check=True) -> subprocess.CompletedProcess:
    """generate.py as a user runs it; with `check`, it must succeed."""
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, stdin=subprocess.DEVNULL, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def prompt(n: int, seed: int) -> list[int]:
    """n random token ids below 256 (every tiny model's vocabulary holds them)."""
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def plain(model, prompt: list[int], n: int, max_seq_len: int = 512, **kw) -> list[int]:
    """Plain greedy (or seeded) decoding of `model`, eager, dense SDPA masks: the reference."""
    engine = minitree.Engine(model, compile=False, attention="sdpa", max_seq_len=max_seq_len)
    return engine.generate(prompt, n, **kw).tokens


SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)  # tiny GGUF models (K-quants: rows of 256)


def causal(model, flex: bool = False, cache_len: int = 256):
    """forward(ids, start=0) -> fp32 logits of ids at slots start.., through a runner of its own whose
    cache keeps what earlier calls wrote (eager; every row in the weights' own form)."""
    runner = minitree.Runner(model, compile=False, attention="flex" if flex else "sdpa", plan="none",
                             cache_len=cache_len)

    def forward(ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        slots = torch.arange(start, start + len(ids))
        mask = TreeMask.causal(len(ids), "cpu")
        with torch.inference_mode():
            return runner(torch.as_tensor(ids), positions=slots, slots=slots, q_node=mask.q_node, base=mask.base,
                          anc_bits=mask.anc_bits)

    return forward


# ----------------------------------------------------------------------------------------
# Lossless sampling, tested on Markov models (test_sampling_lossless.py's docstring)

V = 32  # the vocabulary of conftest.markov_pair
# Sample sizes: at these, the negative controls below are rejected far beyond their 1e-6 bar (p-values
# 0 and 1e-91 at SAMPLES, 1e-121 at JOINT_SAMPLES; 2026-12-03), so the tests keep power to spare.
SAMPLES = 10_000
JOINT_SAMPLES = 3_000  # a whole generate call each (the slowest test)
RUN = 1000  # tokens per generate() call (keeps the dense masks small)
T1 = minitree.Sampling(temperature=1.0)
T07 = minitree.Sampling(temperature=0.7, top_p=0.9)


def transition_matrix(model, sampling):
    logits = causal(model)(torch.arange(V))  # no layers: no attention, each row depends on its token only
    return probs(logits, sampling).double()  # [V, V]: p(b | a)


def sample_transitions(target, draft, tree, sampling, one_hot=False, n=SAMPLES, cutoff=0.0, levels=None):
    engine = minitree.Engine(target, draft, tree, compile=False, attention="sdpa", max_seq_len=RUN + 16,
                             draft_cutoff=cutoff)
    counts, taus, seed = torch.zeros(V, V, dtype=torch.float64), [], 0
    while counts.sum() < n:
        prompt = [seed % V]
        result = engine.generate(prompt, RUN, sampling, seed=seed, one_hot_draft=one_hot, eos_token_ids=[])
        seq = torch.tensor(prompt + result.tokens)
        counts.index_put_((seq[:-1], seq[1:]), torch.ones(len(seq) - 1, dtype=torch.float64), accumulate=True)
        taus.append(result.stats.tau)
        if levels is not None:
            levels.append(result.stats.draft_forwards / result.stats.target_forwards)
        seed += 1
    return counts, sum(taus) / len(taus)


def chi_square_pvalue(counts, p):
    """Pearson chi-square of transition counts against p(b | a); impossible transitions must not occur.
    In each row, the least likely next tokens are pooled into one bin until every bin expects at least
    5 draws (the test's approximation needs that: a token expected 0.002 times and seen once would
    alone reject at 1e-40)."""
    assert counts[p == 0].sum() == 0, "sampled a token the target gives probability 0"
    expected = counts.sum(1, keepdim=True) * p
    stat, df = 0.0, 0
    for a in torch.nonzero(counts.sum(1) > 0).flatten().tolist():
        order = torch.argsort(expected[a])
        order = order[p[a][order] > 0]
        e, o = expected[a][order], counts[a][order]
        pooled = int(torch.searchsorted(torch.cumsum(e, 0), 5.0)) + 1  # the smallest cells, until they expect 5
        pooled = max(pooled, int((e < 5).sum()))
        bins_e = torch.cat([e[:pooled].sum().view(1), e[pooled:]])
        bins_o = torch.cat([o[:pooled].sum().view(1), o[pooled:]])
        stat += float(((bins_o - bins_e) ** 2 / bins_e).sum())
        df += len(bins_e) - 1
    return float(chi2.sf(stat, max(df, 1)))


def blocks_reversed(x: torch.Tensor, groups: torch.Tensor, kind: str, out: int) -> torch.Tensor:
    """The integer kernel's products with the blocks of inputs summed in reverse order: the same
    integers and scales, another float summation order (a planted kernel for negative controls)."""
    nb = x.shape[-1] // (256 if kind.endswith("_K") else 32)
    flip = lambda t, n: t.reshape(*t.shape[:-1], nb, n).flip(-2).reshape(t.shape).contiguous()
    return kernels().int_mm(flip(x, x.shape[-1] // nb), flip(groups, groups.shape[-1] // nb),
                            int(GGMLQuantizationType[kind]), out)
