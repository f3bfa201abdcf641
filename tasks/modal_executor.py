"""The `modal` executor: each job runs as a call to the deployed app's function of the same name.

    executor = ModalExecutor(config.modal)
    result = executor.run("train", train_request)   # spawn (or re-attach), poll, map errors

The app must be deployed first (`modal deploy modal_jobs/app.py`) under `config.modal.app_name`, and this
machine needs a Modal token (`modal setup`, or MODAL_TOKEN_ID and MODAL_TOKEN_SECRET in the environment).
Without one, `run` fails at once, before any network call.

What a paying user expects, and how it is kept:
- **No duplicate GPU work.** A spawned call's id is recorded on the local storage root under the stage's request
  (`modal-calls/<stage>-<hash>.json`) until its outcome is known. A Prefect retry, or the next run of the same
  config, re-attaches to that call while it runs (or takes its result if it finished) instead of spawning another.
- **A lost connection is not a failure.** Modal's client gives up after a few quick retries and raises its
  ConnectionError; the executor keeps the call running, re-attaches by id with backoff, and only after
  `modal.reconnect_timeout_s` without contact raises a retryable error, leaving the call running and recorded:
  the retry re-attaches.
- **A cancel is final.** A call cancelled from the dashboard, `modal app stop` or the Prefect run (UI, Ctrl-C)
  ends the task Cancelled (JobCancelled), never retried.
- **Nothing left running unwatched.** Any other interruption of the waiting thread cancels the call. A killed
  orchestrator cannot cancel; its record stays and the next run re-attaches.

Where the call id goes: a log line and a markdown artifact `modal-call-<stage>` on the task run, so the UI shows
which Modal call did the work and how to follow or cancel it. After the call, a table artifact `cost-<stage>`
estimates its price from what the function requests (GPU, CPU cores, memory) x wall seconds.
No secret ever passes through here: the containers get theirs from the Modal Secret.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel

from modal_jobs.config import ModalConfig
from modal_jobs.errors import INPUT_ERROR_TYPES, InputError
from modal_jobs.jobs import result_type
from modal_jobs.storage import atomic_write_json, short_hash, storage_root
from tasks.executor import (
    JobCancelled,
    PollCallback,
    TransientJobError,
    raise_job_error,
)

# How often the wait is reported in the log (polls happen every poll_interval_s).
LOG_EVERY_S = 60.0
# The train job writes <run>/progress.json on the Volume; mirrored here for the task's progress artifact.
PROGRESS_MIRROR_EVERY_S = 30.0
# Between two attempts to reach a call again after a lost connection (doubling up to the cap).
RECONNECT_FIRST_S, RECONNECT_CAP_S = 2.0, 30.0


class ModalAuthError(InputError):
    """No usable Modal credentials on this machine: retrying cannot help."""


class RunStopped(BaseException):
    """The Prefect run that owns a Modal call has ended or is being cancelled; the call was cancelled.

    A BaseException, like Prefect's own cancellation signals, so that no retry policy catches it."""


class LostContact(Exception):
    """Modal could not be reached for longer than modal.reconnect_timeout_s; the call itself may still run."""


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


class ModalClient:
    """The few remote operations the executor needs, against Modal's service.

    The only seam for tests: the rehearsal (tests/modal_standin.py) replaces this object with one that runs each
    function's real body in a local process, with Modal's semantics, because Modal's service cannot run here."""

    def credentials_configured(self) -> bool:
        return modal_credentials_configured()

    def function(self, app_name: str, stage: str) -> Any:
        import modal

        return modal.Function.from_name(app_name, stage)

    def call(self, call_id: str) -> Any:
        import modal

        return modal.FunctionCall.from_id(call_id)

    def _volume(self) -> Any:
        import modal

        from modal_jobs.app import VOLUME_NAME

        return modal.Volume.from_name(VOLUME_NAME)

    def read_file(self, path: str) -> bytes:
        return b"".join(self._volume().read_file(path))

    def write_file(self, path: str, data: bytes) -> None:
        import io

        with self._volume().batch_upload(force=True) as batch:
            batch.put_file(io.BytesIO(data), path)

    def list_files(self, path: str) -> list[str]:
        """Every file under `path` on the Volume, as Volume paths."""
        from modal.types import FileEntryType

        return [entry.path for entry in self._volume().listdir(path, recursive=True)
                if entry.type == FileEntryType.FILE]

    def terminate_sandbox(self, sandbox_id: str) -> None:
        import modal

        modal.Sandbox.from_id(sandbox_id).terminate()


