"""Trees, tree attention, and lossless greedy tree decoding."""

import pytest
import torch

import minitree
from minitree.attention import BLOCK, block_mask, dense_mask
from minitree.costs import PROBED_ROWS, Plan
from minitree.draft import draft_tree
from minitree.forms import FormLinear
from minitree.tree import MAX_NODES
from minitree.verify import verify
from reference import plain, prompt

PATH_LIST = "[(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 0, 0, 0)]"
DYNAMIC = ["dynamic", "dynamic:depth=3,width=4,k=3,nodes=12", "dynamic:depth=5,width=1,k=2,nodes=6"]
TREES = ["1", "1,1,1,1", "2,2,1", "3,1,1", "4,2", "2,2,2,2", PATH_LIST, "3,3,2,1", *DYNAMIC]
# Eager FlexAttention costs 20x SDPA here (7-11 s per decode against 0.3-0.6 s): every tree decodes with
# SDPA, these with flex too (one query, a branching tree, a path list, a block crossed, a dynamic tree);
# flex masks of other shapes are checked against the dense rule and per-path attention below.
FLEX_TREES = ["1", "2,2,1", PATH_LIST, "3,3,2,1", DYNAMIC[0]]
RUNS = [(spec, "sdpa") for spec in TREES] + [(spec, "flex") for spec in FLEX_TREES]


# ----------------------------------------------------------------------------------------
# Tree structure and parsing

def test_branching_tree_structure():
    t = minitree.Tree.parse("2,2,1")
    assert t.n == 11 and t.max_depth == 3
    # the first-choice path first (nodes 0..3 sit at slots base + depth), then breadth-first
    assert t.node_paths[:4] == [(), (0,), (0, 0), (0, 0, 0)]
    assert t.parents.tolist() == [0, 0, 1, 2, 0, 1, 4, 4, 5, 6, 7]
    assert t.depth.tolist() == [0, 1, 2, 3, 1, 2, 2, 2, 3, 3, 3]
    step = t.step
    assert step.paths[9].tolist() == [0, 4, 6, 9]
    assert step.children[1].tolist() == [2, 5] and step.children[3].tolist() == [-1, -1]
    for i in range(t.n):  # anc: i itself and its parent chain, nothing else
        chain, j = {i}, i
        while j:
            j = int(t.parents[j])
            chain.add(j)
        assert int(step.anc_bits[i]) == sum(1 << j for j in chain)
    # the draft expands the root, then nodes 1 and 4, then 2, 5, 6, 7, at rows 0..6; leaves have none
    assert t.widths == [1, 2, 4] and step.draft_row.tolist() == [0, 1, 3, 0, 2, 4, 5, 6, 0, 0, 0]


def test_path_list_tree_is_non_uniform(tmp_path):
    t = minitree.Tree.parse(PATH_LIST)
    assert t.n == 11 and t.max_depth == 4
    assert [len(e) for e in t.expand] == [1, 2, 2, 1]  # only nodes with children are expanded
    (tmp_path / "tree.json").write_text("[[0], [1], [0, 0]]")
    assert minitree.Tree.parse(tmp_path / "tree.json").parents.tolist() == [0, 0, 1, 0]
    assert minitree.Tree.parse([(0,), (0, 0)]).max_depth == 2
    assert "1 [0]" in t.draw() and "Tree(" in repr(t)


@pytest.mark.parametrize("spec, message", [
    ("", "empty"), ("2,,1", "empty level"), ("0", ">= 1"), ("-1", ">= 1"), ("a", "not an integer"),
    ("2.5", "not an integer"), ("[(0,), (1, 0)]", r"no parent path \(1,\)"),
    ("[(0,), (2,)]", "lower-ranked sibling"), ("[(0,), (0,)]", "duplicate"), ("[]", "empty"),
    ("[(0,), (-1,)]", "negative"), ("[[0], 'x']", "list of paths"), ("[(", "neither JSON"),
    ("8,8", f"at most {MAX_NODES - 1}"), ("64", f"at most {MAX_NODES - 1}"),
    ("dynamic:depth=0", "depth must be an integer >= 1"), ("dynamic:foo=1", "cannot read 'foo=1'"),
    ("dynamic:depth=x", "cannot read 'depth=x'"), ("dynamic:k", "cannot read 'k'"),
    ("dynamic:depth=2,k=1,nodes=5", "only 2 nodes are drafted, fewer than nodes=5"),
    ("dynamic:depth=9,width=8,k=8", "drafts 65 rows; at most 64"), ("dynamic:depth=2,width=40,k=40,nodes=64", "at most 63"),
    ("dynamicx", "not a dynamic tree spec"),
])
def test_malformed_trees(spec, message):
    with pytest.raises(minitree.TreeError, match=message):
        minitree.parse_tree(spec)


