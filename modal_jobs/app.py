"""The Modal app: the only module that knows Modal. Images, the Volume, the Secret, GPU types, timeouts, and
one thin function per stage around the same job function the local executor runs.

Deploy (from the repository root):   modal deploy modal_jobs/app.py      (or: modal deploy -m modal_jobs.app)
Then run the pipeline on it:         vlmpipe run --config configs/modal.yaml          (see docs/modal.md)

Deploy-time settings, read from the environment when this module is imported by `modal deploy`:
    VLMPIPE_MODAL_APP        the app's name (default "vlmpipe"); the config's `modal.app_name` must match
    VLMPIPE_GPU_<STAGE>      GPU type per stage, e.g. VLMPIPE_GPU_TRAIN=H100; "cpu" for none. Checked against
                             modal_jobs.config.MODAL_GPU_TYPES, so a typo fails the deploy instead of a run.

Every stage function takes the request as a JSON dict and answers with an envelope, like modal_jobs.runner:
{"ok": true, "result": {...}} or {"ok": false, "error_type": ..., "message": ...} for bad input. Bad input is
answered, not raised, because Modal retries every raised exception and a retry cannot fix a bad config; any
other failure is raised, so Modal's retries (train) and then the Prefect task's retries get their turn.

Serving: `serve` (the executor's stage) writes the model to serve into /data/serving/current.json, commits,
and waits until the `vllm_server` web endpoint answers for that model. `vllm_server` reads that file when a
container starts, and watches it: when it names another model, the container stops taking requests and
exits, so the next request starts a fresh container on the new model. One app serves one model at a time.

Importing this module is cheap and offline: no token, no network, no torch. Nothing here contacts Modal
until a function runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import modal

from modal_jobs.config import MODAL_GPU_TYPES, StageGpus
from modal_jobs.errors import INPUT_ERROR_TYPES, InputError

MINUTES = 60  # seconds
HOURS = 60 * MINUTES

APP_NAME = os.environ.get("VLMPIPE_MODAL_APP", "vlmpipe")
VOLUME_NAME = "vlmpipe-data"
SECRET_NAME = "vlmpipe-secrets"  # HF_TOKEN, optionally WANDB_API_KEY and an endpoint key (see docs/modal.md)
DATA_DIR = "/data"  # the Volume's mount point, and the storage root (VLMPIPE_HOME) in every container
SERVING_POINTER = "serving/current.json"  # relative to the storage root: which model the endpoint serves
WEB_PORT = 8000
WEB_STARTUP_TIMEOUT_S = 5 * MINUTES  # loading 8.6 GB of weights onto an L40S takes a few minutes cold
POINTER_POLL_S = 15  # how often a serving container checks whether it should hand over to a new model
SERVE_READY_TIMEOUT_S = 12 * MINUTES  # a cold start, plus an old container draining and handing over

# --- images, from committed lock files -----------------------------------------------------------------------
# Each image installs exactly its lock, modal_jobs/locks/<image>.txt: every package, dependencies included, at
# one version, resolved by uv for the image's Python and platform from the direct requirements in <image>.in
# (whose comments say why each pin is what it is). Regenerate with `python -m scripts.lock_images`;
# tests/test_modal_images.py checks that every module each Modal function imports is in its image's lock.
#   cpu:  prepare_dataset, prepare_model, export (the merge), serve, evaluate     Python 3.11
#   gpu:  encode_images, train, consistency (Unsloth 2026.10.9's stack)           Python 3.11
#   vllm: the production endpoint and each evaluation's vLLM Sandbox              Python 3.12 (vLLM 0.33's wheels)
PYTHON_VERSION = "3.11"
VLLM_PYTHON_VERSION = "3.12"
IMAGE_PYTHON: dict[str, str] = {"cpu": PYTHON_VERSION, "gpu": PYTHON_VERSION, "vllm": VLLM_PYTHON_VERSION}
# Modal runs x86_64 Linux; manylinux_2_28 wheels install on every base here (glibc 2.35 or newer).
LOCK_PLATFORM = "x86_64-manylinux_2_28"
LOCKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "locks")
# torch 2.13.0 on PyPI is a CUDA 13 build for Linux (in every lock), hence the CUDA 13.0 toolkit in the GPU base
# images (Triton and bitsandbytes find a matching ptxas/nvcc).
CUDA_BASE_IMAGE = "nvidia/cuda:13.0.1-devel-ubuntu22.04"


def lock_path(image: str) -> str:
    """The lock file of an image ("cpu", "gpu", "vllm"); an absolute path, so `modal deploy` works from anywhere."""
    return os.path.join(LOCKS_DIR, f"{image}.txt")


def lock_pins(image: str) -> dict[str, str]:
    """Every package of an image's lock -> its version, names with '_' for '-' (as NUMERICS_LIBRARIES and
    import names spell them: unsloth_zoo, huggingface_hub)."""
    pins: dict[str, str] = {}
    with open(lock_path(image)) as lock:
        for line in lock:
            requirement = line.split("#", 1)[0].split(";", 1)[0].strip()
            if "==" in requirement:
                name, version = requirement.split("==", 1)
                pins[name.strip().lower().replace("-", "_").replace(".", "_")] = version.strip()
    return pins


def __getattr__(name: str) -> Any:
    # GPU_IMAGE_PINS: the GPU image's versions, which are the train key's library versions for a Modal run
    # (tasks/modal_executor.py). Read on first use, not at import: containers get modal_jobs' .py files only.
    if name == "GPU_IMAGE_PINS":
        return lock_pins("gpu")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


CONTAINER_ENV = {
    "VLMPIPE_HOME": DATA_DIR,  # modal_jobs.storage's root: outputs land on the Volume
    "HF_HOME": f"{DATA_DIR}/hf-cache",  # hub downloads persist on the Volume between containers
    "PYTHONUNBUFFERED": "1",  # job output reaches `modal app logs` as it happens
}

cpu_image = (
    modal.Image.debian_slim(python_version=PYTHON_VERSION)
    .uv_pip_install(requirements=[lock_path("cpu")])
    .env(CONTAINER_ENV)
    .add_local_python_source("modal_jobs")
)

gpu_image = (
    modal.Image.from_registry(CUDA_BASE_IMAGE, add_python=PYTHON_VERSION)
    .entrypoint([])  # the CUDA image's entrypoint only prints a banner
    .uv_pip_install(requirements=[lock_path("gpu")])
    .env(CONTAINER_ENV)
    .add_local_python_source("modal_jobs")
)

vllm_image = (
    modal.Image.from_registry(CUDA_BASE_IMAGE, add_python=VLLM_PYTHON_VERSION)
    .entrypoint([])
    .uv_pip_install(requirements=[lock_path("vllm")])
    # FlashInfer's sampler compiles kernels with nvcc on first use; vLLM's own sampler needs no compiler.
    .env({**CONTAINER_ENV, "VLLM_USE_FLASHINFER_SAMPLER": "0"})
    .add_local_python_source("modal_jobs")
)

# Lazy handles: neither needs a token or the network until a function that uses them runs.
volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)
secret = modal.Secret.from_name(SECRET_NAME)


# --- GPUs, timeouts, resources per stage --------------------------------------------------------------------


def stage_gpus(environ: dict[str, str] | None = None) -> StageGpus:
    """StageGpus defaults, overridden by VLMPIPE_GPU_<STAGE>; unknown GPU types are an error naming the fix."""
    environ = os.environ if environ is None else environ
    overrides: dict[str, str | None] = {}
    for stage in StageGpus.model_fields:
        value = environ.get(f"VLMPIPE_GPU_{stage.upper()}")
        if value is not None:
            value = value.strip()
            overrides[stage] = None if value.lower() in ("", "cpu", "none") else value
    try:
        gpus = StageGpus(**overrides)
    except ValueError as error:
        raise InputError(
            f"VLMPIPE_GPU_* names a GPU Modal does not offer ({error}); use one of {', '.join(MODAL_GPU_TYPES)} "
            "(optionally with :N for N GPUs), or 'cpu'"
        ) from error
    if gpus.serve is None:
        raise InputError("VLMPIPE_GPU_SERVE: the vLLM endpoint needs a GPU (e.g. L40S); it cannot be 'cpu'")
    return gpus


GPUS = stage_gpus()


@dataclass(frozen=True)
class StageSpec:
    image: modal.Image
    gpu: str | None
    timeout_s: int
    cpu: float  # cores requested
    memory_mib: int
    retries: modal.Retries | None = None


STAGE_SPECS: dict[str, StageSpec] = {
    # Downloads and decodes every image once (68,686 + 7,632 rows for LaTeX_OCR).
    "prepare_dataset": StageSpec(cpu_image, GPUS.prepare_dataset, 2 * HOURS, cpu=4.0, memory_mib=16 * 1024),
    "prepare_model": StageSpec(cpu_image, GPUS.prepare_model, 1 * HOURS, cpu=2.0, memory_mib=8 * 1024),
    # Modal's longest timeout. A preempted or crashed container is retried in a fresh one, and the job
    # resumes from its latest complete checkpoint on the Volume.
    # CPU and memory are billed on top of the GPU (for what is requested or used, whichever is more): enough
    # for the data loader and for the 8.6 GB of weights passing through host memory, no more.
    "train": StageSpec(
        gpu_image, GPUS.train, 24 * HOURS, cpu=4.0, memory_mib=32 * 1024,
        retries=modal.Retries(max_retries=3, initial_delay=10.0, backoff_coefficient=2.0, max_delay=60.0),
    ),
    # The frozen vision tower run once over every image, so training can read features instead of pixels
    # (~5.5 TFLOP an image at 896 px). On the training GPU unless StageGpus names one for it.
    "encode_images": StageSpec(
        gpu_image, GPUS.encode_images, 3 * HOURS, cpu=4.0, memory_mib=32 * 1024
    ),
    "export": StageSpec(gpu_image, GPUS.export, 1 * HOURS, cpu=4.0, memory_mib=32 * 1024),
    # Base + adapter beside the merged model on a handful of images, and a few requests to the endpoint.
    "consistency": StageSpec(gpu_image, GPUS.consistency, 1 * HOURS, cpu=4.0, memory_mib=48 * 1024),
    # Points the endpoint at a model and waits for it: no GPU of its own (the endpoint has one).
    "serve": StageSpec(cpu_image, None, SERVE_READY_TIMEOUT_S + 5 * MINUTES, cpu=1.0, memory_mib=1024),
    "evaluate": StageSpec(cpu_image, GPUS.evaluate, 2 * HOURS, cpu=2.0, memory_mib=4 * 1024),
}

app = modal.App(APP_NAME)


def _function_options(stage: str) -> dict[str, Any]:
    spec = STAGE_SPECS[stage]
    return dict(
        name=stage,
        image=spec.image,
        gpu=spec.gpu,
        volumes={DATA_DIR: volume},
        secrets=[secret],
        timeout=spec.timeout_s,
        cpu=spec.cpu,
        memory=spec.memory_mib,
        retries=spec.retries,
        # A fresh container per call: it sees the Volume as last committed, holds no files open from an
        # earlier call (which would make volume.reload() fail), and a retried train starts clean.
        single_use_containers=True,
    )


# --- the stage functions -------------------------------------------------------------------------------------


def _in_container() -> bool:
    return not modal.is_local()


def _enable_checkpoint_commits() -> None:
    """Commit the Volume whenever a job says its state must survive this container (each checkpoint), so a
    preempted train resumes from the last checkpoint rather than from the start.

    The trainer's on_save calls modal_jobs.storage.make_durable, which runs the hooks registered here.
    """
    from modal_jobs.storage import add_durability_hook

    add_durability_hook(volume.commit)


def _error_envelope(error: BaseException) -> dict[str, Any]:
    return {"ok": False, "error_type": type(error).__name__, "message": str(error)}


def run_stage(stage: str, request: dict[str, Any]) -> dict[str, Any]:
    """The body of every job function: the same `run_job` the local executor runs, between a Volume reload
    and a commit. Outside a container (`.local()`) there is no Volume to reload or commit."""
    from modal_jobs.jobs import run_job

    if _in_container():
        volume.reload()  # what other containers committed (a fresh container sees it already; this is cheap)
        _enable_checkpoint_commits()
    try:
        result = run_job(stage, request)
    except Exception as error:
        if type(error).__name__ not in INPUT_ERROR_TYPES:
            # Transient: Modal's retries (train) and then Prefect's get their turn. Outputs appear only whole
            # (atomic_output), so whatever this attempt left on the Volume is never taken for a result.
            raise
        traceback.print_exc()
        return _error_envelope(error)
    if _in_container():
        volume.commit()  # before returning: the next stage's container must see these outputs
    return {"ok": True, "result": result.model_dump(mode="json")}


@app.function(**_function_options("prepare_dataset"))
def prepare_dataset(request: dict[str, Any]) -> dict[str, Any]:
    return run_stage("prepare_dataset", request)


@app.function(**_function_options("prepare_model"))
def prepare_model(request: dict[str, Any]) -> dict[str, Any]:
    return run_stage("prepare_model", request)


@app.function(**_function_options("train"))
def train(request: dict[str, Any]) -> dict[str, Any]:
    return run_stage("train", request)


@app.function(**_function_options("encode_images"))
def encode_images(request: dict[str, Any]) -> dict[str, Any]:
    return run_stage("encode_images", request)


@app.function(**_function_options("export"))
def export(request: dict[str, Any]) -> dict[str, Any]:
    return run_stage("export", request)


@app.function(**_function_options("consistency"))
def consistency(request: dict[str, Any]) -> dict[str, Any]:
    return run_stage("consistency", request)


@app.function(**_function_options("evaluate"))
def evaluate(request: dict[str, Any]) -> dict[str, Any]:
    return run_stage("evaluate", request)


# --- serving -------------------------------------------------------------------------------------------------


def serving_pointer(request: dict[str, Any]) -> dict[str, Any]:
    """What the endpoint should serve, from a ServeRequest; InputError when it cannot be served."""
    from modal_jobs.schemas import ServeRequest
    from modal_jobs.storage import relative, resolve, storage_root

    typed = ServeRequest.model_validate(request)
    cfg = typed.serve
    if cfg.backend == "transformers":
        raise InputError("serve.backend=transformers: the Modal endpoint runs vLLM; use serve.backend auto or vllm")
    model_dir = resolve(typed.model_dir)
    try:
        model_dir.relative_to(storage_root())
    except ValueError:
        raise InputError(
            f"model_dir {typed.model_dir} is not on the Volume ({storage_root()}): give a storage-relative path, "
            "e.g. the export stage's runs/<key>/merged-<key>"
        ) from None
    if not (model_dir / "config.json").is_file():
        raise InputError(f"model_dir {typed.model_dir} has no config.json on the Volume: export a merged model first")
    if cfg.api_key_env is not None and not os.environ.get(cfg.api_key_env):
        raise InputError(
            f"serve.api_key_env names {cfg.api_key_env}, which the {SECRET_NAME} Secret does not set: add it with "
            f"`modal secret create --force {SECRET_NAME} ... {cfg.api_key_env}=...`"
        )
    name = relative(model_dir)  # the storage-relative path, as the local vLLM backend names it
    return {
        "model_dir": name,
        "model_name": name,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "enforce_eager": cfg.enforce_eager,
        "api_key_env": cfg.api_key_env,
    }


def vllm_command(pointer: dict[str, Any]) -> list[str]:
    """`vllm serve` for the pointed-at model. No --trust-remote-code: Gemma 3 is built into vLLM. No
    --api-key either: the key goes through the environment (VLLM_API_KEY), out of `ps` and the logs."""
    argv = [
        "vllm", "serve", f"{DATA_DIR}/{pointer['model_dir']}",
        "--served-model-name", pointer["model_name"],
        "--host", "0.0.0.0",
        "--port", str(WEB_PORT),
        "--tensor-parallel-size", "1",
        "--gpu-memory-utilization", str(pointer["gpu_memory_utilization"]),
    ]
    if pointer["enforce_eager"]:
        argv.append("--enforce-eager")
    return argv


def vllm_environment(pointer: dict[str, Any], environ: dict[str, str]) -> dict[str, str]:
    """The server's environment: an API key only when the served config asks for one (serve.api_key_env), so
    a key left in the Secret cannot lock out an evaluator that was not given it."""
    env = {name: value for name, value in environ.items() if name != "VLLM_API_KEY"}
    if pointer.get("api_key_env"):
        env["VLLM_API_KEY"] = environ[pointer["api_key_env"]]
    return env


def _pointer_identity(pointer: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in pointer.items() if k != "updated_at"}, sort_keys=True)


def _read_committed_pointer() -> dict[str, Any]:
    # Volume.read_file reads the last committed version over the API: unlike volume.reload() it does not
    # fail while vLLM holds files on the Volume open.
    return json.loads(b"".join(volume.read_file(SERVING_POINTER)))


def _watch_pointer(identity: str, process: subprocess.Popen) -> None:
    """Hand over when the pointer moves to another model; die with the server if it dies."""
    while process.poll() is None:
        time.sleep(POINTER_POLL_S)
        try:
            latest = _read_committed_pointer()
        except Exception as error:  # a blip in the API must not take the endpoint down
            print(f"warning: could not read {SERVING_POINTER}: {error}", file=sys.stderr)
            continue
        if _pointer_identity(latest) != identity:
            print(f"the endpoint now serves {latest.get('model_name')}: this container stops taking requests",
                  file=sys.stderr)
            try:
                import modal.experimental

                # Finish the requests in flight, take no more, exit; the next request starts a fresh container.
                modal.experimental.stop_fetching_inputs()
                return
            except Exception as error:
                print(f"warning: could not drain this container ({error}); stopping it", file=sys.stderr)
                process.terminate()
                os._exit(0)
    print(f"vllm exited with code {process.returncode}; stopping this container", file=sys.stderr)
    os._exit(1)


@app.function(
    image=vllm_image,
    gpu=GPUS.serve,
    volumes={DATA_DIR: volume},
    secrets=[secret],
    timeout=10 * MINUTES,  # per request: a long generation, never the container's life
    scaledown_window=3 * MINUTES,  # scale to zero after 3 idle minutes
    max_containers=2,
)
@modal.concurrent(max_inputs=50)
@modal.web_server(port=WEB_PORT, startup_timeout=WEB_STARTUP_TIMEOUT_S)
def vllm_server() -> None:
    """The OpenAI-compatible endpoint: vLLM on the model named in /data/serving/current.json."""
    from modal_jobs.storage import resolve

    pointer_path = resolve(SERVING_POINTER)
    if not pointer_path.is_file():
        raise RuntimeError(
            f"nothing to serve: {pointer_path} does not exist. Run the pipeline's serve stage, or call this app's "
            "`serve` function with {'serve': {}, 'model_dir': 'runs/<key>/merged-<key>'} (see docs/modal.md)"
        )
    pointer = json.loads(pointer_path.read_text())
    argv = vllm_command(pointer)
    print("$ " + " ".join(argv), file=sys.stderr)
    # Output goes to the container's log (`modal app logs`), never to a file on the Volume.
    process = subprocess.Popen(argv, env=vllm_environment(pointer, dict(os.environ)))
    threading.Thread(target=_watch_pointer, args=(_pointer_identity(pointer), process), daemon=True).start()


def endpoint_serves(base_url: str, model_name: str, api_key: str | None, timeout_s: float = 120.0) -> bool:
    """True once GET <base_url>/models lists `model_name`. A cold endpoint holds the request while a
    container starts, hence the long per-request timeout."""
    request = urllib.request.Request(f"{base_url}/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            listing = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False  # starting, handing over, or a blip: all mean "not yet"
    return any(entry.get("id") == model_name for entry in listing.get("data") or [])


def point_endpoint(request: dict[str, Any], web_url: str | None, ready_timeout_s: float) -> dict[str, Any]:
    """Write the serving pointer, commit it, and wait until the endpoint answers for that model."""
    from modal_jobs.schemas import ServeResult
    from modal_jobs.storage import atomic_write_json

    pointer = serving_pointer(request)
    atomic_write_json(SERVING_POINTER, {**pointer, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if _in_container():
        volume.commit()  # the serving containers read the committed pointer
    if not web_url:
        raise RuntimeError(f"the {APP_NAME} app's vllm_server function has no web URL: redeploy the app")
    base_url = web_url.rstrip("/") + "/v1"
    api_key = os.environ[pointer["api_key_env"]] if pointer["api_key_env"] else None
    deadline = time.monotonic() + ready_timeout_s
    while not endpoint_serves(base_url, pointer["model_name"], api_key):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the endpoint {base_url} did not serve {pointer['model_name']} within {ready_timeout_s:.0f} s; "
                f"see `modal app logs {APP_NAME}`"
            )
        time.sleep(5)
    return ServeResult(base_url=base_url, model_name=pointer["model_name"], backend="vllm", pid=None).model_dump(
        mode="json"
    )


@app.function(**_function_options("serve"))
def serve(request: dict[str, Any]) -> dict[str, Any]:
    """Point the web endpoint at a model on the Volume; returns a ServeResult once it answers for it."""
    if _in_container():
        volume.reload()  # the merged model was committed by the export container
    ready_timeout_s = max(SERVE_READY_TIMEOUT_S, float(request.get("serve", {}).get("startup_timeout_s") or 0))
    try:
        result = point_endpoint(request, vllm_server.get_web_url(), ready_timeout_s)
    except Exception as error:
        if type(error).__name__ not in INPUT_ERROR_TYPES:
            raise
        traceback.print_exc()
        return _error_envelope(error)
    return {"ok": True, "result": result}
