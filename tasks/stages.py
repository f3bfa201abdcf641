"""One Prefect task per stage: retry policy, cache policy and progress; the job itself goes to an executor.

The cache key of a stage is the content address of its output (derived from its inputs' fingerprints,
see modal_jobs.keys), so a new process, a new flow run or a scheduled run all hit the same record.
Results persist under <storage root>/prefect-results. The flow decides `refresh_cache` per call: a
record whose output folder has gone is recomputed, never handed back (see flows.pipeline.run_stage).
"""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE, CachePolicy

from modal_jobs.consistency import ConsistencyRequest, ConsistencyResult
from modal_jobs.encode import EncodeRequest, EncodeResult
from modal_jobs.errors import InputError
from modal_jobs.schemas import (
    EvaluateRequest,
    EvaluateResult,
    ExportRequest,
    ExportResult,
    PrepareDatasetRequest,
    PrepareDatasetResult,
    PrepareModelRequest,
    PrepareModelResult,
    ServeRequest,
    ServeResult,
    TrainRequest,
    TrainResult,
)
from modal_jobs.storage import resolve
from tasks.executors import ExecutorSpec, JobCancelled, get_executor


def output_location(request: Any) -> str:
    """The storage-relative path whose manifest marks a stage's output finished; it embeds the cache key."""
    if isinstance(request, TrainRequest):
        return request.adapter_dir
    return getattr(request, "output_dir", None) or request.output_path


def cache_key(stage: str, request: Any) -> str:
    """A stage's cache key (and lock name): the stage name + the content-addressed output location."""
    return f"{stage}-{output_location(request).replace('/', '-')}"


class StageOutputPolicy(CachePolicy):
    """Cache key = stage name + the content-addressed output location of the request."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        return cache_key(task_ctx.task.name, inputs["request"])


def run_job(executor: ExecutorSpec, stage: str, request: Any, on_poll: Any = None) -> Any:
    """Hand the job to the executor. A job cancelled from outside ends its task Cancelled: final, never retried
    (a Cancelled state is not a failure, so no retry policy sees it)."""
    from prefect.states import Cancelled

    try:
        return get_executor(executor).run(stage, request, on_poll=on_poll)
    except JobCancelled as error:
        get_run_logger().warning("%s", error)
        return Cancelled(message=str(error))


def is_transient(task, task_run, state) -> bool:
    """Retry lost connections, timeouts, killed or preempted jobs; never bad config or bad data."""
    try:
        state.result()
    except InputError:
        return False
    except Exception:
        return True
    return False


_STAGE_TASK_OPTIONS: dict[str, Any] = dict(
    cache_policy=StageOutputPolicy(),
    persist_result=True,
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=is_transient,
)


@task(name="prepare_dataset", **_STAGE_TASK_OPTIONS)
def prepare_dataset(request: PrepareDatasetRequest, executor: ExecutorSpec = ExecutorSpec()) -> PrepareDatasetResult:
    """Load, validate (every image decoded) and save the dataset with canonical splits and columns."""
    return run_job(executor, "prepare_dataset", request)


@task(name="prepare_model", **_STAGE_TASK_OPTIONS)
def prepare_model(request: PrepareModelRequest, executor: ExecutorSpec = ExecutorSpec()) -> PrepareModelResult:
    """Download, copy or build the base model into the storage root."""
    return run_job(executor, "prepare_model", request)


class _TrainingProgress:
    """Polls <run>/progress.json (written by the job) into a Prefect progress artifact and the log."""

    def __init__(self, run_dir: str) -> None:
        from prefect.artifacts import create_progress_artifact

        self.path = resolve(run_dir) / "progress.json"
        self.logger = get_run_logger()
        self.artifact_id = create_progress_artifact(0.0, key="training-progress", description="Training: step / max")
        self.last_step = -1
        self.last_log = 0.0

    def __call__(self) -> None:
        from prefect.artifacts import update_progress_artifact

        try:
            progress = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return
        step, max_steps = progress.get("step", 0), progress.get("max_steps") or 0
        if step == self.last_step or not max_steps:
            return
        self.last_step = step
        latest = (progress.get("history") or [{}])[-1]
        description = f"step {step}/{max_steps}, loss {latest.get('loss')}, lr {latest.get('learning_rate')}"
        update_progress_artifact(self.artifact_id, 100.0 * step / max_steps, description=description)
        if time.time() - self.last_log > 10 or step == max_steps:
            self.logger.info("training %s", description)
            self.last_log = time.time()


@task(name="train", **{**_STAGE_TASK_OPTIONS, "retries": 1})
def train(request: TrainRequest, executor: ExecutorSpec = ExecutorSpec()) -> TrainResult:
    """LoRA fine-tune; a retry resumes from the latest complete checkpoint."""
    return run_job(executor, "train", request, on_poll=_TrainingProgress(request.output_dir))


@task(name="encode_images", **_STAGE_TASK_OPTIONS)
def encode_images(request: EncodeRequest, executor: ExecutorSpec = ExecutorSpec()) -> EncodeResult:
    """The frozen vision tower + projector over every training image, once; cached on the storage root."""
    return run_job(executor, "encode_images", request)


@task(name="export", **_STAGE_TASK_OPTIONS)
def export(request: ExportRequest, executor: ExecutorSpec = ExecutorSpec()) -> ExportResult:
    """Merge the adapter into the base model; save 16-bit safetensors with the processor."""
    return run_job(executor, "export", request)


@task(name="serve", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=is_transient)
def serve(request: ServeRequest, executor: ExecutorSpec = ExecutorSpec()) -> ServeResult:
    """Start an OpenAI-compatible server; returns once its health check passes. Not cached: it is a process."""
    return run_job(executor, "serve", request)


@task(name="evaluate", **_STAGE_TASK_OPTIONS)
def evaluate(request: EvaluateRequest, executor: ExecutorSpec = ExecutorSpec()) -> EvaluateResult:
    """Score the endpoint on held-out images: exact match, CER, WER; failed requests counted apart."""
    return run_job(executor, "evaluate", request)


@task(name="consistency", **_STAGE_TASK_OPTIONS)
def consistency(request: ConsistencyRequest, executor: ExecutorSpec = ExecutorSpec()) -> ConsistencyResult:
    """Train/serve consistency on a few test images: files, architecture, prompt ids, merged vs adapter, endpoint."""
    return run_job(executor, "consistency", request)
