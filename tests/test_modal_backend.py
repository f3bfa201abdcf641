"""The Modal backend, offline: the app as it would be deployed, its functions run here, and the executor's
spawn / poll / cancel / error mapping.

Modal's service cannot be reached from here and there is no token, so two kinds of test:
- the app: built from modal_jobs/app.py exactly as `modal deploy` builds it, its settings read from the
  Function objects, and its function bodies run here with `.local()` on the real job functions;
- the executor: real code (and, where Prefect matters, a real flow, task and API) against a stand-in for the
  remote Modal calls only (Function.spawn, FunctionCall.get / .cancel, Volume.read_file), each such test
  says so; and the real Modal client with no token, which must fail at once.

Never set a fake Modal token here: the client then retries for about a minute before giving up.

Run as: python -m pytest tests/test_modal_backend.py -q
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import modal
import modal.exception
import pytest

import modal_jobs.app as modal_app
from modal_jobs.config import ModalConfig, PipelineConfig, StageGpus, load_config
from modal_jobs.errors import InputError
from modal_jobs.jobs import run_job
from modal_jobs.schemas import PrepareModelRequest, PrepareModelResult, TrainRequest
from tasks.executors import ExecutorSpec, TransientJobError, get_executor
from tasks.modal_executor import ModalAuthError, ModalExecutor

REPO = Path(__file__).resolve().parents[1]


def _without_modal_credentials(home: Path) -> dict[str, str]:
    """The environment of a machine with no Modal token: no MODAL_* settings, a HOME without ~/.modal.toml."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env.update(HOME=str(home), PYTHONPATH=str(REPO))
    return env


