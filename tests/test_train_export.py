"""Train and export on the real tiny model: the adapter learns, checkpoints resume, the merge loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from modal_jobs.config import ExportConfig, PipelineConfig, TrainConfig
from modal_jobs.errors import InputError
from modal_jobs.schemas import ExportRequest, TrainRequest
from modal_jobs.storage import is_complete


def _request(model_dir, dataset_dir, output_dir="runs/test", **train_overrides) -> TrainRequest:
    config = PipelineConfig.embedded()
    train = config.train.model_copy(update={"max_steps": 8, "save_steps": 4, "logging_steps": 2, **train_overrides})
    return TrainRequest(
        train=TrainConfig.model_validate(train.model_dump()), model=config.model, dataset_dir=str(dataset_dir),
        model_dir=str(model_dir), output_dir=output_dir, instruction=config.instruction,
    )


def test_train_learns_an_adapter_on_language_layers_only(vlmpipe_home, tiny_model_dir, tiny_dataset_dir):
    import gc

    from safetensors.torch import load_file

    from modal_jobs.train import train

    gc.unfreeze()
    try:
        result = train(_request(tiny_model_dir, tiny_dataset_dir))
        # What the start made was moved out of the collector's reach after the first step (levers).
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
    adapter = vlmpipe_home / result.adapter_dir
    assert is_complete(adapter)
    assert result.global_step == 8 and result.backend == "trl"
    assert result.last_logged_loss < result.first_logged_loss
    # Where the time before the first step went, each part measured (the test process has lived for a while).
    startup = result.startup_s
    parts = {"build_trainer.inputs", "build_trainer.load_model", "build_trainer.trainer", "build_trainer.levers"}
    assert set(startup) == {"imports", "build_trainer", "first_step"} | parts
    assert startup["imports"] > 0 and startup["build_trainer"] >= 0 and 0 <= startup["first_step"] <= result.runtime_s
    # The parts add up to the whole, give or take each one's rounding.
    # (each is rounded to 0.1 s: the tiny model loads in less, so a part may read 0.0)
    assert all(startup[part] >= 0 for part in parts)
    assert abs(sum(startup[part] for part in parts) - startup["build_trainer"]) <= 0.25
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all("language_model" in name for name in weights)
    # LoRA's B matrices start at zero: any non-zero B means the optimiser moved the adapter.
    assert any(float(t.abs().sum()) > 0 for name, t in weights.items() if "lora_B" in name)
    assert (adapter / "tokenizer_config.json").exists() and (adapter / "processor_config.json").exists()
    assert train(_request(tiny_model_dir, tiny_dataset_dir)).cached


def test_bad_training_input_fails_before_training(vlmpipe_home, tiny_model_dir, tmp_path):
    from modal_jobs.train import train

    with pytest.raises(InputError, match="does not exist"):
        train(_request(tiny_model_dir, tmp_path / "no-such-dataset"))
    with pytest.raises(InputError, match="config.json"):
        train(_request(tmp_path, tmp_path))
    assert not (vlmpipe_home / "runs" / "test" / "lora").exists()


def test_killed_training_resumes_from_its_last_checkpoint(vlmpipe_home, tiny_model_dir, tiny_dataset_dir, tmp_path):
    from modal_jobs.train import train

    request = _request(tiny_model_dir, tiny_dataset_dir, max_steps=40, save_steps=5)
    request_path = tmp_path / "request.json"
    request_path.write_text(request.model_dump_json())
    child = subprocess.Popen(
        [sys.executable, "-m", "modal_jobs.runner", "train", str(request_path), str(tmp_path / "result.json")],
        env={**os.environ, "VLMPIPE_HOME": str(vlmpipe_home)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    checkpoints = vlmpipe_home / "runs" / "test" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (checkpoints / "checkpoint-10" / "trainer_state.json").exists():
        assert child.poll() is None, "training ended before it could be killed"
        time.sleep(0.2)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not is_complete(vlmpipe_home / "runs" / "test" / "lora")

    result = train(request)
    saved = int(result.resumed_from.split("-")[1])
    assert saved >= 10  # at most one save interval lost
    assert result.global_step == 40
    state = json.loads((checkpoints / "checkpoint-40" / "trainer_state.json").read_text())
    assert state["global_step"] == 40


def test_export_merges_to_16_bit_that_transformers_loads(vlmpipe_home, tiny_model_dir, tiny_dataset_dir):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from modal_jobs.export import export
    from modal_jobs.train import train

    trained = train(_request(tiny_model_dir, tiny_dataset_dir, output_dir="runs/export"))
    result = export(ExportRequest(export=ExportConfig(), model_dir=str(tiny_model_dir),
                                  adapter_dir=trained.adapter_dir, output_dir="runs/export/merged"))
    merged_dir = vlmpipe_home / result.merged_dir
    assert is_complete(merged_dir)
    assert not list(merged_dir.glob("adapter_*"))
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir)
    assert merged.dtype == torch.bfloat16
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    name = next(n for n, _ in merged.named_parameters() if "language_model" in n and "q_proj" in n)
    assert not torch.allclose(dict(merged.named_parameters())[name].float(), dict(base.named_parameters())[name].float())
    processor = AutoProcessor.from_pretrained(merged_dir)
    assert processor.chat_template
    assert json.loads((merged_dir / "generation_config.json").read_text())["eos_token_id"] == [1, 6]


def test_export_refuses_a_folder_that_is_not_an_adapter(vlmpipe_home, tiny_model_dir, tmp_path):
    from modal_jobs.export import export

    with pytest.raises(InputError, match="adapter_config.json"):
        export(ExportRequest(export=ExportConfig(), model_dir=str(tiny_model_dir), adapter_dir=str(tmp_path),
                             output_dir="runs/x/merged"))
    assert not (vlmpipe_home / "runs" / "x" / "merged").exists()
