"""GGUF files loaded with their quantized weights kept: linear layers run on the file's own blocks.

`load_gguf` reads a GGUF file (llama.cpp's format) into a Transformer whose linear layers are
`GGUFLinear`: each holds its weights exactly as the file defines them, regrouped once by 16 outputs,
and multiplies them with minitree's integer kernel (csrc/integer.cpp, built once on first use with
the machine's C++ compiler): each activation row is quantized to int8 blocks by itself, as
llama.cpp does, the products are summed in int32 and the scales applied in one fixed order. So a
row's output has the same bits whatever else shares the forward, on every instruction set's path.

Supported quantized types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K (the default pair's files hold
Q4_K, Q6_K, Q5_0 and Q8_0; SmolLM2's Q4_1); float tensors (F32, F16, BF16) load as float weights.
A linear layer of another type is refused with one line naming the tensor and its type
(`dequantize=True` loads any type transformers reads, as float weights). The token embedding keeps
its blocks too (`GGUFEmbedding`: the rows a forward looks up are dequantized, the table never is);
a tied model's lm_head is the same layer.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .config import from_hf_config
from .errors import ConfigError, LoadError
from .forms import GGUFEmbedding, GGUFLinear

SUPPORTED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K")
FLOATS = ("F32", "F16", "BF16")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
PERMUTED = ("llama", "mistral")  # llama.cpp stores these q/k rows permuted for its interleaved RoPE
LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


# GGUF metadata value types (llama.cpp's gguf.md) -> struct format; 8: string, 9: array
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# GGUF key (after "<arch>.") -> Hugging Face config key, as transformers maps them for these architectures
CONFIG_KEYS = {"context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
               "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
               "rope.freq_base": "rope_theta", "attention.head_count": "num_attention_heads",
               "attention.head_count_kv": "num_key_value_heads", "attention.layer_norm_rms_epsilon": "rms_norm_eps",
               "attention.key_length": "head_dim", "vocab_size": "vocab_size"}
TOKEN_KEYS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "padding_token_id": "pad_token_id"}


class Header(NamedTuple):
    """A GGUF file's metadata (arrays of strings as their length) and tensors (name, GGUF type,
    shape outermost first, byte offset in the file)."""
    fields: dict
    tensors: list[tuple[str, int, list[int], int]]


def read_header(file: Path) -> Header:
    """The header of a GGUF file (v2/v3), read directly: the gguf package's reader parses every
    token string of the vocabulary into its own array, about ten seconds for a Qwen file."""
    with open(file, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise LoadError(f"{file} is not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
        if version < 2:
            raise LoadError(f"{file}: GGUF version {version} is not supported (2 or 3)")
        buf, at = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), 24

        def take(fmt: str):
            nonlocal at
            value = struct.unpack_from("<" + fmt, buf, at)[0]
            at += struct.calcsize("<" + fmt)
            return value

        def string() -> str:
            nonlocal at
            n = take("Q")
            at += n
            return buf[at - n:at].decode("utf-8", "replace")

        def value(kind: int):
            nonlocal at
            if kind in SCALARS:
                return take(SCALARS[kind])
            if kind == 8:
                return string()
            if kind != 9:
                raise LoadError(f"{file}: unknown GGUF value type {kind}")
            item, n = take("I"), take("Q")
            if item == 8:  # strings (a vocabulary): skipped, counted
                for _ in range(n):
                    length = take("Q")  # (`at += take(..)` would read `at` before take moves it)
                    at += length
                return n
            if item not in SCALARS:
                return [value(item) for _ in range(n)]
            size = struct.calcsize(SCALARS[item])
            at += n * size
            return np.frombuffer(buf, dtype="<" + SCALARS[item], count=n, offset=at - n * size).tolist()

        try:
            fields = {}
            for _ in range(n_kv):
                key = string()
                fields[key] = value(take("I"))
            infos = []
            for _ in range(n_tensors):
                name, dims = string(), take("I")
                shape = [take("Q") for _ in range(dims)]
                infos.append((name, take("I"), shape[::-1], take("Q")))
        except (struct.error, ValueError):  # a value or array past the end of the file
            raise LoadError(f"{file} is truncated") from None
        finally:
            buf.close()
    align = int(fields.get("general.alignment", 32))
    start = -(-at // align) * align
    return Header(fields, [(name, kind, shape, start + offset) for name, kind, shape, offset in infos])


def hf_config(header: Header) -> dict:
    """The Hugging Face config of a GGUF file's model (the keys transformers maps for Llama-family files)."""
    arch = header.fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise LoadError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    cfg = {hf: header.fields[f"{arch}.{key}"] for key, hf in CONFIG_KEYS.items() if f"{arch}.{key}" in header.fields}
    cfg.setdefault("head_dim", header.fields.get(f"{arch}.rope.dimension_count"))  # full rotary: the head size
    cfg |= {hf: header.fields[f"tokenizer.ggml.{key}"] for key, hf in TOKEN_KEYS.items()
            if f"tokenizer.ggml.{key}" in header.fields}
    cfg.setdefault("vocab_size", header.fields.get("tokenizer.ggml.tokens"))
    cfg |= dict(model_type=arch, architectures=[ARCHITECTURES[arch]],
                tie_word_embeddings=all(name != "output.weight" for name, *_ in header.tensors))
    return {k: v for k, v in cfg.items() if v is not None}  # absent, not null: transformers reads null as a value


