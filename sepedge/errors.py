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


class CancelledError(SepedgeError):
    """The call was cancelled (Engine.cancel, Ctrl-C, a closed engine). The KV cache is as it was
    before the call, or empty where that could not be restored; the engine stays usable."""


class NumericalError(SepedgeError, ArithmeticError):
    """A hidden state or logit is NaN or infinite: the weights (or the inputs) are out of range.
    Never a silent NaN or a token drawn from one."""


class BusyError(SepedgeError):
    """Another thread is running a call on the same native context (the C API's one-caller rule)."""


# se_status values (native/include/sepedge.h)
_BY_STATUS = {-1: InvalidArgumentError, -2: ModelLoadError, -3: ModelLoadError, -4: UnsupportedError,
              -5: OutOfMemoryError, -6: ContextFullError, -7: BackendError, -8: CancelledError, -9: NumericalError,
              -10: BusyError}


def check(status: int) -> int:
    """Raise the exception for a failed C call (status < 0) with the library's message."""
    if status >= 0:
        return status
    from ._ffi import ffi, lib
    check_with_message(status, ffi.string(lib.se_last_error()))


def check_with_message(status: int, message: bytes) -> int:
    """check() with the message read already (the C message is per thread: for a call made on
    another thread, it is read there)."""
    if status >= 0:
        return status
    from ._ffi import ffi, lib
    name = ffi.string(lib.se_status_name(status)).decode()
    raise _BY_STATUS.get(status, SepedgeError)(message.decode("utf-8", "replace") or name)
