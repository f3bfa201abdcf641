"""The pipeline's one typed config: a section per stage, validated when it is parsed.

Load it with `load_config(path, overrides)`; `PipelineConfig.embedded()` is the no-account default that
runs everything on one machine. Field defaults are the original recipe (Gemma 3 4B on unsloth/LaTeX_OCR).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator, model_validator

from modal_jobs.prompts import DEFAULT_INSTRUCTION

BUILTIN_DATASET = "builtin:synthetic-latex-ocr"
BUILTIN_MODEL = "builtin:tiny-gemma3"

Executor = Literal["local", "modal"]
StageName = Literal[
    "prepare_dataset", "prepare_model", "encode_images", "train", "export", "consistency", "serve", "evaluate"
]
STAGES: tuple[str, ...] = (
    "prepare_dataset", "prepare_model", "encode_images", "train", "export", "consistency", "serve", "evaluate"
)


# Names that become file or app names: no path separators, no `..`, so they cannot escape the storage root.
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


# Modal attaches at most 8 GPUs to one container (all on one machine); DDP here never spans machines.
MAX_GPUS_PER_CONTAINER = 8


class Section(BaseModel):
    # Unknown keys are errors: a typo in a YAML file must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticDatasetConfig(Section):
    """The built-in LaTeX OCR set: LaTeX strings rendered with matplotlib mathtext."""

    train_size: PositiveInt = Field(600, description="Rows in the train split.")
    test_size: PositiveInt = Field(60, description="Rows in the test split.")
    seed: int = Field(0, description="Same seed, same images and strings.")


class DatasetConfig(Section):
    source: str = Field(
        "unsloth/LaTeX_OCR",
        description=(
            "A hub dataset id, a local parquet file, a `save_to_disk` folder, an image folder with "
            f"metadata.jsonl/metadata.csv, or `{BUILTIN_DATASET}`."
        ),
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit sha).")
    train_split: str = "train"
    test_split: str = "test"
    image_column: str = "image"
    text_column: str = "text"
    max_image_pixels: PositiveInt = Field(
        40_000_000, description="Images larger than this are rejected (decompression-bomb guard)."
    )
    max_bad_rows: int = Field(
        0, ge=0, description="Skip and report up to this many unusable rows instead of failing (0: any bad row fails)."
    )
    # Left out of the saved config while unset, so the keys of every dataset prepared before it existed hold.
    test_size: int | float | None = Field(
        None,
        exclude_if=lambda value: value is None,
        description=(
            "For a source without a test split (e.g. one parquet file with no `split` column): hold out this share "
            "of the train split (0 < x < 1) or this many rows (an integer >= 1) as the test split, chosen with a "
            "fixed seed and recorded in the prepared dataset's manifest. Unset: the source must have its own "
            "test split (we never carve one out of the training data unasked)."
        ),
    )
    synthetic: SyntheticDatasetConfig = SyntheticDatasetConfig()

    @field_validator("source", "train_split", "test_split", "image_column", "text_column")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("test_size")
    @classmethod
    def _share_or_count(cls, value: int | float | None) -> int | float | None:
        if value is None:
            return value
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError(f"{value} is neither a share between 0 and 1 (e.g. 0.1) nor a whole number of rows")
        if isinstance(value, int) and value < 1:
            raise ValueError(f"{value} rows: hold out at least 1 row, or give a share between 0 and 1 (e.g. 0.1)")
        return value


class TinyModelConfig(Section):
    """The built-in tiny Gemma 3 vision model (random init, tokenizer trained offline)."""

    seed: int = 0
    hidden_size: PositiveInt = 64
    num_layers: PositiveInt = 2
    vocab_size: PositiveInt = 512


class ModelConfig(Section):
    source: str = Field(
        "unsloth/gemma-3-4b-it",
        description=f"A hub model id, a local model folder, or `{BUILTIN_MODEL}`.",
    )
    revision: str | None = None
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Weights dtype for training on a GPU (the CPU path always uses float32)."
    )
    load_in_4bit: bool = False
    max_seq_length: PositiveInt = 8000
    trust_remote_code: bool = Field(False, description="Run Python code shipped with a hub model. Off unless you trust it.")
    tiny: TinyModelConfig = TinyModelConfig()


class TrainConfig(Section):
    """LoRA on the language layers, vision tower frozen. Defaults are the original recipe."""

    backend: Literal["auto", "unsloth", "trl"] = Field(
        "auto",
        description=(
            "auto: on cached image features, TRL SFTTrainer + PEFT with the job's labelled-token loss; on pixels, "
            "Unsloth's FastVisionModel when CUDA is present, TRL SFTTrainer + PEFT otherwise."
        ),
    )
    lora_r: PositiveInt = 32
    lora_alpha: PositiveInt = 64
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    finetune_vision_layers: bool = False
    train_embeddings: bool = Field(
        False,
        description=(
            "Also train lm_head and embed_tokens as full copies, as the original script did. Off by default: "
            "with Gemma 3's 262k vocabulary that is ~1.3 B extra trainable parameters and a much larger adapter."
        ),
    )
    learning_rate: PositiveFloat = 3e-4
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.2, ge=0.0, lt=1.0, description="Fraction of the steps spent warming up.")
    per_device_batch_size: PositiveInt = 4
    gradient_accumulation_steps: PositiveInt = 4
    # Left out of the saved config at 1, so the train key of every run made before it existed holds.
    gpus: int = Field(
        1,
        ge=1,
        le=MAX_GPUS_PER_CONTAINER,
        exclude_if=lambda value: value == 1,
        description=(
            "GPUs to train on, one process each (DDP, launched with torchrun). The global batch stays "
            "per_device_batch_size x gradient_accumulation_steps: each process accumulates "
            "gradient_accumulation_steps / gpus micro-batches, so gpus must divide gradient_accumulation_steps. "
            "On Modal the train function asks for `<modal.gpu.train>:<gpus>`. On a machine without CUDA, gpus > 1 "
            "runs that many CPU processes over gloo (a rehearsal of the layout, docs/multi_gpu.md)."
        ),
    )
    num_epochs: PositiveFloat = 1.0
    max_steps: PositiveInt | None = Field(None, description="Stop after this many optimizer steps (overrides epochs).")
    max_samples: PositiveInt | None = Field(None, description="Train on at most this many rows of the train split.")
    max_grad_norm: PositiveFloat = 0.3
    weight_decay: float = Field(0.01, ge=0.0)
    optim: str = Field("adamw_torch_fused", description="A transformers optimizer name.")
    save_steps: PositiveInt = 250
    save_total_limit: PositiveInt = 20
    logging_steps: PositiveInt = 10
    seed: int = 3407
    wandb_project: str = "GemmaFinetuning"
    run_name: str | None = Field(None, pattern=SAFE_NAME, description="Default: finetune_<model>_<timestamp>.")

    @property
    def effective_batch_size(self) -> int:
        """Samples per optimizer step, whatever the number of GPUs (micro-batch x accumulation per process x
        processes)."""
        return self.per_device_batch_size * self.gradient_accumulation_steps

    @property
    def accumulation_per_process(self) -> int:
        return self.gradient_accumulation_steps // self.gpus

    @model_validator(mode="after")
    def _gpus_split_the_accumulation(self) -> TrainConfig:
        if self.gradient_accumulation_steps % self.gpus:
            multiple = self.gpus * max(1, round(self.gradient_accumulation_steps / self.gpus))
            raise ValueError(
                f"train.gpus={self.gpus} does not divide train.gradient_accumulation_steps="
                f"{self.gradient_accumulation_steps}: each GPU accumulates gradient_accumulation_steps / gpus "
                f"micro-batches so that the global batch stays per_device_batch_size x gradient_accumulation_steps "
                f"({self.effective_batch_size}). Set train.gradient_accumulation_steps to a multiple of {self.gpus} "
                f"(e.g. {multiple}, adjusting train.per_device_batch_size to keep the batch you want), or change "
                "train.gpus"
            )
        return self


class ExportConfig(Section):
    dtype: Literal["bfloat16", "float16"] = "bfloat16"
    hub_id: str | None = Field(None, description="Push the adapter to <hub_id>-lora and the merged model to <hub_id>.")
    hub_private: bool = True


class ServeConfig(Section):
    backend: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="auto: vLLM when it is installed and a GPU is present, else `transformers serve`."
    )
    host: str = Field("127.0.0.1", description="Bind address; loopback unless you mean to expose it.")
    port: int | None = Field(None, ge=1, le=65535, description="None: a free port.")
    gpu_memory_utilization: float = Field(0.4, gt=0.0, le=1.0)
    enforce_eager: bool = True
    startup_timeout_s: PositiveFloat = 300.0
    max_model_len: PositiveInt = Field(8192, description="vLLM: longest prompt + answer accepted, in tokens.")
    max_images_per_request: PositiveInt = Field(1, description="vLLM: images accepted in one request.")
    api_key_env: str | None = Field(
        None, description="Name of an environment variable holding an API key the endpoint will require."
    )


class EvaluateConfig(Section):
    """Scoring rules are in modal_jobs.metrics and modal_jobs.latex_norm (module docstrings)."""

    num_samples: PositiveInt = 100
    concurrency: PositiveInt = Field(8, description="Requests in flight at once.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 is greedy decoding, the default for evaluation.")
    max_tokens: PositiveInt = 512
    request_timeout_s: PositiveFloat = 120.0
    max_retries: int = Field(2, ge=0, description="Retries for a failed request (connection errors, 5xx).")
    examples_in_report: int = Field(20, ge=0)
    worst_in_report: int = Field(10, ge=0, description="Worst predictions (by normalized CER) shown in the report.")
    normalize_left_right: bool = Field(
        True, description="Normalized metrics treat `\\left(` as `(` (and drop \\big & co.); false keeps them."
    )
    render_check: bool = Field(
        False,
        description=(
            "Also render prediction and reference (matplotlib mathtext, ~10 ms each): equal images count as a "
            "match (render_match); predictions that do not render are counted (render_failed)."
        ),
    )
    bootstrap_resamples: int = Field(1000, ge=0, description="Bootstrap resamples for the intervals; 0: no intervals.")
    confidence_level: float = Field(0.95, gt=0.0, lt=1.0, description="Coverage of the bootstrap intervals.")
    bootstrap_seed: int = Field(0, description="Fixed, so the same predictions always give the same intervals.")
    length_buckets: list[PositiveInt] = Field(
        default_factory=lambda: [10, 20, 40, 80],
        description="Bucket edges in reference tokens for the per-length breakdown (1-10, 11-20, ..., 81+).",
    )


class PromoteConfig(Section):
    metric: Literal["cer", "wer", "exact_match"] = "cer"
    margin: float = Field(0.0, ge=0.0, description="The candidate must beat the champion by at least this much.")
    registry_name: str = Field("latex-ocr", pattern=SAFE_NAME, description="File name of the model registry.")


MODAL_GPU_TYPES = ("T4", "L4", "A10G", "L40S", "A100-40GB", "A100-80GB", "H100", "H200", "B200")


class StageGpus(Section):
    """GPU type per stage on Modal; null runs the stage on CPU."""

    prepare_dataset: str | None = None
    prepare_model: str | None = Field(None, description="Downloading weights needs no GPU.")
    encode_images: str | None = Field("A100-80GB", description="The frozen vision tower over every image, once.")
    train: str | None = "A100-80GB"
    export: str | None = Field(None, description="The merge runs on the CPU; a GPU would idle, billed.")
    consistency: str | None = Field("A100-80GB", description="Loads base + adapter and the merged model side by side.")
    serve: str | None = "L40S"
    evaluate: str | None = None

    @model_validator(mode="after")
    def _known_gpus(self) -> StageGpus:
        for stage, gpu in self.model_dump().items():
            if gpu is not None and gpu.split(":")[0] not in MODAL_GPU_TYPES:
                raise ValueError(
                    f"{stage}: GPU type {gpu!r} is not offered by Modal; use one of {', '.join(MODAL_GPU_TYPES)}"
                )
        return self


class ModalConfig(Section):
    """Where and on what each stage runs when its executor is `modal`."""

    app_name: str = Field(
        "vlmpipe", pattern=SAFE_NAME, description="The deployed Modal app (`modal deploy modal_jobs/app.py`)."
    )
    gpu: StageGpus = Field(default_factory=lambda: StageGpus(), description="GPU type per stage; null is CPU.")
    # The cost artifact prices each function by what it requests: GPUs + CPU cores + memory (Modal bills all three,
    # for what is requested or used, whichever is more). Check Modal's pricing page; these drift.
    gpu_price_per_hour: dict[str, float] = Field(
        default_factory=lambda: {
            "T4": 0.59, "L4": 0.80, "A10G": 1.10, "L40S": 1.95, "A100-40GB": 2.10,
            "A100-80GB": 2.50, "H100": 3.95, "H200": 4.54, "B200": 6.25,
        },
        description="USD per GPU-hour, for the cost artifact.",
    )
    cpu_core_price_per_hour: float = Field(0.0473, ge=0, description="USD per physical core-hour.")
    memory_gib_price_per_hour: float = Field(0.0080, ge=0, description="USD per GiB-hour of memory.")
    poll_interval_s: PositiveFloat = 10.0
    reconnect_timeout_s: PositiveFloat = Field(
        900.0,
        description="How long to keep re-attaching to a running call while Modal is unreachable before the task "
        "fails as retryable (the call keeps running; the retry re-attaches).",
    )


class PipelineConfig(Section):
    """Everything one run needs. Saved beside every output."""

    instruction: str = Field(DEFAULT_INSTRUCTION, description="The user turn's text, shared by training and serving.")
    executor: Executor = Field("local", description="Where jobs run: this machine, or Modal functions.")
    stage_executors: dict[StageName, Executor] = Field(
        default_factory=dict, description="Per-stage exceptions to `executor`, e.g. {train: modal}."
    )
    dataset: DatasetConfig = DatasetConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    serve: ServeConfig = ServeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    promote: PromoteConfig = PromoteConfig()
    modal: ModalConfig = ModalConfig()

    def executor_for(self, stage: str) -> str:
        return self.stage_executors.get(stage, self.executor)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _builtin_pairs(self) -> PipelineConfig:
        if self.model.source == BUILTIN_MODEL and self.model.load_in_4bit:
            raise ValueError("model.load_in_4bit: the built-in tiny model cannot be loaded in 4 bit")
        return self

    @model_validator(mode="after")
    def _train_gpus_on_modal(self) -> PipelineConfig:
        """On Modal the train function asks for `<modal.gpu.train>:<train.gpus>`: one count, said once."""
        if self.executor_for("train") != "modal":
            return self
        gpu = self.modal.gpu.train
        if gpu is None:
            if self.train.gpus > 1:
                raise ValueError(
                    f"train.gpus={self.train.gpus}, but modal.gpu.train is null (CPU): set modal.gpu.train to a GPU "
                    f"type (e.g. A100-80GB), or train.gpus to 1"
                )
            return self
        kind, _, count = gpu.partition(":")
        if count and (not count.isdigit() or int(count) != self.train.gpus):
            raise ValueError(
                f"modal.gpu.train={gpu!r} asks for {count} GPUs but train.gpus={self.train.gpus}: give the type alone "
                f"(modal.gpu.train: {kind}) and the count in train.gpus, which also sets how many processes train"
            )
        return self

    @classmethod
    def embedded(cls) -> PipelineConfig:
        """The whole pipeline on one CPU in about a minute: tiny model, synthetic data, local server.

        The recipe's learning rate and batch shape are tuned for a 4B model seeing 68k rows; a 200k-parameter
        model seeing a few hundred rows needs a larger rate and several passes to learn anything.
        """
        return cls.model_validate(EMBEDDED_OVERRIDES)


EMBEDDED_OVERRIDES: dict[str, Any] = {
    "dataset": {"source": BUILTIN_DATASET},
    "model": {"source": BUILTIN_MODEL, "max_seq_length": 256},
    "train": {
        "learning_rate": 3e-3,
        "per_device_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "num_epochs": 4,
        "warmup_ratio": 0.05,
        "save_steps": 100,
        "logging_steps": 10,
        "optim": "adamw_torch",
    },
    "evaluate": {"num_samples": 40, "max_tokens": 64, "concurrency": 4},
    # Its own champion: the tiny model must never compete with a real job's on a shared storage root.
    "promote": {"registry_name": "embedded"},
}


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ValueError(f"--set {dotted}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.learning_rate=1e-4` -> ("train.learning_rate", 1e-4); values are read as YAML scalars."""
    import yaml

    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected KEY=VALUE, e.g. train.learning_rate=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"--set {text!r}: the key is empty")
    return key, yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """A YAML file (or the embedded default when there is none) plus dotted overrides; unknown keys are errors.

    A YAML syntax error is an InputError naming the file, line and column (1-based, as editors count)."""
    import yaml

    from modal_jobs.errors import InputError

    def _yaml_problem(error: yaml.YAMLError) -> str:
        mark = getattr(error, "problem_mark", None)
        if mark is None:
            return str(error)
        text = f"line {mark.line + 1}, column {mark.column + 1}: {getattr(error, 'problem', None) or error}"
        context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
        if context and context_mark is not None:
            text += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
        return text

    if path is None:
        tree: dict[str, Any] = json.loads(json.dumps(EMBEDDED_OVERRIDES))
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise InputError(f"config file {path}: {_yaml_problem(error)}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path}: expected a mapping of sections at the top level")
        tree = loaded
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return PipelineConfig.model_validate(tree)


def save_config(config: BaseModel, path: Path) -> None:
    path.write_text(config.model_dump_json(indent=2) + "\n")
