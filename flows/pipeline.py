"""The flows: the whole fine-tuning pipeline, and single-stage flows for evaluation and export.

    prepare_dataset ─┐
                     ├─> train (LoRA) ─> export (merge, 16-bit) ─> serve ─> evaluate (base and fine-tuned)
    prepare_model ───┘

Run as: vlmpipe run   (or python -m flows.cli run)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture
from pydantic import BaseModel

from flows.serving import serving_if
from modal_jobs import keys
from modal_jobs.config import PipelineConfig
from modal_jobs.consistency import ConsistencyRequest
from modal_jobs.encode import EncodeRequest
from modal_jobs.schemas import (
    EvaluateRequest,
    EvaluateResult,
    ExportRequest,
    PrepareDatasetRequest,
    PrepareModelRequest,
    ServeResult,
    TrainRequest,
)
from modal_jobs.storage import atomic_write_json, check_writable, resolve, storage_root
from tasks import artifacts, stages
from tasks.executors import ExecutorSpec, get_executor, stop_running_jobs


class StageOutcome(BaseModel):
    state: str
    output: str | None = None
    key: str | None = None


class PipelineResult(BaseModel):
    stages: dict[str, StageOutcome]
    dataset_dir: str
    model_dir: str
    adapter_dir: str
    merged_dir: str
    metrics: dict[str, dict[str, Any]]
    results_files: dict[str, str]
    storage_root: str
    remote_outputs: dict[str, str] = {}  # Volume paths of outputs that stayed on Modal: `vlmpipe pull PATH`


def _last_components_path(name: str) -> Path:
    return storage_root() / "state" / f"last-{name}.json"


def _changed_since_last_run(name: str, stage_key: keys.StageKey) -> list[str] | None:
    try:
        last = json.loads(_last_components_path(name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return keys.changed_components(last["components"], stage_key.components)


def _check_modal_credentials(config: PipelineConfig) -> None:
    """A run with any stage on Modal needs a token: say so (and how to get one) before anything else happens."""
    from modal_jobs.jobs import JOBS

    if any(config.executor_for(stage) == "modal" for stage in JOBS):
        from tasks.modal_executor import ModalExecutor

        ModalExecutor(config.modal).require_credentials("executor: modal")


def _on_disk(task, request: BaseModel, config: PipelineConfig) -> bool:
    """Whether a stage's output is there, once a run computing it right now (an identical run started earlier)
    has finished: what decides whether a server is needed, so two identical runs never start two servers."""
    from tasks.locks import StageLockManager

    StageLockManager(storage_root() / "locks", stage=task.name).wait_for_lock(stages.cache_key(task.name, request))
    return _where(config, task.name).output_exists(stages.output_location(request))


def _where(config: PipelineConfig, stage: str):
    """The executor of a stage: where its outputs live and how to read them."""
    return get_executor(ExecutorSpec.for_stage(config, stage))


def _stage_task(task, refresh: bool, output_exists: Callable[[], bool] | None = None):
    """The task bound to this storage root: results and locks live beside the outputs they describe.

    `output_exists` is asked once the stage's lock is held: a cache record whose output has gone is dropped
    then (the stage recomputes), so a run that waited on the lock finds the record its holder just wrote."""
    from tasks.locks import StageLockManager

    results = storage_root() / "prefect-results"
    options: dict[str, Any] = {"refresh_cache": refresh, "result_storage": results}
    if isinstance(task.cache_policy, stages.StageOutputPolicy):

        def drop_record_without_output(key: str) -> None:
            if output_exists is not None and not output_exists():
                (results / key).unlink(missing_ok=True)

        # Two runs with the same key at once: one computes, the other waits on the lock and reuses the result.
        options["cache_policy"] = task.cache_policy.configure(
            isolation_level="SERIALIZABLE",
            lock_manager=StageLockManager(storage_root() / "locks", stage=task.name,
                                          on_acquired=drop_record_without_output),
        )
    return task.with_options(**options)


def _submit(
    task, request: BaseModel, config: PipelineConfig, refresh: bool, run_name: str | None = None
) -> PrefectFuture:
    """Start a stage's task on the executor configured for it (task names are stage names)."""
    spec = ExecutorSpec.for_stage(config, task.name)
    executor, location = get_executor(spec), stages.output_location(request)
    # A cache record whose output has gone must not be handed back: checked under the stage's lock, not here.
    bound = _stage_task(task, refresh, output_exists=lambda: executor.output_exists(location))
    if run_name:
        bound = bound.with_options(task_run_name=run_name)
    return bound.submit(request, spec)


