"""What this machine is, and what a forward costs on it (measured once, cached on disk).

How a forward's time grows with its rows differs between machines: on a CPU with avx512_bf16,
oneDNN's bf16 GEMM costs about the same for 1 to 8 rows, but a single row is served faster by
the matrix-vector kernel torch uses when oneDNN is off; on an AVX2-only CPU bf16 is emulated
and every row costs; weight-only int8 kernels grow faster with rows than float ones on one
kind and slower on the other; on a GPU rows are nearly free. So nothing here is a constant
tuned on one machine. `probe` times the linear layers of one forward of a model (a few of its
decoder layers, scaled to all, plus the lm_head) at several row counts and kernel settings,
in seconds, and caches the result keyed by the machine, torch, threads, the model's shapes,
dtype and quantization. A `Plan` turns those costs into execution shapes:

- rows(n): how many rows a forward of n queries runs (padded where more rows are cheaper);
- the kernel setting per row count (forms.py): the weights as loaded, oneDNN off, or a copy of
  a float model's weights (packed in oneDNN's layout, fp32; a draft's lossy int8/int4/q4), made
  where it serves;
- prefill chunks: a prompt is cut into the cheapest sequence of a few fixed chunk shapes;
- cost(n): the measured seconds of a forward, for `--tree auto` (auto.py).

A plan changes rounding, not results: a quantized model (GGUF) computes the same bits for a row
at every row count and on every kernel path, and fp32 decoding is exact whatever the plan
(tested); in bf16, a float model's forwards of different row counts or kernels may round a
near-tie differently. The "exact" plan keeps every forward at 4 rows or more on the multi-row
kernel, so a bf16 float model's chains round exactly like its plain decoding (README, "What is exact").
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import tp
from .forms import INT4_GROUP, FormLinear, q4_runs, quant_kinds
from .kernels import kernels, source_version
from .machine import describe, machine, onednn, packs

PROBED_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128)  # row counts the probe times (linear between)
GROWS_PROBE_ROWS = 16  # gemv (oneDNN off) grows ~linearly in rows: not worth timing further
PAD_GAIN = 0.9  # pad a forward with more rows only where that is measured to cost at most 90%
PREFILL_CHUNKS = (8, 32, 128)  # the prefill chunk shapes (each one compiled graph per model)
CACHE = Path(os.environ.get("MINITREE_CACHE") or Path.home() / ".cache" / "minitree") / "costs.json"


def form_layers(module) -> list[FormLinear]:
    return [m for m in module.modules() if isinstance(m, FormLinear)]


def settings(model, lossy: bool = False) -> list[str]:
    """Kernel settings worth timing for a runner's model (forms.py): the weights as loaded; for
    half-precision float weights on a CPU with oneDNN, oneDNN off, packed copies (where oneDNN packs
    that dtype) and fp32 copies; lossy int8/int4 copies where the runner may approximate (a draft),
    and q4 copies (Q4_1 on minitree's integer kernel) where that kernel builds. A quantized model
    keeps its own exact kernel: no float copies; a GGUF one may take that kernel's AMX path ("tiles")."""
    found = ["native"]
    cpu = model.device.type == "cpu"
    quantized = any(m.quantized for m in form_layers(model))
    if cpu and not quantized and model.dtype in (torch.bfloat16, torch.float16) and torch.backends.mkldnn.is_available():
        found += ["gemv", "packed", "fp32"] if packs(model.dtype) else ["gemv", "fp32"]
    if cpu and any(m.form("tiles") == "tiles" for m in form_layers(model)) and "amx" in kernels().int_paths():
        found.append("tiles")
    if lossy and cpu:
        found.append("int8")
        if all(m.in_features % INT4_GROUP == 0 for m in form_layers(model)):
            found.append("int4")
        if q4_runs() and any(m.q4_fits for m in form_layers(model)):
            found.append("q4")
    return found


def probe_key(model, lossy: bool = False) -> str:
    a = model.args
    signature = dict(machine={k: v for k, v in machine().items() if k != "flags"}, torch=torch.__version__,
                     threads=torch.get_num_threads(), device=str(model.device), dtype=str(model.dtype),
                     shape=[a.n_layers, a.dim, a.intermediate_size, a.n_heads, a.n_kv_heads, a.head_dim,
                            model.lm_head.out_features],
                     quantized=quant_kinds(model, code=True), settings=settings(model, lossy), rows=PROBED_ROWS,
                     fp32_packed=packs(torch.float32))
    if "q4" in signature["settings"]:  # its kernel is minitree's own: measured again when it changes
        signature["kernels"] = source_version()
    return hashlib.sha1(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]


def _run_all(mods, xs: dict) -> None:
    for m in mods:
        m(xs[m.in_features])


@torch.inference_mode()
def probe(model, lossy: bool = False, reps: int = 2, layers: int = 4) -> dict[str, list[float]]:
    """Seconds of one forward's linear layers at each of PROBED_ROWS, per kernel setting (inf where not
    timed), for a runner's model (its layers are FormLinear). The fastest of the times taken in two
    sweeps over the settings, the second in reverse order: a shared machine's slow spells (seconds
    long) then do not decide between two settings by falling on one of them."""
    sub = list(model.model.layers)[:layers]
    scale = model.args.n_layers / len(sub)
    mods, head = form_layers(torch.nn.ModuleList(sub)), form_layers(torch.nn.ModuleList([model.lm_head]))[0]

    def sync():
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        fn()
        sync()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return min(ts)

    def alone(m: FormLinear, setting: str) -> FormLinear:  # the layer in `setting`'s form, for as long as it is timed
        copy = FormLinear(m.source)
        copy.serve({setting: frozenset(PROBED_ROWS)})
        return copy

    found = settings(model, lossy)
    costs = {setting: [math.inf] * len(PROBED_ROWS) for setting in found}
    for sweep in (found, found[::-1]):
        for setting in sweep:
            run_mods, run_head = [alone(m, setting) for m in mods], alone(head, setting)
            for i, r in enumerate(PROBED_ROWS):
                if setting == "gemv" and r > GROWS_PROBE_ROWS:
                    continue
                xs = {}
                for m in mods + [head]:
                    f = m.in_features
                    xs.setdefault(f, torch.randn(1, r, f, dtype=model.dtype, device=model.device))
                with onednn(setting != "gemv"):
                    t_layers = timed(functools.partial(_run_all, run_mods, xs))
                    t_head = timed(functools.partial(_run_all, [run_head], xs))
                costs[setting][i] = min(costs[setting][i], scale * t_layers + t_head)
    return costs


def cached_probe(model, name: str = "model", lossy: bool = False) -> dict[str, list[float]]:
    """probe(model), measured once per key (machine, torch, threads, shapes, dtype, weight formats)."""
    key = probe_key(model, lossy)
    try:
        cache = json.loads(CACHE.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key in cache:
        return cache[key]["costs"]
    print(f"measuring what a forward of {name} costs on this machine (once; cached in {CACHE})",
          file=sys.stderr, flush=True)
    t = time.perf_counter()
    costs = probe(model, lossy)
    cache[key] = dict(costs=costs, rows=PROBED_ROWS, machine=describe(), torch=torch.__version__,
                      threads=torch.get_num_threads(), name=name, seconds=time.perf_counter() - t,
                      date=time.strftime("%Y-%m-%d %H:%M"))
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = CACHE.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, CACHE)
    except OSError as e:  # a read-only home: measure again next time, say so once
        print(f"note: could not cache forward costs in {CACHE} ({e.strerror})", file=sys.stderr)
    return costs


# ----------------------------------------------------------------------------------------
def _interp(values: list[float], n: float) -> float:
    """values at PROBED_ROWS -> value at n (linear between probed row counts, proportional beyond)."""
    if n >= PROBED_ROWS[-1]:
        return values[-1] * n / PROBED_ROWS[-1]
    for i in range(1, len(PROBED_ROWS)):
        if n <= PROBED_ROWS[i]:
            lo, hi = PROBED_ROWS[i - 1], PROBED_ROWS[i]
            if n <= lo:
                return values[i - 1]
            return values[i - 1] + (values[i] - values[i - 1]) * (n - lo) / (hi - lo)
    return values[-1]


@dataclass(eq=False)
class Plan:
    """How a model runs a forward of n queries on this machine.

    costs     setting -> seconds at PROBED_ROWS (empty: unmeasured; then forwards run as they come, in the
              weights' own form)
    min_rows  forwards are padded to at least this many rows (the "exact" plan: 4)
    """
    costs: dict = field(default_factory=dict)
    min_rows: int = 1
    name: str = "none"

    @classmethod
    def measured(cls, model, name: str = "model", lossy: bool = False) -> "Plan":
        """From this machine's costs; with tensor parallelism, rank 0's, so every rank runs alike."""
        return cls(tp.broadcast(cached_probe(model, name, lossy) if tp.world()[0] == 0 else None), name="measured")

    @classmethod
    def exact(cls) -> "Plan":
        """Every forward at >= 4 rows on the multi-row kernels: bf16 rows round alike at any count."""
        return cls(min_rows=4, name="exact")

    @functools.lru_cache(maxsize=None)
    def setting(self, rows: int) -> str:
        """The kernel setting measured cheapest for a forward of `rows` rows."""
        if not self.costs:
            return "native"
        return min(self.costs, key=lambda s: _interp(self.costs[s], rows))

    def cost(self, n: int) -> float:
        """Measured seconds of a forward of n queries (after padding). Unmeasured: one unit per
        forward plus its share of 128 rows (fewest forwards first, then fewest rows)."""
        if not self.costs:
            return 1.0 + max(n, self.min_rows) / 128
        m = self.rows(n)
        return _interp(self.costs[self.setting(m)], m)

    @functools.lru_cache(maxsize=None)
    def rows(self, n: int) -> int:
        """Rows a forward of n queries runs: n, or more where that is measured to be clearly (10%)
        cheaper."""
        if not self.costs:
            return max(n, self.min_rows)
        cost = lambda m: _interp(self.costs[self.setting(m)], m) * (1 if m == n else 1 / PAD_GAIN)
        return min([n] + [r for r in PROBED_ROWS if n < r <= max(2 * n, 4)], key=cost)

    def kernels(self, rows: int):
        """Context for a forward of `rows` rows: oneDNN off where the matrix-vector kernels win."""
        return onednn(False) if self.setting(rows) == "gemv" else contextlib.nullcontext()

    @functools.lru_cache(maxsize=None)
    def chunks(self, length: int, shapes: tuple[int, ...] = PREFILL_CHUNKS) -> tuple[int, ...]:
        """The cheapest sequence of chunk shapes covering `length` prompt tokens."""
        best = [(0.0, ())] + [(math.inf, ())] * length
        for i in range(1, length + 1):
            for c in shapes:
                prev = best[max(i - c, 0)]
                cost = prev[0] + self.cost(c)
                if cost < best[i][0]:
                    best[i] = (cost, prev[1] + (c,))
        return best[length][1]

    def apply(self, model) -> None:
        """Serve each row count of a runner's model in the form of its setting (forms.FormLinear;
        copies are made the first time some row count needs them)."""
        rows = {}
        for r in range(1, PROBED_ROWS[-1] + 1):
            rows.setdefault(self.setting(r), set()).add(r)
        for m in form_layers(model):
            m.serve({s: frozenset(rs) for s, rs in rows.items()})

    def describe(self) -> str:
        """'1->1 gemv, 2->2 packed, ...' for the row counts that matter."""
        return ", ".join(f"{n}->{self.rows(n)} {self.setting(self.rows(n))}" for n in (1, 2, 3, 4, 6, 8, 11, 16, 32))
