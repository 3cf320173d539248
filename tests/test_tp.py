"""Tensor parallelism on the CPU: 2 ranks over gloo (torchrun), tiny models, fp32."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reference import causal, plain
from tiny import save_random, save_tokenizer

ROOT = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(scenario: str, out: Path, target, draft, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(ROOT / "tp_worker.py"), scenario, str(out), str(target), str(draft)]
    # PYTHONFAULTHANDLER: a rank that crashes prints its Python stack (why() shows it first)
    env = {"MINITREE_TP_TIMEOUT": "60", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **__import__("os").environ}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def why(proc: subprocess.CompletedProcess) -> str:
    """What a failed torchrun printed: a crashed rank's stack if there is one, else the end."""
    crash = proc.stderr.find("Fatal Python error")
    return proc.stderr[crash:crash + 6000] if crash >= 0 else proc.stderr[-3000:]


@pytest.fixture(scope="module")
def two_ranks(pair_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    proc = torchrun("check", out, *pair_dirs)
    assert proc.returncode == 0, why(proc)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_each_rank_holds_half_the_heads(two_ranks, pair):
    assert [r["world"] for r in two_ranks] == [2, 2]
    assert two_ranks[0]["local_heads"] == pair[0].args.n_heads // 2


def test_logits_equal_the_single_process_model(two_ranks, pair):
    ref = causal(pair[0])(torch.tensor(list(range(3, 40))))
    for r in two_ranks:
        assert (torch.tensor(r["logits"]) - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("spec", ["2,2,1", "dynamic:depth=4,width=2,k=2,nodes=7", "compiled"])
def test_greedy_tree_decoding_equals_single_process_plain_decoding(two_ranks, pair, spec):
    ref = plain(pair[0], list(range(3, 40)), 40 if spec != "compiled" else 24, max_seq_len=256)
    for r in two_ranks:
        assert r[spec] == ref


def test_sampling_gives_the_same_tokens_on_every_rank(two_ranks):
    assert two_ranks[0]["sampled"] == two_ranks[1]["sampled"] and len(two_ranks[0]["sampled"]) == 40


def test_a_rank_that_dies_is_an_error_not_a_hang(pair_dirs, tmp_path):
    proc = torchrun("die", tmp_path, *pair_dirs, timeout=300)
    assert proc.returncode != 0
    assert not (tmp_path / "rank0.json").exists()


def test_heads_that_do_not_divide_are_refused(tmp_path):
    save_random(tmp_path / "t", "qwen2", hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                tie_word_embeddings=False)
    save_tokenizer(tmp_path / "t")
    proc = torchrun("check", tmp_path, tmp_path / "t", tmp_path / "t", timeout=300)
    assert proc.returncode != 0
    assert "num_key_value_heads=3 does not divide by 2" in proc.stderr
