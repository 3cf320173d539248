"""bench.py end to end on the tiny models, as a user runs it (subprocess)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def bench(*args, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_user_prompts_and_systems_without_plain(pair_dirs, tmp_path):
    """--prompts-file with a systems list that lacks plain: plain is added as the baseline, every
    system gets a finite speedup, the table keeps full names when piped, and the PNG is written."""
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text(json.dumps({"prompt": "def fib(n):"}) + "\n" + json.dumps({"prompt": "x = [1, 2"}) + "\n")
    out = tmp_path / "bench.json"
    systems = "[(0,), (1,), (0, 0)];1,1,1@0.001;hf;hf-assisted;plain+int8;1,1,1+int8"
    proc = bench("--checkpoint", pair_dirs[0], "--draft", pair_dirs[1], "--prompts-file", prompts, "--no-chat",
                 "--systems", systems, "--max-new-tokens", 12, "--no-compile", "--dtype", "float32", "--out", out)
    result = json.loads(out.read_text())
    names = ["plain", "[(0,), (1,), (0, 0)]", "1,1,1@0.001", "hf", "hf-assisted"]
    assert list(result["results"]) == [f"mine/{n}" for n in names + ["plain+int8", "1,1,1+int8"]]
    quantized = [[r["tokens"] for r in result["runs"]["mine"][n]] for n in ("plain+int8", "1,1,1+int8")]
    assert quantized[0] == quantized[1]  # lossless with respect to the quantized target, beside the float one
    for name in names:
        row = result["results"][f"mine/{name}"]
        assert 0 < row["speedup"] < 100 and row["agreement"] == 1.0  # fp32 greedy: every system is exact
        assert [len(r["tokens"]) for r in result["runs"]["mine"][name]] == [12, 12]
    assert result["meta"]["machine"]["cpu"] and "isa" in result["meta"]["machine"]
    assert out.with_suffix(".png").stat().st_size > 10_000
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert any("[(0,), (1,), (0, 0)]" in line and "hf" not in line for line in table)  # full names, Markdown
    assert any(line.startswith("| hf-assisted |") for line in table)


@pytest.mark.parametrize("args, message", [
    (["--systems", "2,,1;hf"], "system '2,,1': tree '2,,1' has an empty level"),
    (["--systems", "2,2@high"], "system '2,2@high': the draft cutoff after '@' must be a number"),
    (["--sets", "gsm8k"], "unknown prompt set 'gsm8k'"),
    (["--prompts-file", "/no/such/file"], "cannot read prompts file /no/such/file"),
])
def test_bad_input_before_loading_anything(args, message):
    proc = bench("--checkpoint", "/no/such/model", *args, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_bench_cost_only_predicts_from_an_acceptance_profile(pair_dirs, tmp_path):
    """bench.py --cost-only times step phases on random weights (architecture from config.json)
    and turns a bench JSON's tau and draft levels per step into tokens/s."""
    target_dir, draft_dir = pair_dirs
    stats = lambda steps, levels, tau: dict(stats=dict(target_forwards=steps, draft_forwards=levels, tau=tau))
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(dict(runs=dict(code={"2,2,1@0.5": [stats(10, 25, 3.0), stats(30, 45, 2.0)]}))))
    out = tmp_path / "costs.json"
    run = bench("--cost-only", "--checkpoint", target_dir, "--draft", draft_dir, "--systems", "2,2,1@0.5;hf",
                "--sets", "code", "--no-compile", "--plan", "measure", "--dtype", "float32", "--acceptance-from", profile,
                "--out", out)
    result = json.loads(out.read_text())
    plans = result["meta"]["plans"]  # the forward costs behind plans and --tree auto, from minitree/costs.py
    assert set(plans) == {"target", "draft"} and all(p["costs_s"]["native"] for p in plans.values())
    assert "minitree/costs.py" in run.stdout
    costs = result["costs_ms"]
    assert set(costs) == {"plain", "2,2,1@0.5"}  # transformers systems have no step phases
    assert costs["plain"]["draft_level"] == 0 and costs["2,2,1@0.5"]["draft_level"] > 0
    c, r = costs["2,2,1@0.5"], result["predicted"]["code/2,2,1@0.5"]
    assert c["draft_level"] == pytest.approx(c["draft"] / 3)
    assert r["tau"] == pytest.approx(2.25) and r["draft_levels"] == pytest.approx(70 / 40)
    step = c["verify"] + c["accept"] + c["compact"] + 70 / 40 * c["draft_level"]
    assert r["step_ms"] == pytest.approx(step) and r["tokens_per_s"] == pytest.approx(1e3 * 2.25 / step)
    missing = bench("--cost-only", "--checkpoint", tmp_path, check=False)
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1].startswith("error: --cost-only needs")


def test_llama_cpp_crash_is_named(tmp_path):
    """A llama.cpp build that dies by a signal (its AMX path did, on prompts) fails with one line naming
    the signal and the remedy, not with the last log line it happened to print."""
    from types import SimpleNamespace

    from minitree.bench.systems import LlamaCppSystem
    from minitree.errors import EngineError
    binary = tmp_path / "build" / "bin" / "llama-completion"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\necho 'llama threadpool init, n_threads = 2' >&2\nkill -SEGV $$\n")
    binary.chmod(0o755)
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens: "def f():")
    args = SimpleNamespace(threads=2, max_seq_len=64, eos_token_ids=[0])
    system = LlamaCppSystem("llama.cpp", tmp_path / "build", tmp_path / "t.gguf", None, tokenizer, args)
    with pytest.raises(EngineError, match=r"llama.cpp failed: killed by SIGSEGV after: llama threadpool init.*AMX"):
        system([1, 2], 4)
