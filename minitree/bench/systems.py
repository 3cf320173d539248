"""The systems bench.py compares. Each maps prompt token ids -> (new tokens, stats dict)."""

from __future__ import annotations

import copy
import re
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from ..auto import AUTO_SPECS
from ..engine import Engine
from ..errors import EngineError, TreeError
from ..forms import QUANTIZE, quantize
from ..runner import Runner
from ..sampling import Sampling
from ..tree import NgramTree, parse_tree

HF_SYSTEMS = ("hf", "hf-assisted")
LLAMA_CPP = re.compile(r"llama\.cpp(-(spec|lookup)(:\d+)?)?$")  # llama.cpp, llama.cpp-spec[:8], llama.cpp-lookup[:8]


def system_parts(name: str) -> tuple[str | None, float | None, str | None]:
    """'2,2,1@0.3+int8' -> ('2,2,1', 0.3, 'int8'); '2,1+ngram@0.3' -> ('2,1+ngram', 0.3, None); 'plain' ->
    (None, None, None); validates without loading a model."""
    head, plus, quant = name.rpartition("+")
    name, quant = (head, quant) if plus and quant in QUANTIZE else (name, None)
    if name == "plain" or name in HF_SYSTEMS or LLAMA_CPP.match(name):
        if quant and name != "plain":
            raise EngineError(f"system '{name}+{quant}': only minitree systems take a quantized target")
        return None, None, quant
    tree, at, cutoff = name.rpartition("@") if "@" in name else (name, "", "")
    try:
        if tree not in AUTO_SPECS:
            parse_tree(tree)
        return tree, float(cutoff) if at else None, quant
    except TreeError as e:
        raise EngineError(f"system '{name}': {e}") from None
    except ValueError:
        raise EngineError(f"system '{name}': the draft cutoff after '@' must be a number") from None


def target_runners(target, names: list[str], **runner_args) -> dict:
    """None -> a runner of the target; "int8"/"int4" -> one of a quantized copy, for the systems that
    ask for one. Systems on one target share its runner: its weight copies, cache and graphs."""
    runners = {None: Runner(target, name="the target", **runner_args)}
    for quant in {system_parts(n)[2] for n in names} - {None}:
        runners[quant] = Runner(quantize(copy.deepcopy(target), quant), name=f"the {quant} target", **runner_args)
    return runners


class MinitreeSystem:
    def __init__(self, name: str, targets: dict, draft: Runner, args):
        tree, cutoff, quant = system_parts(name)  # "2,2,1@0.1+int8": draft cutoff 0.1, int8 target
        self.name = name
        draft_free = tree not in (None, *AUTO_SPECS) and isinstance(parse_tree(tree), NgramTree)  # not a MixedTree
        self.engine = Engine(targets[quant], draft if tree and not draft_free else None, tree, max_seq_len=args.max_seq_len,
                             draft_cutoff=args.draft_cutoff if cutoff is None else cutoff)
        self.sampling, self.seed = Sampling(args.temperature), args.seed
        self.nodes = None if self.engine.auto else self.engine.tree.n - 1  # auto is drawn as a line

    def warm_up(self, ids: list[int]) -> None:
        self.engine.warm_up()

    def __call__(self, ids: list[int], max_new: int):
        r = self.engine.generate(ids, max_new, self.sampling, seed=self.seed)
        return r.tokens, r.stats.as_dict(self.engine.max_depth)


class HFSystem:
    """transformers' generate, alone or with the draft as `assistant_model`, on the same weights."""

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


class LlamaCppSystem:
    """llama.cpp on the same GGUF file(s), from a build of it (README, "llama.cpp beside minitree"):
    `llama.cpp` is its plain decoding (llama-completion), `llama.cpp-spec[:N]` its speculative decoding
    with the draft model, N draft tokens per step (llama-speculative-simple), `llama.cpp-lookup[:N]` its
    draft-free prompt lookup decoding (llama-lookup, N tokens per step). Greedy, the same threads.
    The prompt is the same token ids (its text, special tokens parsed); its output text is tokenized
    back with the target's tokenizer, and an EOS is counted where it stopped early, as minitree counts
    it. Seconds are its own timings of prompt and generation (model loading excluded, as minitree's
    warm-up is)."""

    def __init__(self, name: str, build: Path, target_gguf: Path, draft_gguf: Path | None, tokenizer, args):
        spec, lookup = name.startswith("llama.cpp-spec"), name.startswith("llama.cpp-lookup")
        binary = build / "bin" / ("llama-speculative-simple" if spec else "llama-lookup" if lookup else "llama-completion")
        if not binary.exists():
            raise EngineError(f"system {name}: {binary} does not exist (build llama.cpp: README, "
                              f"\"llama.cpp beside minitree\")")
        if spec and draft_gguf is None:
            raise EngineError(f"system {name} needs the draft as a GGUF file")
        self.name, self.nodes, self.tokenizer = name, None, tokenizer
        threads = str(args.threads or torch.get_num_threads())
        self.cmd = [str(binary), "-m", str(target_gguf), "-t", threads, "--temp", "0", "-c", str(args.max_seq_len)]
        if spec:
            self.cmd += ["-md", str(draft_gguf), "--spec-type", "draft-simple", "-td", threads,
                         "--spec-draft-n-max", name.partition(":")[2] or "8"]
        elif lookup:
            self.cmd += ["--spec-draft-n-max", name.partition(":")[2] or "8"]
        else:
            self.cmd += ["-no-cnv", "--no-display-prompt"]
        self.eos = set(args.eos_token_ids)

    def warm_up(self, ids: list[int]) -> None:
        self(ids, 8)

    def __call__(self, ids: list[int], max_new: int):
        prompt = self.tokenizer.decode(ids, skip_special_tokens=False)
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
            f.write(prompt)
            f.flush()
            run = subprocess.run(self.cmd + ["-bf", f.name, "-n", str(max_new)], capture_output=True, text=True)
        if run.returncode:
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            if run.returncode < 0:  # a signal: its last line is whatever it printed before it
                last = f"killed by {signal.Signals(-run.returncode).name} after: {last}"
                if run.returncode == -signal.SIGSEGV:
                    last += " (on a CPU with AMX, build it without its AMX path: README, \"llama.cpp beside minitree\")"
            raise EngineError(f"{self.name} failed: {last}")
        text, log = run.stdout, run.stderr
        if self.name.startswith(("llama.cpp-spec", "llama.cpp-lookup")):  # they echo the prompt first
            text = text.lstrip("\n").removeprefix(prompt.rstrip("\n")).removeprefix("\n")
            seconds = [float(x) for x in re.findall(r"(?:en|de)coded\s+\d+ tokens in\s+([\d.]+) seconds", log)]
            wall, first = sum(seconds), seconds[0]
        else:
            ms = {k: float(v) for k, v in re.findall(r"(prompt eval|\beval|sampling) time =\s+([\d.]+) ms", log)}
            wall, first = sum(ms.values()) / 1e3, ms["prompt eval"] / 1e3
        tokens = self.tokenizer(text, add_special_tokens=False).input_ids[:max_new]
        if len(tokens) < max_new and self.eos:  # it stopped at an end-of-sequence token, which it does not print
            tokens.append(min(self.eos))
        return tokens, dict(first_token_s=first, wall_s=wall)


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


def load_hf(path: Path, dtype, device):
    import transformers
    transformers.logging.set_verbosity_error()  # its deprecation notices would land in the middle of the table
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


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
