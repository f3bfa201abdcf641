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

Serving: the `serve` stage starts vLLM for one model in a GPU Sandbox of its own and returns its tunnel URL;
the flow terminates it when done. `vllm_server` is the production endpoint: the registry's champion, changed only
by a promotion or a rollback (see "serving" below). VLMPIPE_REGISTRY names that registry at deploy time.

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
WEB_PORT = 8000
WEB_STARTUP_TIMEOUT_S = 5 * MINUTES  # loading 8.6 GB of weights onto an L40S takes a few minutes cold
SERVE_READY_TIMEOUT_S = 12 * MINUTES  # a GPU Sandbox's cold start and 8.6 GB of weights loaded by vLLM

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
    # for the data loader and for the 8.6 GB of weights passing through host memory, no more. Per GPU: a call
    # with train.gpus = N asks for N times these (stage_resources) and N GPUs of this type.
    "train": StageSpec(
        gpu_image, GPUS.train, 24 * HOURS, cpu=4.0, memory_mib=32 * 1024,
        retries=modal.Retries(max_retries=3, initial_delay=10.0, backoff_coefficient=2.0, max_delay=60.0),
    ),
    # The frozen vision tower run once over every image, so training can read features instead of pixels
    # (~5.5 TFLOP an image at 896 px). On the training GPU unless StageGpus names one for it.
    "encode_images": StageSpec(
        gpu_image, GPUS.encode_images, 3 * HOURS, cpu=4.0, memory_mib=32 * 1024
    ),
    # The merge runs on the CPU (float32 sums, then bf16): a GPU would sit idle, billed. 8 cores and room for the
    # base model in float32 (17 GB for Gemma 3 4B) next to the merged copy.
    "export": StageSpec(cpu_image, GPUS.export, 1 * HOURS, cpu=8.0, memory_mib=48 * 1024),
    # Base + adapter beside the merged model on a handful of images, and a few requests to the endpoint.
    "consistency": StageSpec(gpu_image, GPUS.consistency, 1 * HOURS, cpu=4.0, memory_mib=48 * 1024),
    # Starts a vLLM Sandbox for one model and waits for it: no GPU of its own (the Sandbox has one).
    "serve": StageSpec(cpu_image, None, SERVE_READY_TIMEOUT_S + 5 * MINUTES, cpu=1.0, memory_mib=1024),
    "evaluate": StageSpec(cpu_image, GPUS.evaluate, 2 * HOURS, cpu=2.0, memory_mib=4 * 1024),
}


def stage_resources(stage: str, gpus: int = 1) -> tuple[float, int]:
    """(CPU cores, memory MiB) a stage's call asks for on `gpus` GPUs. Train runs one process per GPU (train.gpus),
    each with its own data loader workers and its own copy of the weights passing through host memory, so its
    cores and memory grow with the GPUs; every other stage is one process. A call with train.gpus > 1 asks for
    these and `<type>:<gpus>` through Function.with_options (tasks/modal_executor.py)."""
    spec = STAGE_SPECS[stage]
    processes = gpus if stage == "train" else 1
    return spec.cpu * processes, spec.memory_mib * processes


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
# Two kinds of server, never the same one:
# - an evaluation server: the `serve` stage starts vLLM for one model in a GPU Sandbox of its own (an encrypted
#   port, reached through its tunnel URL), named after the model, the serve config and the flow run it serves, so a
#   Prefect retry finds and reuses it and two pipelines never share one. The flow terminates it when its
#   consistency check and evaluation are done (ModalExecutor.stop_serving); should the flow die first, the Sandbox
#   ends itself after SANDBOX_IDLE_TIMEOUT_S without a request, and at SANDBOX_TIMEOUT_S whatever happens.
# - the production endpoint (`vllm_server`, a web server): always the champion of the registry named by
#   VLMPIPE_REGISTRY at deploy time. Only a promotion or a rollback changes the champion, so only they change what
#   it serves: each container watches the registry and hands over when the champion changes.

SANDBOX_IDLE_TIMEOUT_S = 20 * MINUTES  # consistency loads three models before its first request: minutes, cold
SANDBOX_TIMEOUT_S = 6 * HOURS  # a 7,632-image evaluation at 8 in flight takes well under an hour on an L40S
SERVE_CPU = 4.0  # vLLM's API server, tokenizer and image preprocessing run on the host
SERVE_MEMORY_MIB = 32 * 1024  # the weights pass through host memory on load (8.6 GB for Gemma 3 4B in bf16)
REGISTRY_NAME = os.environ.get("VLMPIPE_REGISTRY", "latex-ocr")  # promote.registry_name of the production config
REGISTRY_POLL_S = 15  # how often an endpoint container checks whether the champion changed


