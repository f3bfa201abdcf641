"""Child processes that must not outlive the process that started them."""

from __future__ import annotations

import sys
from collections.abc import Callable


def parent_death_signal(sig: int) -> Callable[[], None] | None:
    """A function that makes the calling process get `sig` when its parent dies (Linux's PR_SET_PDEATHSIG), for
    `subprocess.Popen(preexec_fn=...)` or to call in the child itself: a killed orchestrator's job, a killed job's
    torchrun, torchrun's processes. libc is looked up here, in the parent, so that the forked child only calls
    prctl (no import, no lock). None off Linux."""
    if sys.platform != "linux":
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None
    return lambda: prctl(1, sig)
