"""What each stage's job function takes and returns.

A request is one typed object: the stage's config section plus the storage-relative paths it reads and
writes. A result is small and JSON-able (paths, fingerprints, counts, metrics), never model bytes.
Paths are relative to the storage root (see `modal_jobs.storage.resolve`) unless absolute.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from modal_jobs.config import (
    DatasetConfig,
    EvaluateConfig,
    ExportConfig,
    ModelConfig,
    ServeConfig,
    TrainConfig,
)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- prepare_dataset ---------------------------------------------------------------------------------


class PrepareDatasetRequest(Message):
    """The prepared dataset always has splits `train` and `test` and columns `image` and `text`, whatever
    the source called them, so later stages need not know."""

    dataset: DatasetConfig
    output_dir: str = Field(description="Where the validated dataset is saved (save_to_disk layout).")


class PrepareDatasetResult(Message):
    path: str
    fingerprint: str = Field(description="Content hash of the prepared dataset.")
    source_fingerprint: str
    splits: dict[str, int] = Field(description="Rows per split.")
    skipped_rows: list[str] = Field([], description="Unusable rows left out (dataset.max_bad_rows), with reasons.")
    cached: bool = False


# --- prepare_model -----------------------------------------------------------------------------------


class PrepareModelRequest(Message):
    model: ModelConfig
    output_dir: str


class PrepareModelResult(Message):
    path: str
    fingerprint: str
    source_fingerprint: str
    architecture: str
    num_parameters: int
    cached: bool = False


# --- train -------------------------------------------------------------------------------------------


class TrainRequest(Message):
    train: TrainConfig
    model: ModelConfig
    dataset_dir: str
    model_dir: str
    output_dir: str = Field(description="The run folder: checkpoints/ while training, lora/ when done.")
    instruction: str
    features_dir: str | None = Field(
        None,
        description=(
            "An encode_images output for this dataset and model: with vision layers frozen, training reads the "
            "cached image features instead of running the vision tower (the job checks that the cache matches)."
        ),
    )

    @property
    def adapter_dir(self) -> str:
        return f"{self.output_dir}/lora"

    @property
    def checkpoints_dir(self) -> str:
        return f"{self.output_dir}/checkpoints"


class TrainResult(Message):
    adapter_dir: str
    checkpoints_dir: str
    backend: str
    global_step: int
    train_loss: float | None
    first_logged_loss: float | None = None
    last_logged_loss: float | None = None
    train_samples: int
    runtime_s: float
    resumed_from: str | None = None
    # The batch as it ran (None in results written before it was recorded): the global batch is the config's,
    # however it was split between micro-batches, accumulation and processes.
    gpus: int = Field(1, description="Processes that trained, one per GPU (CPU processes where there is no CUDA).")
    micro_batch: int | None = Field(None, description="Samples per forward pass in each process.")
    accumulation_steps: int | None = Field(None, description="Micro-batches each process accumulates per step.")
    global_batch_size: int | None = Field(
        None, description="Samples per optimizer step: micro_batch x accumulation_steps x gpus."
    )
    # Where the time before the first optimizer step goes (None in results written before it was recorded): on a
    # GPU it is minutes cold, and the 10-minute smoke and the retrain target both hang on it.
    startup_s: dict[str, float | None] | None = Field(
        None, description="Seconds: 'imports' (process start to building the trainer), 'build_trainer' (model "
                          "load, LoRA, levers; its parts as 'build_trainer.inputs', '.load_model', '.trainer', "
                          "'.levers'), 'first_step' (train() start to the first optimizer step's end: compilation "
                          "and one step).",
    )
    compilation: dict[str, Any] | None = Field(
        None, description="What torch.compile did in the job (modal_jobs.train.levers.compilation_record): frames, "
                          "compile seconds, recompile reasons, kernel-cache hits; None where nothing was compiled.",
    )
    cached: bool = False


# --- export ------------------------------------------------------------------------------------------


class ExportRequest(Message):
    export: ExportConfig
    model_dir: str
    adapter_dir: str
    output_dir: str


class ExportResult(Message):
    merged_dir: str
    dtype: str
    size_bytes: int
    hub_urls: list[str] = []
    cached: bool = False


# --- serve -------------------------------------------------------------------------------------------


class ServeRequest(Message):
    serve: ServeConfig
    model_dir: str
    session: str | None = Field(
        None, description="Who the server is for (the flow run id): two pipelines never share a server."
    )


class ServeResult(Message):
    base_url: str = Field(description="OpenAI-compatible base URL, ending in /v1.")
    model_name: str = Field(description="The `model` value requests must carry.")
    backend: str
    pid: int | None = Field(None, description="Local server process (None when the endpoint is remote).")
    sandbox_id: str | None = Field(None, description="The Modal Sandbox running the server (None when local).")


# --- evaluate ----------------------------------------------------------------------------------------


class EvaluateRequest(Message):
    evaluate: EvaluateConfig
    base_url: str
    model_name: str
    dataset_dir: str
    split: str = "test"
    instruction: str
    output_path: str = Field(description="Results JSON (metrics, per-sample predictions).")
    label: str = Field("model", description="A name for the report: base, finetuned, ...")
    api_key_env: str | None = Field(None, description="Environment variable with the endpoint's API key (not the key).")


class Metrics(Message):
    """Corpus metrics over the scored samples (definitions: modal_jobs.metrics). New fields default to None
    or empty, so results written before they existed still load."""

    exact_match: float | None
    cer: float | None
    wer: float | None
    num_samples: int
    num_scored: int
    num_failed: int
    normalized_exact_match: float | None = None
    normalized_cer: float | None = None
    normalized_wer: float | None = None
    token_edit_rate: float | None = None
    render_match: float | None = Field(None, description="None unless evaluate.render_check.")
    render_failed: int | None = Field(None, description="Predictions that did not render (None unless checked).")
    render_reference_failed: int | None = Field(None, description="References that did not render.")
    intervals: dict[str, list[float]] = Field(
        default_factory=dict, description="Per metric: [low, high] percentile-bootstrap interval over scored samples."
    )
    confidence_level: float | None = None
    bootstrap_resamples: int | None = None


class EvaluateResult(Message):
    results_path: str
    label: str
    metrics: Metrics
    cached: bool = False
