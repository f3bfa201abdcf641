"""Training on several GPUs (train.gpus), rehearsed on this CPU: torchrun starts the processes, gloo stands in for
NCCL, the tiny Gemma 3 trains on the cached-feature path. Two processes must learn what one learns with the same
global batch, write each checkpoint once, resume one another's checkpoints, and on Modal ask for "<type>:2".

Tolerance: the two layouts add the same float32 numbers in another order (a batch's loss summed in two halves, the
gradients all-reduced by gloo), so losses agree to 1e-4 relative and adapter weights (|w| ~ 0.1) to 1e-5 absolute;
measured, they agree to ~1e-6.

Run as: python -m pytest tests/test_multi_gpu.py -q
"""

from __future__ import annotations

import logging
import shutil

import pytest
from pydantic import ValidationError

from modal_jobs.config import ModalConfig, PipelineConfig, TrainConfig, load_config
from modal_jobs.errors import InputError
from modal_jobs.schemas import TrainRequest
from modal_jobs.storage import read_manifest

pytestmark = pytest.mark.integration

GLOBAL_BATCH = 8  # 4 x 2 in one process, 4 x 1 in each of two
LOSS_TOLERANCE = 1e-4  # relative
WEIGHT_TOLERANCE = 1e-5  # absolute


@pytest.fixture(autouse=True)
def no_telemetry_thread(monkeypatch):
    # TRL's trainer sends usage telemetry through huggingface_hub, whose worker thread outlives the test.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")  # and in the processes torchrun starts


def _request(inputs: dict, output_dir: str, gpus: int = 1) -> TrainRequest:
    config = PipelineConfig.embedded()
    # 4 optimizer steps of 8 rows: exactly one epoch of the 32-row set, so no process gets a short last batch.
    train = {**config.train.model_dump(), "per_device_batch_size": 4, "gradient_accumulation_steps": 2,
             "gpus": gpus, "max_steps": 4, "save_steps": 2, "logging_steps": 1}
    return TrainRequest(train=TrainConfig.model_validate(train), model=config.model, instruction=config.instruction,
                        output_dir=output_dir, **inputs)


def _losses(home, run: str) -> list[float]:
    return [entry["loss"] for entry in read_manifest(home / run / "lora")["log_history"] if "loss" in entry]


def _adapter(home, run: str) -> dict:
    from safetensors.torch import load_file

    return load_file(home / run / "lora" / "adapter_model.safetensors")


