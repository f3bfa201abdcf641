"""The `modal` executor: each job runs as a call to the deployed app's function of the same name.

    executor = ModalExecutor(config.modal)
    result = executor.run("train", train_request)   # spawn, poll, cancel on cancellation, map errors

The app must be deployed first (`modal deploy modal_jobs/app.py`) under `config.modal.app_name`, and this
machine needs a Modal token (`modal setup`, or MODAL_TOKEN_ID and MODAL_TOKEN_SECRET in the environment).
Without one, `run` fails at once, before any network call.

Where the call id goes: a log line and a markdown artifact `modal-call-<stage>` on the task run (a task run's
tags cannot change once it has started), so the UI shows which Modal call did the work and how to follow
or cancel it. After the call, a table artifact `cost-<stage>` estimates its price: GPU type x wall seconds x
`modal.gpu_price_per_hour`. Both only inside a Prefect run. No secret ever passes through here: the
containers get theirs from the Modal Secret.

Cancellation: any exception or signal in the waiting thread cancels the call; so does the flow run turning
Cancelling (a cancel from the UI), checked at every poll. Ctrl-C reaches only the flow's thread, and Prefect
waits for submitted tasks before it marks the run: the flow calls `stop_running_calls()` when interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from pydantic import BaseModel

from modal_jobs.config import ModalConfig
from modal_jobs.errors import INPUT_ERROR_TYPES, InputError
from modal_jobs.jobs import result_type
from tasks.executors import PollCallback, TransientJobError, raise_job_error

# How often the wait is reported in the log (polls happen every poll_interval_s).
LOG_EVERY_S = 60.0
# The train job writes <run>/progress.json on the Volume; mirrored here for the task's progress artifact.
PROGRESS_MIRROR_EVERY_S = 30.0

FunctionLookup = Callable[[str, str], Any]
VolumeReader = Callable[[str], bytes]


class ModalAuthError(InputError):
    """No usable Modal credentials on this machine: retrying cannot help."""


class RunStopped(BaseException):
    """The Prefect run that owns a Modal call has ended or is being cancelled; the call was cancelled.

    A BaseException, like Prefect's own cancellation signals, so that no retry policy catches it."""


AUTH_HINT = (
    "run `modal setup` (or `modal token new`), or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET in the environment "
    "that runs the flow"
)


def modal_credentials_configured() -> bool:
    """Whether the Modal client would find credentials, asked of modal's own config (environment first,
    then the active profile of ~/.modal.toml or MODAL_CONFIG_PATH) without any network call."""
    if os.environ.get("MODAL_IS_REMOTE") == "1":
        return True  # inside a Modal container the client authenticates as the container
    from modal.config import config

    if config.get("token_id") and config.get("token_secret"):
        return True
    # modal 1.6 also accepts an OAuth login
    return bool(config.get("oauth_refresh_token") and config.get("oauth_client_id")
                and (config.get("oauth_client_secret") or config.get("oauth_jwt_key")))


def _default_function_lookup(app_name: str, stage: str) -> Any:
    import modal

    return modal.Function.from_name(app_name, stage)


def _default_volume_reader(path: str) -> bytes:
    import modal

    from modal_jobs.app import VOLUME_NAME

    return b"".join(modal.Volume.from_name(VOLUME_NAME).read_file(path))


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow or task run
        return logging.getLogger("vlmpipe.modal")


def _in_prefect_run() -> bool:
    try:
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:
        return False
    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


# Calls this process is waiting on, each with the event that tells its waiting thread to give up.
_RUNNING: dict[int, tuple[Any, threading.Event]] = {}
_RUNNING_LOCK = threading.Lock()


