"""sepedge: a quantized LLM runtime for edge machines built around SepLLM's sparse KV cache."""

__version__ = "0.1.0"

from .errors import ConvertError, SepedgeError  # noqa: E402

__all__ = ["ConvertError", "SepedgeError", "__version__"]
