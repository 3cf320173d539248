"""Model hyper-parameters: one dataclass for the whole Llama family, read from config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

# Architectures the single Transformer in model.py implements, switched by the fields below.
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...}
    qkv_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head, before RoPE
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    architecture: str = "LlamaForCausalLM"
    world: int = 1  # tensor parallelism: this model holds one of `world` shards (tp.py)

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"num_attention_heads={self.n_heads} is not a multiple of num_key_value_heads={self.n_kv_heads}")
        split = dict(num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
                     intermediate_size=self.intermediate_size, vocab_size=self.vocab_size)
        bad = [f"{k}={v}" for k, v in split.items() if v % self.world]
        if bad:
            raise ConfigError(f"tensor parallelism over {self.world} ranks splits heads, MLP columns and the "
                              f"vocabulary evenly; {', '.join(bad)} does not divide by {self.world}")


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either transformers 4 (rope_theta, rope_scaling) or 5 (rope_parameters)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return theta, None
    if kind not in ("llama3", "linear"):
        raise ConfigError(f"rope scaling '{kind}' is not supported (supported: default, linear, llama3)")
    params["rope_type"] = kind
    return theta, params


def from_hf_config(cfg: dict | str | Path) -> ModelArgs:
    """ModelArgs from a Hugging Face config (a dict or the path of config.json)."""
    if not isinstance(cfg, dict):
        cfg = json.loads(Path(cfg).read_text())
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in SUPPORTED:
        raise ConfigError(f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED)})")
    if cfg.get("text_config"):
        raise ConfigError("multimodal checkpoints are not supported")
    theta, scaling = _rope(cfg)
    eos = cfg.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    n_heads = cfg["num_attention_heads"]
    return ModelArgs(
        vocab_size=cfg["vocab_size"],
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        intermediate_size=cfg["intermediate_size"],
        head_dim=cfg.get("head_dim") or 0,
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias")),
        o_bias=arch in ("LlamaForCausalLM", "Qwen3ForCausalLM") and bool(cfg.get("attention_bias")),
        mlp_bias=bool(cfg.get("mlp_bias")),
        qk_norm=arch == "Qwen3ForCausalLM",
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        eos_token_ids=eos,
        architecture=arch,
    )
