"""One Transformer for the Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3), switched by ModelArgs.

The model alone: weights and the forward pass, nothing about how it is run (runner.py owns the
KV cache, compilation, padding and kernel choices). Batch size 1.
`forward(tokens, positions, slots, kv_cache, mask)` keeps two indices apart: `positions` feed
RoPE (a tree node's position is prefix + depth), `slots` say where in the static KV cache each
token's keys and values are written (a tree node's slot is prefix + its flat index). `mask`
holds the tensors of the attention rule (attention.TreeMask). Module and parameter names follow
Hugging Face's, so a checkpoint's state dict loads without renaming (HF stores q/k already
permuted for its rotate-half RoPE, which is the RoPE used here). With tensor parallelism
(tp.py) the model holds this rank's shard: its row-parallel outputs are all-reduced here, its
logits are this rank's vocabulary rows.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from .attention import TreeMask, attend
from .config import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], with linear or llama3 scaling applied."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = args.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling.get("rope_type") == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor,
                               torch.where(wavelen < old_len / high, inv_freq, smoothed))
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [1, H, T, D] rotated by half-split RoPE; cos, sin [T, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def all_reduce(x: torch.Tensor, world: int) -> torch.Tensor:
    """The sum of every rank's partial output of a row-parallel layer (tensor parallelism, tp.py);
    a functional collective, so that it is traced into the compiled layer."""
    return x if world == 1 else funcol.all_reduce(x, "sum", dist.group.WORLD)


class Attention(nn.Module):
    """This rank's heads (all of them unless tensor-parallel): q/k/v split by heads, o_proj by rows."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads // args.world, args.n_kv_heads // args.world, args.head_dim
        self.q_proj = nn.Linear(args.dim, self.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, self.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, self.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)
        self.qk_norm = args.qk_norm

    def forward(self, x, cos, sin, slots, kv_cache, mask: TreeMask):
        # x [1, T, dim]; kv_cache: this layer's (keys, values), each [1, H_kv, S, D]. Two inputs written
        # in place: had the layer been given one [2, ...] tensor and written its halves, Inductor
        # would copy the whole cache around every write (README, "Compilation").
        T = x.shape[1]
        q = self.q_proj(x).view(1, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(1, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(1, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [1, H, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = kv_cache
        keys.index_copy_(2, slots, k)
        values.index_copy_(2, slots, v)
        y = attend(q, keys, values, slots, mask)  # [1, H, T, D]
        return self.o_proj(y.transpose(1, 2).reshape(1, T, -1))


class MLP(nn.Module):
    """This rank's columns of the MLP: gate/up split by columns, down_proj by rows."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.intermediate_size // args.world
        self.gate_proj = nn.Linear(args.dim, hidden, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, hidden, bias=args.mlp_bias)
        self.down_proj = nn.Linear(hidden, args.dim, bias=args.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.world = args.world

    def forward(self, x, cos, sin, slots, kv_cache, mask):
        x = x + all_reduce(self.self_attn(self.input_layernorm(x), cos, sin, slots, kv_cache, mask), self.world)
        return x + all_reduce(self.mlp(self.post_attention_layernorm(x)), self.world)


class Backbone(nn.Module):
    """HF's `model.*` submodule: embeddings, layers, final norm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size // args.world, bias=False)  # this rank's vocabulary rows
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the final norm's weight is held in it, whatever form the others take)."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, kv_cache: torch.Tensor,
                mask: TreeMask, logits: bool = True) -> torch.Tensor:
        """tokens, positions, slots [T]; kv_cache [layers, 2, 1, H_kv, S, D] -> logits [T, vocab rows]
        (hidden states [T, dim] when logits=False, for caching a prompt)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        freqs = torch.cat((freqs, freqs), dim=-1)
        cos, sin = freqs.cos(), freqs.sin()
        x = self.model.embed_tokens(tokens)[None]  # [1, T, dim]
        for layer, layer_cache in zip(self.model.layers, kv_cache):
            x = layer(x, cos, sin, slots, layer_cache.unbind(0), mask)  # (keys, values)
        return self.lm_head(self.model.norm(x[0])) if logits else x[0]