def _finish(stage_key: keys.StageKey, future: PrefectFuture, label: str | None = None) -> tuple[Any, str]:
    """Wait for a stage, publish why it hit or missed, remember its inputs for the next run's explanation."""
    name = label or stage_key.stage
    changed = _changed_since_last_run(name, stage_key)
    result = future.result()
    state_name = future.state.name
    artifacts.publish_cache_decision(name, state_name, stage_key.key, changed)
    atomic_write_json(_last_components_path(name), stage_key.model_dump())
    get_run_logger().info("%s: %s (key %s)", name, state_name, stage_key.key)
    return result, state_name


def _evaluate_model(
    config: PipelineConfig, label: str, model_dir: str, model_identity: str, dataset_fingerprint: str,
    dataset_dir: str, refresh: bool, outcomes: dict[str, StageOutcome], served: ServeResult | None = None,
) -> EvaluateResult:
    """Serve the model only when its evaluation is not already on disk, then evaluate and stop the server.

    With `served`, that server is used (its owner stops it)."""
    eval_key = keys.evaluate_key(model_identity, dataset_fingerprint, config.evaluate, config.instruction)
    request = EvaluateRequest(
        evaluate=config.evaluate, base_url="", model_name="", dataset_dir=dataset_dir,
        instruction=config.instruction, output_path=f"evals/{eval_key.key}.json", label=label,
        api_key_env=config.serve.api_key_env,
    )
    evaluations = _where(config, "evaluate")
    needs_server = served is None and (refresh or not _on_disk(stages.evaluate, request, config))
    if served is None and not needs_server:
        outcomes[f"serve_{label}"] = StageOutcome(state="Skipped", output="evaluation already on disk")
    with serving_if(needs_server, config, model_dir) as started:
        endpoint = served or started
        if started is not None:
            outcomes[f"serve_{label}"] = StageOutcome(state="Completed", output=started.base_url)
        if endpoint is not None:
            request = request.model_copy(update={"base_url": endpoint.base_url, "model_name": endpoint.model_name})
        result, state = _finish(eval_key, _submit(stages.evaluate, request, config, refresh, f"evaluate-{label}"),
                                label=f"evaluate_{label}")
    outcomes[f"evaluate_{label}"] = StageOutcome(state=state, output=result.results_path, key=eval_key.key)
    artifacts.publish_output(f"eval-results-{label}", result.results_path, f"Evaluation results ({label})",
                             where=evaluations)
    return result


def _run_name(config: PipelineConfig | None = None) -> str:
    """model-dataset@fingerprint-r<r>-lr<lr>-bs<batch>-<epochs or steps>-seed<seed>-<config hash>: what a run
    trains, at a glance, and different whenever the config differs (flows.retrain names its runs the same way).
    Without a config (Prefect calls it so), the flow run's own."""
    from modal_jobs.dataset import source_fingerprint
    from modal_jobs.storage import short_hash

    if config is None:
        from prefect.runtime import flow_run

        config = PipelineConfig.model_validate(flow_run.parameters.get("config") or {})
    train = config.train
    model = config.model.source.rsplit("/", 1)[-1].replace("builtin:", "")
    dataset = config.dataset.source.rsplit("/", 1)[-1].replace("builtin:", "")
    try:
        dataset += "@" + source_fingerprint(config.dataset)[:8]
    except Exception:  # a bad source fails in the flow with its own message; the name just goes without
        pass
    length = f"steps{train.max_steps}" if train.max_steps else f"ep{train.num_epochs:g}"
    return (f"{model}-{dataset}-r{train.lora_r}-lr{train.learning_rate:g}-bs{train.effective_batch_size}-{length}"
            f"-seed{train.seed}-{short_hash(config.model_dump(mode='json'))[:6]}")


