"""The Llama-family model against transformers, loading, and plain compiled decoding."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import minitree
from minitree.attention import BLOCK, TreeMask
from reference import causal

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


@pytest.mark.parametrize("flex", [False, True], ids=["sdpa", "flex"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family_dirs, family, flex):
    hf = transformers.AutoModelForCausalLM.from_pretrained(family_dirs[family]).eval()
    forward = causal(minitree.load(family_dirs[family]), flex)
    ids = torch.randint(0, hf.config.vocab_size, (40 + 16,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    ours = forward(ids[:40])  # prefill of 40 tokens
    assert (ours - ref[:40]).abs().max() <= 1e-4
    for t in range(40, 56):  # 16 cached decode steps, one token each
        step = forward(ids[t:t + 1], t)
        assert (step[0] - ref[t]).abs().max() <= 1e-4, f"decode step {t}"


@pytest.fixture(scope="session")
def plain_engines(family_dirs):
    return {f: minitree.Engine(minitree.load(family_dirs[f]), max_seq_len=256) for f in FAMILIES}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_greedy_equals_transformers_generate(family_dirs, plain_engines, family):
    hf = transformers.AutoModelForCausalLM.from_pretrained(family_dirs[family]).eval()
    prompt = torch.randint(0, hf.config.vocab_size, (21,), generator=torch.Generator().manual_seed(1))
    ref = hf.generate(prompt[None], max_new_tokens=40, do_sample=False, min_new_tokens=40)[0, 21:].tolist()
    assert plain_engines[family].generate(prompt.tolist(), 40).tokens == ref


@pytest.mark.slow
def test_plain_decode_never_recompiles(plain_engines):
    engine = plain_engines["llama"]
    engine.warm_up()
    warm = engine.generate(list(range(1, 30)), 4).tokens
    torch._dynamo.config.error_on_recompile = True
    try:  # a different prompt length, then a long decode across several 128-slot blocks
        tokens = engine.generate(list(range(3, 100)), 150).tokens
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert len(tokens) == 150 and len(warm) == 4


@pytest.mark.slow
def test_compiled_layers_run_the_entry_dynamo_chose_for_their_signature(plain_engines, monkeypatch):
    """A compiled layer's first call with a signature goes through Dynamo; its later calls run, without
    Dynamo, the code Dynamo ran for the first: the same bits as calls through Dynamo. A signature that
    left out the shapes would run the one-row code on three rows: caught, whether that code returns one
    row or its bounds check stops it (the inputs it reads are not the ones it was compiled for)."""
    runner = plain_engines["llama"].target
    layers = [layer._compiled_call_impl for layer in runner.model.model.layers]
    through_dynamo = []
    for layer in layers:
        monkeypatch.setattr(layer, "dynamo", lambda *a, _call=layer.dynamo: through_dynamo.append(1) or _call(*a))
        monkeypatch.setattr(layer, "entries", {})  # no signature seen yet

    def forward(rows: int) -> torch.Tensor:
        slots = torch.arange(150, 150 + rows)
        with torch.inference_mode():
            return runner(slots % 50, slots, slots, torch.zeros(rows, dtype=torch.long), slots[0],
                          torch.ones(1, dtype=torch.long))

    first_call = {rows: forward(rows) for rows in (1, 3)}
    assert len(through_dynamo) == 2 * len(layers)
    through_dynamo.clear()
    direct = {rows: forward(rows) for rows in (1, 3, 1)}
    assert not through_dynamo
    with monkeypatch.context() as m:
        m.setattr(minitree.runner.CompiledLayer, "__call__", lambda self, *a: self.dynamo(*a))
        assert all(torch.equal(direct[rows], forward(rows)) for rows in (1, 3))
    assert len(through_dynamo) == 2 * len(layers)
    assert all(torch.equal(direct[rows], first_call[rows]) for rows in (1, 3))

    monkeypatch.setattr(minitree.runner, "_signature", lambda args: ())  # planted: one entry for every call
    for layer in layers:
        monkeypatch.setattr(layer, "entries", {})
    forward(1)
    try:
        wrong = forward(3).shape
    except RuntimeError as e:  # Inductor's bounds check on an index read from the wrong input
        wrong = str(e)
    assert wrong != direct[3].shape


def test_compiled_code_is_cached_per_vector_width(family_dirs):
    """Inductor writes CPU code for the SIMD width ATEN_CPU_CAPABILITY picks, but its on-disk cache
    key leaves the width out: code cached under AVX2 emulation was compiled for AVX-512 later and
    decoded wrong tokens. A compiling runner names the width in Inductor's config, which is in the key."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    script = ("import sys, minitree; from torch._inductor import config; "
              "minitree.Runner(minitree.load(sys.argv[1]), plan='none'); print(config.cpp.simdlen)")

    def width(**env) -> str:
        run = subprocess.run([sys.executable, "-c", script, str(family_dirs["llama"])], env=os.environ | env,
                             capture_output=True, text=True, check=True)
        return run.stdout.split()[-1]

    native = str(pick_vec_isa().bit_width())
    assert width() == native
    if native != "256":  # on AVX-512 CPUs; on an AVX2 one the run above was that check
        assert width(ATEN_CPU_CAPABILITY="avx2") == "256"


