"""sepedge: a quantized LLM runtime for edge machines built around SepLLM's sparse KV cache."""

__version__ = "0.1.0"

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