def test_dynamic_spec_defaults_and_overrides():
    t = minitree.parse_tree("dynamic:nodes=7, width=3")
    assert (t.max_depth, t.width, t.k, t.n) == (minitree.tree.DYNAMIC_DEFAULTS["depth"], 3, 4, 8)
    assert t.widths == [1, 3, 3, 3, 3, 3] and t.n_rows == 16 and t.n_candidates == 1 + 4 + 5 * 12
    assert minitree.parse_tree("dynamic").name == minitree.DynamicTree(**minitree.tree.DYNAMIC_DEFAULTS).name


@pytest.mark.parametrize("seed", range(12))
def test_dynamic_selection_is_a_well_formed_tree(seed):
    """The draft grows a dynamic tree from confidences with ties (probability-1 tokens, equal
    siblings): the selected nodes are the N most confident, ancestor-closed, numbered with the
    first-choice path first and every ancestor before its descendants, children by rank without gaps."""
    spec = minitree.parse_tree("dynamic:depth=4,width=3,k=3,nodes=14")
    g = torch.Generator().manual_seed(seed)

    def run(tokens, positions, slots, q_node, base, anc_bits):  # a fake draft: peaked, tied or random rows
        logits = torch.randn(tokens.numel(), 50, generator=g)
        kind = torch.randint(0, 3, (tokens.numel(),), generator=g)
        logits[kind == 0, 7] = 200.0  # probability 1 (in fp32): children tie with their parent
        logits[kind == 1, :4] = 5.0  # four equally likely tokens
        return logits

    seq = torch.arange(40)
    tree, _, levels = draft_tree(run, spec, seq, torch.tensor(40), minitree.Sampling(), False, None)
    n, parents, depth = spec.n, tree.parents.tolist(), tree.depth.tolist()
    assert levels == 4 and tree.tokens.shape == (n,) and tree.tokens[0] == 39
    assert all(parents[i] < i and depth[i] == depth[parents[i]] + 1 for i in range(1, n))
    assert all(tree.conf[i] <= tree.conf[parents[i]] for i in range(1, n))
    first = [i for i in range(1, n) if all(tree.rank[j] == 0 for j in tree.paths[i][1:depth[i] + 1].tolist())]
    assert first == list(range(1, len(first) + 1)) and [depth[i] for i in first] == list(range(1, len(first) + 1))
    for i in range(n):  # children by rank: ranks 0..c-1, consistent with parents
        kids = [c for c in tree.children[i].tolist() if c >= 0]
        assert sorted(kids) == sorted(c for c in range(1, n) if parents[c] == i)
        assert [int(tree.rank[c]) for c in tree.children[i].tolist() if c >= 0] == list(range(len(kids)))
        chain, j = {i}, i
        while j:
            j = parents[j]
            chain.add(j)
        assert int(tree.anc_bits[i]) == sum(1 << j for j in chain)


@pytest.mark.parametrize("spec", DYNAMIC)
def test_dynamic_tree_verifies_the_most_confident_nodes(pair, spec):
    """The verified nodes' confidences are the N largest of everything drafted."""
    target, draft = pair
    engine = minitree.Engine(target, draft, spec, compile=False, attention="sdpa", max_seq_len=256)
    engine.prefill(PROMPT[:50])
    captured, spec = {}, minitree.parse_tree(spec)
    real_select = spec.select

    def select(tokens, conf, parent, row):
        captured["conf"] = conf.clone()
        return real_select(tokens, conf, parent, row)

    spec.select = select
    tree, _, _ = draft_tree(engine.draft, spec, engine.seq.tokens, engine.seq.n, minitree.Sampling(), False,
                            None)
    drafted = captured["conf"][1:]
    assert torch.equal(tree.conf[1:].sort(descending=True).values, drafted.sort(descending=True).values[:tree.conf.numel() - 1])


# ----------------------------------------------------------------------------------------
# Tree attention

