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
from modal_jobs.errors import InputError
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


class _Run:
    """One pipeline run: its config, whether to recompute, and each stage's outcome. `stage` is the per-stage
    boilerplate: submit on the stage's executor, wait, say why it hit or missed, record the outcome, link the output."""

    def __init__(self, config: PipelineConfig, refresh: bool,
                 outcomes: dict[str, StageOutcome] | None = None) -> None:
        self.config, self.refresh = config, refresh
        self.outcomes: dict[str, StageOutcome] = {} if outcomes is None else outcomes

    def where(self, stage: str):
        return _where(self.config, stage)

    def submit(self, task, request: BaseModel, run_name: str | None = None) -> PrefectFuture:
        return _submit(task, request, self.config, self.refresh, run_name)

    def finish(self, stage_key: keys.StageKey, future: PrefectFuture, output: Callable[[Any], str],
               artifact: tuple[str, Callable[[Any], str]] | None = None, label: str | None = None) -> Any:
        result, state = _finish(stage_key, future, label)
        self.outcomes[label or stage_key.stage] = StageOutcome(state=state, output=output(result), key=stage_key.key)
        if artifact is not None:
            key, describe = artifact
            artifacts.publish_output(key, output(result), describe(result), where=self.where(stage_key.stage))
        return result

    def stage(self, task, stage_key: keys.StageKey, request: BaseModel, output: Callable[[Any], str],
              artifact: tuple[str, Callable[[Any], str]] | None = None, label: str | None = None) -> Any:
        run_name = None if label is None else label.replace("_", "-")
        return self.finish(stage_key, self.submit(task, request, run_name), output, artifact, label)

    def skip(self, name: str, why: str) -> None:
        self.outcomes[name] = StageOutcome(state="Skipped", output=why)


def _evaluate_model(run: _Run, label: str, model_dir: str, model_identity: str, dataset_fingerprint: str,
                    dataset_dir: str, served: ServeResult | None = None) -> EvaluateResult:
    """Serve the model only when its evaluation is not already on disk, then evaluate and stop the server.

    With `served`, that server is used (its owner stops it)."""
    config = run.config
    eval_key = keys.evaluate_key(model_identity, dataset_fingerprint, config.evaluate, config.instruction)
    request = EvaluateRequest(
        evaluate=config.evaluate, base_url="", model_name="", dataset_dir=dataset_dir,
        instruction=config.instruction, output_path=f"evals/{eval_key.key}.json", label=label,
        api_key_env=config.serve.api_key_env,
    )
    needs_server = served is None and (run.refresh or not _on_disk(stages.evaluate, request, config))
    if served is None and not needs_server:
        run.skip(f"serve_{label}", "evaluation already on disk")
    with serving_if(needs_server, config, model_dir) as started:
        endpoint = served or started
        if started is not None:
            run.outcomes[f"serve_{label}"] = StageOutcome(state="Completed", output=started.base_url)
        if endpoint is not None:
            request = request.model_copy(update={"base_url": endpoint.base_url, "model_name": endpoint.model_name})
        return run.stage(stages.evaluate, eval_key, request, output=lambda r: r.results_path,
                         artifact=(f"eval-results-{label}", lambda r: f"Evaluation results ({label})"),
                         label=f"evaluate_{label}")


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
    """The diagram, one line a stage."""
    _preflight(config)
    run = _Run(config, refresh)
    dataset, model = _prepare(run)                                   # prepare_dataset, prepare_model (together)
    train_key, train_request = _train_request(run, dataset, model)
    train_request = _encode_images(run, dataset, model, train_request)  # the frozen vision tower, once per image
    trained = _train(run, train_key, train_request)                  # LoRA fine-tune
    export_key, exported = _export(run, train_key, model, trained)   # merge, 16-bit
    finetuned = _check_and_evaluate_finetuned(run, dataset, model, trained, export_key, exported)
    base = _evaluate_model(run, "base", model.path, model.fingerprint, dataset.fingerprint, dataset.path)
    return _result(run, dataset, model, trained, exported, {"base": base, "finetuned": finetuned})