def stop_running_calls() -> int:
    """Cancel every Modal call this process is waiting on; returns how many.

    For the flow's own thread when it is interrupted (Ctrl-C, TerminationSignal): tasks submitted to
    Prefect's thread pool never see the signal, and Prefect waits for them before it marks the run
    Crashed, so without this a 10-hour training call would outlive its run. Their threads then raise
    RunStopped, which no retry policy catches."""
    with _RUNNING_LOCK:
        entries = list(_RUNNING.values())
    for call, stop in entries:
        stop.set()
    for call, _ in entries:
        try:
            call.cancel()  # also wakes a thread blocked in call.get()
        except Exception:
            pass  # its own thread cancels it again at its next poll
    return len(entries)


def flow_run_stopping() -> bool:
    """Whether the flow run this code runs in is over or being cancelled (Cancelling: a cancel from the UI or
    `prefect flow-run cancel`, seen before the runner's SIGTERM arrives)."""
    try:
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        if context is None or context.flow_run is None:
            return False
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.objects import StateType

        with get_client(sync_client=True) as client:
            state = client.read_flow_run(context.flow_run.id).state
    except Exception:  # the API unreachable for a moment is not a reason to stop
        return False
    return state is not None and (state.is_final() or state.type == StateType.CANCELLING)


def _artifact_key(prefix: str, stage: str) -> str:
    return f"{prefix}-{stage.replace('_', '-')}"  # artifact keys: lowercase letters, digits and dashes


def _gpu_count(gpu: str) -> tuple[str, int]:
    kind, _, count = gpu.partition(":")
    return kind, int(count) if count.isdigit() else 1


