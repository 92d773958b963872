"""sepedge: a quantized LLM runtime for edge machines built around SepLLM's sparse KV cache."""

__version__ = "0.1.0"

import os as _os
import sys as _sys

# The native core runs its own thread pool on the cores it is given. numpy's OpenBLAS starts one
# thread per core at import, and those threads busy-wait after every BLAS call, competing with the
# core's threads during generation. One BLAS thread unless the user chose otherwise; this only
# takes effect when numpy is imported after sepedge (the CLI and the server do that).
if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .errors import (BackendError, BusyError, CancelledError, ContextFullError, ConvertError,  # noqa: E402
                     InvalidArgumentError, ModelLoadError, NumericalError, OutOfMemoryError, SepedgeError,
                     UnsupportedError)


def __getattr__(name):
    # Engine loads the native library; the converter and the reference work without it
    if name == "Engine":
        from .engine import Engine
        return Engine
    if name == "Llama":  # llama-cpp-python's class, over an Engine
        from .llama import Llama
        return Llama
    raise AttributeError(f"module 'sepedge' has no attribute {name!r}")


__all__ = ["BackendError", "BusyError", "CancelledError", "ContextFullError", "ConvertError", "Engine",
           "InvalidArgumentError", "Llama", "ModelLoadError", "NumericalError", "OutOfMemoryError", "SepedgeError",
           "UnsupportedError", "__version__"]
