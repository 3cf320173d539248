"""Draft-free trees (--tree ngram) and mixed trees (the draft's tree plus n-gram branches, "dynamic+ngram"):
proposals found in the committed text, verified like any tree, so greedy output is exactly plain
decoding's and sampled output has the target's distribution; beside the draft's nodes, they leave
the draft's cache exact for every slot it claims."""

import json

import pytest
import torch

import minitree
import minitree.accept
from minitree.tree import UNDRAFTED, EarlierTexts, MixedTree, NgramTree, StepTree, Tree
from reference import FAST, T1, chi_square_pvalue, generate, plain, prompt, sample_transitions, transition_matrix


def test_the_longest_recent_match_gives_the_branches():
    spec = NgramTree(depth=3, nodes=8, branches=2, match=3, min_match=1)
    #          0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [5, 6, 7, 1, 6, 7, 2, 9, 6, 7, 3, 6, 7]
    # suffix [6, 7] occurred at 1-2, 4-5 and 8-9 (most recent first: then 3, 2); [3, 6, 7] nowhere before
    assert spec.continuations(tokens) == [[3, 6, 7], [2, 9, 6]]
    assert spec.continuations([1, 2, 3, 4]) == []  # the last token never occurred before
    assert NgramTree(min_match=2).continuations([1, 2, 9, 3, 2]) == []  # a one-token match is not enough


def test_a_continuation_that_extends_another_replaces_it():
    spec = NgramTree(depth=4, nodes=8, branches=3, match=1, min_match=1)
    assert spec.continuations([8, 8, 8, 8]) == [[8, 8, 8]]  # [8] and [8, 8] (more recent) are its prefixes
    short = NgramTree(depth=2, nodes=8, branches=3, match=1, min_match=1)
    assert short.continuations([1, 5, 1, 5, 1]) == [[5, 1]]  # the same continuation twice is one branch


def test_a_short_match_guesses_short_and_earlier_texts_answer_when_the_text_has_none():
    spec = NgramTree(depth=4, nodes=8, branches=1, match=3, min_match=2, short=2)
    earlier = EarlierTexts(limit=12)
    earlier.add([7, 1, 2, 3, 4, 5])
    assert spec.continuations([9, 1, 2]) == []
    assert spec.continuations([9, 1, 2], earlier) == [[3, 4]]  # a 2-token match: at most `short` tokens
    assert spec.continuations([9, 8, 1, 2, 3], earlier) == [[4, 5]]  # a full match: up to the earlier text's end
    assert spec.continuations([1, 2, 0, 1, 2], earlier) == [[0, 1]]  # the text itself comes first
    earlier.add([6] * 7)  # 13 tokens in all: the oldest text goes
    assert earlier.texts == [[6] * 7] and spec.continuations([9, 1, 2], earlier) == []


def test_branches_share_their_prefixes_and_pad_to_a_compiled_size():
    spec = NgramTree(depth=3, nodes=8, branches=2, match=3, min_match=1)
    tokens = [1, 5, 6, 2, 9, 1, 5, 6, 3, 1, 5]  # after [1, 5]: [6, 3, 1] and [6, 2, 9]
    tree = spec.extend(tokens)
    assert spec.sizes == (1, 7, 9)  # 7 rows: two guesses of at most 3 tokens (a 2-token match is shorter than 3)
    assert tree.tokens.tolist() == [5, 6, 3, 1, 2, 9, UNDRAFTED]
    assert tree.parents.tolist()[:6] == [0, 0, 1, 2, 1, 4] and tree.depth.tolist()[:6] == [0, 1, 2, 3, 2, 3]
    assert tree.children[1].tolist()[:2] == [2, 4]  # node 1 (token 6) has two children, ranks 0 and 1
    padded = spec.extend([1, 5, 6, 1, 5])  # one continuation, [6, 1, 5]: four nodes in seven rows
    assert padded.tokens.tolist() == [5, 6, 1, 5, *[UNDRAFTED] * 3] and padded.rank.tolist() == [0, 0, 0, 0, 1, 2, 3]
    plain_step = spec.extend([1, 2, 3])
    assert plain_step.tokens.tolist() == [3]  # nothing found: one row, plain decoding


