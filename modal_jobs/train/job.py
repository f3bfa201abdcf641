"""The train job: `train(request) -> TrainResult`, resuming from the latest complete checkpoint.

Run as: python -m modal_jobs.runner train REQUEST.json RESULT.json
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from modal_jobs.schemas import TrainRequest, TrainResult
from modal_jobs.storage import atomic_output, is_complete, read_manifest, resolve
from modal_jobs.train.setup import build_trainer

# Files a Trainer checkpoint has once it is whole; a folder missing one was cut off mid-save.
_CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def latest_complete_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The highest-numbered checkpoint with all of _CHECKPOINT_FILES; None where there is none."""
    complete = []
    for path in checkpoints_dir.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and all((path / name).exists() for name in _CHECKPOINT_FILES):
            complete.append((int(match.group(1)), path))
    return max(complete)[1] if complete else None


def train(request: TrainRequest) -> TrainResult:
    """Train the adapter into <run>/lora/ (a finished one is returned as `cached`), resuming from the latest
    complete checkpoint in <run>/checkpoints/; with train.gpus > 1, in that many processes
    (modal_jobs.train.distributed)."""
    adapter_dir = resolve(request.adapter_dir)
    if is_complete(adapter_dir):
        return TrainResult.model_validate({**read_manifest(adapter_dir)["result"], "cached": True})
    if request.train.gpus > 1:
        from modal_jobs.train import distributed

        return distributed.launch(request)
    return train_in_this_process(request)


def train_in_this_process(request: TrainRequest) -> TrainResult:
    """The training itself: the whole run in a one-process job, one rank's share of it under DDP (where rank 0
    alone writes the adapter)."""
    from modal_jobs.train import distributed

    adapter_dir = resolve(request.adapter_dir)
    checkpoints_dir = resolve(request.checkpoints_dir)
    setup = build_trainer(request)
    trainer = setup.trainer
    resume_from = latest_complete_checkpoint(checkpoints_dir)
    if resume_from is not None and distributed.is_rank_zero():
        print(f"resuming from {resume_from}", file=sys.stderr)
    started = time.time()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    runtime = time.time() - started

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = TrainResult(
        adapter_dir=request.adapter_dir,
        checkpoints_dir=request.checkpoints_dir,
        backend=setup.backend,
        global_step=trainer.state.global_step,
        train_loss=output.training_loss,
        first_logged_loss=losses[0] if losses else None,
        last_logged_loss=losses[-1] if losses else None,
        train_samples=len(setup.rows),
        runtime_s=round(runtime, 2),
        resumed_from=resume_from.name if resume_from else None,
        gpus=setup.image_inputs["gpus"],
        micro_batch=setup.image_inputs["micro_batch"],
        accumulation_steps=setup.image_inputs["gradient_accumulation_steps"],
        global_batch_size=setup.image_inputs["global_batch_size"],
    )
    if not distributed.is_rank_zero():
        return result
    manifest = {"stage": "train", "request": request.model_dump(mode="json"), "result": result.model_dump(mode="json"),
                "image_inputs": setup.image_inputs, "log_history": trainer.state.log_history}
    with atomic_output(adapter_dir, manifest) as tmp:
        trainer.model.save_pretrained(str(tmp))
        setup.processor.save_pretrained(str(tmp))
        (tmp / "training_stats.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    del trainer, setup
    return result
