"""GGUF files with their quantized weights kept: the kernels read every supported type exactly, the
models load (llama.cpp's q/k permutation undone on quantized rows), and decoding them is lossless."""

import numpy as np
import pytest
import torch
import transformers
from torch.utils import cpp_extension
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

import minitree
import minitree.accept
from minitree.config import from_hf_config
from minitree.costs import PROBED_ROWS, Plan, probe_key, settings
from minitree.gguf import SUPPORTED, GGUFEmbedding, GGUFLinear, hf_config, read_header
from minitree.kernels import CSRC, FLAGS, kernels
from reference import (SIZES, T1, blocks_reversed, causal, chi_square_pvalue, plain, prompt, sample_transitions,
                       transition_matrix)
from tiny import gguf_types, quantize_q4_k, quantize_q6_k, save_random, write_gguf

PACK = {"Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}
# Every supported type somewhere in the model, as in the default pair's files (Q4_K_M and the draft's mix).
MIX = {"attn_q": "Q4_K", "attn_k": "Q8_0", "attn_v": "Q6_K", "attn_output": "Q4_0", "ffn_gate": "Q5_0",
       "ffn_up": "Q4_1", "ffn_down": "Q6_K", "output.weight": "Q5_1", "token_embd": "Q4_K"}
PROMPT = prompt(70, 9)


def packed(w: np.ndarray, kind: str) -> np.ndarray:
    return PACK.get(kind, lambda a: quantize(a, GGMLQuantizationType[kind]))(w)


PATHS = kernels().int_paths()  # the instruction-set paths this CPU runs, "portable" (the specification) first


@pytest.mark.parametrize("kind", SUPPORTED)
def test_kernels_read_every_type_exactly(kind):
    """The regrouped weights equal the gguf package's reading, and products match float64 within the
    error of int8 activations (ggml's Q8_K / Q8_0 blocks), in fp32 and bf16, also for outputs that do
    not fill a group of 16."""
    w = np.random.RandomState(1).randn(40, 512).astype(np.float32) * 0.05
    blocks = packed(w, kind)
    ref = torch.from_numpy(dequantize(blocks, GGMLQuantizationType[kind]).copy())
    layer = GGUFLinear.from_blocks(torch.from_numpy(blocks), kind, 512, None, torch.float32)
    assert torch.equal(layer.dequantize(), ref)
    assert layer.groups.numel() <= 1.03 * blocks.size * 48 / 40  # the same bytes per weight, in groups of 16
    g = torch.Generator().manual_seed(1)  # fixed inputs: the error's tail over random ones reaches the bound
    for rows in (1, 3, 8, 11):
        x = torch.randn(1, rows, 512, generator=g)
        for dtype in (torch.float32, torch.bfloat16):
            y = layer(x.to(dtype))[0]
            exact = (x.to(dtype).double() @ ref.double().T)[0]
            assert y.dtype == dtype and ((y.double() - exact).norm() / exact.norm()) < 0.015  # 0.0094 at most here; 0.012 over 600 random rows


@pytest.mark.parametrize("kind", SUPPORTED)
def test_every_path_and_row_count_gives_the_same_bits(kind):
    """Each row's output has the same bits (its fp32 sum) alone or among 2..17, 33 or 40 rows (the AMX
    path's tiles take 16), and on every instruction-set path this CPU has (AVX512-VNNI, AVX-VNNI, AVX2,
    AMX-INT8) as on the plain-loop specification; in bf16 and fp16 it is that sum rounded once, as
    torch rounds it."""
    assert_same_bits_on_every_path(kernels(), kind)


@pytest.fixture(scope="module")
def avx_vnni_on_avx512(tmp_path_factory):
    """integer.cpp built with its AVX-VNNI path on the EVEX encodings of the same instructions
    (-DMINITREE_AVX_VNNI_ON_AVX512), under an op namespace of its own: that path, on a CPU without it."""
    if "avx_vnni" in PATHS or "avx512_vnni" not in PATHS:
        pytest.skip("runs where the CPU has AVX512-VNNI and not AVX-VNNI (elsewhere the path runs natively "
                    "in the test above, or cannot run)")
    root = tmp_path_factory.mktemp("avx-vnni-on-avx512")
    for source in ("integer.cpp", "integer_paths.h"):
        (root / source).write_text((CSRC / source).read_text().replace("minitree_kernels", "minitree_avx_vnni_test"))
    cpp_extension.load(name="minitree_avx_vnni_test", sources=[str(root / "integer.cpp")], is_python_module=False,
                       extra_cflags=FLAGS + ["-DMINITREE_AVX_VNNI_ON_AVX512"], build_directory=str(root))
    ops = torch.ops.minitree_avx_vnni_test
    assert "avx_vnni" in ops.int_paths()
    return ops


@pytest.mark.slow
@pytest.mark.parametrize("kind", SUPPORTED)
def test_the_avx_vnni_path_gives_the_same_bits_on_a_cpu_without_it(avx_vnni_on_avx512, kind):
    """The comparison above on every path of a build whose AVX-VNNI path runs here (fixture)."""
    assert_same_bits_on_every_path(avx_vnni_on_avx512, kind)


def assert_same_bits_on_every_path(ops, kind):
    """test_every_path_and_row_count_gives_the_same_bits on the kernels `ops`."""
    w = np.random.RandomState(2).randn(48, 512).astype(np.float32) * 0.05
    groups = GGUFLinear.from_blocks(torch.from_numpy(packed(w, kind)), kind, 512, None, torch.bfloat16).groups
    qtype, x = int(GGMLQuantizationType[kind]), torch.randn(40, 512).bfloat16().float()
    x[5] = 0  # and ties, where the vector paths' quantizers must round as the plain loops do: each block
    # of rows 6 and 7 holds -127 and 127 (the first of them sets the scale's sign; either gives the same
    # products) and values that scale to halves (rounded to even for the k-quants, away from zero for the others)
    i = torch.arange(512)
    x[6] = torch.where(i % 32 < 2, torch.where(i % 2 == 0, -127.0, 127.0), (i % 7) - 3 + 0.5)
    x[7] = -x[6]
    alone = torch.cat([ops.int_mm(x[i:i + 1], groups, qtype, 48, 0) for i in range(40)])
    for rows in [*range(1, 18), 33, 40]:
        halves = {h: x[:rows].to(h) for h in (torch.bfloat16, torch.float16)}  # and their fp32 sums, rounded
        rounded = {h: ops.int_mm(xh.float(), groups, qtype, 48, 0).to(h) for h, xh in halves.items()}
        for name in ops.int_paths():
            index = ("portable", "avx2", "avx_vnni", "avx512_vnni", "amx").index(name)
            assert torch.equal(ops.int_mm(x[:rows], groups, qtype, 48, index), alone[:rows]), (name, rows)
            for h, xh in halves.items():
                assert torch.equal(ops.int_mm(xh, groups, qtype, 48, index), rounded[h]), (name, rows, h)


def test_the_bit_identity_check_catches_another_summation_order():
    """Negative control: a kernel that sums the same block products in another order gives other bits
    (so a path or row count summing in its own order would fail the comparison above)."""
    w = np.random.RandomState(3).randn(48, 512).astype(np.float32) * 0.05
    groups = GGUFLinear.from_blocks(torch.from_numpy(packed(w, "Q4_0")), "Q4_0", 512, None, torch.float32).groups
    x = torch.randn(16, 512)
    ours, planted = kernels().int_mm(x, groups, 2, 48), blocks_reversed(x, groups, "Q4_0", 48)
    assert torch.allclose(ours, planted, rtol=1e-5, atol=1e-6) and not torch.equal(ours, planted)


@pytest.fixture(scope="module")
def quantized_pair(tmp_path_factory):
    """A tiny Qwen2 target and draft as GGUF files holding every supported type; the target also as
    the float model its weights dequantize to."""
    root = tmp_path_factory.mktemp("gguf-pair")
    hf = save_random(root / "target", "qwen2", seed=31, tie_word_embeddings=False, **SIZES)
    write_gguf(hf, root / "target.gguf", gguf_types(MIX))
    draft = save_random(root / "draft", "qwen2", seed=32, noise_from=root / "target", noise=0.3,
                        tie_word_embeddings=False, **SIZES)
    write_gguf(draft, root / "draft.gguf", gguf_types({"ffn": "Q8_0", "attn": "Q5_0", "output.weight": "Q8_0"}))
    return root / "target.gguf", root / "draft.gguf"


def test_a_quantized_gguf_model_keeps_its_blocks(quantized_pair):
    target = minitree.load(quantized_pair[0])
    layer = target.model.layers[0]
    assert isinstance(target.lm_head, GGUFLinear) and target.lm_head.kind == "gguf-Q5_1"
    assert [m.kind for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.gate_proj)] == \
        ["gguf-Q4_K", "gguf-Q8_0", "gguf-Q5_0"]
    assert layer.self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases, beside the blocks
    floats = minitree.load(quantized_pair[0], dequantize=True)
    assert isinstance(floats.lm_head, torch.nn.Linear)
    ids = torch.tensor(PROMPT)
    ours, ref = causal(target)(ids), causal(floats)(ids)
    assert (ours - ref).norm() / ref.norm() < 0.03  # the activations' int8 blocks: measured 0.013


