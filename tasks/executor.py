"""The executor interface: how a task runs a job, whichever executor it has (tasks.local_executor runs it here
in a subprocess, tasks.modal_executor as a Modal function call; tasks.executors picks one).

Failures come back as `InputError` (bad config or data: never retried), `TransientJobError` (anything else: a lost
connection, a killed process, a preempted container) or `JobCancelled` (cancelled from outside: final).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from pydantic import BaseModel

from modal_jobs.config import Executor as ExecutorName
from modal_jobs.config import ModalConfig, PipelineConfig
from modal_jobs.errors import INPUT_ERROR_TYPES, InputError

PollCallback = Callable[[], None]


class TransientJobError(RuntimeError):
    """A job failed for a reason a retry may fix."""


class JobCancelled(Exception):
    """The job was cancelled from outside (a Modal call cancelled in its dashboard or CLI): final, never retried.
    The stage's task ends Cancelled (tasks.stages)."""


class Executor(Protocol):
    name: str

    def run(self, stage: str, request: BaseModel, on_poll: PollCallback | None = None) -> BaseModel: ...

    def library_versions(self) -> dict[str, str]:
        """Versions of the libraries that change numerics where the job runs (part of the train key)."""
        ...

    def read_text(self, path: str) -> str:
        """A storage-relative file a job wrote (e.g. evals/<key>.json), wherever the storage root is."""
        ...

    def output_exists(self, location: str) -> bool:
        """Whether a stage's output is finished: a folder with its manifest, or a file."""
        ...

    def display_path(self, location: str) -> str:
        """Where a person finds a storage-relative output (a local path, or a place on the Modal Volume)."""
        ...

    def stop_serving(self, served: Any, seconds_up: float | None = None) -> None:
        """Stop a server the serve stage started (a local process, or a Modal Sandbox)."""
        ...


def raise_job_error(stage: str, error_type: str, message: str, detail: str = "") -> None:
    text = f"{stage} failed: {error_type}: {message}"
    if error_type in INPUT_ERROR_TYPES:
        raise InputError(text)
    raise TransientJobError(text + (f"\n--- last lines of the job's log ---\n{detail}" if detail else ""))


class ExecutorSpec(BaseModel):
    """Which executor runs a stage, with what it needs to know (a task parameter, so no secrets here)."""

    name: ExecutorName = "local"
    modal: ModalConfig = ModalConfig()

    @classmethod
    def for_stage(cls, config: PipelineConfig, stage: str) -> ExecutorSpec:
        return cls(name=config.executor_for(stage), modal=config.modal)
