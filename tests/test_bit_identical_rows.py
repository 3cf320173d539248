"""One rounding for every row count: a GGUF target computes the same bits for a token whatever shares
its forward, so speculative decoding gives exactly plain decoding's tokens in the precision users run
(bf16), not only in fp32."""

import pytest
import torch

import minitree
import minitree.runner
from minitree.attention import NO_TREE
from minitree.gguf import GGUFLinear
from minitree.kernels import kernels
from reference import SIZES, prompt
from tiny import gguf_types, save_random, write_gguf

PROMPT = prompt(70, 9)
# The default pair's types: Q4_K and Q6_K in the target, Q8_0 and Q5_0 in the draft.
TARGET = {"attn": "Q4_K", "attn_v": "Q6_K", "ffn_up": "Q4_K", "ffn_gate": "Q4_K", "ffn_down": "Q6_K",
          "output.weight": "Q6_K", "token_embd": "Q4_K"}
DRAFT = {"ffn": "Q8_0", "attn": "Q5_0", "output.weight": "Q8_0"}
TREES = ["1,1,1,1", "2,2,1", "3,3,2,1", "[(0,), (1,), (0, 0), (1, 0), (0, 0, 0)]", "dynamic:depth=4,width=2,k=2,nodes=6",
         "auto"]


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory):
    """A tiny Qwen2 target and a noisy copy as draft, as GGUF files of the default pair's types, in bf16.
    Weights drawn 5x wider than transformers' default, so that greedy text does not settle on one token."""
    root = tmp_path_factory.mktemp("exact-pair")
    kw = dict(tie_word_embeddings=False, initializer_range=0.1, **SIZES)
    hf = save_random(root / "target", "qwen2", seed=41, **kw)
    write_gguf(hf, root / "target.gguf", gguf_types(TARGET))
    draft = save_random(root / "draft", "qwen2", seed=42, noise_from=root / "target", noise=0.1, **kw)
    write_gguf(draft, root / "draft.gguf", gguf_types(DRAFT))
    return [minitree.load(root / f"{name}.gguf", dtype=torch.bfloat16) for name in ("target", "draft")]


def logits_by_rows(model, compile: bool, rows: list[int]) -> dict[int, torch.Tensor]:
    """The logits of PROMPT[50:66] computed in forwards of `rows` rows each (the prompt before them cached
    in one prefill): {rows: [16, vocab]}."""
    runner = minitree.Runner(model, compile=compile, plan="none", cache_len=256, prefill_chunks=(32,))
    ids = torch.tensor(PROMPT)
    zero, anc = torch.zeros(16, dtype=torch.long), torch.ones(1, dtype=torch.long)
    out = {}
    with torch.inference_mode():
        runner.cache(ids, 0, 50)
        for n in rows:
            parts = []
            for start in range(50, 66, n):
                slots = torch.arange(start, min(start + n, 66))
                parts.append(runner(ids[slots], slots, slots, zero[: len(slots)], torch.tensor(NO_TREE), anc))
            out[n] = torch.cat(parts)
    return out


def test_a_token_has_the_same_logits_in_forwards_of_any_row_count(bf16_pair):
    """Eager: 16 tokens decoded one per forward, or in forwards of 2 .. 16 rows: bit-identical logits."""
    by_rows = logits_by_rows(bf16_pair[0], False, list(range(1, 17)))
    for n, logits in by_rows.items():
        assert torch.equal(logits, by_rows[1]), f"{n} rows"


