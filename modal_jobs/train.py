"""The train stage: LoRA on the language layers of a vision-language model, vision tower frozen.

Backends: Unsloth's FastVisionModel when CUDA is present (or asked for), TRL's SFTTrainer + PEFT otherwise.
Both train on the same rows (modal_jobs.prompts.training_row: a conversational prompt/completion pair plus
the image) through TRL's vision collator, so the loss covers the answer tokens only either way.

Checkpoints go to <run>/checkpoints/ every `save_steps`; a re-run (or a retried task, or a preempted Modal
container) resumes from the latest complete checkpoint. The adapter and processor land in <run>/lora/,
written atomically with a manifest. Training progress is mirrored to <run>/progress.json for the
orchestrator to show.

Run as: python -m modal_jobs.runner train REQUEST.json RESULT.json
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from modal_jobs.errors import InputError
from modal_jobs.schemas import TrainRequest, TrainResult
from modal_jobs.storage import atomic_write_json, atomic_output, is_complete, read_manifest, resolve

# LoRA targets: the language model's attention and MLP projections only (the vision tower stays frozen).
LANGUAGE_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_TARGETS = r".*vision_tower.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"
# Files a Trainer checkpoint has once it is whole; a folder missing one was cut off mid-save.
_CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def choose_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None:
        return "unsloth"
    return "trl"


def latest_complete_checkpoint(checkpoints_dir: Path) -> Path | None:
    complete = []
    for path in checkpoints_dir.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and all((path / name).exists() for name in _CHECKPOINT_FILES):
            complete.append((int(match.group(1)), path))
    return max(complete)[1] if complete else None


def _report_to() -> list[str]:
    # W&B only when a key is present and the client is installed; never an error otherwise.
    if os.environ.get("WANDB_API_KEY") and importlib.util.find_spec("wandb") is not None:
        return ["wandb"]
    return []


def _training_rows(request: TrainRequest):
    from datasets import load_from_disk

    from modal_jobs.prompts import training_row

    dataset_dir = resolve(request.dataset_dir)
    if not dataset_dir.exists():
        raise InputError(f"prepared dataset {dataset_dir} does not exist")
    train_split = load_from_disk(str(dataset_dir))["train"]
    if request.train.max_samples is not None:
        if request.train.max_samples > len(train_split):
            print(
                f"train.max_samples={request.train.max_samples} is larger than the train split "
                f"({len(train_split)} rows): using all of it",
                file=sys.stderr,
            )
        train_split = train_split.select(range(min(request.train.max_samples, len(train_split))))
    if len(train_split) == 0:
        raise InputError("the train split is empty")

    def to_row(example: dict[str, Any]) -> dict[str, Any]:
        row = training_row(example["image"], example["text"], request.instruction)
        return {"prompt": row["prompt"], "completion": row["completion"]}

    # The image column stays as it is (TRL's collator accepts a single `image`); only text is reshaped.
    return train_split.map(to_row, remove_columns=["text"], desc="formatting")


def _progress_callback(progress_path: Path):
    from transformers import TrainerCallback

    class ProgressFile(TrainerCallback):
        """Mirror the trainer's log lines to a small JSON file the orchestrator polls."""

        def __init__(self) -> None:
            self.history: list[dict[str, Any]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.history.append(
                    {"step": state.global_step, "loss": logs.get("loss"), "learning_rate": logs.get("learning_rate"),
                     "epoch": logs.get("epoch")}
                )
            atomic_write_json(
                progress_path,
                {"step": state.global_step, "max_steps": state.max_steps, "history": self.history[-200:],
                 "updated_at": time.time()},
            )

    return ProgressFile()


def _load_trl(request: TrainRequest, model_dir: Path):
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = getattr(torch, request.model.dtype) if torch.cuda.is_available() else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=dtype, trust_remote_code=request.model.trust_remote_code, use_safetensors=True
    )
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=request.model.trust_remote_code)
    targets = LANGUAGE_TARGETS + (f"|{VISION_TARGETS}" if request.train.finetune_vision_layers else "")
    peft_config = LoraConfig(
        r=request.train.lora_r,
        lora_alpha=request.train.lora_alpha,
        lora_dropout=request.train.lora_dropout,
        bias="none",
        target_modules=targets,
        modules_to_save=["lm_head", "embed_tokens"] if request.train.train_embeddings else None,
        task_type="CAUSAL_LM",
    )
    return model, processor, peft_config


