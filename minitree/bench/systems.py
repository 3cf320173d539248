"""The systems bench.py compares. Each maps prompt token ids -> (new tokens, stats dict)."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import torch

from ..engine import Engine
from ..errors import EngineError, TreeError
from ..forms import QUANTIZE, quantize
from ..runner import Runner
from ..sampling import Sampling
from ..tree import parse_tree

HF_SYSTEMS = ("hf", "hf-assisted")


def system_parts(name: str) -> tuple[str | None, float | None, str | None]:
    """'2,2,1@0.3+int8' -> ('2,2,1', 0.3, 'int8'); 'plain' -> (None, None, None); validates without
    loading a model."""
    name, plus, quant = name.partition("+")
    if plus and quant not in QUANTIZE:
        raise EngineError(f"system '{name}+{quant}': the target quantization after '+' must be one of "
                          f"{', '.join(QUANTIZE)}")
    quant = quant or None
    if name == "plain" or name in HF_SYSTEMS:
        if quant and name != "plain":
            raise EngineError(f"system '{name}+{quant}': only minitree systems take a quantized target")
        return None, None, quant
    tree, at, cutoff = name.partition("@")
    try:
        if tree != "auto":
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
        self.engine = Engine(targets[quant], draft if tree else None, tree, max_seq_len=args.max_seq_len,
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