@flow(name="finetune-pipeline", flow_run_name=_run_name, log_prints=True)
def finetune_pipeline(config: PipelineConfig = PipelineConfig(), refresh: bool = False) -> PipelineResult:
    """Prepare data and model, LoRA fine-tune, merge to 16-bit, serve, and evaluate base vs fine-tuned."""
    from prefect.exceptions import CancelledRun
    from prefect.states import Cancelled

    try:
        return _finetune_pipeline(config, refresh)
    except CancelledRun as cancelled:
        # A stage's job was cancelled from outside (e.g. its Modal call): final, and the run says so.
        stop_running_jobs()
        return Cancelled(message=str(cancelled))
    except BaseException:
        # Interrupted or failed: no job (a training subprocess, a Modal call) may run on without its flow.
        stop_running_jobs()
        raise


def _finetune_pipeline(config: PipelineConfig, refresh: bool) -> PipelineResult:
    from modal_jobs.dataset import source_fingerprint as dataset_source_fingerprint
    from modal_jobs.model import source_fingerprint as model_source_fingerprint
    from tasks.secrets import load_secret_blocks

    logger = get_run_logger()
    check_writable()
    _check_modal_credentials(config)
    loaded = load_secret_blocks()
    if loaded:
        logger.info("read %s from Prefect Secret blocks", ", ".join(loaded))
    if config.export.hub_id and config.executor_for("export") == "local":
        # On Modal the token lives in the Secret, where the push happens: the export job checks it there.
        from modal_jobs.hub import hub_token

        if not hub_token():
            raise ValueError("export.hub_id is set but no HF_TOKEN is in the environment: set it, or unset hub_id")
    outcomes: dict[str, StageOutcome] = {}

    # Keys first: a bad source fails here, before any job starts.
    dataset_key = keys.prepare_dataset_key(config.dataset, dataset_source_fingerprint(config.dataset))
    model_key = keys.prepare_model_key(config.model, model_source_fingerprint(config.model))
    dataset_request = PrepareDatasetRequest(dataset=config.dataset, output_dir=f"datasets/{dataset_key.key}")
    model_request = PrepareModelRequest(model=config.model, output_dir=f"models/{model_key.key}")
    dataset_future = _submit(stages.prepare_dataset, dataset_request, config, refresh)
    model_future = _submit(stages.prepare_model, model_request, config, refresh)
    dataset, state = _finish(dataset_key, dataset_future)
    outcomes["prepare_dataset"] = StageOutcome(state=state, output=dataset.path, key=dataset_key.key)
    artifacts.publish_output("dataset", dataset.path, f"Prepared dataset: {dataset.splits}",
                             where=_where(config, "prepare_dataset"))
    if dataset.skipped_rows:
        artifacts.publish_skipped_rows(dataset.skipped_rows)
    model, state = _finish(model_key, model_future)
    outcomes["prepare_model"] = StageOutcome(state=state, output=model.path, key=model_key.key)
    artifacts.publish_output("base-model", model.path,
                             f"Base model: {model.architecture}, {model.num_parameters:,} parameters",
                             where=_where(config, "prepare_model"))

    train_key = keys.train_key(
        dataset.fingerprint, model.fingerprint, config.train, config.model, config.instruction,
        get_executor(ExecutorSpec.for_stage(config, "train")).library_versions(),
    )
    train_request = TrainRequest(
        train=config.train, model=config.model, dataset_dir=dataset.path, model_dir=model.path,
        output_dir=f"runs/{train_key.key}", instruction=config.instruction,
    )
    atomic_write_json(f"runs/{train_key.key}/pipeline_config.json", config.model_dump(mode="json"))
    # encode_images: the frozen vision tower once per training image; train (and every retrain or sweep on this
    # base model and data) reads the features instead of pixels. Skipped when vision layers train, or when the
    # adapter is already on disk (train is then a cache hit and needs no inputs).
    train_on_disk = get_executor(ExecutorSpec.for_stage(config, "train")).output_exists(train_request.adapter_dir)
    if config.train.finetune_vision_layers:
        outcomes["encode_images"] = StageOutcome(state="Skipped", output="train.finetune_vision_layers: pixels")
    elif train_on_disk and not refresh:
        outcomes["encode_images"] = StageOutcome(state="Skipped", output="adapter already on disk")
    else:
        encode_key = keys.encode_images_key(
            dataset.fingerprint, model.fingerprint, config.model.dtype,
            get_executor(ExecutorSpec.for_stage(config, "encode_images")).library_versions(),
        )
        encode_request = EncodeRequest(model=config.model, dataset_dir=dataset.path, model_dir=model.path,
                                       output_dir=f"features/{encode_key.key}")
        encoded, state = _finish(encode_key, _submit(stages.encode_images, encode_request, config, refresh))
        outcomes["encode_images"] = StageOutcome(state=state, output=encoded.features_dir, key=encode_key.key)
        artifacts.publish_output("image-features", encoded.features_dir,
                                 f"{encoded.num_images} images encoded ({encoded.size_bytes / 1e9:.1f} GB)",
                                 where=_where(config, "encode_images"))
        train_request = train_request.model_copy(update={"features_dir": encoded.features_dir})
    trained, state = _finish(train_key, _submit(stages.train, train_request, config, refresh))
    outcomes["train"] = StageOutcome(state=state, output=trained.adapter_dir, key=train_key.key)
    artifacts.publish_output("train-adapter", trained.adapter_dir, f"LoRA adapter, {trained.global_step} steps, "
                             f"loss {trained.first_logged_loss} -> {trained.last_logged_loss}", where=_where(config, "train"))
    artifacts.publish_checkpoints(trained.checkpoints_dir, where=_where(config, "train"))
    artifacts.publish_training_stats(trained.adapter_dir, where=_where(config, "train"))

    export_key = keys.export_key(train_key.key, config.export)
    export_request = ExportRequest(
        export=config.export, model_dir=model.path, adapter_dir=trained.adapter_dir,
        output_dir=f"runs/{train_key.key}/merged-{export_key.key}",
    )
    exported, state = _finish(export_key, _submit(stages.export, export_request, config, refresh))
    outcomes["export"] = StageOutcome(state=state, output=exported.merged_dir, key=export_key.key)
    artifacts.publish_output("merged-model", exported.merged_dir, f"Merged {exported.dtype} model",
                             where=_where(config, "export"))

    # Train/serve consistency before anything is evaluated or promoted: the served merged model against the
    # adapter and the training prompt, on a few test images. One server for the check and the fine-tuned
    # evaluation, none when both are on disk. A mismatch fails the run, with its report as an artifact.
    finetuned_identity = f"export:{export_key.key}"
    check_key = keys.consistency_key(export_key.key, dataset.fingerprint, config.serve, config.instruction)
    check_request = ConsistencyRequest(
        model_dir=model.path, adapter_dir=trained.adapter_dir, merged_dir=exported.merged_dir,
        dataset_dir=dataset.path, instruction=config.instruction, api_key_env=config.serve.api_key_env,
        output_path=f"runs/{train_key.key}/consistency-{check_key.key}.json",
    )
    finetuned_eval = EvaluateRequest(
        evaluate=config.evaluate, base_url="", model_name="", dataset_dir=dataset.path, instruction=config.instruction,
        output_path="evals/" + keys.evaluate_key(finetuned_identity, dataset.fingerprint, config.evaluate,
                                                 config.instruction).key + ".json",
    )
    needs_server = (refresh or not _on_disk(stages.consistency, check_request, config)
                    or not _on_disk(stages.evaluate, finetuned_eval, config))
    if not needs_server:
        outcomes["serve_finetuned"] = StageOutcome(state="Skipped", output="check and evaluation already on disk")
    with serving_if(needs_server, config, exported.merged_dir) as served:
        if served is not None:
            outcomes["serve_finetuned"] = StageOutcome(state="Completed", output=served.base_url)
            check_request = check_request.model_copy(
                update={"base_url": served.base_url, "model_name": served.model_name})
        checked, state = _finish(check_key, _submit(stages.consistency, check_request, config, refresh))
        outcomes["consistency"] = StageOutcome(
            state=state if checked.passed else "Failed", output=checked.report_path, key=check_key.key
        )
        artifacts.publish_consistency(checked, where=get_executor(ExecutorSpec.for_stage(config, "consistency")))
        checked.raise_for_mismatch()
        finetuned = _evaluate_model(config, "finetuned", exported.merged_dir, finetuned_identity,
                                    dataset.fingerprint, dataset.path, refresh, outcomes, served=served)
    evaluations = {
        "base": _evaluate_model(config, "base", model.path, model.fingerprint, dataset.fingerprint, dataset.path,
                                refresh, outcomes),
        "finetuned": finetuned,
    }
    evaluated = get_executor(ExecutorSpec.for_stage(config, "evaluate"))
    artifacts.publish_metrics(evaluations)
    artifacts.publish_eval_report(evaluations, where=evaluated)
    # Paths as what they are: local files, or places on the Modal Volume (`vlmpipe pull` fetches those).
    shown = {stage: get_executor(ExecutorSpec.for_stage(config, stage)).display_path
             for stage in ("prepare_dataset", "prepare_model", "train", "export")}
    result = PipelineResult(
        stages=outcomes,
        dataset_dir=shown["prepare_dataset"](dataset.path),
        model_dir=shown["prepare_model"](model.path),
        adapter_dir=shown["train"](trained.adapter_dir),
        merged_dir=shown["export"](exported.merged_dir),
        metrics={label: e.metrics.model_dump() for label, e in evaluations.items()},
        results_files={label: evaluated.display_path(e.results_path) for label, e in evaluations.items()},
        storage_root=str(storage_root()),
        remote_outputs={stage: location for stage, location in (
            ("merged", exported.merged_dir), ("adapter", trained.adapter_dir))
            if config.executor_for("export" if stage == "merged" else "train") == "modal"},
    )
    logger.info("merged model: %s", result.merged_dir)
    for label, metrics in result.metrics.items():
        logger.info("%s: CER %s, WER %s, exact match %s", label, metrics["cer"], metrics["wer"], metrics["exact_match"])
    return result