def _python(code: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _deployed(function) -> dict:
    """What `modal deploy` would send for a function. Modal 1.6.4 (pinned) keeps these settings in the
    function's loader until deploy time; reading them there is the only offline way to see them."""
    from modal._utils.async_utils import synchronizer

    settings = inspect.getclosurevars(synchronizer._translate_in(function)._load).nonlocals
    return {name: settings[name] for name in ("timeout", "retry_policy", "scaledown_window", "max_containers",
                                              "max_concurrent_inputs", "single_use_containers", "webhook_config")}


def _same(modal_object, local_handle) -> bool:
    from modal._utils.async_utils import synchronizer

    return modal_object is synchronizer._translate_in(local_handle)


# --- the app -------------------------------------------------------------------------------------------------


def test_importing_the_app_needs_no_token_network_or_heavy_libraries(tmp_path):
    probe = (
        "import json, sys, time\n"
        "started = time.monotonic()\n"
        "import modal_jobs.app as m\n"
        "print(json.dumps({'seconds': time.monotonic() - started, 'name': m.app.name,\n"
        "    'heavy': sorted(k for k in ('torch', 'transformers', 'prefect', 'datasets', 'vllm', 'unsloth')\n"
        "                    if k in sys.modules)}))\n"
    )
    done = _python(probe, _without_modal_credentials(tmp_path))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["name"] == "vlmpipe"
    assert report["heavy"] == []
    assert report["seconds"] < 10


def test_every_stage_has_its_gpu_timeout_volume_secret_and_image():
    # The defaults are StageGpus' (train on an A100-80GB, export and data on CPU); VLMPIPE_GPU_* in the
    # environment of `modal deploy` overrides them (tested below), and so it does here.
    assert modal_app.stage_gpus({}) == StageGpus()
    assert (StageGpus().train, StageGpus().export, StageGpus().prepare_dataset) == ("A100-80GB", None, None)
    gpus = modal_app.stage_gpus()
    expected = {
        # stage: (gpu, image, timeout_s)
        "prepare_dataset": (gpus.prepare_dataset, modal_app.cpu_image, 2 * 3600),
        "prepare_model": (gpus.prepare_model, modal_app.cpu_image, 3600),
        "train": (gpus.train, modal_app.gpu_image, 24 * 3600),
        "export": (gpus.export, modal_app.cpu_image, 3600),  # the merge runs on the CPU: no idle GPU billed
        "evaluate": (gpus.evaluate, modal_app.cpu_image, 2 * 3600),
        "serve": (None, modal_app.cpu_image, modal_app.SERVE_READY_TIMEOUT_S + 300),  # the endpoint has the GPU
    }
    for stage, (gpu, image, timeout_s) in expected.items():
        function = getattr(modal_app, stage)
        spec = function._spec_
        assert spec.gpus == gpu, stage
        assert _same(spec.image, image), stage
        assert list(spec.volumes) == ["/data"] and _same(spec.volumes["/data"], modal_app.volume), stage
        assert len(spec.secrets) == 1 and _same(spec.secrets[0], modal_app.secret), stage
        deployed = _deployed(function)
        assert deployed["timeout"] == timeout_s, stage
        assert deployed["single_use_containers"] is True, stage  # a fresh view of the Volume per call
        assert deployed["webhook_config"] is None, stage
    assert modal_app.volume.name == "vlmpipe-data"
    assert modal_app.DATA_DIR == "/data"
    assert modal_app.CONTAINER_ENV["VLMPIPE_HOME"] == "/data"
    assert modal_app.CONTAINER_ENV["HF_HOME"] == "/data/hf-cache"


def test_every_job_stage_has_a_function_of_its_name():
    from modal_jobs.jobs import JOBS

    for stage in JOBS:
        function = getattr(modal_app, stage, None)
        assert function is not None and function.__class__ is modal.Function, stage
        assert stage in modal_app.STAGE_SPECS, stage
        assert function._spec_.gpus == (None if stage == "serve" else modal_app.STAGE_SPECS[stage].gpu), stage
    assert ModalExecutor(ModalConfig()).gpu_for("encode_images") == modal_app.STAGE_SPECS["encode_images"].gpu


def test_train_is_retried_in_a_fresh_container_and_nothing_else_is():
    retry = _deployed(modal_app.train)["retry_policy"]
    assert retry is not None and retry.retries == 3
    assert retry.initial_delay_ms == 10_000 and retry.backoff_coefficient == 2.0
    for stage in ("prepare_dataset", "prepare_model", "encode_images", "export", "evaluate", "serve"):
        assert _deployed(getattr(modal_app, stage))["retry_policy"] is None, stage  # Prefect retries those


def test_the_endpoint_is_vllm_on_an_l40s_scaling_to_zero():
    spec = modal_app.vllm_server._spec_
    assert StageGpus().serve == "L40S" and spec.gpus == modal_app.stage_gpus().serve
    assert _same(spec.image, modal_app.vllm_image)
    assert list(spec.volumes) == ["/data"] and _same(spec.secrets[0], modal_app.secret)
    deployed = _deployed(modal_app.vllm_server)
    webhook = deployed["webhook_config"]
    assert webhook is not None and webhook.web_server_port == 8000
    assert webhook.web_server_startup_timeout == 5 * 60
    assert deployed["max_concurrent_inputs"] == 50
    assert deployed["scaledown_window"] == 3 * 60
    assert deployed["max_containers"] == 2


def test_images_pin_the_unsloth_stack_and_vllm():
    pins = modal_app.GPU_IMAGE_PINS
    assert {k: pins[k] for k in ("unsloth", "unsloth_zoo", "trl", "transformers", "peft", "datasets")} == {
        "unsloth": "2026.10.9", "unsloth_zoo": "2026.10.9", "trl": "1.15.0", "transformers": "5.17.0",
        "peft": "0.21.2", "datasets": "4.8.5",
    }
    # The server's tokenizer and processor are the training ones.
    vllm = modal_app.lock_pins("vllm")
    assert vllm["vllm"] == "0.33.0" and vllm["transformers"] == pins["transformers"] == "5.17.0"
    assert "devel" in modal_app.CUDA_BASE_IMAGE
    # Each image installs its lock, and every line of a lock is one exact version (tests/test_modal_images.py
    # checks what each function imports against it).
    for image in ("cpu", "gpu", "vllm"):
        lines = [line.split("#", 1)[0].strip() for line in Path(modal_app.lock_path(image)).read_text().splitlines()]
        assert all("==" in line for line in lines if line), image


def test_gpu_types_and_app_name_come_from_the_environment_at_deploy_time(tmp_path):
    env = _without_modal_credentials(tmp_path)
    env.update(VLMPIPE_GPU_TRAIN="H100", VLMPIPE_GPU_EXPORT="cpu", VLMPIPE_MODAL_APP="vlmpipe-test")
    done = _python("import modal_jobs.app as m; print(m.app.name, m.train._spec_.gpus, m.export._spec_.gpus)", env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["vlmpipe-test", "H100", "None"]

    env.update(VLMPIPE_GPU_TRAIN="K80")
    done = _python("import modal_jobs.app", env)
    assert done.returncode != 0
    assert "K80" in done.stderr and "A100-80GB" in done.stderr  # the error names the choices


def test_a_stage_function_body_is_the_job_the_local_executor_runs(vlmpipe_home):
    """`.local()` runs the Modal function's body here (no Volume outside a container): same job, same result."""
    request = {"model": {"source": "builtin:tiny-gemma3"}, "output_dir": "models/tiny"}
    with pytest.warns(UserWarning, match="executing locally"):
        answer = modal_app.prepare_model.local(request)
    assert answer["ok"] is True
    first = PrepareModelResult.model_validate(answer["result"])
    again = run_job("prepare_model", request)  # the local executor's entry point, on the same storage root
    assert again.cached is True
    assert again.model_dump() == {**first.model_dump(), "cached": True}
    assert (vlmpipe_home / "models" / "tiny" / "config.json").is_file()


def test_bad_input_is_answered_not_raised_so_modal_does_not_retry_it(vlmpipe_home):
    with pytest.warns(UserWarning):
        answer = modal_app.prepare_model.local({"model": {"source": str(vlmpipe_home / "missing")},
                                                 "output_dir": "models/x"})
    assert answer["ok"] is False and answer["error_type"] == "InputError"
    with pytest.warns(UserWarning):
        answer = modal_app.prepare_model.local({"model": {"source": "builtin:tiny-gemma3"}, "output_dir": "m",
                                                 "typo": 1})
    assert answer["ok"] is False and answer["error_type"] == "ValidationError"


# --- serving -------------------------------------------------------------------------------------------------


def test_the_evaluation_server_command_applies_the_serve_config(vlmpipe_home, tiny_model_dir):
    import shutil

    from modal_jobs.config import ServeConfig

    shutil.copytree(tiny_model_dir, vlmpipe_home / "runs" / "k" / "merged")
    request = {"serve": {"max_model_len": 4096, "max_images_per_request": 2, "gpu_memory_utilization": 0.5},
               "model_dir": "runs/k/merged", "session": "run-1"}
    typed, model_path, model_name = modal_app.serve_settings(request)
    assert (model_path, model_name) == ("/data/runs/k/merged", "runs/k/merged")
    argv = modal_app.vllm_command(model_path, model_name, typed.serve)
    assert argv[:3] == ["vllm", "serve", "/data/runs/k/merged"]
    flags = " ".join(argv)
    for flag in ("--served-model-name runs/k/merged", "--enforce-eager", "--gpu-memory-utilization 0.5",
                 "--tensor-parallel-size 1", "--host 0.0.0.0", "--port 8000", "--max-model-len 4096",
                 '--limit-mm-per-prompt {"image": 2}'):
        assert flag in flags
    assert "--trust-remote-code" not in argv and "--api-key" not in argv
    # The same flags as the local vLLM backend builds from the same config.
    from modal_jobs.serve import vllm_arguments

    assert argv == vllm_arguments("vllm", model_path, model_name, typed.serve, "0.0.0.0", 8000)

    # One server per (model, serve config, flow run): a retry finds it again, another pipeline never does.
    name = modal_app.sandbox_name(typed)
    assert name == modal_app.sandbox_name(modal_app.serve_settings(request)[0])
    assert name != modal_app.sandbox_name(modal_app.serve_settings({**request, "session": "run-2"})[0])

    # A key stays out of argv; it reaches vLLM only when the config asks for one.
    environ = {"PATH": "/bin", "VLLM_API_KEY": "stray", "MY_KEY": "sk-test"}
    assert modal_app.key_environment(ServeConfig(), environ) == {}
    assert modal_app.key_environment(ServeConfig(api_key_env="MY_KEY"), environ) == {"VLLM_API_KEY": "sk-test"}

    for bad, why in (({"serve": {}, "model_dir": "runs/none"}, "config.json"),
                     ({"serve": {"backend": "transformers"}, "model_dir": "runs/k/merged"}, "vLLM"),
                     ({"serve": {}, "model_dir": str(tiny_model_dir)}, "not on the Volume"),
                     ({"serve": {"api_key_env": "UNSET_KEY_NAME"}, "model_dir": "runs/k/merged"}, "Secret")):
        with pytest.raises(InputError, match=why):
            modal_app.serve_settings(bad)


def test_the_production_endpoint_serves_the_published_champion_only():
    """What vllm_server serves comes from serving/<registry>.json, which only promotion and rollback write."""
    from modal_jobs.config import PipelineConfig
    from modal_jobs.registry import Entry
    from tasks.champion import serving_record

    config = PipelineConfig.model_validate({"serve": {"max_model_len": 2048}, "promote": {"registry_name": "r"}})
    champion = Entry(event="promoted", merged_dir="runs/a/merged-b", metric="cer", metrics={}, decided_at="t",
                     reason="better")
    record = serving_record(config, champion)
    serving = modal_app.champion_to_serve(json.dumps(record))
    assert serving == {"model_dir": "runs/a/merged-b", "serve": config.serve.model_dump(mode="json")}
    assert modal_app.champion_to_serve(json.dumps(serving_record(config, None))) is None


class _Models(BaseHTTPRequestHandler):
    """An OpenAI-style /v1/models answer, as vLLM gives it, for the readiness check."""

    served = "runs/k/merged"

    def do_GET(self):  # noqa: N802
        if self.path != "/v1/models":
            self.send_error(404)
            return
        body = json.dumps({"object": "list", "data": [{"id": self.served, "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_the_endpoint_counts_as_ready_only_when_it_lists_our_model():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert modal_app.endpoint_serves(f"{url}/v1", "runs/k/merged", None, timeout_s=5)
        # A server answering for another model (someone else's) is not ours.
        assert not modal_app.endpoint_serves(f"{url}/v1", "models/base", None, timeout_s=5)
        assert not modal_app.endpoint_serves("http://127.0.0.1:9/v1", "runs/k/merged", None, timeout_s=2)
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def prefect_database(tmp_path_factory):
    """Prefect's ephemeral API on a database of this module's own, not the user's ~/.prefect (~10 s once;
    prefect_test_harness costs more). At exit Prefect logs "Stopping temporary server" to pytest's closed
    stdout: a harmless "Logging error" after the summary."""
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, temporary_settings

    database = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('prefect') / 'prefect.db'}"
    with temporary_settings({PREFECT_API_DATABASE_CONNECTION_URL: database}):
        yield database


# --- the executor --------------------------------------------------------------------------------------------


class StandInCall:
    """Stands in for the remote Modal call only (modal.FunctionCall): while the 'job' runs, get() waits
    `timeout` seconds and raises Modal's own TimeoutError, as the real one does; then it returns or raises
    what the remote function would. cancel() ends the wait, as a cancelled call does."""

    def __init__(self, outcome, polls_before_done: int = 0):
        self.object_id = "fc-standin"
        self.outcome = outcome
        self.pending = polls_before_done
        self._cancelled = threading.Event()
        self.timeouts: list[float] = []

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def get(self, timeout=None):
        self.timeouts.append(timeout)
        if self.pending > 0:
            self.pending -= 1
            if self._cancelled.wait(timeout):
                raise modal.exception.RemoteError("the function call was cancelled")
            raise modal.exception.TimeoutError()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self, terminate_containers=False):
        self._cancelled.set()


class StandInFunction:
    """Stands in for the deployed modal.Function: records spawn() arguments and with_options()."""

    def __init__(self, call: StandInCall, spawn_error: Exception | None = None):
        self.call = call
        self.spawn_error = spawn_error
        self.spawned: list = []
        self.options: dict = {}

    def with_options(self, **options):
        self.options.update(options)
        return self

    def spawn(self, *args):
        if self.spawn_error is not None:
            raise self.spawn_error
        self.spawned.append(args)
        return self.call


class StandInClient:
    """Stands in for tasks.modal_executor.ModalClient (the remote service) around one function and its call."""

    def __init__(self, function: StandInFunction | None = None, read=None, lookups: list | None = None):
        self.function_, self.read, self.lookups = function, read or (lambda path: b"{}"), lookups

    def credentials_configured(self):
        return True

    def function(self, app_name, stage):
        if self.lookups is not None:
            self.lookups.append((app_name, stage))
        return self.function_

    def call(self, call_id):
        return self.function_.call

    def read_file(self, path):
        return self.read(path)


def _executor(function: StandInFunction, lookups: list | None = None, **settings) -> ModalExecutor:
    return ModalExecutor(ModalConfig(poll_interval_s=0.01, **settings), client=StandInClient(function, lookups=lookups))


def _model_request() -> PrepareModelRequest:
    return PrepareModelRequest(model={"source": "builtin:tiny-gemma3"}, output_dir="models/tiny")


def _ok(result: dict) -> dict:
    return {"ok": True, "result": result}


RESULT = {"path": "models/tiny", "fingerprint": "f", "source_fingerprint": "s", "architecture": "A",
          "num_parameters": 1, "cached": False}


def test_executor_spawns_polls_and_returns_the_typed_result(vlmpipe_home):
    """Stand-in for the remote Modal call only."""
    call = StandInCall(_ok(RESULT), polls_before_done=3)
    function = StandInFunction(call)
    lookups: list = []
    polls: list = []
    result = _executor(function, lookups, app_name="my-app").run("prepare_model", _model_request(),
                                                                on_poll=lambda: polls.append(1))
    assert isinstance(result, PrepareModelResult) and result.path == "models/tiny"
    assert lookups == [("my-app", "prepare_model")]
    assert function.spawned == [(_model_request().model_dump(mode="json"),)]
    assert function.options == {}  # prepare_model is a CPU stage: the deployed function as it is
    assert call.timeouts == [0.01] * 4
    assert len(polls) == 4  # each interval, and once at the end
    assert not call.cancelled


def test_executor_applies_the_configured_gpu(vlmpipe_home):
    """Stand-in for the remote Modal call only."""
    function = StandInFunction(StandInCall(_ok(RESULT)))
    _executor(function, gpu={"prepare_model": "H100"}).run("prepare_model", _model_request())
    assert function.options == {"gpu": "H100"}


@pytest.mark.parametrize(
    ("remote", "expected", "message"),
    [
        (ValueError("bad row 7"), InputError, "bad row 7"),  # a remote exception re-raised with its type
        (InputError("no config.json"), InputError, "no config.json"),
        (modal.exception.InternalFailure("worker lost"), TransientJobError, "worker lost"),
        (modal.exception.FunctionTimeoutError("24h"), TransientJobError, "FunctionTimeoutError"),
        (modal.exception.OutputExpiredError(), TransientJobError, "OutputExpiredError"),
        (modal.exception.ExecutionError("could not deserialize"), TransientJobError, "deserialize"),
        (RuntimeError("CUDA error"), TransientJobError, "CUDA error"),
    ],
)
def test_executor_maps_remote_failures(vlmpipe_home, remote, expected, message):
    """Stand-in for the remote Modal call only."""
    call = StandInCall(remote, polls_before_done=1)
    with pytest.raises(expected, match=message) as raised:
        _executor(StandInFunction(call)).run("prepare_model", _model_request())
    assert expected is not InputError or not isinstance(raised.value, TransientJobError)
    assert call.cancelled  # harmless on a finished call; essential on a running one


def test_executor_maps_answered_errors(vlmpipe_home):
    """Stand-in for the remote Modal call only."""
    call = StandInCall({"ok": False, "error_type": "FileNotFoundError", "message": "no such dataset"})
    with pytest.raises(InputError, match="no such dataset"):
        _executor(StandInFunction(call)).run("prepare_model", _model_request())
    assert not call.cancelled
    call = StandInCall({"ok": False, "error_type": "OSError", "message": "disk full"})
    with pytest.raises(TransientJobError, match="disk full"):
        _executor(StandInFunction(call)).run("prepare_model", _model_request())
    call = StandInCall(RESULT)  # a bare result: an app deployed from other code
    with pytest.raises(TransientJobError, match="Redeploy"):
        _executor(StandInFunction(call)).run("prepare_model", _model_request())


@pytest.mark.parametrize(
    ("spawn_error", "expected", "message"),
    [
        (modal.exception.AuthError("Token missing"), ModalAuthError, "modal setup"),
        (modal.exception.NotFoundError("App 'vlmpipe' not found"), InputError, "modal deploy"),
        (modal.exception.ConnectionError("unreachable"), TransientJobError, "unreachable"),
    ],
)
def test_executor_maps_spawn_failures(vlmpipe_home, spawn_error, expected, message):
    """Stand-in for the remote Modal call only."""
    with pytest.raises(expected, match=message):
        _executor(StandInFunction(StandInCall(None), spawn_error)).run("prepare_model", _model_request())


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt(), "termination"])
def test_cancelling_the_task_cancels_the_modal_call(vlmpipe_home, interrupt):
    """Stand-in for the remote Modal call only: the call never finishes; the task is cancelled mid-poll."""
    from prefect.exceptions import TerminationSignal

    signal_ = TerminationSignal(15) if interrupt == "termination" else interrupt
    call = StandInCall(_ok(RESULT), polls_before_done=10**6)
    polls = []

    def cancel_on_third_poll():
        polls.append(1)
        if len(polls) == 3:
            raise signal_

    with pytest.raises(type(signal_)):
        _executor(StandInFunction(call)).run("prepare_model", _model_request(), on_poll=cancel_on_third_poll)
    assert call.cancelled


def _spawn_signalling(call: StandInCall) -> tuple[StandInFunction, threading.Event]:
    function = StandInFunction(call)
    spawned = threading.Event()
    spawn = function.spawn

    def spawn_and_signal(*args):
        result = spawn(*args)
        spawned.set()
        return result

    function.spawn = spawn_and_signal
    return function, spawned


def test_a_flow_interrupted_by_ctrl_c_cancels_its_tasks_calls(vlmpipe_home, prefect_database):
    """Stand-in for the remote Modal call only; a real flow and a real thread-pool task. Ctrl-C reaches the
    flow's thread, never the task's, and Prefect waits for the task before it marks the run: the flow's
    thread must stop the calls (stop_running_calls), or the task waits for ever."""
    from prefect import flow, task
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from tasks.modal_executor import RunStopped, stop_running_calls

    call = StandInCall(_ok(RESULT), polls_before_done=10**6)  # a job that would run for ever
    function, spawned = _spawn_signalling(call)
    executor = ModalExecutor(ModalConfig(poll_interval_s=1), client=StandInClient(function))
    seen = {}

    @task(name="prepare_model", retries=2, retry_delay_seconds=0)
    def stage_task():
        try:
            return executor.run("prepare_model", _model_request())
        except BaseException as error:
            seen["error"] = error
            raise

    @flow
    def interrupted():
        stage_task.submit()
        assert spawned.wait(30)
        try:
            raise KeyboardInterrupt  # what Ctrl-C does to the flow's thread, wherever it waits
        except BaseException:
            stop_running_calls()
            raise

    started = time.monotonic()
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        with pytest.raises(KeyboardInterrupt):
            interrupted()
    assert call.cancelled
    assert isinstance(seen["error"], RunStopped)  # not retried: the task ran once
    assert time.monotonic() - started < 30


def test_a_flow_run_cancelled_from_the_api_cancels_its_calls(vlmpipe_home, prefect_database):
    """Stand-in for the remote Modal call only; a real flow, task and API. A cancel from the UI sets the
    flow run Cancelling before the runner signals the process: the waiting task sees it and cancels."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.states import Cancelling

    call = StandInCall(_ok(RESULT), polls_before_done=10**6)
    function, spawned = _spawn_signalling(call)
    executor = ModalExecutor(ModalConfig(poll_interval_s=1), client=StandInClient(function))

    @task(name="prepare_model")
    def stage_task():
        return executor.run("prepare_model", _model_request())

    @flow
    def cancelled_from_the_ui():
        future = stage_task.submit()
        assert spawned.wait(30)
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
        future.wait(30)
        return future.state.name

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        try:
            cancelled_from_the_ui()
        except BaseException:
            pass  # how the engine ends a run it finds Cancelling is Prefect's business, not this test's
    assert call.cancelled


def test_training_progress_is_mirrored_from_the_volume(vlmpipe_home):
    """Stand-in for the remote Modal call and the Volume read only."""
    progress = {"step": 5, "max_steps": 10, "history": []}
    request = TrainRequest(train={}, model={}, dataset_dir="datasets/d", model_dir="models/m",
                           output_dir="runs/k", instruction="x")
    call = StandInCall({"ok": True, "result": {
        "adapter_dir": "runs/k/lora", "checkpoints_dir": "runs/k/checkpoints", "backend": "unsloth",
        "global_step": 10, "train_loss": 0.1, "train_samples": 40, "runtime_s": 1.0}}, polls_before_done=2)
    reads = []

    def read(path):
        reads.append(path)
        return json.dumps(progress).encode()

    executor = ModalExecutor(ModalConfig(poll_interval_s=0.01), client=StandInClient(StandInFunction(call), read))
    seen = []
    executor.run("train", request, on_poll=lambda: seen.append(
        json.loads((vlmpipe_home / "runs" / "k" / "progress.json").read_text())["step"]))
    assert reads and set(reads) == {"runs/k/progress.json"}
    assert seen[-1] == 5


def test_outputs_are_read_from_the_volume():
    """Stand-in for the Volume read only (modal.Volume.read_file raises FileNotFoundError for a missing path)."""
    files = {"evals/k.json": b'{"metrics": {}}', "runs/k/lora/vlmpipe_manifest.json": b"{}"}

    def read(path):
        if path not in files:
            raise FileNotFoundError(path)
        return files[path]

    executor = ModalExecutor(ModalConfig(), client=StandInClient(read=read))
    assert json.loads(executor.read_text("evals/k.json")) == {"metrics": {}}
    assert executor.output_exists("runs/k/lora") and executor.output_exists("evals/k.json")
    assert not executor.output_exists("runs/other/lora") and not executor.output_exists("evals/none.json")


def test_library_versions_are_the_gpu_image_pins():
    versions = ModalExecutor(ModalConfig()).library_versions()
    assert versions == {"torch": "2.13.0", "transformers": "5.17.0", "peft": "0.21.2", "trl": "1.15.0",
                        "accelerate": "1.15.0", "unsloth": "2026.10.9", "unsloth_zoo": "2026.10.9"}


def test_get_executor_gives_the_modal_executor():
    executor = get_executor(ExecutorSpec(name="modal", modal=ModalConfig(app_name="x")))
    assert isinstance(executor, ModalExecutor) and executor.name == "modal" and executor.settings.app_name == "x"


def test_without_a_token_the_executor_fails_at_once_with_the_fix(tmp_path):
    """No stand-ins: the real executor and the real Modal client, on a machine with no Modal credentials."""
    probe = (
        "import json, time\n"
        "from modal_jobs.config import ModalConfig\n"
        "from modal_jobs.schemas import PrepareModelRequest\n"
        "from tasks.modal_executor import ModalAuthError, ModalClient, ModalExecutor\n"
        "class Bypassed(ModalClient):\n"
        "    def credentials_configured(self):\n"
        "        return True\n"
        "request = PrepareModelRequest(model={'source': 'builtin:tiny-gemma3'}, output_dir='models/x')\n"
        "report = {}\n"
        "for label, executor in (('checked', ModalExecutor(ModalConfig())),\n"
        "        ('client', ModalExecutor(ModalConfig(), client=Bypassed()))):\n"
        "    started = time.monotonic()\n"
        "    try:\n"
        "        executor.run('prepare_model', request)\n"
        "    except ModalAuthError as error:\n"
        "        report[label] = {'seconds': time.monotonic() - started, 'message': str(error)}\n"
        "print(json.dumps(report))\n"
    )
    env = _without_modal_credentials(tmp_path)
    env["VLMPIPE_HOME"] = str(tmp_path / "vlmpipe")
    done = _python(probe, env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # Our own check, before any network call...
    assert report["checked"]["seconds"] < 2
    assert "modal setup" in report["checked"]["message"] and "MODAL_TOKEN_ID" in report["checked"]["message"]
    # ...and, were it bypassed, Modal's client refuses at once too, and says the same.
    assert report["client"]["seconds"] < 2
    assert "modal setup" in report["client"]["message"]


def test_call_id_and_cost_are_recorded_on_the_task_run_and_no_secret_leaks(vlmpipe_home, monkeypatch,
                                                                         prefect_database):
    """Stand-in for the remote Modal call only; a real Prefect flow and task (ephemeral API)."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    monkeypatch.setenv("HF_TOKEN", "hf_secret_sentinel")
    call = StandInCall(_ok(RESULT), polls_before_done=2)
    call.object_id = "fc-recorded"
    executor = _executor(StandInFunction(call), gpu={"prepare_model": "H100"})

    @task(name="prepare_model")
    def stage_task():
        return executor.run("prepare_model", _model_request())

    @flow
    def one_stage():
        from prefect.runtime import flow_run

        return stage_task(), flow_run.id

    async def artifacts(flow_run_id):
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                key=ArtifactFilterKey(any_=["modal-call-prepare-model", "cost-prepare-model"])))

    import asyncio

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        result, flow_run_id = one_stage()
        assert result.path == "models/tiny"
        found = {a.key: a for a in asyncio.run(artifacts(flow_run_id))}
    assert set(found) == {"modal-call-prepare-model", "cost-prepare-model"}
    assert "fc-recorded" in str(found["modal-call-prepare-model"].data)
    assert found["modal-call-prepare-model"].task_run_id is not None
    cost = found["cost-prepare-model"].data
    rows = json.loads(cost) if isinstance(cost, str) else cost
    prices = ModalConfig()
    spec = modal_app.STAGE_SPECS["prepare_model"]
    expected = (prices.gpu_price_per_hour["H100"] + spec.cpu * prices.cpu_core_price_per_hour
                + spec.memory_mib / 1024 * prices.memory_gib_price_per_hour)
    assert rows[0]["gpu"] == "H100" and rows[0]["usd_per_hour"] == pytest.approx(expected, abs=1e-4)
    assert rows[0]["cpu_cores"] == spec.cpu
    for artifact in found.values():
        assert "hf_secret_sentinel" not in f"{artifact.data} {artifact.description}"


# --- configs -------------------------------------------------------------------------------------------------


def test_the_shipped_configs_are_valid():
    modal_config = load_config(REPO / "configs" / "modal.yaml")
    assert modal_config.executor == "modal"
    assert modal_config.model.source == "unsloth/gemma-3-4b-it"
    assert modal_config.dataset.source == "unsloth/LaTeX_OCR"
    assert modal_config.modal.app_name == modal_app.APP_NAME
    assert modal_config.modal.gpu.train == modal_app.STAGE_SPECS["train"].gpu

    local = load_config(REPO / "configs" / "latex_ocr.yaml")
    assert local.executor == "local"
    recipe = PipelineConfig()
    assert local.model.source == "unsloth/gemma-3-4b-it" and local.dataset.source == "unsloth/LaTeX_OCR"
    assert local.train == recipe.train and local.evaluate == recipe.evaluate
