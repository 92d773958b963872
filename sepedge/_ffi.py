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


ffi = FFI()
ffi.cdef(cdef_from_header(header_path().read_text()))
lib = ffi.dlopen(str(library_path()))