@pytest.mark.parametrize("base", [0, 5, 120, 127, 128, 250])
@pytest.mark.parametrize("spec", ["2,2,1", "4,2", PATH_LIST])
def test_block_mask_matches_dense_rule(spec, base):
    """Expanding the BlockMask (partial blocks by mask_mod, the rest false) gives the dense
    rule exactly; every block is partial and they are visited in ascending order."""
    t = minitree.Tree.parse(spec)
    S = 512
    nodes = torch.arange(t.n)
    q_slot, b = torch.tensor(base) + nodes, torch.tensor(base)
    bm = block_mask(q_slot, nodes, b, t.step.anc_bits, S)
    dense = dense_mask(q_slot, nodes, b, t.step.anc_bits, S)
    assert bm.full_kv_num_blocks is None
    n = int(bm.kv_num_blocks[0, 0, 0])
    assert bm.kv_indices[0, 0, 0, :n].tolist() == list(range(n))
    partial = bm.to_dense()[0, 0, 0]  # [kv blocks]
    assert torch.equal(partial.repeat_interleave(BLOCK).bool()[None] & dense, dense)
    # the dense rule itself: the prefix, plus self and ancestors
    ref = torch.zeros(t.n, S, dtype=torch.bool)
    ref[:, :base] = True
    ref[:, base:base + t.n] = (t.step.anc_bits[:, None] >> nodes) & 1
    assert torch.equal(dense, ref)


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
@pytest.mark.parametrize("base", [30, 125])
def test_tree_attention_equals_per_path_attention(pair, attention, base):
    """Each node's verify logits equal a plain causal forward over prefix + its own path."""
    target, _ = pair
    tree = minitree.Tree.parse("3,2,2")
    engine = minitree.Engine(target, compile=False, attention=attention, max_seq_len=256)
    g = torch.Generator().manual_seed(base)
    prefix = torch.randint(0, 256, (base + 1,), generator=g).tolist()
    tokens = torch.randint(0, 256, (tree.n,), generator=g)
    tokens[0] = prefix[-1]
    engine.prefill(prefix)
    step = tree.step._replace(tokens=tokens)
    logits = verify(engine.target, step, torch.tensor(base))
    for i in range(tree.n):
        path = tokens[step.paths[i][: int(tree.depth[i]) + 1]].tolist()
        seq = prefix[:-1] + path
        ref = minitree.Engine(target, compile=False, attention="sdpa", max_seq_len=256)
        ref.prefill(seq)  # caches seq[:-1]; then one plain step on seq[-1]
        ref_logits = verify(ref.target, ref.tree.step._replace(tokens=torch.tensor(seq[-1:])),
                            torch.tensor(len(seq) - 1))
        assert (logits[i] - ref_logits[0]).abs().max() < 1e-4, f"node {i}"


# ----------------------------------------------------------------------------------------
# Lossless greedy decoding

PROMPT = prompt(100, 3)


@pytest.fixture(scope="module")
def plain_tokens(pair):
    return plain(pair[0], PROMPT, 72)


@pytest.fixture(scope="module")
def tree_runs(pair):
    target, draft = pair
    return {(spec, attn): minitree.Engine(target, draft, spec, compile=False, attention=attn,
                                          max_seq_len=512).generate(PROMPT, 72) for spec, attn in RUNS}


@pytest.mark.parametrize("spec, attention", RUNS)
def test_tree_greedy_equals_plain_greedy(tree_runs, plain_tokens, spec, attention):
    result = tree_runs[spec, attention]
    assert result.tokens == plain_tokens
    hist = result.stats.accepted
    assert 0 < sum(m * c for m, c in hist.items()) < minitree.parse_tree(spec).max_depth * sum(hist.values()), \
        "acceptance should be partial with a noisy draft"


def test_acceptance_follows_non_first_rank_branches(tree_runs):
    """A flat walk over the first-rank chain would never accept these nodes."""
    for spec in TREES:
        if minitree.parse_tree(spec).k > 1:
            assert sum(c for r, c in tree_runs[spec, "sdpa"].stats.accepted_ranks.items() if r > 0) > 0, spec


def test_blocks_crossed_during_decoding(tree_runs):
    assert len(PROMPT) < BLOCK < len(PROMPT) + len(tree_runs["3,3,2,1", "flex"].tokens)


@pytest.mark.parametrize("spec", ["1,1,1,1", "2,2,1", "3,1,1", "dynamic:depth=3,width=4,k=2,nodes=14"])
def test_draft_equal_to_target_accepts_every_depth(pair, pair_dirs, spec):
    target, _ = pair
    same = minitree.load(pair_dirs[0])  # a second instance: each model has its own cache
    engine = minitree.Engine(target, same, spec, compile=False, attention="sdpa", max_seq_len=512)
    result = engine.generate(PROMPT, 40)
    depth = minitree.parse_tree(spec).max_depth
    assert set(result.stats.accepted) == {depth}
    assert result.stats.tau == depth + 1


def test_compaction_leaves_the_plain_cache(pair):
    """After tree decoding, the target's cache equals a plain prefill of the committed tokens."""
    target, draft = pair
    engine = minitree.Engine(target, draft, "2,2,1", compile=False, attention="sdpa", max_seq_len=512)
    out = engine.generate(PROMPT, 50).tokens
    L = engine.seq.length
    committed = engine.seq.tokens[:L].tolist()
    assert committed == PROMPT + out[: L - len(PROMPT)]
    ref = minitree.Engine(target, compile=False, attention="sdpa", max_seq_len=512)
    ref.prefill(committed)
    assert (ref.target.kv_cache[:, :, :, :, : L - 1] - engine.target.kv_cache[:, :, :, :, : L - 1]).abs().max() <= 1e-5