def _load_unsloth(request: TrainRequest, model_dir: Path):
    from unsloth import FastVisionModel  # noqa: I001  (Unsloth must be imported before transformers)

    train = request.train
    model, processor = FastVisionModel.from_pretrained(
        str(model_dir),
        load_in_4bit=request.model.load_in_4bit,
        use_gradient_checkpointing="unsloth",
        max_seq_length=request.model.max_seq_length,
    )
    model = FastVisionModel.get_peft_model(
        model,
        finetune_vision_layers=train.finetune_vision_layers,
        finetune_language_layers=True,
        finetune_attention_modules=True,
        finetune_mlp_modules=True,
        r=train.lora_r,
        lora_alpha=train.lora_alpha,
        lora_dropout=train.lora_dropout,
        bias="none",
        random_state=train.seed,
        modules_to_save=["lm_head", "embed_tokens"] if train.train_embeddings else None,
    )
    FastVisionModel.for_training(model)
    return model, processor, None


def train(request: TrainRequest) -> TrainResult:
    run_dir = resolve(request.output_dir)
    adapter_dir = resolve(request.adapter_dir)
    checkpoints_dir = resolve(request.checkpoints_dir)
    if is_complete(adapter_dir):
        return TrainResult.model_validate({**read_manifest(adapter_dir)["result"], "cached": True})

    model_dir = resolve(request.model_dir)
    if not (model_dir / "config.json").exists():
        raise InputError(f"model folder {model_dir} has no config.json")
    backend = choose_backend(request.train.backend)
    if backend == "unsloth":
        import torch

        if not torch.cuda.is_available():
            raise InputError("train.backend=unsloth needs a CUDA GPU; use backend auto or trl on this machine")
    rows = _training_rows(request)  # before the model: bad data fails before any weights are loaded

    if backend == "unsloth":
        model, processor, peft_config = _load_unsloth(request, model_dir)
    else:
        model, processor, peft_config = _load_trl(request, model_dir)

    import torch
    from trl import SFTConfig, SFTTrainer

    train_cfg = request.train
    on_gpu = torch.cuda.is_available()
    run_name = train_cfg.run_name or f"finetune_{model_dir.name}_{time.strftime('%Y%m%d-%H%M%S')}"
    os.environ.setdefault("WANDB_PROJECT", train_cfg.wandb_project)
    args = SFTConfig(
        output_dir=str(checkpoints_dir),
        per_device_train_batch_size=train_cfg.per_device_batch_size,
        gradient_accumulation_steps=train_cfg.gradient_accumulation_steps,
        num_train_epochs=train_cfg.num_epochs,
        max_steps=train_cfg.max_steps or -1,
        learning_rate=train_cfg.learning_rate,
        lr_scheduler_type=train_cfg.lr_scheduler_type,
        warmup_steps=train_cfg.warmup_ratio,  # transformers 5: a float below 1 is a ratio of total steps
        max_grad_norm=train_cfg.max_grad_norm,
        weight_decay=train_cfg.weight_decay,
        optim=train_cfg.optim,
        save_strategy="steps",
        save_steps=train_cfg.save_steps,
        save_total_limit=train_cfg.save_total_limit,
        logging_steps=train_cfg.logging_steps,
        seed=train_cfg.seed,
        bf16=on_gpu and request.model.dtype == "bfloat16",
        fp16=on_gpu and request.model.dtype == "float16",
        gradient_checkpointing=on_gpu and backend == "trl",
        max_length=request.model.max_seq_length,
        report_to=_report_to(),
        run_name=run_name,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[_progress_callback(run_dir / "progress.json")],
    )
    resume_from = latest_complete_checkpoint(checkpoints_dir)
    if resume_from is not None:
        print(f"resuming from {resume_from}", file=sys.stderr)
    started = time.time()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    runtime = time.time() - started

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = TrainResult(
        adapter_dir=request.adapter_dir,
        checkpoints_dir=request.checkpoints_dir,
        backend=backend,
        global_step=trainer.state.global_step,
        train_loss=output.training_loss,
        first_logged_loss=losses[0] if losses else None,
        last_logged_loss=losses[-1] if losses else None,
        train_samples=len(rows),
        runtime_s=round(runtime, 2),
        resumed_from=resume_from.name if resume_from else None,
    )
    manifest = {"stage": "train", "request": request.model_dump(mode="json"), "result": result.model_dump(mode="json"),
                "log_history": trainer.state.log_history}
    with atomic_output(adapter_dir, manifest) as tmp:
        trainer.model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        (tmp / "training_stats.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    del trainer, model
    return result

