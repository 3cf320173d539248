"""Tiny random checkpoints written by transformers, shared by the whole session."""

from __future__ import annotations

import os

import pytest

import minitree
import minitree.costs
from tiny import save_random, save_tokenizer


@pytest.fixture(scope="session", autouse=True)
def private_cost_cache(tmp_path_factory):
    """Forward costs the tests measure stay out of the user's cache (also in the scripts they run)."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["MINITREE_CACHE"] = str(cache)
    minitree.costs.CACHE = cache / "costs.json"


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: _saved(root / f, f) for f in ("llama", "qwen2", "qwen3", "mistral")}


def _saved(path, family, **kw):
    save_random(path, family, **kw)
    return path


@pytest.fixture(scope="session")
def pair_dirs(tmp_path_factory):
    """A Qwen2-style target and a draft that is the target plus noise, with a shared tokenizer."""
    root = tmp_path_factory.mktemp("pair")
    save_random(root / "target", "qwen2", seed=1, tie_word_embeddings=False)
    save_random(root / "draft", "qwen2", seed=2, noise_from=root / "target", noise=0.3, tie_word_embeddings=False)
    for name in ("target", "draft"):
        save_tokenizer(root / name)
    return root / "target", root / "draft"


@pytest.fixture(scope="session")
def pair(pair_dirs):
    return minitree.load(pair_dirs[0]), minitree.load(pair_dirs[1])


@pytest.fixture(scope="session")
def markov_pair(tmp_path_factory):
    """Models without decoder layers (test_sampling_lossless.py): the next token depends on the last one only."""
    root = tmp_path_factory.mktemp("markov")
    kw = dict(num_hidden_layers=0, vocab_size=32, tie_word_embeddings=False)
    save_random(root / "target", "llama", seed=11, head_scale=10.0, **kw)
    save_random(root / "draft", "llama", seed=12, noise_from=root / "target", noise=0.5, **kw)
    return minitree.load(root / "target"), minitree.load(root / "draft")
