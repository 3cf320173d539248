"""Tiny random checkpoints written by transformers, shared by the whole session."""

from __future__ import annotations

import pytest
import torch
import transformers

import minitree

VOCAB = 256


def hf_config(family: str, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  rms_norm_eps=1e-6, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    common.update(overrides)
    if family == "llama":
        return transformers.LlamaConfig(**common, rope_parameters=dict(
            rope_type="llama3", rope_theta=50000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64), attention_bias=False)
    if family == "qwen2":
        common.setdefault("tie_word_embeddings", True)
        return transformers.Qwen2Config(**common, rope_parameters=dict(
            rope_type="default", rope_theta=1000000.0))
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=32, rope_parameters=dict(
            rope_type="default", rope_theta=1000000.0))
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    raise ValueError(family)


def save_random(path, family: str, seed: int = 0, noise_from=None, noise: float = 0.0, head_scale: float = 1.0,
                **overrides):
    """Save a random model of `family` to `path`; with noise_from, its weights are that
    checkpoint's plus Gaussian noise (a draft that partly agrees with its target).
    head_scale multiplies lm_head (sharper distributions than the tiny default init)."""
    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
        if noise_from is not None:
            src = transformers.AutoModelForCausalLM.from_pretrained(noise_from).float()
            for p, q in zip(model.parameters(), src.parameters()):
                p.copy_(q + noise * torch.randn_like(q) * q.std())
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: _saved(root / f, f) for f in ("llama", "qwen2", "qwen3", "mistral")}


def _saved(path, family, **kw):
    save_random(path, family, **kw)
    return path


def save_tokenizer(path, vocab_size: int = VOCAB, shift: int = 0):
    """A byte-level BPE tokenizer without merges: one token per byte (ids rotated by `shift`),
    the shape of the Qwen2 tokenizer that AutoTokenizer picks for these checkpoints."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: (i + shift) % vocab_size for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)


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
