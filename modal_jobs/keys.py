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

from modal_jobs.config import DatasetConfig, EvaluateConfig, ExportConfig, ModelConfig, TrainConfig
from modal_jobs.storage import short_hash

# Bump when a stage's code changes what it produces, so old outputs are not reused.
CODE_VERSIONS = {"prepare_dataset": "1", "prepare_model": "1", "train": "1", "export": "1", "evaluate": "1"}

# Train settings that do not change the weights learned: left out of the key.
_TRAIN_FIELDS_NOT_IN_KEY = {"run_name", "wandb_project", "logging_steps", "save_total_limit", "save_steps"}
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
    settings = evaluate.model_dump(include={"num_samples", "temperature", "max_tokens"})
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
