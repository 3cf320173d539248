"""Tree attention masks: who may see whom in one forward pass.

Every forward of minitree (prefill chunk, plain decode, draft level, tree verify) uses one
mask rule over the cache slots, parameterised by tensors so that it never forces a
recompile:

    query q (at cache slot q_slot[q], tree node q_node[q]) sees cache slot kv  iff
        kv <= q_slot[q]  and  (kv < base  or  node kv - base is q_node[q] or one of its ancestors)

`base` is the slot of the tree's root (the last committed token); everything below it is the
committed prefix. The ancestor relation is an int64 bitmask per node (bit j of
anc_bits[i] set iff node j is i or an ancestor of i), so a tree holds at most 64 nodes.
A causal chunk (prefill) is the same rule with `base` beyond every slot.

`attend` runs attention under this rule in one of three ways: minitree's own CPU kernel
("exact", csrc/attention.cpp: each query's sums in the order of the slots it sees, so that a token
rounds alike whatever shares the forward and wherever the tree starts; the default on CPUs),
FlexAttention with a BlockMask ("flex": GPUs), or SDPA with a dense mask ("sdpa": the reference).
The model calls it in every layer, so the mask is built inside the compiled layer from tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

KINDS = ("exact", "flex", "sdpa")
BLOCK = 128  # FlexAttention block size, in slots and in queries
NO_TREE = 1 << 40  # a `base` beyond any slot: the rule degenerates to causal-by-slot


def tree_mask_mod(q_slot: torch.Tensor, q_node: torch.Tensor, base: torch.Tensor, anc_bits: torch.Tensor):
    """mask_mod(b, h, q_idx, kv_idx) -> bool for the rule above (pure, closes over tensors)."""

    def mask_mod(b, h, q_idx, kv_idx):
        rel = kv_idx - base
        bit = (anc_bits[q_node[q_idx]] >> rel.clamp(0, 63)) & 1
        # Integer arithmetic instead of `&`/`|` on mixed lookups: a CPU compile trap of
        # torch 2.13 (README, "Compilation").
        in_tree = torch.where(rel < 0, 1, bit)
        causal = torch.where(kv_idx <= q_slot[q_idx], 1, 0)
        return (in_tree * causal) > 0

    mask_mod.__name__ = "tree_mask"
    return mask_mod


def block_mask(q_slot: torch.Tensor, q_node: torch.Tensor, base: torch.Tensor, anc_bits: torch.Tensor,
               cache_len: int) -> BlockMask:
    """BlockMask for at most BLOCK queries over a cache of `cache_len` slots (a multiple of BLOCK).

    Built from tensors only (no host sync), so it can live inside a compiled step. Every
    block up to the highest query slot is partial (mask_mod applied), none is "full": on CPU
    FlexAttention visits partial blocks before full ones, so a full/partial split that moves
    with `base` would change the order in which a query's softmax is accumulated, and with
    it the rounding. Ascending blocks for every query make a token's attention round the
    same in plain decoding and in a tree verify (when its ancestors sit at the same slots).
    """
    n_blocks = cache_len // BLOCK
    blocks = torch.arange(n_blocks, device=q_slot.device, dtype=torch.int32)
    n_partial = (q_slot.max() // BLOCK + 1).to(torch.int32)
    return BlockMask.from_kv_blocks(
        n_partial.view(1, 1, 1), blocks.view(1, 1, 1, -1),
        BLOCK_SIZE=BLOCK, mask_mod=tree_mask_mod(q_slot, q_node, base, anc_bits),
        seq_lengths=(q_slot.numel(), cache_len), compute_q_blocks=False,
    )


def dense_mask(q_slot: torch.Tensor, q_node: torch.Tensor, base: torch.Tensor, anc_bits: torch.Tensor,
               cache_len: int) -> torch.Tensor:
    """The same rule as a dense bool [Q, cache_len] mask (the SDPA reference path)."""
    q_idx = torch.arange(q_slot.numel(), device=q_slot.device)[:, None]
    kv_idx = torch.arange(cache_len, device=q_slot.device)[None, :]
    return tree_mask_mod(q_slot, q_node, base, anc_bits)(0, 0, q_idx, kv_idx)


class TreeMask(NamedTuple):
    """The mask rule's parameters, passed to the model's forward; `attend` builds the actual mask
    from them in every layer (queries sit at their own write slots)."""
    q_node: torch.Tensor  # [T] tree node of each query (0 for causal queries)
    base: torch.Tensor  # [] slot of the tree root; NO_TREE for causal-by-slot
    anc_bits: torch.Tensor  # [n] int64 ancestor bitmask per tree node
    kind: str = "flex"  # one of KINDS (module docstring)
    q_slot: torch.Tensor | None = None  # [T'] slots the mask rows stand for, when not the write slots

    @classmethod
    def causal(cls, T: int, device, kind: str = "flex") -> "TreeMask":
        return cls(torch.zeros(T, dtype=torch.long, device=device), torch.tensor(NO_TREE, device=device),
                   torch.ones(1, dtype=torch.long, device=device), kind)

    def for_one_query(self, slots: torch.Tensor) -> "TreeMask":
        """Compiled flex fails with a single query on CPU (README, "Compilation"): a one-query forward
        masks two identical queries instead (`attend` runs its query twice). The repeated tensors
        are made here, outside the compiled layers: Inductor's CPU flex template takes its mask's
        tensors as inputs only (computed ones leave it without a kernel on one thread)."""
        return self._replace(q_node=self.q_node.repeat(2), q_slot=slots.repeat(2)) if self.kind == "flex" else self


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
           mask: TreeMask) -> torch.Tensor:
    """Queries q [1, H, T, D] at cache `slots` [T] attend to the cache keys, values [1, H_kv, S, D]
    under the tree rule -> [1, H, T, D]."""
    S, T = keys.shape[2], q.shape[2]
    q_slot = slots if mask.q_slot is None else mask.q_slot
    if mask.kind == "exact":  # the op is loaded by the runner that chose it (kernels.available)
        return torch.ops.minitree_kernels.attend(q, keys, values, q_slot, mask.q_node, mask.base, mask.anc_bits)
    if mask.kind == "sdpa":
        dense = dense_mask(q_slot, mask.q_node, mask.base, mask.anc_bits, S)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=dense, enable_gqa=True)
    if q_slot.numel() != T:  # TreeMask.for_one_query
        q = q.repeat(1, 1, q_slot.numel() // T, 1)
    blocks = block_mask(q_slot, mask.q_node, mask.base, mask.anc_bits, S)
    return flex_attention(q, keys, values, block_mask=blocks, enable_gqa=True)[:, :, :T]
