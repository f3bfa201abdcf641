"""Which executor runs a stage: `local` (tasks.local_executor) or `modal` (tasks.modal_executor).

Tasks hand a stage name and a typed request to an executor and get the typed result back; they do not care which
executor they have (the interface is tasks.executor). Both implementations import only the interface, never this
module, so there is no import cycle.
"""

from __future__ import annotations

import sys

from tasks.executor import (  # noqa: F401  (the interface, re-exported for callers)
    Executor,
    ExecutorSpec,
    JobCancelled,
    PollCallback,
    TransientJobError,
    raise_job_error,
)
from tasks.local_executor import _RUNNING_PROCESSES, LocalExecutor, stop_local_jobs  # noqa: F401


def stop_running_jobs() -> int:
    """Stop every job this process is waiting on (local subprocesses and Modal calls); returns how many.

    For a flow interrupted in its own thread (Ctrl-C, cancellation): tasks running in Prefect's thread pool
    never see the signal, and Prefect waits for them before it marks the run over."""
    stopped = stop_local_jobs()
    if "tasks.modal_executor" in sys.modules:
        stopped += sys.modules["tasks.modal_executor"].stop_running_calls()
    return stopped


def get_executor(spec: ExecutorSpec) -> Executor:
    if spec.name == "local":
        return LocalExecutor()
    if spec.name == "modal":
        from tasks.modal_executor import ModalExecutor

        return ModalExecutor(spec.modal)
    raise ValueError(f"unknown executor {spec.name!r}: use 'local' or 'modal'")
