"""The typed config: defaults are the original recipe, bad values fail at parse time with the field name."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from modal_jobs.config import BUILTIN_DATASET, BUILTIN_MODEL, PipelineConfig, load_config


def test_defaults_are_the_original_recipe():
    config = PipelineConfig()
    assert config.model.source == "unsloth/gemma-3-4b-it"
    assert config.dataset.source == "unsloth/LaTeX_OCR"
    assert config.instruction == "Write the LaTeX representation for this image."
    train = config.train
    assert (train.lora_r, train.lora_alpha, train.lora_dropout) == (32, 64, 0.0)
    assert (train.learning_rate, train.warmup_ratio, train.lr_scheduler_type) == (3e-4, 0.2, "linear")
    assert (train.per_device_batch_size, train.gradient_accumulation_steps) == (4, 4)
    assert (train.max_grad_norm, train.weight_decay, train.save_steps, train.save_total_limit) == (0.3, 0.01, 250, 20)
    assert train.train_embeddings is False and train.finetune_vision_layers is False


def test_no_config_file_means_the_embedded_default():
    config = load_config()
    assert config.model.source == BUILTIN_MODEL
    assert config.dataset.source == BUILTIN_DATASET


def test_yaml_file_and_dotted_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model:\n  source: some/model\ntrain:\n  lora_r: 16\n")
    config = load_config(path, ["train.learning_rate=1e-4", "evaluate.num_samples=7", "export.hub_id=me/model"])
    assert config.model.source == "some/model"
    assert config.train.lora_r == 16
    assert config.train.learning_rate == 1e-4
    assert config.evaluate.num_samples == 7
    assert config.export.hub_id == "me/model"
    assert config.dataset.source == "unsloth/LaTeX_OCR"  # a file starts from the recipe, not the embedded default


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.learning_rate=0", "train.learning_rate"),
        ("train.learning_rate=-1e-4", "train.learning_rate"),
        ("train.lora_r=0", "train.lora_r"),
        ("train.per_device_batch_size=-2", "train.per_device_batch_size"),
        ("train.bogus=1", "train.bogus"),
        ("bogus.key=1", "bogus"),
        ("executor=kubernetes", "executor"),
        ("dataset.image_column=", "dataset.image_column"),
        ("dataset.max_bad_rows=-1", "dataset.max_bad_rows"),
        ("promote.registry_name=../../etc/passwd", "promote.registry_name"),
        ("train.run_name=runs/../../x", "train.run_name"),
        ("modal.gpu.train=TPU-v5", "modal.gpu"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ValidationError) as caught:
        load_config(None, [override])
    locations = {".".join(str(part) for part in error["loc"]) for error in caught.value.errors()}
    assert field in locations


def test_override_needs_key_and_value():
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_config(None, ["train.learning_rate"])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_config_round_trips_through_json():
    config = load_config(None, ["train.lora_r=8"])
    assert PipelineConfig.model_validate_json(config.model_dump_json()) == config
