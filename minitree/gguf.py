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
(`dequantize=True` loads any type transformers reads, as float weights). The token embedding is
dequantized once to the activations' dtype.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import from_hf_config
from .errors import LoadError
from .forms import GGUFLinear
from .kernels import kernels

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


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode() if value.dtype == np.uint8 else value.tolist()[0]


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
    from gguf import GGUFReader
    from gguf.quants import dequantize as dequantize_numpy
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    try:
        reader = GGUFReader(str(file))
        config = load_gguf_checkpoint(str(file), return_tensors=False)["config"]
    except Exception as e:  # the readers raise many types; all mean "not a usable GGUF file"
        raise LoadError(f"{file} could not be read as a GGUF model ({type(e).__name__}: {e})") from None
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise LoadError(f"{file}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    config["architectures"] = [ARCHITECTURES[arch]]
    args = from_hf_config(config)
    tensors, layers = {}, {}
    for t in reader.tensors:
        name, kind = hf_name(t.name), t.tensor_type.name
        shape = [int(d) for d in reversed(t.shape)]  # GGUF lists dimensions innermost first
        data = np.asarray(t.data)
        if arch in PERMUTED and name.endswith(("q_proj.weight", "k_proj.weight")):
            data = unpermute(data, args.n_heads if "q_proj" in name else args.n_kv_heads)
        if kind in FLOATS:
            tensors[name] = torch.from_numpy(np.ascontiguousarray(data).astype(np.float32)).reshape(shape)
        elif kind not in SUPPORTED and not dequantize:
            raise LoadError(f"{file}: tensor {t.name} has GGUF type {kind}, which minitree's kernels do not read "
                            f"(supported: {', '.join(SUPPORTED + FLOATS)}); load the file dequantized (--dequantize)")
        elif dequantize:
            tensors[name] = torch.from_numpy(dequantize_numpy(data, t.tensor_type)).reshape(shape)
        elif name.startswith("model.embed_tokens"):  # looked up, not multiplied: dequantized once
            groups = kernels().int_repack(torch.from_numpy(np.array(data)), int(t.tensor_type), shape[1])
            tensors[name] = kernels().int_dequantize(groups, int(t.tensor_type), shape[1], shape[0])
        else:  # regrouped one tensor at a time: the file's blocks are not kept
            layers[name.removesuffix(".weight")] = GGUFLinear.from_blocks(torch.from_numpy(np.array(data)), kind,
                                                                          shape[1], None, dtype)
    for module, layer in layers.items():
        if (bias := tensors.pop(f"{module}.bias", None)) is not None:
            layer.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    return args, tensors, layers