# The client every ModalExecutor uses unless given one.
CLIENT: ModalClient = ModalClient()


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
        if call is None:
            continue  # not spawned yet: its thread sees the event right after spawning, and cancels
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


def _requested_gpus(stage: str, request: BaseModel | None) -> int:
    """train.gpus of a train request; 1 for anything else (every other stage runs one process)."""
    train = getattr(request, "train", None) if stage == "train" else None
    return getattr(train, "gpus", 1) or 1


def _call_record_path(stage: str, request: BaseModel) -> Path:
    """Where the id of the call running this exact request is kept: the request embeds the stage's cache key."""
    return storage_root() / "modal-calls" / f"{stage}-{short_hash(request.model_dump(mode='json'))}.json"


def cancelled_remotely(call: Any, error: BaseException) -> bool:
    """Whether a call's failure is a cancel (dashboard, `modal app stop`, FunctionCall.cancel). Modal reports a
    cancelled input as a bare RemoteError; its status in the call graph says TERMINATED."""
    import modal.exception as modal_errors

    if isinstance(error, modal_errors.InputCancellation):
        return True
    if type(error) is not modal_errors.RemoteError:
        return False
    try:
        from modal.call_graph import InputStatus

        return any(node.status == InputStatus.TERMINATED for node in call.get_call_graph())
    except Exception:  # the call graph is best effort; the message is the fallback
        text = str(error).lower()
        return "cancel" in text or "terminated" in text