@flow(name="evaluate", log_prints=True)
def evaluate_endpoint(
    base_url: str, model_name: str, config: PipelineConfig = PipelineConfig(), label: str = "endpoint"
) -> EvaluateResult:
    """Evaluate an already running OpenAI-compatible endpoint on the configured dataset's test split."""
    from modal_jobs.dataset import source_fingerprint

    check_writable()
    dataset_key = keys.prepare_dataset_key(config.dataset, source_fingerprint(config.dataset))
    dataset_request = PrepareDatasetRequest(dataset=config.dataset, output_dir=f"datasets/{dataset_key.key}")
    dataset, _ = _finish(dataset_key, _submit(stages.prepare_dataset, dataset_request, config, False))
    eval_key = keys.evaluate_key(f"endpoint:{base_url}:{model_name}", dataset.fingerprint, config.evaluate,
                                 config.instruction)
    request = EvaluateRequest(
        evaluate=config.evaluate, base_url=base_url, model_name=model_name, dataset_dir=dataset.path,
        instruction=config.instruction, output_path=f"evals/{eval_key.key}.json", label=label,
    )
    # An endpoint can change behind the same URL, so an ad-hoc evaluation always runs.
    result, _ = _finish(eval_key, _submit(stages.evaluate, request, config, True))
    artifacts.publish_metrics({label: result})
    artifacts.publish_eval_report({label: result})
    return result


@flow(name="export-adapter", log_prints=True)
def export_adapter(adapter_dir: str, model_dir: str, config: PipelineConfig = PipelineConfig()):
    """Merge a given LoRA adapter into a given base model folder (16-bit safetensors)."""
    from modal_jobs.storage import fingerprint_path

    check_writable()
    export_key = keys.export_key(
        f"adapter:{fingerprint_path(resolve(adapter_dir))}:{fingerprint_path(resolve(model_dir))}", config.export
    )
    request = ExportRequest(export=config.export, model_dir=str(resolve(model_dir)),
                            adapter_dir=str(resolve(adapter_dir)), output_dir=f"exports/{export_key.key}")
    result, _ = _finish(export_key, _submit(stages.export, request, config, False))
    artifacts.publish_output("merged-model", result.merged_dir, f"Merged {result.dtype} model")
    return result
