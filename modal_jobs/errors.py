"""Errors that say whose fault a failure is, so retries are spent only where they can help."""

from __future__ import annotations


class InputError(ValueError):
    """Bad config or bad data: retrying cannot help, so it is never retried. The message names the fix."""


class StorageFullError(InputError):
    """The storage root ran out of space: a retry would fail the same way until someone frees space."""


def disk_full(error: BaseException) -> bool:
    """ENOSPC anywhere in the exception chain (libraries often wrap the OSError in their own type)."""
    import errno

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# Exception type names (as reported across a process or Modal boundary) that mean bad input.
INPUT_ERROR_TYPES = frozenset(
    {"InputError", "StorageFullError", "ValueError", "ValidationError", "FileNotFoundError", "NotADirectoryError", "PermissionError",
     "KeyError", "TypeError"}
)