def test_compiled_layers_write_the_cache_in_place(family_dirs):
    """A compiled layer writes its keys and values where they are: its code allocates no buffer of the
    cache's length. A layer given one [2, ...] cache tensor, whose halves it wrote, got copies of the
    whole cache on every forward (five per layer, at S slots each: a one-row step cost grew with S)."""
    from torch._inductor.utils import run_and_get_code
    slots_in_cache = 5 * BLOCK  # a cache length no other test compiles, so that Inductor runs here
    runner = minitree.Runner(minitree.load(family_dirs["qwen2"]), plan="none", cache_len=slots_in_cache)
    mask, slots = TreeMask.causal(3, "cpu"), torch.arange(200, 203)
    with torch.inference_mode(), torch._inductor.config.patch(fx_graph_cache=False):
        _, code = run_and_get_code(runner, torch.tensor([5, 6, 7]), slots, slots, mask.q_node, mask.base,
                                   mask.anc_bits)
    shapes = allocated_shapes("\n".join(code))
    assert shapes, "no compiled code was captured"
    assert not [shape for shape in shapes if slots_in_cache in shape]


def allocated_shapes(code: str) -> list[tuple[int, ...]]:
    """The shapes of the buffers compiled code allocates: from Inductor's Python wrapper
    (`empty_strided_cpu((1, 2, 640, 16), ...)`) or its C++ wrapper (`aoti_torch_empty_strided(4,
    int_array_9, ...)`, the sizes in `static constexpr int64_t int_array_9[] = {1L, 2L, 640L, 16L};`)."""
    arrays = dict(re.findall(r"int_array_(\d+)\[\] = \{([^}]*)\}", code))
    numbers = lambda text: tuple(int(v.strip().rstrip("L")) for v in text.split(",") if v.strip())
    shapes = [numbers(arrays[i]) for i in re.findall(r"aoti_torch_empty_strided\(\d+, int_array_(\d+),", code)]
    return shapes + [numbers(sizes) for sizes in re.findall(r"empty_strided_cpu\(\(([^)]*)\)", code)]


def test_sampled_plain_decoding_is_seeded(family_dirs):
    engine = minitree.Engine(minitree.load(family_dirs["qwen3"]), max_seq_len=256, compile=False,
                             attention="sdpa")
    s = minitree.Sampling(temperature=1.0, top_k=50, top_p=0.9)
    a, b, c = (engine.generate([1, 2, 3], 24, s, seed=seed).tokens for seed in (7, 7, 8))
    assert a == b and a != c


# ----------------------------------------------------------------------------------------
# Bad input: one clear error naming the problem.

def test_missing_config(tmp_path):
    with pytest.raises(minitree.LoadError, match="no config.json"):
        minitree.load(tmp_path)


def test_missing_path():
    with pytest.raises(minitree.LoadError, match="does not exist"):
        minitree.load("/nonexistent/checkpoint")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(minitree.ConfigError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        minitree.load(tmp_path)


def _copy_with(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")


def test_missing_tensor(family_dirs, tmp_path):
    _copy_with(family_dirs["llama"], tmp_path / "m", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(minitree.LoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        minitree.load(tmp_path / "m")


def test_misshaped_tensor(family_dirs, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1]
    _copy_with(family_dirs["llama"], tmp_path / "m", edit)
    with pytest.raises(minitree.LoadError, match=r"k_proj\.weight has shape \(31, 64\), expected \(32, 64\)"):
        minitree.load(tmp_path / "m")


def test_corrupt_safetensors(family_dirs, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text((family_dirs["llama"] / "config.json").read_text())
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(minitree.LoadError, match="not a readable safetensors file"):
        minitree.load(tmp_path / "m")


def test_prompt_longer_than_context(family_dirs):
    engine = minitree.Engine(minitree.load(family_dirs["llama"]), max_seq_len=64, compile=False)
    with pytest.raises(minitree.EngineError, match="prompt has 80 tokens; the context holds 64"):
        engine.generate(list(range(80)), 4)


def test_unreachable_hub_id():
    with pytest.raises(minitree.LoadError, match="could not be downloaded"):
        minitree.load("no-such-org/no-such-model")


def test_sharded_checkpoint(family_dirs, tmp_path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(family_dirs["qwen3"])
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    ids = torch.arange(20)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert (causal(minitree.load(tmp_path / "sharded"))(ids) - ref).abs().max() <= 1e-4
