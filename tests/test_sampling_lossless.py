"""Lossless sampling: tree decoding at temperature > 0 samples exactly the target's distribution.

The models here have no decoder layers (embedding -> norm -> lm_head), so the next-token
distribution depends on the last token only: generated text is a Markov chain whose
transition matrix is the target's processed distribution p(b | a), computable exactly.
Every consecutive pair of tokens is one sample of a transition, so a few long generations
give tens of thousands of samples, compared with p by a chi-square test over all
transitions. The same test applied to deliberately wrong acceptance rules must fail.
"""

import copy

import pytest
import torch
from scipy.stats import chi2

import minitree
import minitree.accept
import minitree.engine
from minitree.sampling import probs
from reference import JOINT_SAMPLES, T07, T1, V, chi_square_pvalue, sample_transitions, transition_matrix
from tiny import save_random

DYNAMIC = "dynamic:depth=3,width=2,k=2,nodes=5"  # top-k children, so the one-hot rule
CASES = [(tree, s, False) for tree in ("2,2,1", "3,1", "1,1,1") for s in (T1, T07)] + [("2,2,1", T07, True),
                                                                                      (DYNAMIC, T1, True), (DYNAMIC, T07, True)]


@pytest.mark.parametrize("tree, sampling, one_hot", CASES,
                         ids=[f"{t}-T{s.temperature}-p{s.top_p}{'-topk' if o else ''}" for t, s, o in CASES])
def test_tree_sampling_matches_target_distribution(markov_pair, tree, sampling, one_hot):
    target, draft = markov_pair
    counts, tau = sample_transitions(target, draft, tree, sampling, one_hot)
    pvalue = chi_square_pvalue(counts, transition_matrix(target, sampling))
    print(f"tree {tree} {sampling} one_hot={one_hot}: tau {tau:.3f}, p-value {pvalue:.3g}")
    assert tau > 1.2, "the draft should be accepted often enough for the test to mean something"
    assert pvalue > 1e-3


def test_restricted_vocab_draft_sampling_matches_target_distribution(markov_pair):
    """Tokens the draft cannot propose (q = 0) must still come out with the target's probability."""
    target, draft = markov_pair
    counts, _ = sample_transitions(target, minitree.restrict_vocab(copy.deepcopy(draft), V // 2), "2,2,1", T1)
    assert chi_square_pvalue(counts, transition_matrix(target, T1)) > 1e-3


def test_early_stop_sampling_matches_target_distribution(markov_pair):
    """Children below an early stop are never accepted; the bonus then comes from the residual."""
    levels = []
    counts, _ = sample_transitions(*markov_pair, "2,2,1,1", T1, cutoff=0.3, levels=levels)
    pvalue = chi_square_pvalue(counts, transition_matrix(markov_pair[0], T1))
    print(f"early stop at 0.3: {sum(levels) / len(levels):.2f} of 4 draft levels per step, p-value {pvalue:.3g}")
    assert 1.2 < sum(levels) / len(levels) < 3.8
    assert pvalue > 1e-3


def test_plain_sampling_matches_target_distribution(markov_pair):
    counts, _ = sample_transitions(markov_pair[0], None, None, T07)
    assert chi_square_pvalue(counts, transition_matrix(markov_pair[0], T07)) > 1e-3


@pytest.mark.parametrize("tree", ["2,2,1", DYNAMIC])
def test_negative_control_draft_softmax_for_top_k_drafts(markov_pair, monkeypatch, tree):
    """Top-k drafts verified as if they were draws from the draft softmax: biased, and caught."""
    real = minitree.engine.accept_sample
    monkeypatch.setattr(minitree.engine, "accept_sample", lambda *a: real(*a[:-1], False))
    counts, _ = sample_transitions(*markov_pair, tree, T1, one_hot=True)
    pvalue = chi_square_pvalue(counts, transition_matrix(markov_pair[0], T1))
    print(f"negative control, draft softmax for top-k drafts: p-value {pvalue:.3g}")
    assert pvalue < 1e-6


def test_negative_control_no_residual_update(markov_pair, monkeypatch):
    """Rejected siblings not removed from p: biased, and caught."""
    monkeypatch.setattr(minitree.accept, "residual", lambda p, q: p)
    counts, _ = sample_transitions(*markov_pair, "2,2,1", T1)
    pvalue = chi_square_pvalue(counts, transition_matrix(markov_pair[0], T1))
    print(f"negative control, no residual update: p-value {pvalue:.3g}")
    assert pvalue < 1e-6


def test_trees_accept_more_than_a_chain_of_the_same_depth(markov_pair):
    _, tau_chain = sample_transitions(*markov_pair, "1,1,1", T1, n=5000)
    _, tau_tree = sample_transitions(*markov_pair, "2,2,1", T1, n=5000)
    _, tau_wide = sample_transitions(*markov_pair, "4,2,1", T1, n=5000)
    print(f"tau at T=1: chain 1,1,1 {tau_chain:.3f}, tree 2,2,1 {tau_tree:.3f}, tree 4,2,1 {tau_wide:.3f}")
    assert tau_chain + 0.1 < tau_tree < tau_wide


def test_same_seed_same_output(pair):
    target, draft = pair
    engine = minitree.Engine(target, draft, "2,2,1", compile=False, attention="sdpa", max_seq_len=256)
    a, b, c = (engine.generate([5, 6, 7], 40, T07, seed=s).tokens for s in (1, 1, 2))
    assert a == b and a != c


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature must be >= 0"), (dict(top_p=0.0), r"top-p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top-p must be in \(0, 1\]"), (dict(top_k=-1), "top-k must be an integer >= 0"),
])
def test_invalid_sampling_parameters(kwargs, message):
    with pytest.raises(minitree.SamplingError, match=message):
        minitree.Sampling(**kwargs)


