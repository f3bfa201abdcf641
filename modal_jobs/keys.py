"""Cache keys: each stage's key chains from the fingerprints of what it depends on.

    prepare_dataset  hash(dataset source fingerprint, dataset config)
    prepare_model    hash(model source fingerprint, model config)
    train            hash(dataset fp, model fp, normalised train config, training code version, numerics libs)
    export           hash(train key, export config)
    evaluate         hash(evaluated model fp or export key, dataset fp, evaluate config, instruction)

A key names the output folder (content addressing), so the same inputs always land in the same place.
Each key comes with its components, so a miss can say which input changed.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from pydantic import BaseModel

from modal_jobs.config import DatasetConfig, EvaluateConfig, ExportConfig, ModelConfig, ServeConfig, TrainConfig
from modal_jobs.storage import short_hash

# Bump when a stage's code changes what it produces, so old outputs are not reused.
CODE_VERSIONS = {"prepare_dataset": "1", "prepare_model": "1", "train": "1", "export": "1", "evaluate": "2"}

# Train settings that do not change the weights learned: left out of the key. `gpus` among them: N processes
# train on the same global batch and steps as one (tests/test_multi_gpu.py: adapters equal within 1e-5), so a run
# moved to another card count finds the same cache and resumes the same checkpoints.
_TRAIN_FIELDS_NOT_IN_KEY = {"run_name", "wandb_project", "logging_steps", "save_total_limit", "save_steps", "gpus"}
NUMERICS_LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "unsloth", "unsloth_zoo")


def local_library_versions() -> dict[str, str]:
    versions = {}
    for name in NUMERICS_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


class StageKey(BaseModel):
    stage: str
    key: str
    components: dict[str, Any]


def _key(stage: str, components: dict[str, Any]) -> StageKey:
    components = {"code_version": CODE_VERSIONS[stage], **components}
    return StageKey(stage=stage, key=short_hash(components), components=components)


def prepare_dataset_key(dataset: DatasetConfig, source_fingerprint: str) -> StageKey:
    settings = dataset.model_dump(exclude={"source", "revision"})
    if not dataset.source.startswith("builtin:"):
        settings.pop("synthetic")
    return _key("prepare_dataset", {"source": dataset.source, "source_fingerprint": source_fingerprint,
                                    "settings": settings})


def prepare_model_key(model: ModelConfig, source_fingerprint: str) -> StageKey:
    # Only the source decides what is on disk; dtype and sequence length matter to training, not here.
    settings = model.tiny.model_dump() if model.source.startswith("builtin:") else {}
    return _key("prepare_model", {"source": model.source, "source_fingerprint": source_fingerprint,
                                  "settings": settings})


def train_key(
    dataset_fingerprint: str,
    model_fingerprint: str,
    train: TrainConfig,
    model: ModelConfig,
    instruction: str,
    library_versions: dict[str, str],
) -> StageKey:
    return _key(
        "train",
        {
            "dataset_fingerprint": dataset_fingerprint,
            "model_fingerprint": model_fingerprint,
            "train": train.model_dump(exclude=_TRAIN_FIELDS_NOT_IN_KEY),
            "model": model.model_dump(include={"dtype", "load_in_4bit", "max_seq_length"}),
            "instruction": instruction,
            "libraries": library_versions,
        },
    )


def export_key(train_key: str, export: ExportConfig) -> StageKey:
    return _key("export", {"train_key": train_key, "export": export.model_dump(include={"dtype"})})


def evaluate_key(model_identity: str, dataset_fingerprint: str, evaluate: EvaluateConfig, instruction: str) -> StageKey:
    # Everything that changes the results file; concurrency, timeouts and retries do not.
    settings = evaluate.model_dump(include={
        "num_samples", "temperature", "max_tokens", "normalize_left_right", "render_check", "bootstrap_resamples",
        "confidence_level", "bootstrap_seed", "length_buckets", "worst_in_report", "examples_in_report",
    })
    return _key("evaluate", {"model": model_identity, "dataset_fingerprint": dataset_fingerprint,
                             "evaluate": settings, "instruction": instruction})


def changed_components(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the components that differ: why a key missed."""
    changed = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            changed.extend(changed_components(a, b, f"{prefix}{name}."))
        elif a != b:
            changed.append(f"{prefix}{name}")
    return changed


# --- encode_images (appended) -------------------------------------------------------------------------

CODE_VERSIONS["encode_images"] = "1"


def encode_features_key(
    dataset_fingerprint: str,
    split: str,
    vision_fingerprint: str,
    processor_signature: str,
    dtype: str,
    library_versions: dict[str, str],
) -> StageKey:
    """The image-feature cache: what the frozen vision tower + projector make of every image of a split.

    Keyed on the vision weights alone (not the whole model), so a retrain or a sweep on the same base model and
    data reuses it; and on everything else that changes the numbers: the processor's image settings (size,
    resampling, normalisation), the dtype the tower ran in and the libraries that computed it.
    """
    return _key(
        "encode_images",
        {
            "dataset_fingerprint": dataset_fingerprint,
            "split": split,
            "vision_fingerprint": vision_fingerprint,
            "processor_signature": processor_signature,
            "dtype": dtype,
            "libraries": {name: version for name, version in library_versions.items() if name in ("torch", "transformers")},
        },
    )


def encode_images_key(
    dataset_fingerprint: str, model_fingerprint: str, dtype: str, library_versions: dict[str, str]
) -> StageKey:
    """The orchestrator's name for an encode_images output, from the fingerprints a flow holds (it cannot read
    the weights when they live on a Modal Volume). The whole model's fingerprint covers its vision weights and
    its processor files, so a hit here is never stale; the job records the exact components (vision weights
    alone, processor settings) in the cache's manifest, and the train job checks those before using it."""
    return _key(
        "encode_images",
        {
            "dataset_fingerprint": dataset_fingerprint,
            "model_fingerprint": model_fingerprint,
            "dtype": dtype,
            "libraries": {name: version for name, version in library_versions.items() if name in ("torch", "transformers")},
        },
    )


# --- consistency ---------------------------------------------------------------------------------------

CODE_VERSIONS["consistency"] = "1"


def consistency_key(export_key: str, dataset_fingerprint: str, serve: ServeConfig, instruction: str) -> StageKey:
    """The train/serve check of one export, served by one kind of server, on one test set."""
    return _key("consistency", {"export_key": export_key, "dataset_fingerprint": dataset_fingerprint,
                                "serve": serve.model_dump(include={"backend"}), "instruction": instruction})
