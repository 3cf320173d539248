"""What this machine is, and what a forward costs on it (measured, cached on disk).

The engine's execution shapes (rows per forward, prefill chunks, the draft's int8 threshold)
and `--tree auto` depend on how a forward's time grows with its rows, which differs between
CPU kinds (native bf16 GEMMs on avx512_bf16, emulated ones on AVX2) and GPUs. Nothing here
is a constant tuned on one machine: it is timed once per machine, model and dtype, and kept.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache

import torch

ISA_FLAGS = ("avx512_bf16", "amx_bf16", "avx512_vnni", "avx512f", "avx2", "fma", "neon", "asimd")


@lru_cache(maxsize=None)
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
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        isa.append(f"ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']}")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return dict(cpu=cpu, isa=isa, flags=flags, cores=os.cpu_count(), gpu=gpu)


def describe() -> str:
    """One line for table headers: 'AMD EPYC (avx512_bf16 avx512f avx2), 2 cores'."""
    m = machine()
    return m["gpu"] or f"{m['cpu']} ({' '.join(m['isa']) or 'no SIMD flags read'}), {m['cores']} cores"
