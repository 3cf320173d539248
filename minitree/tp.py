"""Tensor parallelism: the target split Megatron-style across torch.distributed ranks.

    torchrun --nproc-per-node 2 generate.py ...      # gloo on CPU, NCCL on GPUs

Each rank holds 1/world of every decoder layer: q/k/v and gate/up by output columns (whole
heads, whole MLP columns), o_proj and down_proj by input rows, followed by an all-reduce (model.py);
the lm_head by vocabulary rows, its logits gathered. Embeddings, norms and the draft are
replicated. Every rank runs the same engine step on the same tokens with the same random
stream, so all ranks commit the same tokens; rank 0 does the talking. Each rank reads only
its slices from the safetensors files.

This module knows which tensor splits along which dimension, and sets up the process group
with a bounded timeout, so that a rank that died makes the others fail, not hang.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_S = float(os.environ.get("MINITREE_TP_TIMEOUT", 600))  # compiling the first step counts too
COLUMNS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")  # split by outputs (dim 0)
ROW_PARALLEL = ("o_proj", "down_proj")  # split by inputs (dim 1); their bias is added once, by rank 0


def init() -> tuple[int, int]:
    """(rank, world size): the default process group when launched by torchrun with more than one
    process (gloo on CPU, NCCL with CUDA), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT_S))
        atexit.register(dist.destroy_process_group)
    return dist.get_rank(), dist.get_world_size()


def world() -> tuple[int, int]:
    """(rank, world size) of the running process group, (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def shard(name: str, get, shape: tuple[int, ...], rank: int, world: int) -> torch.Tensor:
    """This rank's part of checkpoint tensor `name`; `get(index)` reads a slice of it from disk."""
    module, kind = name.split(".")[-2:] if "." in name else (name, "")
    if module in COLUMNS:
        n = shape[0] // world
        return get((slice(rank * n, (rank + 1) * n),))
    if module in ROW_PARALLEL and kind == "weight":
        n = shape[1] // world
        return get((slice(None), slice(rank * n, (rank + 1) * n)))
    if module in ROW_PARALLEL and rank > 0:  # a row-parallel bias: summed over the ranks, so rank 0 adds it
        return torch.zeros_like(get((slice(None),)))
    return get((slice(None),) * len(shape))


def broadcast(obj, src: int = 0):
    """`obj` as rank `src` has it, on every rank (a no-op without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
