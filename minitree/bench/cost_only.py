"""`bench.py --cost-only`: what one step of each system costs on this machine, on random weights with
the checkpoints' architectures (only config.json is read), turned into predicted tokens/s with an
acceptance profile measured elsewhere (a bench JSON's tau and draft levels per step). This is how
a GPU without the real weights is measured (scripts/gpu_check.sh)."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ..config import from_hf_config
from ..errors import EngineError, LoadError
from ..machine import describe as describe_machine
from ..model import Transformer
from .report import git_commit


def random_model(path: Path, dtype, device) -> Transformer:
    """The architecture in path/config.json with random weights: what a step costs, nothing more."""
    config = path / "config.json"
    if not config.exists():
        raise LoadError(f"--cost-only needs {config} (the architecture; the weights are random)")
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(from_hf_config(json.loads(config.read_text())))
    model.to(dtype).eval().requires_grad_(False)
    model.tokenizer = None
    return model


def _steps(engine, sampling, prefix: int, n: int) -> Counter:
    """Run n steps at the same place (rewinding after each) -> phase seconds summed (when timed) and
    `step`, the wall seconds of all n (on a GPU, synchronized)."""
    totals = Counter()
    gpu = engine.device.type == "cuda"
    start = time.perf_counter()
    for _ in range(n):
        step = engine.step(sampling)
        engine.advance(step)
        engine.rewind(prefix)  # the next step drafts and verifies at the same place
        totals.update(step.times)
    if gpu:
        torch.cuda.synchronize()
    totals["step"] = time.perf_counter() - start
    return totals


def step_costs(systems: list, prefix: int = 256, warmup: int = 3, repeats: int = 10) -> dict:
    """Mean seconds per phase of one step of each minitree system, drafting every level (no early
    stop), after a prefill of `prefix` random tokens; plus `draft_level`, one draft forward. On a
    GPU the phases are timed without CUDA graphs (a sync per phase), and `graph_step` is a whole
    step replayed from its CUDA graph."""
    costs = {}
    for s in systems:
        engine, vocab = s.engine, s.engine.target.args.vocab_size
        with torch.inference_mode(), engine.every_level_timed():
            engine.prefill(torch.randint(0, vocab, (prefix,)).tolist())
            _steps(engine, s.sampling, prefix, warmup)
            totals = _steps(engine, s.sampling, prefix, repeats)
            c = {k: totals[k] / repeats for k in ("draft", "verify", "accept", "compact")}
        if engine.graphs is not None:
            with torch.inference_mode(), engine.every_level_timed(graphs=True):
                _steps(engine, s.sampling, prefix, warmup)  # captures
                c["graph_step"] = _steps(engine, s.sampling, prefix, repeats)["step"] / repeats
        c["draft_level"] = c["draft"] / engine.tree.max_depth if engine.tree.max_depth else 0.0
        costs[s.name] = c
    return costs


def predict(costs: dict, measured: dict, prompt_sets: list[str]) -> dict:
    """Tokens/s per system from step costs and a bench JSON's tau and draft levels per step
    (decode only: prefill excluded). Speedup is against the plain step of the same costs. A step
    replayed from a CUDA graph drafts every level (its early stop is a mask): its whole time counts."""
    table = {}
    for ps in prompt_sets:
        plain = costs["plain"].get("graph_step") or costs["plain"]["verify"] + costs["plain"]["accept"] + \
            costs["plain"]["compact"]
        for name, c in costs.items():
            runs = measured.get("runs", {}).get(ps, {}).get(name)
            if not runs:
                continue
            steps = sum(r["stats"]["target_forwards"] for r in runs)
            tau = sum(r["stats"]["tau"] * r["stats"]["target_forwards"] for r in runs) / steps
            levels = sum(r["stats"]["draft_forwards"] for r in runs) / steps
            step = c.get("graph_step") or c["verify"] + c["accept"] + c["compact"] + levels * c["draft_level"]
            table[f"{ps}/{name}"] = dict(step_ms=1e3 * step, tau=tau, draft_levels=levels,
                                         tokens_per_s=tau / step, speedup=tau * plain / step)
    return table


def report_costs(costs: dict, runners: dict, acceptance_from: Path | None, prompt_sets: list[str], dtype: str,
                 device: str, out: Path | None) -> int:
    plans = {name: r.plan for name, r in runners.items()}
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), commit=git_commit(),
                device=describe_machine(), torch=torch.__version__, dtype=dtype,
                acceptance_from=str(acceptance_from or ""),
                plans={name: dict(shapes=p.describe(), costs_s=p.costs) for name, p in plans.items()},
                memory={name: r.memory() for name, r in runners.items()})
    if all(p.costs for p in plans.values()):  # measured plans (--plan measure, compiled)
        table = Table(title="the linear layers of one forward as minitree/costs.py measured them here (ms, with "
                            "the kernel setting chosen): the costs behind plans and --tree auto")
        table.add_column("queries")
        for name in plans:
            table.add_column(name, justify="right")
        for n in (1, 2, 3, 4, 8, 11, 16, 32, 128):
            table.add_row(str(n), *(f"{1e3 * p.cost(n):.1f} {p.setting(p.rows(n))}" +
                                    (f" ({p.rows(n)} rows)" if p.rows(n) != n else "") for p in plans.values()))
        Console().print(table)
    table = Table(title=f"step costs on random weights (ms), {meta['device']}, {dtype}, {meta['date']}, {meta['commit']}")
    keys = ("draft_level", "draft", "verify", "accept", "compact") + (("graph_step",) if "graph_step" in costs["plain"] else ())
    for col in ("system", "draft level", "all levels", "verify", "accept", "compact", "CUDA graph step")[:len(keys) + 1]:
        table.add_column(col, justify="left" if col == "system" else "right")
    for name, c in costs.items():
        table.add_row(name, *(f"{1e3 * c[k]:.1f}" for k in keys))
    Console().print(table)
    predicted = {}
    if acceptance_from:
        try:
            predicted = predict(costs, json.loads(Path(acceptance_from).read_text()), prompt_sets)
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise EngineError(f"cannot read an acceptance profile from {acceptance_from}: {e}") from None
        table = Table(title=f"predicted decode speed: these costs x tau and draft levels measured in {acceptance_from}")
        for col in ("set/system", "step ms", "levels", "tau", "tok/s", "speedup"):
            table.add_column(col, justify="left" if col == "set/system" else "right")
        for key, r in predicted.items():
            table.add_row(key, f"{r['step_ms']:.1f}", f"{r['draft_levels']:.2f}", f"{r['tau']:.2f}",
                          f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.2f}x")
        Console().print(table)
    result = dict(meta=meta, costs_ms={n: {k: 1e3 * v for k, v in c.items()} for n, c in costs.items()},
                  predicted=predicted)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


