"""minitree's C++ kernels: GGUF blocks multiplied in integers (csrc/integer.cpp), attention under the
tree mask (csrc/attention.cpp) and RMSNorm (csrc/norm.cpp), each with one rounding per row whatever
shares the forward, and each row's largest values (csrc/top_k.cpp). Built on
first use with the machine's C++ compiler (cached by torch in ~/.cache/torch_extensions, or
$TORCH_EXTENSIONS_DIR); every instruction-set path is compiled in and chosen at run time
(`kernels().int_paths()` lists those this CPU runs)."""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import sysconfig
import threading
from pathlib import Path

import torch

from .errors import LoadError
from .machine import machine

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "integer.cpp", CSRC / "attention.cpp", CSRC / "norm.cpp", CSRC / "top_k.cpp")
HEADERS = (CSRC / "integer_paths.h",)
# -ffp-contract=off: a * b + c stays two roundings wherever it is written, so that every path
# computes the same float operations as the plain-loop specification.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]


_building = threading.Lock()  # one build at a time: a caller waits for one under way (build_in_background)


def kernels():
    """torch.ops.minitree_kernels, built once per process (module docstring)."""
    with _building:
        return _build()


def build_in_background() -> None:
    """Start building the kernels in a thread, so that a first run builds them while its models
    download; kernels() then waits for that build (and reports its error, if it failed)."""
    threading.Thread(target=available, daemon=True, name="minitree kernels").start()


@functools.lru_cache(maxsize=None)
def _build():
    from torch.utils import cpp_extension
    isa = hashlib.sha1(" ".join(machine()["isa"]).encode()).hexdigest()[:8]
    scripts = sysconfig.get_path("scripts")  # pip's ninja, also when its virtual environment is not activated
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    # said only when it takes a while: a build already cached for this source loads in well under that
    slow = threading.Timer(3.0, lambda: print("building minitree's kernels for this CPU (once, under a minute)",
                                              file=sys.stderr, flush=True))
    slow.start()
    try:
        cpp_extension.load(name=f"minitree_kernels_{isa}", sources=[str(s) for s in SOURCES],
                           is_python_module=False, extra_cflags=FLAGS, verbose=False)
    except (RuntimeError, OSError, ImportError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LoadError(f"building minitree's kernels failed ({first}); they need a C++ compiler (g++) and "
                        f"ninja; or load the file dequantized (--dequantize)") from None
    finally:
        slow.cancel()
    torch.library.register_fake("minitree_kernels::int_mm")(
        lambda x, groups, kind, out, path=-1: x.new_empty(x.shape[0], out))
    torch.library.register_fake("minitree_kernels::int_dequantize")(
        lambda groups, kind, K, outputs: groups.new_empty(outputs.shape[0], K, dtype=torch.float32))
    torch.library.register_fake("minitree_kernels::attend")(
        lambda q, keys, values, q_slot, q_node, base, anc_bits: torch.empty_like(q))
    torch.library.register_fake("minitree_kernels::rms_norm")(lambda x, weight, eps: torch.empty_like(x))
    return torch.ops.minitree_kernels


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the kernels build (and load) here: a C++ compiler and ninja (tried once per process)."""
    try:
        kernels()
        return True
    except LoadError:
        return False


def top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [R, k] of the k largest values in each row of x [R, n], largest first, equal values by
    lower index (k = 1: argmax's first maximum). On CPUs minitree's kernel (csrc/top_k.cpp), a tenth of
    torch's topk or argmax on a row of logits; elsewhere, or without the kernels, torch's (among equal
    values in its own order)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and available():
        return kernels().top_k(x, k)[1]
    return x.argmax(-1, keepdim=True) if k == 1 else x.topk(k, dim=-1).indices


@functools.lru_cache(maxsize=None)
def source_version() -> str:
    """The kernels' source, hashed (a GGUFLinear's `code`)."""
    return hashlib.sha1(b"".join(p.read_bytes() for p in SOURCES + HEADERS)).hexdigest()[:12]
