"""What this machine is, and the few process-wide kernel switches that depend on it.

Nothing here knows about models: the CPU's model name and instruction-set flags (or the GPU),
whether oneDNN packs weights of a dtype here, oneDNN on or off for a block of ops, the SIMD
width Inductor writes its CPU code for, and handing freed memory back to the system.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform

import torch
from torch._inductor import config
from torch._inductor.cpu_vec_isa import pick_vec_isa

ISA_FLAGS = ("avx512_bf16", "amx_bf16", "avx512_vnni", "avx512f", "avx2", "fma", "neon", "asimd")


@functools.lru_cache(maxsize=None)
def machine() -> dict:
    """CPU model, its instruction-set flags (and the few that decide the kernels), cores, GPU."""
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu in ("", platform.machine(), platform.processor()):
                cpu = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = value.split()
    except OSError:
        pass
    isa = [f for f in ISA_FLAGS if f in flags]
    for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):  # kernels chosen below the hardware's
        if os.environ.get(var):
            isa.append(f"{var}={os.environ[var]}")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return dict(cpu=cpu, isa=isa, flags=flags, cores=os.cpu_count(), gpu=gpu)


def describe() -> str:
    """One line for table headers: 'AMD EPYC (avx512_bf16 avx512f avx2), 2 cores'."""
    m = machine()
    return m["gpu"] or f"{m['cpu']} ({' '.join(m['isa']) or 'no SIMD flags read'}), {m['cores']} cores"


@contextlib.contextmanager
def onednn(enabled: bool):
    """oneDNN (mkldnn) on or off for the ops run inside; what torch.backends.mkldnn.flags does,
    without the notice it prints at every call."""
    was = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(enabled)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(was)


@functools.lru_cache(maxsize=None)
def packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs weights of this dtype here (bf16 needs avx512bw/vl/dq or avx_ne_convert,
    and ONEDNN_MAX_CPU_ISA=AVX2 rules them out; fp32 packs on any x86 oneDNN supports)."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
        return True
    except RuntimeError:
        return False


def pin_vector_width() -> None:
    """Name in Inductor's config the SIMD width its CPU code is written for. Inductor picks the
    width from ATEN_CPU_CAPABILITY, but its on-disk graph cache key leaves that out (torch
    2.13): code written for 8 lanes under `ATEN_CPU_CAPABILITY=avx2` was later compiled for 16
    natively, and decoded wrong tokens. A width in the config is part of the key."""
    if config.cpp.simdlen is None and (isa := pick_vec_isa()):
        config.cpp.simdlen = isa.bit_width()


def release_free_memory() -> None:
    """Hand the pages glibc's malloc holds free back to the system (malloc_trim). Loading, making
    weight copies and compiling free much memory in the middle of the heap, which glibc keeps
    resident otherwise (0.35-0.75 GB of a default-pair run on a Zen 4). Nothing where the C library
    is not glibc."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
