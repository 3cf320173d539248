"""The benchmark's report: per-system summary, a table (rich at a terminal, Markdown when piped),
a PNG of speedup against tree size, the commit it ran at."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .systems import HFSystem

ROOT = Path(__file__).resolve().parents[2]


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def agreement(runs: list[dict], reference: list[dict]) -> float:
    """The share of the reference's tokens that a system's output repeats at the same place, prompt by prompt."""
    same = sum(sum(a == b for a, b in zip(r["tokens"], p["tokens"])) for r, p in zip(runs, reference))
    return same / max(sum(len(p["tokens"]) for p in reference), 1)


def summarize(runs: dict, systems: list, prompt_sets: list[str]) -> dict:
    """Per prompt set and system: tokens/s, speedup (geometric mean of per-prompt ratios against
    plain decoding), tau, acceptance per depth, agreement with minitree's plain decoding (and with
    llama.cpp's greedy output, when it ran), time split, peak memory."""
    table = {}
    for ps in prompt_sets:
        plain, llama = runs[ps]["plain"], runs[ps].get("llama.cpp")
        for s in systems:
            rs = runs[ps][s.name]
            tps = [r["new_tokens"] / r["wall_s"] for r in rs]
            row = dict(tokens_per_s=sum(r["new_tokens"] for r in rs) / sum(r["wall_s"] for r in rs),
                       peak_rss_gb=max(r["peak_rss"] for r in rs) / 2**30, nodes=s.nodes)
            row["speedup"] = geomean([t / (p["new_tokens"] / p["wall_s"]) for t, p in zip(tps, plain)])
            row["agreement"] = agreement(rs, plain)
            if llama is not None:
                row["agreement_llama_cpp"] = agreement(rs, llama)
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
                accepted = sum(sum(st["accepted_ranks"].values()) for st in stats)
                row["from_ngram"] = sum(st["from_ngram"] for st in stats) / max(accepted, 1)  # accepted nodes' share
                configs = Counter()
                for st in stats:
                    configs.update(st["configs"])
                if configs:
                    row["auto_configs"] = dict(configs.most_common())
                    row["compile_s"] = sum(st["compile_s"] for st in stats)
            table[f"{ps}/{s.name}"] = row
    return table


COLUMNS = ("system", "nodes", "tok/s", "speedup", "tau", "accept by depth", "agree", "agree llama.cpp",
           "draft/verify/other", "TTFT", "peak RSS")


def table_rows(table: dict, ps: str, systems: list) -> list[tuple[str, ...]]:
    rows = []
    for s in systems:
        r = table[f"{ps}/{s.name}"]
        split = r.get("time_split")
        rows.append((s.name, str(r["nodes"] or ""), f"{r['tokens_per_s']:.2f}", f"{r['speedup']:.2f}x",
                     f"{r['tau']:.2f}" if "tau" in r else "",
                     " ".join(f"{a:.2f}" for a in r.get("acceptance_per_depth", [])), f"{r['agreement']:.3f}",
                     f"{r['agreement_llama_cpp']:.3f}" if "agreement_llama_cpp" in r else "",
                     "/".join(f"{100 * split[k]:.0f}" for k in ("draft", "verify")) +
                     f"/{100 * (1 - split['draft'] - split['verify']):.0f}%" if split else "",
                     f"{r['first_token_s']:.2f} s", f"{r['peak_rss_gb']:.1f} GiB"))
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
            label = f"transformers {s.name}" if isinstance(s, HFSystem) else s.name if s.name.startswith("llama.cpp") \
                else f"minitree {s.name} (chooses per step)"
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