def serve_settings(request: dict[str, Any]) -> tuple[Any, str, str]:
    """(typed request, model path inside the container, served model name); InputError when it cannot be served."""
    from modal_jobs.schemas import ServeRequest
    from modal_jobs.storage import relative, resolve, storage_root

    typed = ServeRequest.model_validate(request)
    if typed.serve.backend == "transformers":
        raise InputError("serve.backend=transformers: on Modal the model is served by vLLM; use serve.backend auto or vllm")
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
    api_key_env = typed.serve.api_key_env
    if api_key_env is not None and not os.environ.get(api_key_env):
        raise InputError(
            f"serve.api_key_env names {api_key_env}, which the {SECRET_NAME} Secret does not set: add it with "
            f"`modal secret create --force {SECRET_NAME} ... {api_key_env}=...`"
        )
    name = relative(model_dir)  # the storage-relative path, as the local vLLM backend names it
    return typed, f"{DATA_DIR}/{name}", name


def vllm_command(model_path: str, model_name: str, serve_config: Any) -> list[str]:
    """`vllm serve` for a model on the Volume, with the serve config applied exactly as the local backend does."""
    from modal_jobs.serve import vllm_arguments

    return vllm_arguments("vllm", model_path, model_name, serve_config, "0.0.0.0", WEB_PORT)


def key_environment(serve_config: Any, environ: dict[str, str]) -> dict[str, str]:
    """VLLM_API_KEY only when the served config asks for a key (serve.api_key_env), so a key left in the Secret
    cannot lock out an evaluator that was not given it."""
    if serve_config.api_key_env:
        return {"VLLM_API_KEY": environ[serve_config.api_key_env]}
    return {}


def sandbox_name(typed_request: Any) -> str:
    """One evaluation server per (model, serve config, flow run): what a retry finds again, and nobody else."""
    from modal_jobs.storage import short_hash

    identity = [typed_request.model_dir, typed_request.serve.model_dump(mode="json"), typed_request.session]
    return f"eval-{short_hash(identity)}"


