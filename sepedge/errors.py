"""The exception family of sepedge. Every error a user can cause ends up as one of these."""


class SepedgeError(Exception):
    """Base class of all sepedge errors."""


class ConvertError(SepedgeError):
    """A checkpoint could not be converted; the message names the file and the problem."""
