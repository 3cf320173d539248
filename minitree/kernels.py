"""minitree's C++ kernels (csrc/gguf.cpp): GGUF blocks read as the file stores them, their AMX tile
groups, and the lossy "q4" draft form. Built on first use for this machine's instruction set with
its C++ compiler (cached by torch in ~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR)."""

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

CSRC = Path(__file__).resolve().parent / "csrc" / "gguf.cpp"


@functools.lru_cache(maxsize=None)
def kernels():
    """torch.ops.minitree_gguf, built once per process (module docstring)."""
    from torch.utils import cpp_extension
    isa = hashlib.sha1(" ".join(machine()["isa"]).encode()).hexdigest()[:8]
    scripts = sysconfig.get_path("scripts")  # pip's ninja, also when its virtual environment is not activated
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    # said only when it takes a while: a build already cached for this source loads in well under that
    slow = threading.Timer(3.0, lambda: print("building minitree's kernels for this CPU (once, about a minute)",
                                              file=sys.stderr, flush=True))
    slow.start()
    try:
        cpp_extension.load(name=f"minitree_gguf_{isa}", sources=[str(CSRC)], is_python_module=False,
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], verbose=False)
    except (RuntimeError, OSError, ImportError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LoadError(f"building minitree's kernels failed ({first}); they need a C++ compiler (g++) and "
                        f"ninja; or load the file dequantized (--dequantize)") from None
    finally:
        slow.cancel()
    torch.library.register_fake("minitree_gguf::mm")(lambda x, w, kind: x.new_empty(x.shape[0], w.shape[0]))
    torch.library.register_fake("minitree_gguf::tiled_mm")(lambda x, t, kind: x.new_empty(x.shape[0], 16 * t.shape[0]))
    torch.library.register_fake("minitree_gguf::q4_mm")(lambda x, t: x.new_empty(x.shape[0], 16 * t.shape[0]))
    return torch.ops.minitree_gguf


@functools.lru_cache(maxsize=None)
def source_version() -> str:
    """The kernels' source, hashed (a GGUFLinear's `code`)."""
    return hashlib.sha1(CSRC.read_bytes()).hexdigest()[:12]
