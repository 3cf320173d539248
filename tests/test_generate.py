"""generate.py end to end, as a user runs it (subprocess)."""

import json

import pytest

import minitree
from reference import FAST, generate, plain
from tiny import save_tokenizer

PROMPT = "def fib(n): return n"


def test_json_tokens_equal_plain_greedy(pair_dirs):
    target_dir, draft_dir = pair_dirs
    proc = generate("--checkpoint", target_dir, "--draft", draft_dir, "--tree", "2,2,1", "--prompt", PROMPT,
                    "--max-new-tokens", 48, "--json", *FAST)
    out = json.loads(proc.stdout)
    target = minitree.load(target_dir)
    ids = target.tokenizer(PROMPT).input_ids
    reference = plain(target, ids, 48, max_seq_len=256)
    assert out["tokens"] == reference
    assert out["text"] == target.tokenizer.decode(reference)
    assert out["stats"]["new_tokens"] == 48 and out["stats"]["tau"] > 1


def test_streams_text_and_prints_a_summary(pair_dirs):
    args = ["--checkpoint", pair_dirs[0], "--draft", pair_dirs[1], "--tree", "3,1", "--prompt", PROMPT,
            "--max-new-tokens", 30, *FAST]
    streamed = generate(*args)
    assert streamed.stdout.rstrip("\n") == json.loads(generate(*args, "--json").stdout)["text"]
    proc = streamed
    assert "tokens/s" in proc.stderr and "tau" in proc.stderr and "acceptance by depth" in proc.stderr


@pytest.fixture(scope="module")
def other_tokenizer_draft(pair_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("other") / "draft"
    d.mkdir()
    for f in pair_dirs[1].iterdir():
        if f.name in ("config.json", "model.safetensors"):
            (d / f.name).write_bytes(f.read_bytes())
    save_tokenizer(d, shift=1)
    return d


@pytest.mark.parametrize("case", ["unknown name", "missing path", "hub unreachable", "tokenizer mismatch",
                                  "malformed tree", "bad temperature", "bad top-p", "tree without draft"])
def test_bad_input_is_one_clear_line(pair_dirs, other_tokenizer_draft, case):
    t, d = pair_dirs
    args, message = {
        "unknown name": (["--checkpoint", "qwen-9000", "--tree", "none"], "neither a checkpoint path nor a known model (qwen2.5"),
        "missing path": (["--checkpoint", "/no/such/dir", "--tree", "none"], "does not exist"),
        "hub unreachable": (["--checkpoint", "no-such-org/no-such-model", "--tree", "none"], "could not be downloaded"),
        "tokenizer mismatch": (["--checkpoint", t, "--draft", other_tokenizer_draft], "tokenizer"),
        "malformed tree": (["--checkpoint", t, "--draft", d, "--tree", "2,,1"], "empty level"),
        "bad temperature": (["--checkpoint", t, "--draft", d, "--temperature", "-1"], "temperature must be >= 0"),
        "bad top-p": (["--checkpoint", t, "--draft", d, "--top-p", "2"], "top-p must be in (0, 1]"),
        "tree without draft": (["--checkpoint", t, "--tree", "2,2"], "--tree needs a --draft model"),
    }[case]
    proc = generate(*args, "--prompt", PROMPT, *FAST, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
