"""The native library and its cffi declarations, read from sepedge.h itself (one source of truth).

The library and the header are installed together in the package (`sepedge/lib`,
`sepedge/include`); $SEPEDGE_LIB overrides the library's path, for a development build.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cffi import FFI


def cdef_from_header(text: str) -> str:
    """The declarations of a header as cffi's cdef() takes them: preprocessor lines, the C++ guard
    blocks and the SE_API export marker removed."""
    out, in_cplusplus = [], False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#"):
            if s.startswith("#ifdef __cplusplus"):
                in_cplusplus = True
            elif s.startswith("#endif"):
                in_cplusplus = False
            continue
        if not in_cplusplus:
            out.append(line)
    return re.sub(r"\bSE_API\b", "", "\n".join(out))


def _package_dirs() -> list[Path]:
    import sepedge  # an editable install spreads the package over several directories
    return [Path(p) for p in sepedge.__path__]


def library_path() -> Path:
    if env := os.environ.get("SEPEDGE_LIB"):
        return Path(env)
    for d in _package_dirs():
        for name in ("libsepedge.so", "libsepedge.dylib"):
            if (d / "lib" / name).is_file():
                return d / "lib" / name
    raise ImportError("the sepedge native library is missing: reinstall the package (pip install .)")


def header_path() -> Path:
    lib = library_path()
    for candidate in (lib.parent.parent / "include" / "sepedge.h",
                      Path(__file__).resolve().parent.parent / "native" / "include" / "sepedge.h"):
        if candidate.is_file():
            return candidate
    raise ImportError("sepedge.h is missing next to the native library")


# cuBLAS for the CUDA backend's long prefill chunks, as the NVIDIA wheels install it (nvidia-cublas for
# CUDA 13, nvidia-cublas-cu12 for 12), newest first; the library opens it itself (dlopen) when a CUDA
# context starts, from $SEPEDGE_CUBLAS or the system's libcublas.so.13 / .12.
CUBLAS_WHEEL_FILES = ("cu13/lib/libcublas.so.13", "cublas/lib/libcublas.so.13", "cublas/lib/libcublas.so.12")


def cublas_from_wheels() -> str | None:
    """The path of libcublas in an installed nvidia-cublas* wheel, found without importing torch or
    the nvidia namespace package itself (only where it lies on the path)."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return None
    for d in (spec.submodule_search_locations or []) if spec else []:
        for rel in CUBLAS_WHEEL_FILES:
            if (Path(d) / rel).is_file():
                return str(Path(d) / rel)
    return None


if "SEPEDGE_CUBLAS" not in os.environ and (_cublas := cublas_from_wheels()):
    os.environ["SEPEDGE_CUBLAS"] = _cublas

ffi = FFI()
ffi.cdef(cdef_from_header(header_path().read_text()))
lib = ffi.dlopen(str(library_path()))
