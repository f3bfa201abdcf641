"""Errors that say whose fault a failure is, so retries are spent only where they can help."""

from __future__ import annotations


class InputError(ValueError):
    """Bad config or bad data: retrying cannot help, so it is never retried. The message names the fix."""


# Exception type names (as reported across a process or Modal boundary) that mean bad input.
INPUT_ERROR_TYPES = frozenset(
    {"InputError", "ValueError", "ValidationError", "FileNotFoundError", "NotADirectoryError", "PermissionError",
     "KeyError", "TypeError"}
)
