"""The exception family of sepedge, and `check()`, which turns C status codes into it."""


class SepedgeError(Exception):
    """Base class of all sepedge errors."""


class ConvertError(SepedgeError):
    """A checkpoint could not be converted; the message names the file and the problem."""


class ModelLoadError(SepedgeError):
    """A model file cannot be read: missing, unreadable, or not a well-formed GGUF."""


class UnsupportedError(ModelLoadError):
    """A well-formed file uses an architecture, tensor type or feature sepedge does not run."""


class InvalidArgumentError(SepedgeError, ValueError):
    """A parameter is out of range, or a call was made out of order."""


class ContextFullError(SepedgeError):
    """The tokens do not fit in the KV cache; nothing was processed."""


class BackendError(SepedgeError):
    """The requested device (e.g. a CUDA GPU) is not available."""


class OutOfMemoryError(SepedgeError, MemoryError):
    pass


# se_status values (native/include/sepedge.h)
_BY_STATUS = {-1: InvalidArgumentError, -2: ModelLoadError, -3: ModelLoadError, -4: UnsupportedError,
              -5: OutOfMemoryError, -6: ContextFullError, -7: BackendError}


def check(status: int) -> int:
    """Raise the exception for a failed C call (status < 0) with the library's message."""
    if status >= 0:
        return status
    from ._ffi import ffi, lib
    message = ffi.string(lib.se_last_error()).decode("utf-8", "replace")
    name = ffi.string(lib.se_status_name(status)).decode()
    raise _BY_STATUS.get(status, SepedgeError)(message or name)
