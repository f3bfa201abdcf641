"""The `local` executor: each job in its own Python subprocess on this machine (GPU if present), killable.

Run as: executor = LocalExecutor(); executor.run("train", train_request)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from modal_jobs.jobs import result_type
from modal_jobs.processes import parent_death_signal
from modal_jobs.storage import resolve, storage_root, verify_output
from tasks.executor import PollCallback, raise_job_error

POLL_INTERVAL_S = 1.0
# Job processes this process is waiting on: a flow interrupted in its own thread stops them (stop_running_jobs).
_RUNNING_PROCESSES: set[subprocess.Popen] = set()


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    tail = text.replace("\r", "\n").splitlines()[-lines:]
    return "\n".join(tail)


class LocalExecutor:
    """Each job in its own Python subprocess: memory (and GPU memory) is freed between stages, and a
    cancelled run kills it."""

    name = "local"

    def library_versions(self) -> dict[str, str]:
        from modal_jobs.keys import local_library_versions

        return local_library_versions()

    def read_text(self, path: str) -> str:
        return resolve(path).read_text()

    def display_path(self, location: str) -> str:
        return str(resolve(location))

    def stop_serving(self, served: Any, seconds_up: float | None = None) -> None:
        from modal_jobs.serve import stop_server

        if served.pid is not None:
            stop_server(served.pid)

    def output_exists(self, location: str) -> bool:
        # Verified, not just present: a folder whose files no longer match its manifest is recomputed, and
        # the run says so (storage.verify_output says what the cheap check can and cannot notice).
        check = verify_output(location)
        if check.state == "mismatch":
            try:
                from prefect import get_run_logger

                get_run_logger().warning("%s; not reused: recomputing it", check.describe())
            except Exception:  # outside a flow or task run: no run logger to tell
                print(f"warning: {check.describe()}; not reused: recomputing it", file=sys.stderr)
        return check.usable

    def run(self, stage: str, request: BaseModel, on_poll: PollCallback | None = None) -> BaseModel:
        logs = storage_root() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        log_path = logs / f"{stage}-{stamp}-{os.getpid()}.log"
        with tempfile.TemporaryDirectory(prefix=f"vlmpipe-{stage}-") as scratch:
            request_path = Path(scratch) / "request.json"
            result_path = Path(scratch) / "result.json"
            request_path.write_text(request.model_dump_json())
            env = dict(os.environ, VLMPIPE_HOME=str(storage_root()), PYTHONUNBUFFERED="1")
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "modal_jobs.runner", stage, str(request_path), str(result_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    # If the orchestrating process is killed (a cancelled Prefect run), its job must not run on.
                    preexec_fn=parent_death_signal(signal.SIGKILL),  # noqa: PLW1509 (prctl only)
                )
                _RUNNING_PROCESSES.add(process)
                try:
                    while process.poll() is None:
                        time.sleep(POLL_INTERVAL_S)
                        if on_poll is not None:
                            on_poll()
                except BaseException:
                    # Cancellation, Ctrl-C, a timeout: the job must not outlive the task.
                    process.kill()
                    process.wait()
                    raise
                finally:
                    _RUNNING_PROCESSES.discard(process)
            if on_poll is not None:
                on_poll()
            if not result_path.exists():
                raise_job_error(
                    stage, "ProcessDied", f"exit code {process.returncode} (log: {log_path})", _log_tail(log_path)
                )
            outcome = json.loads(result_path.read_text())
        if not outcome["ok"]:
            raise_job_error(stage, outcome["error_type"], outcome["message"], _log_tail(log_path))
        return result_type(stage).model_validate(outcome["result"])


def stop_local_jobs() -> int:
    """Kill every job subprocess this process is waiting on; returns how many."""
    stopped = 0
    for process in list(_RUNNING_PROCESSES):
        process.kill()
        stopped += 1
    return stopped