def test_branches_follow_the_drafts_nodes_and_branch_off_where_they_stop():
    # the draft's tree: root 5 -> 6 (node 1) -> 3 (node 2); root -> 8 (node 3, rank 1)
    drafted = StepTree.build(torch.tensor([5, 6, 3, 8]), torch.tensor([0, 0, 1, 0]), torch.tensor([0, 1, 2, 1]),
                             torch.tensor([0, 0, 0, 1]), torch.tensor([1.0, 0.9, 0.5, 0.1]),
                             torch.tensor([0, 1, 0, 0]), max_depth=2, k=2)
    mixed = MixedTree(Tree.parse("1,1"), NgramTree(depth=3, nodes=4, branches=2, match=3, min_match=1))
    assert mixed.sizes == (3, 7) and mixed.max_depth == 3
    tree = mixed.extend([1, 5, 6, 2, 9, 1, 5, 6, 3, 1, 5], drafted)  # after [1, 5]: [6, 3, 1] and [6, 2, 9]
    assert tree.tokens.tolist() == [5, 6, 3, 8, 1, 2, 9]  # [6, 3] were drafted: 1 hangs below node 2; 2 below node 1
    assert tree.parents.tolist() == [0, 0, 1, 0, 2, 1, 5] and tree.rank.tolist() == [0, 0, 0, 1, 0, 1, 0]
    assert tree.draft_row.tolist() == [0, 1, 0, 0, 0, 0, 0] and tree.paths.shape == (7, 4)
    assert mixed.extend([1, 2, 3], drafted) is drafted  # nothing found: the draft's tree as it was


def test_the_draft_caches_only_the_nodes_it_expanded():
    """An accepted path through an n-gram branch: the draft cached the root and the nodes it expanded
    up to the first n-gram node, never past it (the catch-up computes the rest)."""
    seq = minitree.engine.Committed(64, "cpu")
    seq.reset(list(range(10)))  # root at slot 9
    seq.advanced([20, 21, 22, 23, 24], expanded=[3, 0, 7])  # nodes at depths 1-3; depth 2 was an n-gram node
    assert seq.draft_cached == 9 + 1 + 1 and seq.length == 15
    seq.advanced([30, 31, 32], expanded=[1, 2])  # the draft's own nodes: all but the last two slots
    assert seq.draft_cached == seq.length - 2


@pytest.mark.parametrize("spec", ["2,2,1+ngram", "dynamic:depth=3,width=2,k=2,nodes=5+ngram:depth=6,nodes=6"])
def test_mixed_greedy_equals_plain_greedy_and_the_drafts_cache_stays_exact(pair, spec):
    target, draft = pair
    ids = prompt(30, 4) * 3
    engine = minitree.Engine(target, draft, spec, compile=False, attention="sdpa", max_seq_len=512)
    result = engine.generate(ids, 80)
    assert result.tokens == plain(target, ids, 80)
    assert result.stats.tau > 1.5 and result.stats.draft_forwards > 0
    assert 0 < result.stats.from_ngram < sum(result.stats.accepted_ranks.values())  # both sources accepted
    # every slot the draft claims as cached holds what a fresh prefill of the committed tokens computes
    cached, fresh = engine.seq.draft_cached, minitree.Runner(draft, compile=False, attention="sdpa")
    fresh.reserve(engine.draft.cache_len)
    fresh.cache(engine.seq.tokens, 0, cached)
    assert cached > len(ids) and torch.allclose(engine.draft.kv_cache[..., :cached, :], fresh.kv_cache[..., :cached, :],
                                                atol=1e-5)


def test_auto_without_a_draft_chooses_between_plain_decoding_and_branches(pair):
    target, _ = pair
    ids = prompt(30, 4) * 3
    result = minitree.Engine(target, None, "auto", compile=False, attention="sdpa", max_seq_len=512).generate(ids, 80)
    assert result.tokens == plain(target, ids, 80)
    assert set(result.stats.configs) <= {"plain", "ngram:nodes=10", "ngram"} and result.stats.draft_forwards == 0
    assert result.stats.configs.get("ngram:nodes=10", 0) + result.stats.configs.get("ngram", 0) > 0
    assert result.stats.tau > 1.5