def test_the_embedding_stays_in_blocks_and_a_tied_head_multiplies_them(tmp_path):
    """The token embedding is never dequantized whole: a lookup reads its rows from the file's blocks,
    equal to the gguf package's reading; a tied model's lm_head is the same layer (llama.cpp's reading)."""
    hf = save_random(tmp_path / "m", "qwen2", seed=6, tie_word_embeddings=True, **SIZES)
    write_gguf(hf, tmp_path / "tied.gguf", gguf_types({"token_embd": "Q4_K"}))
    model, floats = minitree.load(tmp_path / "tied.gguf"), minitree.load(tmp_path / "tied.gguf", dequantize=True)
    embed = model.model.embed_tokens
    assert isinstance(embed, GGUFEmbedding) and model.lm_head is embed.table and embed.table.kind == "gguf-Q4_K"
    ids = torch.tensor(PROMPT)
    assert torch.equal(embed(ids), floats.model.embed_tokens.weight[ids])
    ours, ref = causal(model)(ids), causal(floats)(ids)
    assert (ours - ref).norm() / ref.norm() < 0.03


def test_the_header_reads_as_transformers_reads_it(quantized_pair, tmp_path):
    """minitree reads a GGUF file's config from its header directly (gguf.read_header): the same
    values as transformers' reader, for every key ModelArgs takes; a cut file is one clear error."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    for file in quantized_pair:
        ours = hf_config(read_header(file))
        theirs = load_gguf_checkpoint(str(file), return_tensors=False)["config"]
        assert from_hf_config(ours) == from_hf_config(theirs | dict(architectures=ours["architectures"]))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(quantized_pair[0].read_bytes()[:5000])
    with pytest.raises(minitree.LoadError, match="truncated"):
        minitree.load(cut)


def test_llama_q_and_k_rows_are_unpermuted(tmp_path):
    """llama.cpp stores a Llama's q/k rows permuted for its interleaved RoPE; quantized or not, they
    are read back in Hugging Face's order (logits match transformers within quantization error)."""
    cfg = transformers.LlamaConfig(vocab_size=256, num_hidden_layers=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                                   max_position_embeddings=512, tie_word_embeddings=False, **SIZES)
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    write_gguf(hf, tmp_path / "f32.gguf")
    write_gguf(hf, tmp_path / "q8.gguf", gguf_types({"attn": "Q8_0"}))
    assert (causal(minitree.load(tmp_path / "f32.gguf"))(ids) - ref).abs().max() < 1e-4
    q8 = causal(minitree.load(tmp_path / "q8.gguf"))(ids)
    assert (q8 - ref).norm() / ref.norm() < 0.02