def _preflight(config: PipelineConfig) -> None:
    """What can fail without any job running: the storage root, the Modal token, the Hub token for a push."""
    from tasks.secrets import load_secret_blocks

    check_writable()
    _check_modal_credentials(config)
    loaded = load_secret_blocks()
    if loaded:
        get_run_logger().info("read %s from Prefect Secret blocks", ", ".join(loaded))
    if config.export.hub_id and config.executor_for("export") == "local":
        # On Modal the token lives in the Secret, where the push happens: the export job checks it there.
        from modal_jobs.hub import hub_token

        if not hub_token():
            raise InputError("export.hub_id is set but no HF_TOKEN is in the environment: set it, or unset hub_id")


def _prepare(run: _Run) -> tuple[Any, Any]:
    """Both sources keyed first (a bad source fails here, before any job starts), then both stages at once."""
    from modal_jobs.dataset import source_fingerprint as dataset_source_fingerprint
    from modal_jobs.model import source_fingerprint as model_source_fingerprint

    config = run.config
    dataset_key = keys.prepare_dataset_key(config.dataset, dataset_source_fingerprint(config.dataset))
    model_key = keys.prepare_model_key(config.model, model_source_fingerprint(config.model))
    dataset_future = run.submit(stages.prepare_dataset, PrepareDatasetRequest(
        dataset=config.dataset, output_dir=f"datasets/{dataset_key.key}"))
    model_future = run.submit(stages.prepare_model, PrepareModelRequest(
        model=config.model, output_dir=f"models/{model_key.key}"))
    dataset = run.finish(dataset_key, dataset_future, output=lambda r: r.path,
                         artifact=("dataset", lambda r: f"Prepared dataset: {r.splits}"))
    if dataset.skipped_rows:
        artifacts.publish_skipped_rows(dataset.skipped_rows)
    model = run.finish(model_key, model_future, output=lambda r: r.path, artifact=(
        "base-model", lambda r: f"Base model: {r.architecture}, {r.num_parameters:,} parameters"))
    return dataset, model


def _train_request(run: _Run, dataset: Any, model: Any) -> tuple[keys.StageKey, TrainRequest]:
    config = run.config
    train_key = keys.train_key(dataset.fingerprint, model.fingerprint, config.train, config.model,
                               config.instruction, run.where("train").library_versions())
    atomic_write_json(f"runs/{train_key.key}/pipeline_config.json", config.model_dump(mode="json"))
    return train_key, TrainRequest(
        train=config.train, model=config.model, dataset_dir=dataset.path, model_dir=model.path,
        output_dir=f"runs/{train_key.key}", instruction=config.instruction,
    )


def _encode_images(run: _Run, dataset: Any, model: Any, train_request: TrainRequest) -> TrainRequest:
    """The frozen vision tower once per training image; train (and every retrain or sweep on this base model and
    data) reads the features instead of pixels. Skipped when vision layers train, or when the adapter is already
    on disk (train is then a cache hit and needs no inputs)."""
    config = run.config
    if config.train.finetune_vision_layers:
        run.skip("encode_images", "train.finetune_vision_layers: pixels")
        return train_request
    if not run.refresh and run.where("train").output_exists(train_request.adapter_dir):
        run.skip("encode_images", "adapter already on disk")
        return train_request
    return train_request.model_copy(update={"features_dir": _encode(run, dataset, model).features_dir})


def _encode(run: _Run, dataset: Any, model: Any) -> Any:
    """The encode_images stage itself (one set of features per dataset and base model, whatever trains on it)."""
    config = run.config
    encode_key = keys.encode_images_key(dataset.fingerprint, model.fingerprint, config.model.dtype,
                                        run.where("encode_images").library_versions())
    request = EncodeRequest(model=config.model, dataset_dir=dataset.path, model_dir=model.path,
                            output_dir=f"features/{encode_key.key}")
    return run.stage(stages.encode_images, encode_key, request, output=lambda r: r.features_dir, artifact=(
        "image-features", lambda r: f"{r.num_images} images encoded ({r.size_bytes / 1e9:.1f} GB)"))


def _train(run: _Run, train_key: keys.StageKey, train_request: TrainRequest) -> Any:
    trained = run.stage(stages.train, train_key, train_request, output=lambda r: r.adapter_dir, artifact=(
        "train-adapter",
        lambda r: f"LoRA adapter, {r.global_step} steps, loss {r.first_logged_loss} -> {r.last_logged_loss}"))
    artifacts.publish_checkpoints(trained.checkpoints_dir, where=run.where("train"))
    artifacts.publish_training_stats(trained.adapter_dir, where=run.where("train"))
    return trained