@pytest.mark.parametrize("spec", ["ngram", "ngram:depth=4,nodes=4,branches=2,match=2,min=1"])
def test_greedy_equals_plain_greedy(pair, spec):
    """A prompt that repeats itself, so that proposals are found and accepted."""
    target, _ = pair
    ids = prompt(30, 4) * 3
    result = minitree.Engine(target, None, spec, compile=False, attention="sdpa", max_seq_len=512).generate(ids, 80)
    assert result.tokens == plain(target, ids, 80)
    assert result.stats.tau > 1.5 and result.stats.draft_forwards == 0
    assert result.stats.from_ngram == sum(result.stats.accepted_ranks.values())  # every accepted node


def test_a_text_decoded_again_is_proposed_from_the_earlier_one(pair):
    target, _ = pair
    ids = prompt(40, 5)
    engine = minitree.Engine(target, None, "ngram", compile=False, attention="sdpa", max_seq_len=512)
    first, again = engine.generate(ids, 60), engine.generate(ids, 60)
    assert first.tokens == again.tokens == plain(target, ids, 60)
    print(f"tau {first.stats.tau:.2f}, then {again.stats.tau:.2f}")
    assert again.stats.tau > 8 and again.stats.tau > 2 * first.stats.tau


SAMPLED = [(False, "ngram:depth=3,nodes=4,branches=2,match=2,min=1"),
           (True, "2,1+ngram:depth=3,nodes=4,branches=2,match=2,min=1")]


@pytest.mark.parametrize("drafted, spec", SAMPLED)
def test_sampling_matches_target_distribution(markov_pair, drafted, spec):
    counts, tau = sample_transitions(markov_pair[0], markov_pair[1] if drafted else None, spec, T1)
    pvalue = chi_square_pvalue(counts, transition_matrix(markov_pair[0], T1))
    print(f"{spec}: tau {tau:.3f}, p-value {pvalue:.3g}")
    assert tau > 1.1 and pvalue > 1e-3


@pytest.mark.parametrize("drafted, spec", SAMPLED)
def test_negative_control_sampling_without_the_residual_update(markov_pair, monkeypatch, drafted, spec):
    """A proposal rejected, its token must leave the distribution the bonus is drawn from."""
    monkeypatch.setattr(minitree.accept, "residual", lambda p, q: p)
    counts, _ = sample_transitions(markov_pair[0], markov_pair[1] if drafted else None, spec, T1)
    pvalue = chi_square_pvalue(counts, transition_matrix(markov_pair[0], T1))
    print(f"negative control, {spec} without residual update: p-value {pvalue:.3g}")
    assert pvalue < 1e-6


@pytest.mark.parametrize("spec, message", [("ngram:depth=0", "must be >= 1"), ("ngram:min=9", "min <= match"),
                                           ("ngram:width=2", "cannot read 'width=2'")])
def test_malformed_specs_are_reported(spec, message):
    with pytest.raises(minitree.TreeError, match=message):
        minitree.parse_tree(spec)


def test_an_ngram_tree_with_a_draft_and_a_mixed_one_without_are_refused(pair):
    with pytest.raises(minitree.EngineError, match="without a draft"):
        minitree.Engine(*pair, "ngram", compile=False)
    with pytest.raises(minitree.EngineError, match="it needs a draft"):
        minitree.Engine(pair[0], None, "2,1+ngram", compile=False)


def test_cli_without_a_draft_gives_plain_tokens(pair_dirs):
    args = ["--checkpoint", pair_dirs[0], "--draft", "none", "--prompt", "a b c a b c a b c a b", "--max-new-tokens",
            40, "--json", *FAST]
    ngram, none = (json.loads(generate(*args, "--tree", t).stdout) for t in ("ngram", "none"))
    assert ngram["tokens"] == none["tokens"] and ngram["stats"]["draft_forwards"] == 0
    proc = generate("--checkpoint", pair_dirs[0], "--draft", pair_dirs[1], "--tree", "ngram", "--prompt", "x", *FAST,
                    check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].endswith("or pass --draft none")