@pytest.mark.parametrize("spec", ["2,2,1", "dynamic:depth=4,width=2,k=2,nodes=6"])
def test_tree_decoding_of_a_quantized_target_is_lossless(quantized_pair, spec):
    """fp32 activations: tree decoding equals plain decoding of the same GGUF weights, also with the
    draft on lossy int8 and q4 copies."""
    target, draft = (minitree.load(p) for p in quantized_pair)
    reference = plain(target, PROMPT, 48)
    result = minitree.Engine(target, draft, spec, compile=False, max_seq_len=256).generate(PROMPT, 48)
    assert result.tokens == reference and result.stats.tau > 1.2
    copies = Plan(dict(native=[1.0] * len(PROBED_ROWS), int8=[0.5 if r < 4 else 2.0 for r in PROBED_ROWS],
                       q4=[2.0 if r < 4 else 0.5 for r in PROBED_ROWS]))
    runners = [minitree.Runner(m, compile=False, plan=copies, lossy=m is draft) for m in (target, draft)]
    assert runners[0].model.lm_head.form_of == {}  # the target keeps its own kernel
    assert runners[1].model.lm_head.form_of == dict.fromkeys(range(1, 4), "int8") | dict.fromkeys(range(4, 129), "q4")
    assert minitree.Engine(*runners, spec, max_seq_len=256).generate(PROMPT, 48).tokens == reference


def test_a_gguf_draft_restricted_to_its_first_ids_is_lossless(quantized_pair):
    """--draft-vocab on a GGUF draft keeps the first rows of its lm_head's blocks, exactly; the output
    is unchanged also when the draft cannot propose the ids it needs (this one uses ids above 100)."""
    target, draft = (minitree.load(p) for p in quantized_pair)
    head = draft.lm_head.dequantize()
    minitree.restrict_vocab(draft, 100)
    assert draft.lm_head.out_features == 100 and torch.equal(draft.lm_head.dequantize(), head[:100])
    result = minitree.Engine(target, draft, "2,2,1", compile=False, max_seq_len=256).generate(PROMPT, 48)
    assert result.tokens == plain(target, PROMPT, 48)
    with pytest.raises(minitree.EngineError, match="needs a float or GGUF lm_head, not int8"):
        minitree.restrict_vocab(minitree.quantize(minitree.load(quantized_pair[0], dequantize=True), "int8"), 100)