def _export(run: _Run, train_key: keys.StageKey, model: Any, trained: Any) -> tuple[keys.StageKey, Any]:
    export_key = keys.export_key(train_key.key, run.config.export)
    request = ExportRequest(export=run.config.export, model_dir=model.path, adapter_dir=trained.adapter_dir,
                            output_dir=f"runs/{train_key.key}/merged-{export_key.key}")
    exported = run.stage(stages.export, export_key, request, output=lambda r: r.merged_dir,
                         artifact=("merged-model", lambda r: f"Merged {r.dtype} model"))
    return export_key, exported


def _check_and_evaluate_finetuned(run: _Run, dataset: Any, model: Any, trained: Any, export_key: keys.StageKey,
                                  exported: Any) -> EvaluateResult:
    """serve -> consistency -> evaluate, for the fine-tuned model: the served merged model against the adapter and
    the training prompt on a few test images, before anything is evaluated or promoted. One server for the check
    and the evaluation, none when both are on disk. A mismatch fails the run, with its report as an artifact."""
    config = run.config
    identity = f"export:{export_key.key}"
    check_key = keys.consistency_key(export_key.key, dataset.fingerprint, config.serve, config.instruction)
    check_request = ConsistencyRequest(
        model_dir=model.path, adapter_dir=trained.adapter_dir, merged_dir=exported.merged_dir,
        dataset_dir=dataset.path, instruction=config.instruction, api_key_env=config.serve.api_key_env,
        output_path=f"{trained.adapter_dir.rsplit('/', 1)[0]}/consistency-{check_key.key}.json",
    )
    eval_key = keys.evaluate_key(identity, dataset.fingerprint, config.evaluate, config.instruction)
    evaluation = EvaluateRequest(evaluate=config.evaluate, base_url="", model_name="", dataset_dir=dataset.path,
                                 instruction=config.instruction, output_path=f"evals/{eval_key.key}.json")
    needs_server = (run.refresh or not _on_disk(stages.consistency, check_request, config)
                    or not _on_disk(stages.evaluate, evaluation, config))
    if not needs_server:
        run.skip("serve_finetuned", "check and evaluation already on disk")
    with serving_if(needs_server, config, exported.merged_dir) as served:
        if served is not None:
            run.outcomes["serve_finetuned"] = StageOutcome(state="Completed", output=served.base_url)
            check_request = check_request.model_copy(
                update={"base_url": served.base_url, "model_name": served.model_name})
        checked = run.stage(stages.consistency, check_key, check_request, output=lambda r: r.report_path)
        if not checked.passed:
            run.outcomes["consistency"] = run.outcomes["consistency"].model_copy(update={"state": "Failed"})
        artifacts.publish_consistency(checked, where=run.where("consistency"))
        checked.raise_for_mismatch()
        return _evaluate_model(run, "finetuned", exported.merged_dir, identity, dataset.fingerprint, dataset.path,
                               served=served)


def _result(run: _Run, dataset: Any, model: Any, trained: Any, exported: Any,
            evaluations: dict[str, EvaluateResult]) -> PipelineResult:
    """What the run made, its paths named as what they are: local files, or places on the Modal Volume."""
    config = run.config
    evaluated = run.where("evaluate")
    artifacts.publish_metrics(evaluations)
    artifacts.publish_eval_report(evaluations, where=evaluated)
    result = PipelineResult(
        stages=run.outcomes,
        dataset_dir=run.where("prepare_dataset").display_path(dataset.path),
        model_dir=run.where("prepare_model").display_path(model.path),
        adapter_dir=run.where("train").display_path(trained.adapter_dir),
        merged_dir=run.where("export").display_path(exported.merged_dir),
        metrics={label: e.metrics.model_dump() for label, e in evaluations.items()},
        results_files={label: evaluated.display_path(e.results_path) for label, e in evaluations.items()},
        storage_root=str(storage_root()),
        remote_outputs={what: location for what, stage, location in (
            ("merged", "export", exported.merged_dir), ("adapter", "train", trained.adapter_dir))
            if config.executor_for(stage) == "modal"},
    )
    logger = get_run_logger()
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