class ModalExecutor:
    """Runs a stage as `modal.Function.from_name(app_name, stage).spawn(request)` and waits for it.

    `client` (default: the module's CLIENT) performs the remote operations; `should_stop` is asked at every poll
    whether to give up (default: the owning flow run has ended or is being cancelled).
    """

    name = "modal"

    def __init__(self, settings: ModalConfig, *, client: ModalClient | None = None,
                 should_stop: Any = None) -> None:
        self.settings = settings
        self.client = client or CLIENT
        self._should_stop = should_stop or flow_run_stopping
        self._last_mirror = 0.0

    def library_versions(self) -> dict[str, str]:
        """The GPU image's pins (what the train job runs with on Modal), not this machine's versions."""
        from modal_jobs.app import GPU_IMAGE_PINS
        from modal_jobs.keys import NUMERICS_LIBRARIES

        return {name: GPU_IMAGE_PINS[name] for name in NUMERICS_LIBRARIES if name in GPU_IMAGE_PINS}

    def require_credentials(self, what: str = "the Modal backend") -> None:
        """Fail at once, with the fix, on a machine without a Modal token (Modal's own AuthError comes later and
        as a traceback)."""
        if not self.client.credentials_configured():
            raise ModalAuthError(f"{what}: no Modal token on this machine: {AUTH_HINT}")

    # --- outputs on the Volume --------------------------------------------------------------------------------

    def read_text(self, path: str) -> str:
        """A storage-relative file written by a job (e.g. evals/<key>.json): it is on the Volume, not here."""
        self.require_credentials()
        return self.client.read_file(path).decode()

    def output_exists(self, location: str) -> bool:
        """Whether a stage's output is on the Volume: a folder counts only with its manifest (as in
        modal_jobs.storage.is_complete), a file when it exists."""
        from modal_jobs.storage import MANIFEST_NAME

        self.require_credentials()
        target = location if PurePosixPath(location).suffix else f"{location}/{MANIFEST_NAME}"
        try:
            self.client.read_file(target)
        except FileNotFoundError:
            return False
        return True

    def display_path(self, location: str) -> str:
        """How a person finds an output: the Volume and its path (`vlmpipe pull` fetches it)."""
        from modal_jobs.app import VOLUME_NAME

        return f"{VOLUME_NAME}:/{location}"

    def pull(self, location: str, destination: Path) -> list[Path]:
        """Copy a file or folder from the Volume into `destination`; returns the files written."""
        files = self.client.list_files(location)
        if not files:
            raise FileNotFoundError(f"nothing at {self.display_path(location)} on the Volume")
        written: list[Path] = []
        destination.mkdir(parents=True, exist_ok=True)
        for remote in files:
            inside = PurePosixPath(remote.lstrip("/")).relative_to(PurePosixPath(location).parent)
            target = destination / inside
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.partial")
            partial.write_bytes(self.client.read_file(remote))
            os.replace(partial, target)  # never a half-downloaded file under its real name
            written.append(target)
        return written

    def stop_serving(self, served: Any, seconds_up: float | None = None) -> None:
        """Terminate an evaluation server's Sandbox (a no-op when it has already ended)."""
        if not served.sandbox_id:
            return
        logger = _logger()
        try:
            self.client.terminate_sandbox(served.sandbox_id)
            logger.info("serve: stopped the vLLM Sandbox %s", served.sandbox_id)
        except Exception as error:  # it ends itself after its idle timeout; say so rather than fail the run
            from modal_jobs.app import SANDBOX_IDLE_TIMEOUT_S

            logger.warning("serve: could not stop Sandbox %s (%s); it stops itself after %d idle minutes",
                           served.sandbox_id, error, SANDBOX_IDLE_TIMEOUT_S // 60)
        if seconds_up is not None:
            from modal_jobs.app import GPUS, SERVE_CPU, SERVE_MEMORY_MIB

            self._record_cost("serve-sandbox", seconds_up, logger, gpu=GPUS.serve, cpu=SERVE_CPU,
                              memory_mib=SERVE_MEMORY_MIB)

    # --- running a stage ----------------------------------------------------------------------------------------

    def gpu_for(self, stage: str, request: BaseModel | None = None) -> str | None:
        """The GPU a stage's function asks for: the config's type, and for train the count of train.gpus
        (`A100-80GB:2`), read from the request, since a Modal function's GPU is fixed when it is deployed."""
        if stage == "serve":
            return None  # the function only starts the Sandbox, which has the GPU (VLMPIPE_GPU_SERVE)
        if stage in type(self.settings.gpu).model_fields:
            gpu = getattr(self.settings.gpu, stage)
        else:
            from modal_jobs.app import (
                STAGE_SPECS,  # a stage the config has no GPU field for: the app's default
            )

            gpu = STAGE_SPECS[stage].gpu if stage in STAGE_SPECS else None
        gpus = _requested_gpus(stage, request)
        if gpu is not None and gpus > 1:
            return f"{_gpu_count(gpu)[0]}:{gpus}"
        return gpu

    def resources_for(self, stage: str, request: BaseModel | None = None) -> dict[str, Any]:
        """What a stage's call asks Modal for (and is billed for): gpu, cpu cores, memory_mib."""
        from modal_jobs.app import stage_resources

        cpu, memory_mib = stage_resources(stage, _requested_gpus(stage, request))
        return {"gpu": self.gpu_for(stage, request), "cpu": cpu, "memory_mib": memory_mib}

    def run(self, stage: str, request: BaseModel, on_poll: PollCallback | None = None) -> BaseModel:
        self.require_credentials(stage)
        logger = _logger()
        started = time.monotonic()
        record = _call_record_path(stage, request)
        # Registered before the spawn: a flow stopped at any moment from here on stops this call too.
        stop = threading.Event()
        with _RUNNING_LOCK:
            _RUNNING[id(stop)] = (None, stop)
        try:
            call_id, payload = self._attach(stage, record, logger)
            if call_id is None:
                call_id = self._spawn(stage, request, record, logger)
            call = self.client.call(call_id)
            with _RUNNING_LOCK:
                _RUNNING[id(stop)] = (call, stop)
            if stop.is_set() and payload is None:
                self._cancel(stage, call, logger)
                record.unlink(missing_ok=True)
                raise RunStopped(f"{stage}: stopped with its flow; Modal call {call_id} cancelled")
            if payload is None:
                payload = self._wait_for_outcome(stage, request, call_id, record, stop, on_poll, started, logger)
        finally:
            with _RUNNING_LOCK:
                _RUNNING.pop(id(stop), None)
            self._record_cost(stage, time.monotonic() - started, logger, request=request)
        if on_poll is not None:
            self._mirror_progress(stage, request, force=True)
            on_poll()
        return self._result(stage, payload)

    # --- steps ---------------------------------------------------------------------------------------------

    def _attach(self, stage: str, record: Path, logger: Any) -> tuple[str | None, Any]:
        """(call id, payload) of a call an earlier attempt spawned for this request: running (payload None) or
        finished with a result. (None, None) when there is none to attach to."""
        from modal.exception import TimeoutError as ModalTimeoutError

        try:
            call_id = json.loads(record.read_text())["call_id"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None, None
        call = self.client.call(call_id)
        try:
            payload = call.get(timeout=0)
        except ModalTimeoutError:
            logger.info("%s: re-attached to the running Modal call %s (not spawning another)", stage, call_id)
            return call_id, None
        except Exception as error:
            record.unlink(missing_ok=True)
            if cancelled_remotely(call, error):
                raise JobCancelled(f"{stage}: Modal call {call_id} was cancelled; a cancel is final") from error
            logger.info("%s: the earlier Modal call %s ended without a result (%s: %s); spawning a new one",
                        stage, call_id, type(error).__name__, error)
            return None, None
        logger.info("%s: the earlier Modal call %s had finished; taking its result", stage, call_id)
        record.unlink(missing_ok=True)
        return call_id, payload

    def _spawn(self, stage: str, request: BaseModel, record: Path, logger: Any) -> str:
        function = self.client.function(self.settings.app_name, stage)
        resources = self.resources_for(stage, request)
        if _requested_gpus(stage, request) > 1:
            # Several GPUs, one training process each: the function is deployed with one, so the count (and the
            # CPU cores and memory that grow with the processes) are asked for per call (Function.with_options:
            # calls run in a container pool of their own).
            function = function.with_options(gpu=resources["gpu"], cpu=resources["cpu"],
                                             memory=resources["memory_mib"])
        elif resources["gpu"] is not None:
            # The config's GPU wins over the deploy-time default, without a redeploy. (A GPU cannot be
            # removed this way: a stage deployed with one keeps it when the config says null.)
            function = function.with_options(gpu=resources["gpu"])
        try:
            call = function.spawn(request.model_dump(mode="json"))
        except Exception as error:
            raise self._mapped(stage, error) from error
        atomic_write_json(record, {"call_id": call.object_id, "stage": stage, "app": self.settings.app_name,
                                   "spawned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self._record_call(stage, call.object_id, logger, resources["gpu"])
        return call.object_id

    def _wait_for_outcome(self, stage: str, request: BaseModel, call_id: str, record: Path, stop: threading.Event,
                          on_poll: PollCallback | None, started: float, logger: Any) -> Any:
        call = self.client.call(call_id)
        try:
            payload = self._wait(stage, request, call_id, stop, on_poll, started, logger)
        except LostContact as error:
            # Not a job failure: the call keeps running and stays recorded, so the retry re-attaches to it.
            raise TransientJobError(str(error)) from error
        except BaseException as error:
            record.unlink(missing_ok=True)
            # A call we cancelled ourselves (the flow stopped) also reads as cancelled: that is RunStopped below.
            if not stop.is_set() and isinstance(error, Exception) and cancelled_remotely(call, error):
                raise JobCancelled(
                    f"{stage}: Modal call {call_id} was cancelled (from the dashboard, `modal app stop` or the CLI); "
                    "a cancel is final: the stage is not retried"
                ) from error
            # Cancelled run, Ctrl-C, a failed call: the remote job must not run on alone (a no-op if it ended).
            self._cancel(stage, call, logger)
            if stop.is_set() and not isinstance(error, RunStopped):
                raise RunStopped(f"{stage}: stopped with its flow; Modal call {call_id} cancelled") from error
            if isinstance(error, Exception):
                raise self._mapped(stage, error) from error
            raise
        record.unlink(missing_ok=True)
        return payload

    def _wait(self, stage: str, request: BaseModel, call_id: str, stop: threading.Event,
              on_poll: PollCallback | None, started: float, logger: Any) -> Any:
        from modal.exception import ConnectionError as ModalConnectionError
        from modal.exception import FunctionTimeoutError, OutputExpiredError
        from modal.exception import TimeoutError as ModalTimeoutError

        call = self.client.call(call_id)
        last_log = started
        lost_since: float | None = None
        backoff = RECONNECT_FIRST_S
        while True:
            try:
                return call.get(timeout=self.settings.poll_interval_s)
            except (FunctionTimeoutError, OutputExpiredError):
                raise  # subclasses of Modal's TimeoutError that mean the call is over, not "not yet"
            except ModalTimeoutError:
                lost_since, backoff = None, RECONNECT_FIRST_S
            except ModalConnectionError as error:
                now = time.monotonic()
                lost_since = lost_since or now
                if now - lost_since > self.settings.reconnect_timeout_s:
                    raise LostContact(
                        f"{stage}: no contact with Modal for {now - lost_since:.0f} s (modal.reconnect_timeout_s); "
                        f"Modal call {call_id} was left running and is recorded: a retry or the next run re-attaches "
                        "to it"
                    ) from error
                logger.warning("%s: lost contact with Modal (%s); call %s keeps running, re-attaching in %.0f s",
                               stage, error, call_id, backoff)
                if stop.wait(backoff):
                    raise RunStopped(f"{stage}: stopped with its flow while Modal was unreachable") from error
                backoff = min(backoff * 2, RECONNECT_CAP_S)
                call = self.client.call(call_id)  # a fresh handle: the old one's connection is gone
            if stop.is_set() or self._should_stop():
                raise RunStopped(f"{stage}: the Prefect run ended while Modal call {call_id} ran")
            now = time.monotonic()
            if now - last_log >= LOG_EVERY_S:
                logger.info("%s: Modal call %s running for %.0f s", stage, call_id, now - started)
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
        if type(error).__name__ in INPUT_ERROR_TYPES or isinstance(error, (ImportError, SyntaxError)):
            # Bad input re-raised here with its own type, or an image that lacks a module: a retry runs the same
            # image and fails the same way (redeploy with the fixed lock instead).
            return InputError(text)
        # Preemption and internal failures (InternalFailure), a function timeout (train resumes from its
        # checkpoint), an unpicklable remote error (ExecutionError), anything else.
        return TransientJobError(text)

    def _cancel(self, stage: str, call: Any, logger: Any) -> None:
        try:
            call.cancel()  # a no-op for a call that has already ended
            logger.warning("%s: cancelled Modal call %s (if it was still running)", stage, call.object_id)
        except Exception as error:  # never hide why we are cancelling
            logger.warning("%s: could not cancel Modal call %s: %s", stage, call.object_id, error)

    def _record_call(self, stage: str, call_id: str, logger: Any, gpu: str | None) -> None:
        gpu = gpu or "CPU"
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
            f"- cancel: `python -c \"import modal; modal.FunctionCall.from_id('{call_id}').cancel()\"` "
            "(final: the stage is not retried)\n"
            "- a retry or the next run of the same config re-attaches to this call while it runs",
            key=_artifact_key("modal-call", stage),
            description=f"The Modal function call running {stage}",
        )

    def _record_cost(self, stage: str, wall_s: float, logger: Any, request: BaseModel | None = None,
                     **requests: Any) -> None:
        try:
            self._publish_cost(stage, wall_s, logger, **(requests or self.resources_for(stage, request)))
        except Exception as error:  # bookkeeping must not turn a finished job into a failed one
            logger.warning("%s: could not record the cost: %s", stage, error)

    def hourly_price(self, gpu: str | None, cpu: float, memory_mib: int) -> float | None:
        """USD an hour for what a function requests: its GPUs (the price of one x their count, `H100:2`), CPU
        cores and memory (Modal bills the three)."""
        price = self.settings
        per_hour = cpu * price.cpu_core_price_per_hour + memory_mib / 1024 * price.memory_gib_price_per_hour
        if gpu is not None:
            kind, count = _gpu_count(gpu)
            gpu_price = price.gpu_price_per_hour.get(kind)
            if gpu_price is None:
                return None
            per_hour += gpu_price * count
        return per_hour

    def _publish_cost(self, stage: str, wall_s: float, logger: Any, gpu: str | None, cpu: float,
                      memory_mib: int) -> None:
        per_hour = self.hourly_price(gpu, cpu, memory_mib)
        usd = None if per_hour is None else round(per_hour * wall_s / 3600.0, 4)
        resources = f"{gpu or 'no GPU'}, {cpu:g} cores, {memory_mib / 1024:g} GiB"
        logger.info("%s: %.0f s on %s, about %s USD", stage, wall_s, resources, "?" if usd is None else f"{usd:.2f}")
        if not _in_prefect_run():
            return
        from prefect.artifacts import create_table_artifact

        create_table_artifact(
            [{"stage": stage, "gpu": gpu or "-", "cpu_cores": cpu, "memory_gib": round(memory_mib / 1024, 1),
              "wall_s": round(wall_s, 1), "usd_per_hour": None if per_hour is None else round(per_hour, 4),
              "estimated_usd": usd}],
            key=_artifact_key("cost", stage),
            description=(
                "Estimate: wall time from spawn to result (queueing and cold start included) x the function's "
                "requests (modal.gpu_price_per_hour, cpu_core_price_per_hour, memory_gib_price_per_hour); "
                "Modal's bill is the truth"
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
        relative = f"{output_dir}/progress.json"
        try:
            progress = json.loads(self.client.read_file(relative))
        except Exception:  # not written yet, not committed yet, or the API blinked
            return
        atomic_write_json(relative, progress)