def test_compiled_quantized_target_equals_eager(quantized_pair):
    """The kernel is an op of its own inside compiled layers (no recompiles in steady state)."""
    target = minitree.load(quantized_pair[0])
    engine = minitree.Engine(target, max_seq_len=256, plan="none", prefill_chunks=(32,))
    engine.warm_up()
    torch._dynamo.config.error_on_recompile = True
    try:
        tokens = engine.generate(PROMPT, 40).tokens
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert tokens == plain(target, PROMPT, 40)


@pytest.fixture(scope="module")
def quantized_markov_pair(tmp_path_factory):
    """test_sampling_lossless's Markov models (no decoder layers), their lm_heads in Q4_K (target) and Q8_0 (draft)."""
    root = tmp_path_factory.mktemp("gguf-markov")
    kw = dict(num_hidden_layers=0, vocab_size=32, hidden_size=256, intermediate_size=512, tie_word_embeddings=False)
    hf = save_random(root / "target", "qwen2", seed=11, head_scale=10.0, **kw)
    write_gguf(hf, root / "target.gguf", gguf_types({"output.weight": "Q4_K"}))
    hf = save_random(root / "draft", "qwen2", seed=12, noise_from=root / "target", noise=0.5, **kw)
    write_gguf(hf, root / "draft.gguf", gguf_types({"output.weight": "Q8_0"}))
    return minitree.load(root / "target.gguf"), minitree.load(root / "draft.gguf")


@pytest.mark.parametrize("broken", [False, True], ids=["exact", "negative-control-no-residual"])
def test_sampling_a_quantized_target_matches_its_distribution(quantized_markov_pair, monkeypatch, broken):
    if broken:
        monkeypatch.setattr(minitree.accept, "residual", lambda p, q: p)
    target, draft = quantized_markov_pair
    assert isinstance(target.lm_head, GGUFLinear)
    counts, tau = sample_transitions(target, draft, "2,2,1", T1, n=12_000)
    pvalue = chi_square_pvalue(counts, transition_matrix(target, T1))
    print(f"quantized target, tree 2,2,1, broken={broken}: tau {tau:.3f}, p-value {pvalue:.3g}")
    assert tau > 1.2
    assert pvalue < 1e-6 if broken else pvalue > 1e-3


def test_settings_of_a_quantized_model(quantized_pair):
    """A quantized target runs on its own kernel only (no float copy would round alike), on its AMX path
    where the CPU has one; a quantized draft may also take lossy copies."""
    tiles = ["tiles"] if "amx" in PATHS else []
    model = minitree.load(quantized_pair[1], dtype=torch.bfloat16)
    assert settings(minitree.Runner(model, compile=False, plan="none", lossy=True).model, lossy=True) == \
        ["native", *tiles, "int8", "int4", "q4"]
    target = minitree.Runner(minitree.load(quantized_pair[0], dtype=torch.bfloat16), compile=False, plan="none")
    assert settings(target.model) == ["native", *tiles]


def test_costs_are_measured_again_for_other_kernels(quantized_pair):
    """The probe's cache key names the GGUF kernels' source version: costs measured with an older
    kernel are not reused after an upgrade."""
    model = minitree.Runner(minitree.load(quantized_pair[1], dtype=torch.bfloat16), compile=False,
                            plan="none").model
    key = probe_key(model)
    assert probe_key(model) == key
    for m in model.modules():
        if isinstance(m, GGUFLinear):
            m.code = "another version"
    assert probe_key(model) != key


def test_unsupported_types_are_one_clear_error(tmp_path, quantized_pair):
    hf = save_random(tmp_path / "m", "qwen2", seed=5, tie_word_embeddings=False, **SIZES)
    write_gguf(hf, tmp_path / "q51.gguf", gguf_types({"ffn_up": "Q5_1", "ffn_gate": "TQ2_0"}))
    with pytest.raises(minitree.LoadError, match=r"tensor blk\.0\.ffn_gate\.weight has GGUF type TQ2_0.*--dequantize"):
        minitree.load(tmp_path / "q51.gguf")
    assert isinstance(minitree.load(tmp_path / "q51.gguf", dequantize=True).model.layers[0].mlp.gate_proj,
                      torch.nn.Linear)
    with pytest.raises(minitree.EngineError, match="holds gguf-"):
        minitree.quantize(minitree.load(quantized_pair[0]), "int8")