@pytest.mark.parametrize("D", [16, 40, 128, 256])
def test_a_query_attends_with_the_same_bits_alone_or_beside_others(D):
    """minitree's attention kernel, at head sizes 16 .. 256: 17 queries along a chain (a verify pass, a
    prefill chunk) give each query the bits it gets alone, close to float64 attention."""
    g = torch.Generator().manual_seed(D)
    H, Hkv, S, base, T = 12, 2, 96, 50, 17
    k, v = (torch.randn(1, Hkv, S, D, generator=g).bfloat16() for _ in range(2))
    q = torch.randn(1, H, T, D, generator=g).bfloat16()
    slots, nodes, at = base + torch.arange(T), torch.arange(T), torch.tensor(base)
    chain = 2 ** (nodes + 1) - 1  # node i's ancestors: nodes 0 .. i
    together = kernels().attend(q, k, v, slots, nodes, at, chain)
    for t in range(T):
        alone = kernels().attend(q[:, :, t:t + 1], k, v, slots[t:t + 1], nodes[t:t + 1], at, chain)
        assert torch.equal(alone[:, :, 0], together[:, :, t]), t
    keys, values = (c.double().repeat_interleave(H // Hkv, 1) for c in (k, v))
    scores = (q.double() @ keys.transpose(-1, -2)) / D ** 0.5
    scores = scores.masked_fill(torch.arange(S)[None, :] > slots[:, None], float("-inf"))
    assert torch.allclose(together.double(), scores.softmax(-1) @ values, atol=1e-2)


@pytest.fixture(scope="module")
def wide_target(tmp_path_factory):
    """The default target's hidden size (1536, 12 heads): where Inductor's code for a one-row forward
    splits a row's sums over the threads (at 256 it does not). In fp32, where a summation order shows in
    the logits (bf16 rounding hides most last-bit differences of a 2-layer model)."""
    root = tmp_path_factory.mktemp("exact-wide")
    hf = save_random(root / "target", "qwen2", seed=43, tie_word_embeddings=False, initializer_range=0.1,
                     hidden_size=1536, intermediate_size=512, num_attention_heads=12, num_key_value_heads=2)
    write_gguf(hf, root / "target.gguf", gguf_types(TARGET))
    return minitree.load(root / "target.gguf")


@pytest.mark.slow
def test_compiled_forwards_round_alike_at_any_row_count(wide_target):
    """Compiled (Inductor's code for RoPE, SiLU and residuals, minitree's for norms; one graph per row
    count): the same bits."""
    by_rows = logits_by_rows(wide_target, True, [1, 3, 16])
    assert torch.equal(by_rows[3], by_rows[1]) and torch.equal(by_rows[16], by_rows[1])


@pytest.mark.slow
def test_the_compiled_check_catches_inductors_split_row_sums(wide_target, monkeypatch):
    """Negative control: with Inductor's own RMSNorm (a one-row forward sums each half of the row on
    its own thread), the compiled check fails."""
    monkeypatch.setattr(minitree.runner, "replace_norms", lambda model: model)
    by_rows = logits_by_rows(wide_target, True, [1, 3])
    assert not torch.equal(by_rows[3], by_rows[1])


def float_verify(monkeypatch):
    """Plant a kernel that multiplies forwards of several rows in float (the products summed in another
    order, the activations not quantized): how a float GEMM for verify passes rounds."""
    own = GGUFLinear.forward

    def planted(self, x):
        if x.numel() == x.shape[-1]:
            return own(self, x)
        y = x.float() @ self.dequantize().T
        return (y if self.bias is None else y + self.bias).to(x.dtype)

    monkeypatch.setattr(GGUFLinear, "forward", planted)


def test_the_row_count_check_catches_a_kernel_that_sums_in_another_order(bf16_pair, monkeypatch):
    """Negative control: with the planted kernel, the check above fails."""
    float_verify(monkeypatch)
    by_rows = logits_by_rows(bf16_pair[0], False, [1, 4])
    assert not torch.equal(by_rows[4], by_rows[1])


@pytest.fixture(scope="module")
def plain_bf16(bf16_pair):
    return minitree.Engine(bf16_pair[0], compile=False, max_seq_len=512).generate(PROMPT, 160, eos_token_ids=[]).tokens


@pytest.mark.parametrize("spec", TREES)
def test_greedy_bf16_decoding_equals_plain_decoding(bf16_pair, plain_bf16, spec):
    """Every tree kind, in bf16, over 160 tokens: the tokens of plain decoding, exactly."""
    target, draft = bf16_pair
    result = minitree.Engine(target, draft, spec, compile=False, max_seq_len=512).generate(PROMPT, 160, eos_token_ids=[])
    assert len(set(plain_bf16)) > 50  # text, not one token repeated
    assert result.tokens == plain_bf16
    assert result.stats.tau > 1.2 if spec != "auto" else result.stats.draft_forwards > 0  # auto, unmeasured: mostly plain


def test_the_decoding_check_catches_a_kernel_that_sums_in_another_order(bf16_pair, plain_bf16, monkeypatch):
    """Negative control: with verify passes multiplied in float, tree decoding departs from plain decoding."""
    float_verify(monkeypatch)
    target, draft = bf16_pair
    result = minitree.Engine(target, draft, "3,3,2,1", compile=False, max_seq_len=512).generate(PROMPT, 160,
                                                                                                eos_token_ids=[])
    assert result.tokens != plain_bf16


def test_a_float_model_quantized_to_gguf_blocks_is_exact_in_bf16(pair_dirs):
    """--quantize q8_0 / q4_1 puts a float model on the integer kernel: exact in bf16 too."""
    for kind in ("q8_0", "q4_1"):
        target = minitree.quantize(minitree.load(pair_dirs[0], dtype=torch.bfloat16), kind)
        draft = minitree.load(pair_dirs[1], dtype=torch.bfloat16)
        assert isinstance(target.lm_head, GGUFLinear) and target.lm_head.kind == f"gguf-{kind.upper()}"
        reference = minitree.Engine(target, compile=False, max_seq_len=256).generate(PROMPT, 64).tokens
        assert minitree.Engine(target, draft, "2,2,1", compile=False, max_seq_len=256).generate(PROMPT, 64).tokens == reference