def _assert_same_adapter(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    largest = max(float((ours[name] - theirs[name]).abs().max()) for name in ours)
    assert largest <= WEIGHT_TOLERANCE, largest
    assert any(float(weight.abs().sum()) > 0 for name, weight in ours.items() if "lora_B" in name)  # it learned


def _resume_from(checkpoint, home, run: str) -> None:
    """Put a checkpoint where a run looks for one (its own checkpoints/ folder)."""
    target = home / run / "checkpoints" / checkpoint.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(checkpoint, target)


@pytest.fixture(scope="module")
def inputs(module_home, tiny_model_dir, tiny_dataset_dir) -> dict:
    from modal_jobs.encode import EncodeRequest, encode_images

    encoded = encode_images(EncodeRequest(model=PipelineConfig.embedded().model, dataset_dir=str(tiny_dataset_dir),
                                          model_dir=str(tiny_model_dir), features_root=str(module_home / "features"),
                                          batch_size=8, num_workers=0))
    return {"dataset_dir": str(tiny_dataset_dir), "model_dir": str(tiny_model_dir),
            "features_dir": encoded.features_dir}


@pytest.fixture(scope="module")
def one_process(module_home, inputs):
    """The reference: one process, micro-batch x accumulation = 8 (fused to one micro-batch of 8 on this path)."""
    from modal_jobs.train import train

    result = train(_request(inputs, "runs/one"))
    assert result.gpus == 1 and result.global_batch_size == GLOBAL_BATCH
    assert read_manifest(module_home / "runs/one/lora")["image_inputs"]["path"] == "features"
    return result


# --- the config ---------------------------------------------------------------------------------------------


def test_gpus_must_divide_the_accumulation_steps():
    with pytest.raises(ValidationError, match=r"train.gpus=2 does not divide train.gradient_accumulation_steps=3"):
        TrainConfig(gpus=2, gradient_accumulation_steps=3)
    split = TrainConfig(gpus=2, per_device_batch_size=4, gradient_accumulation_steps=4)
    assert split.accumulation_per_process == 2 and split.effective_batch_size == 16  # the config's global batch
    # At 1 it is left out of what is saved and hashed: the train key of every earlier run holds.
    assert "gpus" not in TrainConfig().model_dump() and TrainConfig(**split.model_dump()).gpus == 2


def test_modal_gets_one_gpu_count_and_a_gpu_type():
    on_modal = ["executor=modal", "train.gradient_accumulation_steps=2"]
    with pytest.raises(ValidationError, match=r"train.gpus=2, but modal.gpu.train is null"):
        load_config(None, [*on_modal, "train.gpus=2", "modal.gpu.train=null"])
    with pytest.raises(ValidationError, match=r"modal.gpu.train='H100:4' asks for 4 GPUs but train.gpus=2"):
        load_config(None, [*on_modal, "train.gpus=2", "modal.gpu.train=H100:4"])
    assert load_config(None, [*on_modal, "train.gpus=2", "modal.gpu.train=H100:2"]).train.gpus == 2
    # Locally the modal section is not used: nothing to agree with.
    assert load_config(None, ["train.gpus=2", "train.gradient_accumulation_steps=2", "modal.gpu.train=null"])


def test_more_gpus_than_visible_fails_before_any_model_is_loaded(vlmpipe_home, tmp_path, monkeypatch):
    import torch

    from modal_jobs.train import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    # The model folder does not even exist: the GPU count is what the job reports, so it looked at nothing else.
    missing = {"dataset_dir": str(tmp_path / "no-dataset"), "model_dir": str(tmp_path / "no-model")}
    with pytest.raises(InputError, match=r"train.gpus=2 but this machine shows 1 GPU"):
        train(_request(missing, "runs/too-many", gpus=2))
    assert not (vlmpipe_home / "runs" / "too-many").exists()


# --- two processes against one -----------------------------------------------------------------------------


def test_two_processes_learn_what_one_does_and_one_resumes_their_checkpoint(module_home, inputs, one_process):
    from modal_jobs.train import train

    two = train(_request(inputs, "runs/two", gpus=2))
    assert (two.gpus, two.micro_batch, two.accumulation_steps, two.global_batch_size) == (2, 4, 1, GLOBAL_BATCH)
    assert two.global_step == one_process.global_step == 4
    print("losses, one process:", _losses(module_home, "runs/one"), "two:", _losses(module_home, "runs/two"))
    assert _losses(module_home, "runs/two") == pytest.approx(_losses(module_home, "runs/one"), rel=LOSS_TOLERANCE)
    _assert_same_adapter(_adapter(module_home, "runs/two"), _adapter(module_home, "runs/one"))

    # Each checkpoint written once, by rank 0 (the RNG states are per rank by design), the manifest once.
    checkpoint = module_home / "runs/two/checkpoints/checkpoint-2"
    written = sorted(path.name for path in checkpoint.iterdir())
    assert written.count("adapter_model.safetensors") == 1 and "optimizer.pt" in written
    assert [name for name in written if name.startswith("rng_state")] == ["rng_state_0.pth", "rng_state_1.pth"]
    checkpoints = (module_home / "runs/two/checkpoints").glob("checkpoint-*")
    assert sorted(path.name for path in checkpoints) == ["checkpoint-2", "checkpoint-4"]
    assert read_manifest(module_home / "runs/two/lora")["image_inputs"]["gpus"] == 2

    # Their checkpoint, resumed by one process, ends where the one-process run ended.
    _resume_from(checkpoint, module_home, "runs/two-then-one")
    resumed = train(_request(inputs, "runs/two-then-one"))
    assert resumed.resumed_from == "checkpoint-2" and resumed.global_step == 4 and resumed.gpus == 1
    assert _losses(module_home, "runs/two-then-one")[-2:] == pytest.approx(_losses(module_home, "runs/one")[-2:],
                                                                           rel=LOSS_TOLERANCE)
    _assert_same_adapter(_adapter(module_home, "runs/two-then-one"), _adapter(module_home, "runs/one"))


# --- on Modal -----------------------------------------------------------------------------------------------


def test_on_modal_two_gpus_are_asked_for_billed_and_resume_a_one_process_checkpoint(
        module_home, inputs, one_process, tmp_path, monkeypatch, caplog):
    """Rehearsal style (tests/modal_standin.py): the executor's real spawn, the app function's real body in a
    container of its own, which launches the two processes itself."""
    import modal_jobs.app as modal_app
    from tasks import modal_executor
    from tests.modal_standin import StandInModal

    standin = StandInModal(tmp_path / "modal")
    monkeypatch.setattr(modal_executor, "CLIENT", standin)
    volume = standin.volume.folder
    _resume_from(module_home / "runs/one/checkpoints/checkpoint-2", volume, "runs/one-then-two")
    settings = ModalConfig(poll_interval_s=0.5)
    assert settings.gpu.train == "A100-80GB"
    executor = modal_executor.ModalExecutor(settings)
    request = _request(inputs, "runs/one-then-two", gpus=2)

    executor_log = logging.getLogger("vlmpipe.modal")  # Prefect's logging set-up may stop it propagating
    executor_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="vlmpipe.modal"):
            result = executor.run("train", request)
    finally:
        executor_log.removeHandler(caplog.handler)

    call = standin.calls("train")[0]
    spec = modal_app.STAGE_SPECS["train"]
    assert call["gpu"] == "A100-80GB:2"  # the deployed function has one; this call asked for two
    assert (call["cpu"], call["memory"]) == (2 * spec.cpu, 2 * spec.memory_mib)
    assert result.gpus == 2 and result.resumed_from == "checkpoint-2" and result.global_step == 4
    _assert_same_adapter(_adapter(volume, "runs/one-then-two"), _adapter(module_home, "runs/one"))

    # The cost counts both GPUs (and the cores and memory asked for with them).
    price = (2 * settings.gpu_price_per_hour["A100-80GB"] + 2 * spec.cpu * settings.cpu_core_price_per_hour
             + 2 * spec.memory_mib / 1024 * settings.memory_gib_price_per_hour)
    assert executor.hourly_price(**executor.resources_for("train", request)) == pytest.approx(price)
    assert executor.hourly_price(**executor.resources_for("train", _request(inputs, "runs/x"))) < price / 1.9
    costs = [record.getMessage() for record in caplog.records if "USD" in record.getMessage()]
    assert costs and "A100-80GB:2" in costs[-1], costs


