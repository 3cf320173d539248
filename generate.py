"""Generate text with lossless tree speculative decoding.

    python generate.py                       # default pair, tree auto, a demo prompt
    python generate.py --checkpoint T --draft D --tree 2,2,1 --prompt "def fib(n):"
    python generate.py --tree none --prompt "..."     # plain decoding of the target alone
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import minitree
from minitree.auto import AUTO_SPECS
from minitree.errors import FetchError
from minitree.fetch import DEFAULT_DRAFT, DEFAULT_TARGET, GGUF_NAME, MODELS, fetch
from minitree.kernels import build_in_background

DEMO_PROMPT = "Write a Python function that checks whether a string is a palindrome, with a short docstring."


def load_model(name: str, dtype: torch.dtype, device: str, tensor_parallel: bool = False,
               dequantize: bool = False) -> minitree.Transformer:
    """A known model name (fetched when missing, by rank 0 alone), a checkpoint directory, a .gguf
    file or a hub id; with tensor_parallel, this rank's shard. A known model runs its GGUF file's
    quantized weights on the CPU (gguf.py), its dequantized bf16 copy with `dequantize`, on a GPU
    or split over ranks."""
    if name not in MODELS and not Path(name).exists() and "/" not in name:
        raise FetchError(f"{name} is neither a checkpoint path nor a known model ({', '.join(MODELS)})")
    if name in MODELS:
        quantized = not dequantize and device == "cpu" and minitree.tp.world()[1] == 1
        fetched = None
        if minitree.tp.world()[0] == 0:
            try:
                fetched = fetch(name, gguf=quantized, floats=not quantized)
            except FetchError as e:
                fetched = e
        fetched = minitree.tp.broadcast(fetched)
        if isinstance(fetched, FetchError):
            raise fetched
        name = fetched / GGUF_NAME if quantized else fetched
    return minitree.load(name, dtype=dtype, device=device, tensor_parallel=tensor_parallel, dequantize=dequantize)


class Streamer:
    """Prints text as tokens are committed (decoding the whole answer, printing the new suffix)."""

    def __init__(self, tokenizer, enabled: bool):
        self.tokenizer, self.enabled, self.tokens, self.printed = tokenizer, enabled, [], ""

    def __call__(self, tokens: list[int], final: bool = False) -> None:
        self.tokens += tokens
        if self.enabled:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            if final or not text.endswith("\ufffd"):  # hold back a character still incomplete
                print(text[len(self.printed):], end="", flush=True)
                self.printed = text


def summary(result: minitree.Result, engine: minitree.Engine, compile_s: float, tree_spec: str) -> None:
    from rich.console import Console
    from rich.table import Table
    s = result.stats
    table = Table(title=f"tree {tree_spec}", show_header=False, box=None, padding=(0, 2))
    table.add_row("new tokens", f"{s.new_tokens} in {s.decode_s:.2f} s: [bold]{s.new_tokens / max(s.decode_s, 1e-9):.1f}"
                  " tokens/s[/bold]")
    table.add_row("prefill", f"{s.prefill_s:.2f} s" + (f"   compile + warm-up {compile_s:.1f} s (not counted)"
                                                        if compile_s else ""))
    if s.configs:
        used = ", ".join(f"{name} x{n}" for name, n in s.configs.most_common())
        table.add_row("auto chose", f"{used} (steps)" + (f"; compiling new shapes {s.compile_s:.1f} s (not counted)"
                                                           if s.compile_s > 0.5 else ""))
    if engine.max_depth:
        table.add_row("tau", f"{s.tau:.2f} tokens per target forward ({s.target_forwards} forwards)")
        hist = " ".join(f"{m}:{c}" for m, c in sorted(s.accepted.items()))
        table.add_row("accepted length", hist)
        off_first = 1 - s.accepted_ranks[0] / max(sum(s.accepted_ranks.values()), 1)
        table.add_row("accepted shape", f"depth {s.tau - 1:.2f} per step, rank {s.mean_accepted_rank:.2f} on average "
                                        f"({100 * off_first:.0f}% of accepted nodes off the first choice, "
                                        f"{s.from_ngram} of {sum(s.accepted_ranks.values())} from n-gram branches)")
        per_depth = " ".join(f"{a:.2f}" for a in s.acceptance_per_depth(engine.max_depth))
        table.add_row("acceptance by depth", per_depth)
    split = "  ".join(f"{k} {v:.2f}s" for k, v in s.time_s.items())
    table.add_row("time split", split)
    Console(stderr=True).print(table)


def main(checkpoint: str | None, draft: str | None, tree: str, prompt: str | None, prompt_file: Path | None,
         chat: bool | None, max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None,
         dtype: str, device: str, compile: bool, json_out: bool, max_seq_len: int, attention: str | None,
         deterministic_draft: bool, draft_lossy: bool | None, draft_vocab: int, draft_cutoff: float,
         quantize: str | None = None, plan: str | None = None, dequantize: bool = False, demo: bool = False) -> int:
    sampling = minitree.Sampling(temperature, top_k, top_p)
    rank, world = minitree.tp.init()  # under torchrun: the target is sharded over the processes
    use_tree = tree.lower() != "none"
    spec = minitree.parse_tree(tree) if use_tree and tree not in AUTO_SPECS else None  # malformed: reported before loading
    draft_free = isinstance(spec, minitree.NgramTree)
    if draft_free and draft not in (None, "none"):
        raise minitree.EngineError("--tree ngram proposes without a draft model: leave --draft out or pass --draft none")
    if checkpoint is None:
        checkpoint, draft = DEFAULT_TARGET, draft or (None if draft_free else DEFAULT_DRAFT)
    draft = None if draft == "none" else draft
    if use_tree and draft is None and not draft_free and tree != "auto":
        raise minitree.EngineError("--tree needs a --draft model (or pass --tree none for plain decoding, "
                                   "--tree ngram or auto for draft-free trees)")
    torch_dtype = getattr(torch, dtype)
    if device == "cpu" and not dequantize:  # GGUF files run on minitree's kernels: built while the models download
        build_in_background()
    target = load_model(checkpoint, torch_dtype, device, tensor_parallel=True, dequantize=dequantize)
    if quantize:
        minitree.quantize(target, quantize)
    drafter = load_model(draft, torch_dtype, device, dequantize=dequantize) if use_tree and draft else None
    if drafter is not None and draft_vocab:
        minitree.restrict_vocab(drafter, draft_vocab)
    tok = target.tokenizer
    if tok is None:
        raise minitree.LoadError(f"{checkpoint} has no tokenizer")
    if drafter is not None and drafter.tokenizer is not None and drafter.tokenizer.get_vocab() != tok.get_vocab():
        raise minitree.EngineError(f"the draft's tokenizer ({len(drafter.tokenizer)} tokens) differs from the "
                                   f"target's ({len(tok)} tokens)")
    if chat is None:
        chat = bool(getattr(tok, "chat_template", None))
    engine = minitree.Engine(target, drafter, tree if use_tree else None, max_seq_len=max_seq_len,
                             compile=compile, attention=attention, draft_cutoff=draft_cutoff, plan=plan,
                             draft_lossy=draft_lossy)

    def run(ids: list[int], stream: bool) -> tuple[minitree.Result, float]:
        compile_s = engine.warm_up() if compile else 0.0
        streamer = Streamer(tok, stream and rank == 0)
        result = engine.generate(ids, max_new_tokens, sampling, seed=seed, one_hot_draft=deterministic_draft,
                                 on_tokens=streamer)
        streamer([], final=True)
        return result, compile_s

    if prompt is None and prompt_file is not None:
        prompt = prompt_file.read_text()
    if prompt is None and not demo and sys.stdin.isatty() and not json_out:
        if world > 1:
            raise minitree.EngineError("the interactive chat runs in one process; under torchrun pass --prompt")
        return chat_loop(run, tok, chat, engine, tree)
    if prompt is None and not sys.stdin.isatty() and rank == 0:
        prompt = sys.stdin.read().strip() or None  # piped text; nothing piped: the demo
    prompt = minitree.tp.broadcast(DEMO_PROMPT if prompt is None else prompt)
    ids = minitree.encode(tok, prompt, chat)
    if not json_out and rank == 0:
        print(f"> {prompt}\n", file=sys.stderr)
    result, compile_s = run(ids, stream=not json_out)
    text = tok.decode(result.tokens, skip_special_tokens=True)
    if rank > 0:
        return 0
    if json_out:
        stats = result.stats.as_dict(engine.max_depth) | {"warm_up_s": compile_s, "world_size": world}
        print(json.dumps({"tokens": result.tokens, "text": text, "stats": stats}))
    else:
        print()
        summary(result, engine, compile_s, tree if use_tree else "none (plain decoding)")
    return 0


def chat_loop(run, tok, chat: bool, engine: minitree.Engine, tree: str) -> int:
    history: list[dict] = []
    print("chat with the target model; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("\n> ").strip()
        except EOFError:
            return 0
        if not line:
            return 0
        result, compile_s = run(minitree.encode(tok, line, chat, history), stream=True)
        print()
        summary(result, engine, compile_s, tree)
        history += [{"role": "user", "content": line},
                    {"role": "assistant", "content": tok.decode(result.tokens, skip_special_tokens=True)}]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help=f"target: a known name ({', '.join(MODELS)}), a checkpoint directory, "
                   f"a .gguf file or a hub id (default: {DEFAULT_TARGET} with draft {DEFAULT_DRAFT})")
    p.add_argument("--draft", help="draft model, same forms as --checkpoint; must share the target's tokenizer; "
                   "'none': no draft model (with --tree ngram, auto or none)")
    p.add_argument("--tree", default="auto", help="'auto': chosen online for this machine and text among plain "
                   "decoding, dynamic trees, n-gram branches and the two mixed (without a draft: plain or "
                   "n-gram; 'auto:draft' without n-gram branches); branching per depth (2,2,1); a path list "
                   "('[(0,), (1,), (0, 0)]'); "
                   "a JSON file of paths; a per-step tree grown from the draft's confidence "
                   f"({minitree.tree.DYNAMIC_SYNTAX}); draft-free trees of continuations found earlier in the "
                   f"text, no draft model ({minitree.tree.NGRAM_SYNTAX}); a draft tree plus n-gram branches "
                   "('dynamic+ngram', '2,2,1+ngram:nodes=8'); or 'none' for plain decoding "
                   "(default: %(default)s)")
    p.add_argument("--prompt", help="the prompt text")
    p.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the tokenizer's chat template (default: when it has one)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="0 is off (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="1 is off (default: %(default)s)")
    p.add_argument("--seed", type=int, help="seed for sampling (default: random)")
    p.add_argument("--deterministic-draft", action="store_true",
                   help="when sampling, draft the top-k tokens instead of drawing them (still lossless)")
    p.add_argument("--draft-lossy", action=argparse.BooleanOptionalAction, default=None,
                   help="lossy int8/int4/q4 copies of the draft's weights serve the forwards they are measured "
                        "cheapest for (default: on for CPU); the output does not change")
    p.add_argument("--draft-vocab", type=int, default=0,
                   help="the draft proposes only token ids below N (0: all); the output does not change")
    p.add_argument("--draft-cutoff", type=float, default=0.0,
                   help="stop drafting a step when no frontier node's draft confidence (product of draft "
                        "probabilities along its path) reaches this (default: 0, off); the output does not change")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="(default: %(default)s)")
    p.add_argument("--quantize", choices=sorted(minitree.forms.QUANTIZE),
                   help="weight-only quantized target (CPU kernels): the output is what plain decoding of the "
                        "quantized target gives, not the float target's")
    p.add_argument("--dequantize", action="store_true",
                   help="run a GGUF file's weights dequantized to --dtype (as float weights) instead of its "
                        "quantized blocks; known models then load their bf16 copy")
    p.add_argument("--plan", choices=["measure", "exact", "none"],
                   help="execution shapes: measured on this machine (default when compiled; once, cached), "
                        "'exact' (every forward >= 4 rows: bf16 chains round like plain decoding), or 'none'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(default: %(default)s)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the forward passes (default: on)")
    p.add_argument("--attention", default=None, choices=["exact", "flex", "sdpa"],
                   help="exact: minitree's CPU kernel, a token rounds alike in every forward (default on CPUs); "
                        "flex: FlexAttention (default on GPUs); sdpa: dense masks, the reference")
    p.add_argument("--max-seq-len", type=int, default=2048, help="prompt + output limit (default: %(default)s)")
    p.add_argument("--json", dest="json_out", action="store_true",
                   help="print one JSON object {tokens, text, stats} instead of streaming text")
    args = p.parse_args(argv)
    args.demo = not (argv if argv is not None else sys.argv[1:])
    return args


if __name__ == "__main__":
    minitree.cli.run(main, parse_args())
