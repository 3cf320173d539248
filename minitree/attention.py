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

This module does not run attention; model.py does, with either mask form built here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn.attention.flex_attention import BlockMask

BLOCK = 128  # FlexAttention block size, in slots and in queries
NO_TREE = 1 << 40  # a `base` beyond any slot: the rule degenerates to causal-by-slot


def tree_mask_mod(q_slot: torch.Tensor, q_node: torch.Tensor, base: torch.Tensor, anc_bits: torch.Tensor):
    """mask_mod(b, h, q_idx, kv_idx) -> bool for the rule above (pure, closes over tensors)."""

    def mask_mod(b, h, q_idx, kv_idx):
        rel = kv_idx - base
        bit = (anc_bits[q_node[q_idx]] >> rel.clamp(0, 63)) & 1
        # Integer arithmetic instead of `&`/`|` on mixed lookups: see DESIGN.md, CPU traps.
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
    """The mask rule's parameters, passed to the model's forward; each layer builds the actual
    mask from them inside its compiled region (queries sit at their own write slots)."""
    q_node: torch.Tensor  # [T] tree node of each query (0 for causal queries)
    base: torch.Tensor  # [] slot of the tree root; NO_TREE for causal-by-slot
    anc_bits: torch.Tensor  # [n] int64 ancestor bitmask per tree node
    flex: bool = True  # FlexAttention BlockMask, or a dense bool mask for SDPA
    q_slot: torch.Tensor | None = None  # [T'] slots the mask rows stand for, when not the write slots

    def build(self, q_slot: torch.Tensor, cache_len: int):
        make = block_mask if self.flex else dense_mask
        q_slot = q_slot if self.q_slot is None else self.q_slot
        return make(q_slot, self.q_node, self.base, self.anc_bits, cache_len)

    def for_one_query(self, slots: torch.Tensor) -> "TreeMask":
        """Compiled flex fails with a single query on CPU (DESIGN.md): a one-query forward masks two
        identical queries instead (model.py runs its query twice through attention)."""
        return self._replace(q_node=self.q_node.repeat(2), q_slot=slots.repeat(2)) if self.flex else self

    @classmethod
    def causal(cls, T: int, device, flex: bool = True) -> "TreeMask":
        return cls(torch.zeros(T, dtype=torch.long, device=device), torch.tensor(NO_TREE, device=device),
                   torch.ones(1, dtype=torch.long, device=device), flex)
