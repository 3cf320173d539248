"""Execution plans from measured costs, the probe and its cache, weight forms, and quantized targets."""

import math

import pytest
import torch

import minitree
import minitree.costs as costs
from minitree.costs import PROBED_ROWS, Plan, settings
from minitree.forms import Q4_1, Int4Linear, Int8Linear, int4_linear, int4_weights, q4_runs
from minitree.kernels import kernels
from minitree.machine import packs
from reference import causal, plain, prompt

PROMPT = prompt(60, 5)


def table(fn):
    return [fn(r) for r in PROBED_ROWS]


# Shaped like the two CPU kinds (seconds of a forward's linear layers, per kernel setting):
AVX512 = dict(native=table(lambda r: 0.21 if r == 1 else 0.16 + 0.0075 * r),  # one row is its slow case
              gemv=table(lambda r: 0.086 * r if r <= 16 else math.inf),
              int8=table(lambda r: 0.03 + 0.012 * r))
AVX2 = dict(native=table(lambda r: 0.02 + 0.03 * r), gemv=table(lambda r: 0.02 + 0.03 * r if r <= 16 else math.inf))


def runner(model, plan, **kw):
    return minitree.Runner(model, compile=False, plan=plan, **kw)


def test_plan_on_an_avx512_like_machine():
    plan = Plan(AVX512)
    assert plan.setting(1) == "int8" and plan.setting(64) == "native"
    assert [plan.rows(n) for n in (1, 2, 3, 5, 11)] == [1, 2, 3, 5, 11]  # nothing is cheaper padded
    no_int8 = Plan({k: v for k, v in AVX512.items() if k != "int8"})
    assert no_int8.setting(1) == "gemv" and no_int8.setting(3) == "native"
    assert no_int8.rows(1) == 1 and no_int8.chunks(100) == (128,) and no_int8.chunks(20) == (32,)


def test_plan_on_an_avx2_like_machine():
    """Every row costs: no padding, prefill chunks that follow the prompt length."""
    plan = Plan(AVX2)
    assert all(plan.rows(n) == n for n in range(1, 40))
    assert plan.chunks(20) == (8, 8, 8) and plan.chunks(7) == (8,) and sum(plan.chunks(200)) < 256


def test_weight_copies_serve_the_rows_where_they_pay(pair, pair_dirs):
    """Packed copies (oneDNN's layout) where few rows are cheapest so, fp32 copies where many bf16
    rows are dear (emulated, AVX2); the copies compute what the weights do, decoding stays exact,
    and the model itself is not changed. (oneDNN packs bf16 weights only on CPUs with avx512bw or
    avx_ne_convert: elsewhere, fp32 only.)"""
    packs_bf16 = packs(torch.bfloat16)
    plan = Plan(AVX2 | dict(packed=table(lambda r: 0.04 + 0.02 * r), fp32=table(lambda r: 0.25 + 0.004 * r)))
    assert [plan.setting(r) for r in (1, 3, 13, 14, 32)] == ["native", "packed", "packed", "fp32", "fp32"]
    assert plan.chunks(200) == (128, 128)
    bf16 = minitree.load(pair_dirs[0], dtype=torch.bfloat16)
    run = runner(bf16, plan if packs_bf16 else Plan(AVX2 | dict(fp32=plan.costs["fp32"])))
    head = run.model.lm_head
    assert isinstance(bf16.lm_head, torch.nn.Linear) and isinstance(run.model.model.layers[0].mlp.down_proj.source,
                                                                    torch.nn.Linear)
    expected = dict.fromkeys(range(3, 14), "packed") | dict.fromkeys(range(14, 129), "fp32") if packs_bf16 else \
        dict.fromkeys(range(9, 129), "fp32")
    assert head.form_of == expected
    assert head.weight32.is_mkldnn == packs(torch.float32)  # fp32 copies packed where oneDNN packs fp32
    assert run.memory()["copies"] > run.memory()["weights"] // 2
    for rows in (5, 20):  # packed, fp32
        x = torch.randn(1, rows, head.in_features, dtype=torch.bfloat16)
        torch.testing.assert_close(head(x), torch.nn.functional.linear(x.float(), head.source.weight.float()).bfloat16())
    target, draft = pair  # fp32 models: the copies hold the weights themselves (summed in oneDNN's order)
    engine = minitree.Engine(runner(target, plan), runner(draft, plan), "2,2,1", max_seq_len=256)
    assert engine.generate(PROMPT, 40).tokens == plain(target, PROMPT, 40)