def hf_name(name: str) -> str:
    """A GGUF tensor name -> the Hugging Face name model.py's modules use."""
    stem, _, kind = name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, module = stem.split(".", 2)
        if module not in LAYER_NAMES:
            raise LoadError(f"GGUF tensor {name} has no place in a Llama-family model")
        return f"model.layers.{layer}.{LAYER_NAMES[module]}.{kind}"
    if stem not in TOP_NAMES:
        raise LoadError(f"GGUF tensor {name} has no place in a Llama-family model")
    return f"{TOP_NAMES[stem]}.{kind}"


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> rotate-half), on whole rows
    (so on quantized rows too)."""
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def read_gguf(file: Path, dtype: torch.dtype, dequantize: bool = False):
    """A GGUF file -> (ModelArgs, float tensors by Hugging Face name, GGUFLinear layers by module name).
    With `dequantize`, every tensor comes back as a float tensor (no layers, no kernels built)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize as dequantize_numpy
    header = read_header(file)
    try:
        args = from_hf_config(hf_config(header))
    except (LoadError, ConfigError, KeyError, TypeError) as e:
        raise LoadError(f"{file}: {e}") from None
    arch = header.fields["general.architecture"]
    data_of = np.memmap(file, dtype=np.uint8, mode="r")
    tensors, layers = {}, {}
    for gguf_name, code, shape, offset in header.tensors:
        name = hf_name(gguf_name)
        if code not in GGMLQuantizationType._value2member_map_:
            raise LoadError(f"{file}: tensor {gguf_name} has an unknown GGUF type ({code})")
        qtype = GGMLQuantizationType(code)
        kind, (block, size) = qtype.name, GGML_QUANT_SIZES[qtype]
        row_bytes = shape[-1] // block * size
        end = offset + math.prod(shape[:-1]) * row_bytes
        if end > data_of.size:
            raise LoadError(f"{file} is truncated (tensor {gguf_name} ends past the end of the file)")
        data = data_of[offset:end]
        data = data.reshape(-1, row_bytes) if len(shape) > 1 else data
        if kind in FLOATS:  # the rows' bytes as their own dtype
            data = data.view({"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[kind])
            data = (data.astype(np.uint32) << 16).view(np.float32) if kind == "BF16" else data
        if arch in PERMUTED and name.endswith(("q_proj.weight", "k_proj.weight")):
            data = unpermute(data, args.n_heads if "q_proj" in name else args.n_kv_heads)
        if kind in FLOATS:
            tensors[name] = torch.from_numpy(np.ascontiguousarray(data).astype(np.float32)).reshape(shape)
        elif kind not in SUPPORTED and not dequantize:
            raise LoadError(f"{file}: tensor {gguf_name} has GGUF type {kind}, which minitree's kernels do not read "
                            f"(supported: {', '.join(SUPPORTED + FLOATS)}); load the file dequantized (--dequantize)")
        elif dequantize:
            tensors[name] = torch.from_numpy(dequantize_numpy(data, qtype)).reshape(shape)
        else:  # regrouped one tensor at a time: the file's blocks are not kept
            layers[name.removesuffix(".weight")] = GGUFLinear.from_blocks(torch.from_numpy(np.array(data)), kind,
                                                                          shape[1], None, dtype)
    if isinstance(table := layers.get("model.embed_tokens"), GGUFLinear):  # looked up row by row, kept in blocks
        layers["model.embed_tokens"] = GGUFEmbedding(table)
        if args.tie_embeddings:
            layers["lm_head"] = table
    for module, layer in layers.items():
        if (bias := tensors.pop(f"{module}.bias", None)) is not None:
            layer.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    return args, tensors, layers
