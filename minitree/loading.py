"""Checkpoint -> Transformer: a local directory (config.json + safetensors, sharded or not), a
GGUF file, or a Hugging Face hub id. Weights are built on the meta device and assigned from
memory-mapped safetensors, so nothing is allocated twice.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open

from . import tp
from .config import from_hf_config
from .errors import LoadError
from .gguf import read_gguf
from .model import Transformer, rope_frequencies


def resolve(checkpoint: str | Path) -> Path:
    """A local checkpoint directory for `checkpoint` (a path, or a hub id downloaded when reachable)."""
    path = Path(checkpoint).expanduser()
    if path.exists():
        return path
    name = str(checkpoint)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise LoadError(f"checkpoint {name} does not exist")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
    except Exception as e:  # the hub client raises many types; all mean "not available here"
        raise LoadError(f"{name} is not a local path and could not be downloaded from the Hugging Face hub "
                        f"({type(e).__name__}); is the hub reachable?") from None


def _state_dict(path: Path, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, or with world > 1 only this rank's slices of them (tp.py)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LoadError(f"no *.safetensors files in {path}")
    tensors = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as sf:
                for name in sf.keys():
                    if world == 1:
                        tensors[name] = sf.get_tensor(name)
                        continue
                    part = sf.get_slice(name)
                    tensors[name] = tp.shard(name, part.__getitem__, tuple(part.get_shape()), rank, world)
        except Exception as e:
            raise LoadError(f"{f} is not a readable safetensors file ({e})") from None
    return tensors


def load_state(model: Transformer, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device) -> None:
    """Assign `tensors` (HF names) to the parameters a meta-device `model` still lacks, checking every
    name and shape."""
    if model.args.tie_embeddings and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        rows = model.lm_head.weight.shape[0]  # this rank's vocabulary rows, when tensor-parallel
        rank = tp.world()[0] if model.args.world > 1 else 0
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"][rank * rows:(rank + 1) * rows]
    expected = {name: p for name, p in model.named_parameters() if p.is_meta}
    for name, param in expected.items():
        if name not in tensors:
            raise LoadError(f"tensor {name} is missing from the checkpoint")
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise LoadError(f"tensor {name} has shape {tuple(tensors[name].shape)}, expected {tuple(param.shape)}")
    state = {name: tensors[name].to(device=device, dtype=dtype) for name in expected}
    model.load_state_dict(state, assign=True, strict=False)  # every parameter still missing is in `state`
    model.inv_freq = rope_frequencies(model.args).to(device)  # a buffer computed, not loaded


def load(checkpoint: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         tokenizer: bool = True, tensor_parallel: bool = False, dequantize: bool = False) -> Transformer:
    """Load a Llama-family checkpoint. The tokenizer (or None) is attached as `model.tokenizer`.
    A GGUF file keeps its quantized weights (gguf.py; CPU), unless `dequantize` (float weights in
    `dtype`). tensor_parallel: inside a process group of several ranks (tp.init), load only this
    rank's shard of the model (tp.py)."""
    path = resolve(checkpoint)
    rank, world = tp.world() if tensor_parallel else (0, 1)
    if path.suffix == ".gguf" or (path.is_dir() and not any(path.glob("*.safetensors")) and any(path.glob("*.gguf"))):
        if world > 1:
            raise LoadError(f"tensor parallelism reads safetensors checkpoints; {path} is GGUF")
        return _load_gguf(path, dtype, device, tokenizer, dequantize)
    config = path / "config.json"
    if not config.exists():
        raise LoadError(f"{path} has no config.json (expected a Hugging Face checkpoint directory or a .gguf file)")
    try:
        args = dataclasses.replace(from_hf_config(json.loads(config.read_text())), world=world)
    except (KeyError, json.JSONDecodeError) as e:
        raise LoadError(f"{config} is not a usable model config ({type(e).__name__}: {e})") from None
    with torch.device("meta"):
        model = Transformer(args)
    load_state(model, _state_dict(path, rank, world), dtype, device)
    model.eval().requires_grad_(False)
    model.tokenizer = load_tokenizer(path) if tokenizer else None
    return model


def gguf_file(path: Path) -> Path:
    """The .gguf file at `path` (a file, or a directory holding exactly one)."""
    if path.is_file():
        return path
    files = sorted(path.glob("*.gguf"))
    if len(files) != 1:
        raise LoadError(f"{path} holds {len(files)} .gguf files; name the one to load")
    return files[0]


def hf_from_gguf(path: Path, dtype: torch.dtype):
    """(transformers model, tokenizer) dequantized from a GGUF file by transformers' own reader."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    file = gguf_file(path)
    # transformers >= 5 may keep GGUF weights packed (when its `kernels` are installed): ask for plain tensors
    unpack = dict(quantization_config=transformers.GgufConfig(dequantize=True)) if hasattr(transformers, "GgufConfig") else {}
    try:
        hf = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype, **unpack)
        tok = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    except Exception as e:
        raise LoadError(f"{file} could not be read as a GGUF model ({type(e).__name__}: {e})") from None
    return hf, tok


def _load_gguf(path: Path, dtype: torch.dtype, device, tokenizer: bool, dequantize: bool) -> Transformer:
    file = gguf_file(path)
    if not dequantize and torch.device(device).type != "cpu":
        raise LoadError(f"{file}: quantized GGUF weights run on minitree's CPU kernels; on {device}, load them "
                        f"dequantized (--dequantize)")
    args, tensors, layers = read_gguf(file, dtype, dequantize)
    with torch.device("meta"):
        model = Transformer(args)
    for name, layer in layers.items():  # quantized linear layers, kept as the file holds them (gguf.py)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    load_state(model, tensors, dtype, device)
    model.eval().requires_grad_(False)
    model.tokenizer = None
    if tokenizer:  # the tokenizer files beside a fetched GGUF, else the one inside it
        model.tokenizer = load_tokenizer(file.parent) or hf_tokenizer(file)
    return model


def hf_tokenizer(file: Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    except Exception as e:
        raise LoadError(f"{file}: its tokenizer could not be read ({type(e).__name__}: {e})") from None


def load_tokenizer(path: Path):
    """The checkpoint's tokenizer, or None when it ships none."""
    if not any(path.glob("tokenizer*")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)

