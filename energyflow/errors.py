"""The one exception type for bad input: a file, a recipe key or a value that cannot be used.

The CLI prints an :class:`InputError` as one line (``energyflow: error: <message>``, exit code 2)
without a traceback, so its message must name the file or key and say what was expected.
"""
from __future__ import annotations

__all__ = ["InputError", "CorruptFileError", "UnsafeFileError"]


class InputError(ValueError):
    """A bad input: the message names the file or key and says what is expected."""


class CorruptFileError(InputError):
    """A file that exists but cannot be read: empty, truncated or not the expected format."""


class UnsafeFileError(InputError):
    """A file that would need arbitrary code to load (a pickle of classes or functions): refused."""