def test_the_card_count_is_not_part_of_the_train_key():
    """gpus=2 trains the same global batch and steps as gpus=1 (above): a run moved to another card count must find
    the same cache and checkpoints, while a change that does alter the batch still changes the key."""
    from modal_jobs.config import ModelConfig
    from modal_jobs.keys import train_key

    def key(**train):
        return train_key("data", "model", TrainConfig(**train), ModelConfig(), "read it", {"torch": "2"}).key

    assert key(gradient_accumulation_steps=4, gpus=2) == key(gradient_accumulation_steps=4)
    assert key(gradient_accumulation_steps=2, gpus=2) != key(gradient_accumulation_steps=4, gpus=2)


def test_the_loss_through_ddp_keeps_a_forward_set_on_the_instance(monkeypatch):
    """accelerate puts its autocast wrapper on the model instance before DDP wraps it: routing the feature loss
    through DDP's forward must leave that wrapper in place for every later call."""
    import socket

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from modal_jobs.train.distributed import through_ddp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        inner = torch.nn.Linear(2, 1)
        wrapper = inner.forward  # stands for accelerate's autocast-wrapped forward
        inner.forward = wrapper
        model = DistributedDataParallel(inner)
        loss = through_ddp(model, lambda module, x: module.weight.sum() * x.sum(), torch.ones(2))
        loss.backward()
        assert inner.__dict__["forward"] is wrapper
        assert inner.weight.grad is not None  # the gradient went through DDP's hooks
    finally:
        dist.destroy_process_group()
