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
from modal_jobs.train import levers
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


def _seconds_since_process_start() -> float | None:
    """How long this process has lived (Linux /proc; None elsewhere): what its imports took, before any job code."""
    try:
        import os

        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return round(time.time() - (boot + start_ticks / os.sysconf("SC_CLK_TCK")), 1)
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _first_step_clock(ended: list[float]):
    """A callback noting when the first optimizer step ended (host time: the compilation before it dominates), and
    then, with levers.FEATURES_GC_FREEZE_AFTER_FIRST_STEP, moving what the start made (models, compiled code) out of
    the garbage collector's reach (gc.freeze): a full collection then walks only what training makes."""
    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if ended:
                return
            ended.append(time.time())
            if levers.FEATURES_GC_FREEZE_AFTER_FIRST_STEP:
                import gc

                gc.collect()
                gc.freeze()

    return FirstStep()


def train_in_this_process(request: TrainRequest) -> TrainResult:
    """The training itself: the whole run in a one-process job, one rank's share of it under DDP (where rank 0
    alone writes the adapter)."""
    from modal_jobs.train import distributed

    adapter_dir = resolve(request.adapter_dir)
    checkpoints_dir = resolve(request.checkpoints_dir)
    startup = {"imports": _seconds_since_process_start()}
    building = time.time()
    setup = build_trainer(request)
    startup["build_trainer"] = round(time.time() - building, 1)
    startup.update({f"build_trainer.{part}": seconds for part, seconds in setup.seconds.items()})
    trainer = setup.trainer
    first_step_ended: list[float] = []
    trainer.add_callback(_first_step_clock(first_step_ended))
    resume_from = latest_complete_checkpoint(checkpoints_dir)
    if resume_from is not None and distributed.is_rank_zero():
        print(f"resuming from {resume_from}", file=sys.stderr)
    started = time.time()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    runtime = time.time() - started
    # From train()'s start: the trainer's own set-up (resume included), compilation and the first step.
    startup["first_step"] = round(first_step_ended[0] - started, 1) if first_step_ended else None
    compilation = levers.compilation_record()  # ours (compiled layers) or Unsloth's own; None if nothing compiled
    if distributed.is_rank_zero():
        if compilation:
            print(f"compilation: {json.dumps(compilation)}", file=sys.stderr)
        parts = ", ".join(f"{part} {seconds}" for part, seconds in setup.seconds.items())
        print(f"startup: imports {startup['imports']} s, build_trainer {startup['build_trainer']} s ({parts}), first "
              f"optimizer step {startup['first_step']} s after train() began", file=sys.stderr)

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
        startup_s=startup,
        compilation=compilation,
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