def test_eos_inside_accepted_path_stops_there(pair, plain_tokens):
    target, draft = pair
    eos = plain_tokens[10]
    first = plain_tokens.index(eos)
    engine = minitree.Engine(target, draft, "2,2,1", compile=False, attention="sdpa", max_seq_len=512)
    assert engine.generate(PROMPT, 72, eos_token_ids=[eos]).tokens == plain_tokens[: first + 1]


def test_draft_vocab_mismatch(pair, tmp_path):
    from tiny import save_random
    save_random(tmp_path / "small", "qwen2", vocab_size=128)
    with pytest.raises(minitree.EngineError, match=r"draft vocabulary \(128 tokens\).*target's \(256 tokens\)"):
        minitree.Engine(pair[0], minitree.load(tmp_path / "small"), "2,2,1")


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["2,2,1", "dynamic:depth=4,width=2,k=2,nodes=10"])
def test_compiled_tree_decoding_never_recompiles(pair, plain_tokens, spec):
    """With the static tree, forwards of several rows run on weights packed in oneDNN's layout
    (forms.FormLinear: an op of its own inside the compiled layers)."""
    target, draft = pair
    if spec == "2,2,1":
        packed = Plan(dict(native=[1.0] * len(PROBED_ROWS), packed=[2.0] + [0.5] * (len(PROBED_ROWS) - 1)))
        target, draft = (minitree.Runner(m, plan=packed) for m in pair)
        assert target.model.lm_head.form_of == dict.fromkeys(range(2, 129), "packed")
    engine = minitree.Engine(target, draft, spec, max_seq_len=512)
    try:
        engine.warm_up()
        assert engine.generate(PROMPT, 72).tokens == plain_tokens
        torch._dynamo.config.error_on_recompile = True
        result = engine.generate(PROMPT[:90], 200)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert result.stats.target_forwards >= 20 and len(result.tokens) == 200  # 90 -> 290: crosses 2 blocks


def test_cheaper_draft_is_still_lossless(pair_dirs, plain_tokens):
    """An int8 draft with a restricted vocabulary proposes differently; the output is unchanged."""
    target = minitree.load(pair_dirs[0])
    int8_few_rows = Plan(dict(native=[1.0] * len(PROBED_ROWS), int8=[0.5 if r <= 4 else 2.0 for r in PROBED_ROWS]))
    draft = minitree.Runner(minitree.restrict_vocab(minitree.load(pair_dirs[1]), 128), compile=False,
                            attention="sdpa", plan=int8_few_rows, lossy=True)
    head = draft.model.lm_head
    assert head.form_of == dict.fromkeys(range(1, 5), "int8") and head.qweight.shape[0] == 128
    engine = minitree.Engine(target, draft, "2,2,1", compile=False, attention="sdpa", max_seq_len=512)
    result = engine.generate(PROMPT, 72)
    assert result.tokens == plain_tokens
    assert result.stats.tau > 1.2


@pytest.mark.parametrize("spec, cutoff", [("2,2,1,1", 1e-4), ("2,2,1,1", 2e-3), ("dynamic", 2e-3)])
def test_early_stop_is_lossless(pair, plain_tokens, spec, cutoff):
    """Levels below an early stop are not drafted (the tiny draft is nearly flat over 256 tokens);
    their nodes are verified but never accepted."""
    target, draft = pair
    engine = minitree.Engine(target, draft, spec, compile=False, attention="sdpa", max_seq_len=512,
                             draft_cutoff=cutoff)
    result = engine.generate(PROMPT, 72)
    assert result.tokens == plain_tokens
    steps, levels = result.stats.target_forwards, engine.tree.max_depth
    print(f"cutoff {cutoff}: {result.stats.draft_forwards / steps:.2f} of {levels} levels per step")
    assert steps < result.stats.draft_forwards < steps * levels  # stopped early sometimes, not always


def test_int8_copy_serves_few_rows_only():
    linear = torch.nn.Linear(64, 32)
    q = FormLinear(linear)
    q.serve({"int8": frozenset({1, 2, 3})})
    for rows in (1, 3):  # the int8 kernel: close to the float weights, not equal
        x = torch.randn(1, rows, 64)
        assert not torch.equal(q(x), linear(x)) and torch.allclose(q(x), linear(x), atol=0.02)
    x = torch.randn(1, 4, 64)
    assert torch.equal(q(x), linear(x))  # longer forwards keep the float weights


@pytest.mark.parametrize("spec", ["2,2,1", "dynamic"])
def test_one_token_prompt(pair, spec):
    """The catch-up window of the first draft level has no previous token to recompute."""
    target, draft = pair
    tree = minitree.Engine(target, draft, spec, compile=False, attention="sdpa", max_seq_len=128)
    assert tree.generate([17], 24).tokens == plain(target, [17], 24, max_seq_len=128)