def endpoint_serves(base_url: str, model_name: str, api_key: str | None, timeout_s: float = 120.0) -> bool:
    """True once GET <base_url>/models lists `model_name`: the server we started answers, not just any server."""
    request = urllib.request.Request(f"{base_url}/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            listing = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False  # starting, or a blip: both mean "not yet"
    return any(entry.get("id") == model_name for entry in listing.get("data") or [])


def _running_sandbox(name: str) -> Any | None:
    try:
        sandbox = modal.Sandbox.from_name(APP_NAME, name)
    except modal.exception.NotFoundError:
        return None
    return sandbox if sandbox.poll() is None else None


def start_evaluation_server(request: dict[str, Any], ready_timeout_s: float) -> dict[str, Any]:
    """vLLM for one model in a GPU Sandbox (or the one a previous attempt of this stage started); returns a
    ServeResult once the server lists the model."""
    from modal_jobs.schemas import ServeResult

    typed, model_path, model_name = serve_settings(request)
    name = sandbox_name(typed)
    sandbox = _running_sandbox(name)
    if sandbox is None:
        argv = vllm_command(model_path, model_name, typed.serve)
        print(f"starting Sandbox {name}: $ {' '.join(argv)}", file=sys.stderr)
        key_env = key_environment(typed.serve, dict(os.environ))
        sandbox = modal.Sandbox.create(
            *argv,
            app=modal.App.lookup(APP_NAME),
            name=name,
            image=vllm_image,
            gpu=GPUS.serve,
            cpu=SERVE_CPU,
            memory=SERVE_MEMORY_MIB,
            volumes={DATA_DIR: volume},
            # The key as a Secret of its own: out of argv, the Sandbox's listing and the logs.
            secrets=[secret] + ([modal.Secret.from_dict(key_env)] if key_env else []),
            encrypted_ports=[WEB_PORT],
            timeout=SANDBOX_TIMEOUT_S,
            idle_timeout=SANDBOX_IDLE_TIMEOUT_S,
        )
    else:
        print(f"reusing the running Sandbox {name} ({sandbox.object_id})", file=sys.stderr)
    # The tunnel exists once the Sandbox's container runs: a GPU to schedule and an image to pull come first.
    base_url = sandbox.tunnels(timeout=int(ready_timeout_s))[WEB_PORT].url.rstrip("/") + "/v1"
    api_key = os.environ[typed.serve.api_key_env] if typed.serve.api_key_env else None
    deadline = time.monotonic() + ready_timeout_s
    try:
        while not endpoint_serves(base_url, model_name, api_key):
            code = sandbox.poll()
            if code is not None:
                raise RuntimeError(
                    f"the vLLM Sandbox {sandbox.object_id} for {model_name} exited with code {code} before it served; "
                    f"see `modal app logs {APP_NAME}` or the Sandbox's page in the Modal dashboard"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the vLLM Sandbox {sandbox.object_id} did not serve {model_name} within {ready_timeout_s:.0f} s "
                    "(serve.startup_timeout_s); it was stopped"
                )
            time.sleep(5)
    except BaseException:
        sandbox.terminate()  # never leave a GPU running that nobody will use
        raise
    return ServeResult(base_url=base_url, model_name=model_name, backend="vllm", pid=None,
                       sandbox_id=sandbox.object_id).model_dump(mode="json")


@app.function(**_function_options("serve"))
def serve(request: dict[str, Any]) -> dict[str, Any]:
    """Start an evaluation server for a model on the Volume; returns a ServeResult once it answers for it."""
    if _in_container():
        volume.reload()  # the merged model was committed by the export container
    ready_timeout_s = max(SERVE_READY_TIMEOUT_S, float(request.get("serve", {}).get("startup_timeout_s") or 0))
    try:
        result = start_evaluation_server(request, ready_timeout_s)
    except Exception as error:
        if type(error).__name__ not in INPUT_ERROR_TYPES:
            raise
        traceback.print_exc()
        return _error_envelope(error)
    return {"ok": True, "result": result}


# --- the production endpoint: the registry's champion ---------------------------------------------------------


def champion_to_serve(serving_json: str) -> dict[str, Any] | None:
    """What the endpoint serves, from serving/<registry>.json: the champion's merged model and the serve config of
    the run that promoted it. Only a promotion or a rollback writes that file (tasks.champion); None: no champion."""
    serving = json.loads(serving_json)
    if not serving.get("model_dir"):
        return None
    return {"model_dir": serving["model_dir"], "serve": serving.get("serve") or {}}


def _serving_file() -> str:
    return f"serving/{REGISTRY_NAME}.json"


def _read_committed_serving_file() -> str:
    # Volume.read_file reads the last committed version over the API: unlike volume.reload() it does not fail
    # while vLLM holds files on the Volume open.
    return b"".join(volume.read_file(_serving_file())).decode()


def _watch_champion(serving: dict[str, Any], process: subprocess.Popen) -> None:
    """Hand over when a promotion or rollback changes the champion; die with the server if it dies."""
    while process.poll() is None:
        time.sleep(REGISTRY_POLL_S)
        try:
            latest = champion_to_serve(_read_committed_serving_file())
        except Exception as error:  # a blip in the API must not take the endpoint down
            print(f"warning: could not read {_serving_file()}: {error}", file=sys.stderr)
            continue
        if latest != serving:
            print(f"the champion is now {latest and latest['model_dir']}: this container stops taking requests",
                  file=sys.stderr)
            try:
                import modal.experimental

                # Finish the requests in flight, take no more, exit; the next request starts on the new champion.
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
    cpu=SERVE_CPU,
    memory=SERVE_MEMORY_MIB,
    volumes={DATA_DIR: volume},
    secrets=[secret],
    timeout=10 * MINUTES,  # per request: a long generation, never the container's life
    scaledown_window=3 * MINUTES,  # scale to zero after 3 idle minutes
    max_containers=2,
)
@modal.concurrent(max_inputs=50)
@modal.web_server(port=WEB_PORT, startup_timeout=WEB_STARTUP_TIMEOUT_S)
def vllm_server() -> None:
    """The production OpenAI-compatible endpoint: vLLM on the champion of the VLMPIPE_REGISTRY registry."""
    from modal_jobs.config import ServeConfig
    from modal_jobs.storage import resolve

    serving_file = resolve(_serving_file())
    serving = champion_to_serve(serving_file.read_text()) if serving_file.is_file() else None
    if serving is None:
        raise RuntimeError(
            f"nothing to serve: registry {REGISTRY_NAME!r} has no champion yet. Run `vlmpipe retrain --config "
            "configs/modal.yaml` (a model is promoted when it beats the champion), see docs/modal.md"
        )
    serve_config = ServeConfig.model_validate(serving["serve"])
    argv = vllm_command(f"{DATA_DIR}/{serving['model_dir']}", serving["model_dir"], serve_config)
    print("$ " + " ".join(argv), file=sys.stderr)
    # Output goes to the container's log (`modal app logs`), never to a file on the Volume.
    env = {name: value for name, value in os.environ.items() if name != "VLLM_API_KEY"}
    process = subprocess.Popen(argv, env={**env, **key_environment(serve_config, dict(os.environ))})
    threading.Thread(target=_watch_champion, args=(serving, process), daemon=True).start()