def test_top_k_top_p_processing():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    p = probs(logits, minitree.Sampling(temperature=1.0, top_k=3))
    assert (p[0, 3:] == 0).all() and torch.allclose(p[0, :3], logits[0, :3].softmax(-1))
    full = logits.softmax(-1)[0]
    p = probs(logits, minitree.Sampling(temperature=1.0, top_p=0.9))
    keep = int((full.cumsum(0) - full < 0.9).sum())  # smallest prefix reaching 0.9
    assert (p[0, keep:] == 0).all() and (p[0, :keep] > 0).all()


@pytest.mark.parametrize("broken", [False, True], ids=["exact", "negative-control-no-residual"])
def test_first_two_tokens_match_exact_enumeration(tmp_path, monkeypatch, broken):
    """With attention (context matters): the joint law of the first two generated tokens from
    tree decoding equals the target's, enumerated exactly by transformers; with the residual
    update skipped, the same test rejects it."""
    if broken:
        monkeypatch.setattr(minitree.accept, "residual", lambda p, q: p)
    kw = dict(num_hidden_layers=1, vocab_size=16, hidden_size=32, intermediate_size=64, tie_word_embeddings=False)
    hf = save_random(tmp_path / "target", "qwen2", seed=21, head_scale=10.0, **kw)
    save_random(tmp_path / "draft", "qwen2", seed=22, noise_from=tmp_path / "target", noise=0.5, **kw)
    target, draft = minitree.load(tmp_path / "target"), minitree.load(tmp_path / "draft")
    prompt = [3, 7, 1, 12]
    with torch.no_grad():
        seqs = torch.tensor([prompt + [x] for x in range(16)])
        p1 = hf(torch.tensor([prompt])).logits[0, -1].double().softmax(-1)  # [16]
        p2 = hf(seqs).logits[:, -1].double().softmax(-1)  # [16, 16]: p(x2 | x1)
    joint = p1[:, None] * p2
    engine = minitree.Engine(target, draft, "2,2,1", compile=False, attention="sdpa", max_seq_len=32,
                             prefill_chunks=(8,))
    counts = torch.zeros(16, 16, dtype=torch.float64)
    for seed in range(JOINT_SAMPLES):
        x1, x2 = engine.generate(prompt, 2, T1, seed=seed, eos_token_ids=[]).tokens
        counts[x1, x2] += 1
    expected = JOINT_SAMPLES * joint
    big = expected >= 5  # cells expecting fewer than 5 samples are pooled into one bin
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    stat = float(((obs - exp) ** 2 / exp).sum())
    pvalue = float(chi2.sf(stat, len(obs) - 1))
    print(f"first two tokens, tree 2,2,1, 1-layer model, broken={broken}: p-value {pvalue:.3g}")
    assert pvalue < 1e-6 if broken else pvalue > 1e-3