def test_padding_where_more_rows_are_cheaper():
    plan = Plan(dict(native=table(lambda r: {1: 0.3, 2: 0.29, 3: 0.28}.get(r, 0.2 + 0.001 * r))))
    assert [plan.rows(n) for n in (1, 2, 3, 4, 5)] == [4, 4, 4, 4, 5]
    assert plan.cost(1) == pytest.approx(0.204)


def test_exact_and_unmeasured_plans():
    assert [Plan.exact().rows(n) for n in (1, 3, 4, 9)] == [4, 4, 4, 9]
    assert Plan().rows(1) == 1 and Plan().chunks(300) == (128, 128, 128)  # fewest forwards


def test_probe_is_cached_per_model_and_machine(pair_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(costs, "CACHE", tmp_path / "costs.json")
    draft = runner(minitree.load(pair_dirs[1], dtype=torch.bfloat16), Plan(), lossy=True).model
    measured = costs.cached_probe(draft, "tiny draft", lossy=True)
    assert set(measured) == ({"native", "gemv", "fp32", "int8", "int4"} | ({"packed"} if packs(torch.bfloat16) else set())
                             | ({"q4"} if q4_runs() else set()))
    assert all(0 < t < 1 for t in measured["native"]) and math.isinf(measured["gemv"][-1])
    monkeypatch.setattr(costs, "probe", lambda *a, **k: pytest.fail("measured twice"))
    assert costs.cached_probe(draft, lossy=True) == measured
    measured_run = runner(minitree.load(pair_dirs[1], dtype=torch.bfloat16), "measure", lossy=True)
    plan, head = measured_run.plan, measured_run.model.lm_head
    for form in ("int8", "int4", "q4"):
        assert {r for r, f in head.form_of.items() if f == form} == {r for r in range(1, 129)
                                                                      if head.form(plan.setting(r)) == form}
    target = runner(minitree.load(pair_dirs[0], dtype=torch.bfloat16), Plan()).model  # another model: another key
    monkeypatch.setattr(costs, "probe", lambda *a, **k: {"native": [1.0] * len(PROBED_ROWS)})
    assert costs.cached_probe(target) == {"native": [1.0] * len(PROBED_ROWS)}


@pytest.mark.parametrize("plan", [Plan.exact(), Plan(AVX512), Plan(dict(native=table(lambda r: 1 / r)))],
                         ids=["exact", "avx512-like", "pads-everything"])
def test_decoding_is_exact_whatever_the_plan(pair, plan):
    """Plans pad forwards, pick kernels and cut prompts differently; fp32 output stays the same."""
    target, draft = pair
    engine = minitree.Engine(runner(target, plan), runner(draft, plan, lossy=False),
                             "dynamic:depth=4,width=2,k=2,nodes=6", max_seq_len=256)
    assert engine.generate(PROMPT, 40).tokens == plain(target, PROMPT, 40)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_target_is_decoded_losslessly(pair_dirs, kind):
    """A quantized target is another model: tree decoding reproduces its own plain decoding, and the
    plan gives it no float copies; its logits stay close to the float model's."""
    float_target = minitree.load(pair_dirs[0])
    target = minitree.quantize(minitree.load(pair_dirs[0]), kind)
    draft = minitree.load(pair_dirs[1])
    cls = Int8Linear if kind == "int8" else Int4Linear
    assert isinstance(target.lm_head, cls) and isinstance(target.model.layers[0].mlp.down_proj, cls)
    assert getattr(target.lm_head, "weight", None) is None  # the float weights are gone
    reference = plain(target, PROMPT, 40, max_seq_len=256)
    result = minitree.Engine(target, draft, "2,2,1", compile=False, attention="flex", max_seq_len=256).generate(PROMPT, 40)
    assert result.tokens == reference and result.stats.tau > 1.2
    assert settings(runner(target, Plan()).model) == ["native"]
    ids = torch.tensor(PROMPT)
    ours, ref = causal(target)(ids), causal(float_target)(ids)
    assert (ours - ref).norm() / ref.norm() < (0.03 if kind == "int8" else 0.3)  # measured: 0.009, 0.11


def test_q4_products():
    """The q4 form is GGUF's Q4_1 on the integer kernel: weights on its levels (every group of 32 spanning
    the 16 levels) come back exactly, each row's result is the same alone or with others, and on random
    weights the error is about int4's (the same levels, fp16 scales, int8 activations)."""
    torch.manual_seed(0)
    q = torch.randint(0, 16, (48, 256))
    q[:, ::32], q[:, 1::32] = 0, 15
    w = 0.25 * q - 1
    q4 = lambda w: kernels().int_repack(kernels().int_quantize(w, Q4_1), Q4_1, w.shape[1])
    torch.testing.assert_close(kernels().int_dequantize(q4(w), Q4_1, 256, torch.arange(48)), w, rtol=0, atol=0)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    y = kernels().int_mm(x, q4(w), Q4_1, 48)
    exact = x.float() @ w.T
    assert (y.float() - exact).norm() / exact.norm() < 0.02  # int8 activations, bf16 output: measured 0.008
    assert torch.equal(torch.cat([kernels().int_mm(x[i:i + 1], q4(w), Q4_1, 48) for i in range(5)]), y)
    w = torch.randn(48, 256, dtype=torch.bfloat16)
    ref = x.float() @ w.float().T
    err = lambda out: ((out.float() - ref).norm() / ref.norm()).item()
    assert err(kernels().int_mm(x, q4(w), Q4_1, 48)) < 1.2 * err(int4_linear(x, *int4_weights(w), None)) < 0.2
    with pytest.raises(RuntimeError, match="K a multiple of 32"):
        kernels().int_quantize(torch.randn(48, 96 + 8), Q4_1)


def test_a_q4_draft_is_lossless(pair_dirs):
    """A bf16 draft in the q4 form proposes for an fp32 target: the output is the target's plain decoding."""
    target = minitree.load(pair_dirs[0])
    q4_plan = Plan(dict(native=[1.0] * len(PROBED_ROWS), q4=[0.5] * len(PROBED_ROWS)))
    draft = runner(minitree.load(pair_dirs[1], dtype=torch.bfloat16), q4_plan, lossy=True)
    down, head = draft.model.model.layers[0].mlp.down_proj, draft.model.lm_head  # 128 -> 64; 64 -> 256
    assert down.form_of == head.form_of == dict.fromkeys(range(1, 129), "q4")
    result = minitree.Engine(target, draft, "2,2,1", compile=False, max_seq_len=256).generate(PROMPT, 40)
    assert result.tokens == plain(target, PROMPT, 40) and result.stats.tau > 1.2


def test_no_q4_without_a_compiler(monkeypatch):
    """A float draft never needs a C++ compiler: where minitree's kernels cannot be built, q4 is not offered."""
    def no_compiler():
        raise minitree.LoadError("building minitree's kernels failed (no g++)")
    monkeypatch.setattr(minitree.forms, "kernels", no_compiler)
    assert not q4_runs()


def test_quantize_rejects_unknown_kinds(pair):
    with pytest.raises(minitree.EngineError, match="quantization must be one of int8, int4"):
        minitree.quantize(pair[0], "int3")