class ModalExecutor:
    """Runs a stage as `modal.Function.from_name(app_name, stage).spawn(request)` and waits for it.

    `function_lookup`, `volume_reader` and `credentials_configured` exist so tests can stand in for the
    remote Modal service; everything else is the code that runs against Modal. `should_stop` is asked at
    every poll whether to give up (default: the owning flow run has ended or is being cancelled).
    """

    name = "modal"

    def __init__(
        self,
        settings: ModalConfig,
        *,
        function_lookup: FunctionLookup | None = None,
        volume_reader: VolumeReader | None = None,
        credentials_configured: Callable[[], bool] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings
        self._lookup = function_lookup or _default_function_lookup
        self._read_volume = volume_reader or _default_volume_reader
        self._credentials_configured = credentials_configured or modal_credentials_configured
        self._should_stop = should_stop or flow_run_stopping
        self._last_mirror = 0.0

    def library_versions(self) -> dict[str, str]:
        """The GPU image's pins (what the train job runs with on Modal), not this machine's versions."""
        from modal_jobs.app import GPU_IMAGE_PINS
        from modal_jobs.keys import NUMERICS_LIBRARIES

        return {name: GPU_IMAGE_PINS[name] for name in NUMERICS_LIBRARIES if name in GPU_IMAGE_PINS}

    def read_text(self, path: str) -> str:
        """A storage-relative file written by a job (e.g. evals/<key>.json): it is on the Volume, not here."""
        return self._read_volume(path).decode()

    def output_exists(self, location: str) -> bool:
        """Whether a stage's output is on the Volume: a folder counts only with its manifest (as in
        modal_jobs.storage.is_complete), a file when it exists."""
        from modal_jobs.storage import MANIFEST_NAME

        target = location if PurePosixPath(location).suffix else f"{location}/{MANIFEST_NAME}"
        try:
            self._read_volume(target)
        except FileNotFoundError:
            return False
        return True

    def gpu_for(self, stage: str) -> str | None:
        if stage == "serve":
            return None  # runs on CPU and points the GPU endpoint (deployed with VLMPIPE_GPU_SERVE) at the model
        if stage in type(self.settings.gpu).model_fields:
            return getattr(self.settings.gpu, stage)
        from modal_jobs.app import STAGE_SPECS  # a stage the config has no GPU field for: the app's default

        return STAGE_SPECS[stage].gpu if stage in STAGE_SPECS else None

    def run(self, stage: str, request: BaseModel, on_poll: PollCallback | None = None) -> BaseModel:
        if not self._credentials_configured():
            raise ModalAuthError(f"{stage}: no Modal token on this machine: {AUTH_HINT}")
        logger = _logger()
        started = time.monotonic()
        try:
            call = self._function(stage).spawn(request.model_dump(mode="json"))
        except Exception as error:
            raise self._mapped(stage, error) from error
        stop = threading.Event()
        with _RUNNING_LOCK:
            _RUNNING[id(stop)] = (call, stop)
        try:
            try:
                self._record_call(stage, call, logger)
                payload = self._wait(stage, request, call, stop, on_poll, started, logger)
            except BaseException as error:
                # Cancelled run, Ctrl-C, a lost connection, a failed call: the remote job must not run on alone.
                self._cancel(stage, call, logger)
                if stop.is_set() and not isinstance(error, RunStopped):
                    stopped = f"{stage}: stopped with its flow; Modal call {call.object_id} cancelled"
                    raise RunStopped(stopped) from error
                if isinstance(error, Exception):
                    raise self._mapped(stage, error) from error
                raise
        finally:
            with _RUNNING_LOCK:
                _RUNNING.pop(id(stop), None)
            self._record_cost(stage, time.monotonic() - started, logger)
        if on_poll is not None:
            self._mirror_progress(stage, request, force=True)
            on_poll()
        return self._result(stage, payload)

    # --- steps ---------------------------------------------------------------------------------------------

    def _function(self, stage: str) -> Any:
        function = self._lookup(self.settings.app_name, stage)
        gpu = self.gpu_for(stage)
        if gpu is not None:
            # The config's GPU wins over the deploy-time default, without a redeploy. (A GPU cannot be
            # removed this way: a stage deployed with one keeps it when the config says null.)
            function = function.with_options(gpu=gpu)
        return function

    def _wait(self, stage: str, request: BaseModel, call: Any, stop: threading.Event,
              on_poll: PollCallback | None, started: float, logger: Any) -> Any:
        from modal.exception import FunctionTimeoutError, OutputExpiredError
        from modal.exception import TimeoutError as ModalTimeoutError

        last_log = started
        while True:
            try:
                return call.get(timeout=self.settings.poll_interval_s)
            except (FunctionTimeoutError, OutputExpiredError):
                raise  # subclasses of Modal's TimeoutError that mean the call is over, not "not yet"
            except ModalTimeoutError:
                pass
            if stop.is_set() or self._should_stop():
                raise RunStopped(f"{stage}: the Prefect run ended while Modal call {call.object_id} ran")
            now = time.monotonic()
            if now - last_log >= LOG_EVERY_S:
                logger.info("%s: Modal call %s running for %.0f s", stage, call.object_id, now - started)
                last_log = now
            if on_poll is not None:
                self._mirror_progress(stage, request)
                on_poll()

    def _result(self, stage: str, payload: Any) -> BaseModel:
        if not isinstance(payload, dict) or "ok" not in payload:
            raise TransientJobError(
                f"{stage}: the Modal function answered {type(payload).__name__}, not a result envelope; "
                "is the deployed app older than this code? Redeploy: modal deploy modal_jobs/app.py"
            )
        if not payload["ok"]:
            raise_job_error(stage, payload.get("error_type", "Error"), payload.get("message", ""))
        return result_type(stage).model_validate(payload["result"])

    def _mapped(self, stage: str, error: Exception) -> Exception:
        """Whose fault, so that retries go only where they can help."""
        import modal.exception as modal_errors

        text = f"{stage} failed on Modal: {type(error).__name__}: {error}"
        if isinstance(error, modal_errors.AuthError):
            return ModalAuthError(f"{stage}: Modal refused the credentials ({error}); {AUTH_HINT}")
        if isinstance(error, InputError):
            return error
        if isinstance(error, modal_errors.NotFoundError):
            return InputError(
                f"{stage}: no function {stage!r} in a deployed Modal app {self.settings.app_name!r} ({error}): "
                "deploy it with `modal deploy modal_jobs/app.py` (VLMPIPE_MODAL_APP names the app), or set "
                "modal.app_name to the deployed app's name"
            )
        if isinstance(error, modal_errors.InvalidError):
            return InputError(text)  # e.g. a GPU type Modal rejects
        if type(error).__name__ in INPUT_ERROR_TYPES:
            return InputError(text)  # a remote exception re-raised here with its own type
        # Preemption and internal failures (InternalFailure), a function timeout (train resumes from its
        # checkpoint), lost connections, an unpicklable remote error (ExecutionError), anything else.
        return TransientJobError(text)

    def _cancel(self, stage: str, call: Any, logger: Any) -> None:
        try:
            call.cancel()  # a no-op for a call that has already ended
            logger.warning("%s: cancelled Modal call %s (if it was still running)", stage, call.object_id)
        except Exception as error:  # never hide why we are cancelling
            logger.warning("%s: could not cancel Modal call %s: %s", stage, call.object_id, error)

    def _record_call(self, stage: str, call: Any, logger: Any) -> None:
        call_id = call.object_id
        gpu = self.gpu_for(stage) or "CPU"
        logger.info("%s: spawned Modal call %s (app %s, %s)", stage, call_id, self.settings.app_name, gpu)
        if not _in_prefect_run():
            return
        from prefect.artifacts import create_markdown_artifact
        from prefect.runtime import task_run

        create_markdown_artifact(
            f"**{stage}** runs as Modal call `{call_id}` of app `{self.settings.app_name}` on {gpu}"
            f" (task run `{task_run.name or '-'}`).\n\n"
            f"- logs: `modal app logs {self.settings.app_name}`\n"
            f"- result: `python -c \"import modal; print(modal.FunctionCall.from_id('{call_id}').get())\"`\n"
            f"- cancel: `python -c \"import modal; modal.FunctionCall.from_id('{call_id}').cancel()\"`",
            key=_artifact_key("modal-call", stage),
            description=f"The Modal function call running {stage}",
        )

    def _record_cost(self, stage: str, wall_s: float, logger: Any) -> None:
        try:
            self._publish_cost(stage, wall_s, logger)
        except Exception as error:  # bookkeeping must not turn a finished job into a failed one
            logger.warning("%s: could not record the cost: %s", stage, error)

    def _publish_cost(self, stage: str, wall_s: float, logger: Any) -> None:
        gpu = self.gpu_for(stage) or "CPU"
        kind, count = _gpu_count(gpu)
        per_hour = self.settings.gpu_price_per_hour.get(kind)
        usd = None if per_hour is None else round(per_hour * count * wall_s / 3600.0, 4)
        logger.info("%s: %.0f s on %s, about %s USD", stage, wall_s, gpu, "?" if usd is None else f"{usd:.2f}")
        if not _in_prefect_run():
            return
        from prefect.artifacts import create_table_artifact

        create_table_artifact(
            [{"stage": stage, "gpu": gpu, "wall_s": round(wall_s, 1), "usd_per_hour": per_hour,
              "estimated_usd": usd}],
            key=_artifact_key("cost", stage),
            description=(
                "Estimate: wall time from spawn to result (queueing and cold start included) x "
                "modal.gpu_price_per_hour; Modal's bill is the truth" + (
                    ". The vLLM endpoint's own GPU time is billed apart, while it runs" if stage == "serve" else "")
            ),
        )

    def _mirror_progress(self, stage: str, request: BaseModel, force: bool = False) -> None:
        """Copy <run>/progress.json from the Volume to the local storage root, where the train task's
        progress callback reads it. Best effort: the run goes on without it."""
        output_dir = getattr(request, "output_dir", None)
        if stage != "train" or not output_dir or os.path.isabs(output_dir):
            return
        now = time.monotonic()
        if not force and now - self._last_mirror < PROGRESS_MIRROR_EVERY_S:
            return
        self._last_mirror = now
        from modal_jobs.storage import atomic_write_json

        relative = f"{output_dir}/progress.json"
        try:
            progress = json.loads(self._read_volume(relative))
        except Exception:  # not written yet, not committed yet, or the API blinked
            return
        atomic_write_json(relative, progress)
