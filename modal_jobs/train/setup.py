"""Building the trainer: backend, model and LoRA, image inputs, speed levers, arguments, rows and collator.

`build_trainer(request)` reads as the sequence of its steps, each a named function of this module. The trainer's
arguments are all in `_training_arguments`; which levers a run uses is decided once, in `_choose_levers`, from
the settings in modal_jobs.train.levers.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modal_jobs.errors import InputError
from modal_jobs.schemas import TrainRequest
from modal_jobs.storage import atomic_write_json, resolve, short_hash
from modal_jobs.train import distributed, levers
from modal_jobs.train.loss import _with_image_features
from modal_jobs.train.rows import (
    FeatureCollator,
    _feature_rows,
    _pixel_rows,
    _train_split,
)

# LoRA targets: the language model's attention and MLP projections only (the vision tower stays frozen).
LANGUAGE_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_TARGETS = r".*vision_tower.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"


def choose_backend(requested: str, features_expected: bool = False) -> str:
    """auto: on cached features, HF + PEFT with our labelled-token loss and compiled layers (faster there than
    Unsloth, whose gains are on the pixel path: bench/train_speed.py); on pixels, Unsloth when CUDA has it."""
    if requested != "auto":
        return requested
    import torch

    if not features_expected and torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None:
        return "unsloth"
    return "trl"


def plan_image_inputs(request: TrainRequest) -> dict[str, Any]:
    """Cached features or pixels, and why: {"features_dir": str | None, "reasons": [...], "components": ...}."""
    if request.features_dir is None:
        return {"features_dir": None, "reasons": ["no feature cache given (request.features_dir)"]}
    if request.train.finetune_vision_layers:
        return {"features_dir": None,
                "reasons": ["train.finetune_vision_layers: the vision tower's outputs change as it trains"]}
    from transformers import AutoProcessor

    from modal_jobs.encode import cache_components, check_cache, compute_dtype

    processor = AutoProcessor.from_pretrained(resolve(request.model_dir),
                                              trust_remote_code=request.model.trust_remote_code)
    expected = cache_components(request.dataset_dir, request.model_dir, processor, "train",
                                compute_dtype(request.model))
    reasons = check_cache(request.features_dir, expected.components)
    return {"features_dir": None if reasons else request.features_dir, "reasons": reasons,
            "components": expected.components}


def _micro_batch(train_cfg: Any, features: bool) -> tuple[int, int]:
    """(micro-batch, accumulation steps) of each of the train.gpus processes: together they keep the effective
    batch (each accumulates gradient_accumulation_steps / gpus micro-batches); with cached features, as few steps
    as the micro-batch cap allows."""
    if not features:
        return train_cfg.per_device_batch_size, train_cfg.accumulation_per_process
    effective = train_cfg.per_device_batch_size * train_cfg.accumulation_per_process
    micro = max(d for d in range(1, min(effective, levers.FEATURES_MAX_MICRO_BATCH) + 1) if effective % d == 0)
    return micro, effective // micro


def _report_to() -> list[str]:
    # W&B only when a key is present and the client is installed; never an error otherwise.
    if os.environ.get("WANDB_API_KEY") and importlib.util.find_spec("wandb") is not None:
        return ["wandb"]
    return []


def _progress_callback(progress_path: Path):
    from transformers import TrainerCallback

    class ProgressFile(TrainerCallback):
        """Mirror the trainer's log lines to a small JSON file the orchestrator polls; after each checkpoint,
        make the storage durable (on Modal: commit the Volume, so a preempted run resumes from it)."""

        def on_save(self, args, state, control, **kwargs):
            from modal_jobs.storage import make_durable

            make_durable()

        def __init__(self) -> None:
            self.history: list[dict[str, Any]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero:  # under DDP every process logs the same (gathered) numbers
                return
            if logs and "loss" in logs:
                self.history.append(
                    {"step": state.global_step, "loss": logs.get("loss"), "learning_rate": logs.get("learning_rate"),
                     "epoch": logs.get("epoch"), "time": round(time.time(), 3)}
                )
            atomic_write_json(
                progress_path,
                {"step": state.global_step, "max_steps": state.max_steps, "history": self.history[-200:],
                 "updated_at": time.time()},
            )

    return ProgressFile()


# --- loading --------------------------------------------------------------------------------------------


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


def _load_unsloth(request: TrainRequest, model_dir: Path, gradient_checkpointing: bool | str = "unsloth"):
    from unsloth import FastVisionModel  # Unsloth must be imported before transformers

    train = request.train
    # Under DDP each process's copy on its own GPU (Unsloth places only quantized models per rank by itself).
    placement = {"device_map": {"": f"cuda:{distributed.local_rank()}"}} if distributed.world_size() > 1 else {}
    model, processor = FastVisionModel.from_pretrained(
        str(model_dir),
        load_in_4bit=request.model.load_in_4bit,
        use_gradient_checkpointing=gradient_checkpointing,
        max_seq_length=request.model.max_seq_length,
        **placement,
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


class TrainerSetup:
    """A built trainer and how it was built (what `train` runs; the benchmark and the tests use it too)."""

    def __init__(self, trainer: Any, processor: Any, rows: Any, backend: str, image_inputs: dict[str, Any],
                 seconds: dict[str, float] | None = None):
        self.trainer = trainer
        self.processor = processor
        self.rows = rows
        self.backend = backend
        self.image_inputs = image_inputs
        # Building it, by part: inputs (data checked and read), load_model (transformers' import, the weights),
        # trainer (LoRA, the rows, TRL's trainer), levers (compiled layers, fused LoRA).
        self.seconds = seconds or {}


@dataclass(frozen=True)
class LeverChoice:
    """Which speed levers one run uses, decided once from modal_jobs.train.levers (the cached-features path's;
    pixels get full recomputation and nothing else)."""

    features: bool
    on_gpu: bool
    checkpointing: bool | str
    compile_layers: bool
    recompute_in_compiled: bool
    micro_batch: int
    accumulation: int  # per process
    processes: int  # train.gpus: the global batch is micro_batch x accumulation x processes
    group_by_length: bool
    pack: bool
    loader_workers: int
    pad_to_multiple_of: int | None


def build_trainer(request: TrainRequest) -> TrainerSetup:
    """The trainer `train` runs, built so that a bad model folder, split or image fails before weights load.
    With train.gpus > 1, the trainer of one of that many processes (modal_jobs.train.distributed)."""
    # Seconds each part took (TrainResult.startup_s): the warm start is a target of its own (issue 17).
    took: dict[str, float] = {}
    began = time.time()
    _check_process_count(request)
    model_dir = _checked_model_dir(request)
    backend = _backend_imported_first(request)
    train_split = _train_split(request)  # before the model: bad data fails before any weights are loaded
    plan = plan_image_inputs(request)
    # Pixel rows decode every image: do it before loading the weights, so a broken image fails first.
    pixel_rows = None if plan["features_dir"] is not None else _pixel_rows(request, train_split)
    took["inputs"], began = round(time.time() - began, 1), time.time()
    expandable_segments = levers.use_expandable_segments()
    model, processor, peft_config = _load_model(request, model_dir, backend, plan["features_dir"] is not None)
    took["load_model"], began = round(time.time() - began, 1), time.time()
    plan = _plan_checked_against_processor(plan, processor, backend)
    choice = _choose_levers(request, backend, plan["features_dir"] is not None, model)
    args = _training_arguments(request, model_dir, backend, choice)
    rows, trainer_class, collator_args = _rows_and_trainer_class(request, train_split, pixel_rows, processor, plan,
                                                                 choice, args.max_length)
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=rows,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[_progress_callback(resolve(request.output_dir) / "progress.json")],
        **collator_args,
    )
    took["trainer"], began = round(time.time() - began, 1), time.time()
    compiled, fused_lora = _apply_model_levers(trainer, backend, choice)
    took["levers"] = round(time.time() - began, 1)
    record = _image_inputs_record(plan, choice, compiled, fused_lora)
    record["expandable_segments"] = expandable_segments
    if compiled:
        text_config = trainer.model.config.get_text_config()
        selective_inside = choice.recompute_in_compiled and choice.checkpointing == "selective"
        record.update(recomputed_wide_matmuls=levers.recompute_wide_matmuls() if selective_inside else None,
                      flex_kernel_options=levers.flex_kernel_options(text_config))
    return TrainerSetup(trainer, processor, rows, backend, record, took)


def _check_process_count(request: TrainRequest) -> None:
    # Each process accumulates gradient_accumulation_steps / gpus micro-batches: built in fewer processes than
    # train.gpus, a trainer would quietly train on a smaller global batch than the config's.
    if request.train.gpus > 1 and request.train.gpus != distributed.world_size():
        raise RuntimeError(
            f"a trainer for train.gpus={request.train.gpus} built in a group of {distributed.world_size()} "
            "process(es): train() launches one process per GPU (modal_jobs.train.distributed)"
        )


def _checked_model_dir(request: TrainRequest) -> Path:
    model_dir = resolve(request.model_dir)
    if not (model_dir / "config.json").exists():
        raise InputError(f"model folder {model_dir} has no config.json")
    return model_dir


def _backend_imported_first(request: TrainRequest) -> str:
    """The backend; Unsloth, where chosen, imported now, before anything below imports transformers (so that all
    its patches apply)."""
    # Whether cached features will be used is settled later (it needs transformers); the backend is chosen first,
    # because Unsloth must be imported before transformers. A stale cache then trains from pixels on HF + PEFT.
    features_expected = request.features_dir is not None and not request.train.finetune_vision_layers
    backend = choose_backend(request.train.backend, features_expected)
    if backend == "unsloth":
        import torch

        if not torch.cuda.is_available():
            raise InputError("train.backend=unsloth needs a CUDA GPU; use backend auto or trl on this machine")
        import unsloth  # noqa: F401  (before anything below imports transformers, so all its patches apply)
    return backend


def _checkpointing(features: bool) -> bool | str:
    return levers.FEATURES_GRADIENT_CHECKPOINTING if features else True  # the levers are the cached path's


def _load_model(request: TrainRequest, model_dir: Path, backend: str, features: bool):
    """(model, processor, peft_config): peft_config for the trainer to apply, None where the model has its LoRA."""
    if backend == "unsloth":
        return _load_unsloth(request, model_dir, "unsloth" if _checkpointing(features) else False)
    return _load_trl(request, model_dir)


def _plan_checked_against_processor(plan: dict[str, Any], processor: Any, backend: str) -> dict[str, Any]:
    """The image-input plan, switched to pixels if the loaded processor is not the one the cache was made with;
    says on stderr which inputs the run trains on and why."""
    if plan["features_dir"] is not None:
        from modal_jobs.encode import processor_settings

        loaded = short_hash(processor_settings(processor), length=32)
        if loaded != plan["components"]["processor_signature"]:
            plan = {**plan, "features_dir": None,
                    "reasons": [f"the {backend} backend's processor differs from the one the cache was made with"]}
    if distributed.is_rank_zero():  # under DDP one line, not one per process
        inputs = (f"cached features from {plan['features_dir']}" if plan["features_dir"] is not None
                  else f"pixels ({'; '.join(plan['reasons'])})")
        print(f"image inputs: {inputs}", file=sys.stderr)
    return plan


def _choose_levers(request: TrainRequest, backend: str, features: bool, model: Any) -> LeverChoice:
    """The levers this run uses. Where rows are packed, switches the model to FlexAttention."""
    import torch

    on_gpu = torch.cuda.is_available()
    checkpointing = _checkpointing(features)
    compile_layers = features and on_gpu and backend == "trl" and levers.FEATURES_COMPILE
    micro_batch, accumulation = _micro_batch(request.train, features)
    processes = request.train.gpus
    if distributed.is_rank_zero():
        print(f"batch: micro-batch {micro_batch} x accumulation {accumulation} x {processes} "
              f"process{'es' if processes > 1 else ''} = {micro_batch * accumulation * processes} rows per optimizer "
              f"step (train.per_device_batch_size x gradient_accumulation_steps = "
              f"{request.train.effective_batch_size})", file=sys.stderr)
    # Packed rows need a mask that keeps them apart; FlexAttention computes only its non-empty blocks (SDPA would
    # get a dense [tokens, tokens] mask over the whole batch). A model without it trains on padded batches.
    pack = bool(compile_layers and levers.FEATURES_PACK_SEQUENCES) and levers._switch_to_flex_attention(model)
    return LeverChoice(
        features=features,
        on_gpu=on_gpu,
        checkpointing=checkpointing,
        compile_layers=compile_layers,
        recompute_in_compiled=bool(compile_layers and levers.FEATURES_RECOMPUTE_IN_COMPILED and checkpointing),
        micro_batch=micro_batch,
        accumulation=accumulation,
        processes=processes,
        # transformers sizes the length groups by one process's batch, so under DDP other rows would share a step
        # than in one process: off there, so that any number of GPUs trains on the same steps.
        group_by_length=features and levers.FEATURES_GROUP_BY_LENGTH and processes == 1,
        pack=pack,
        loader_workers=levers.FEATURES_LOADER_WORKERS if features and on_gpu else 0,
        pad_to_multiple_of=levers.FEATURES_PAD_TO_MULTIPLE if compile_layers else None,
    )


def _training_arguments(request: TrainRequest, model_dir: Path, backend: str, choice: LeverChoice):
    """The trainer's arguments (TRL's SFTConfig): the recipe from request.train, the levers from `choice`."""
    from trl import SFTConfig

    train_cfg = request.train
    on_gpu = choice.on_gpu
    extra_args: dict[str, Any] = {}
    if choice.features:
        # The rows are already what the collator wants; TRL must not tokenize them itself.
        extra_args["dataset_kwargs"] = {"skip_prepare_dataset": True}
    if choice.group_by_length:
        extra_args["train_sampling_strategy"] = "group_by_length"
    if choice.processes > 1:
        extra_args.update(
            # The group modal_jobs.train.distributed made: NCCL between GPUs, gloo between CPU processes (which
            # accelerate treats as a distributed run only when told it is on the CPU).
            ddp_backend="nccl" if on_gpu else "gloo",
            use_cpu=not on_gpu,
            # Every LoRA weight gets a gradient at every step; searching the graph for unused ones costs a pass per
            # step (and does not mix with recomputation).
            ddp_find_unused_parameters=False,
            # What makes N processes compute the one-process update: each micro-batch's summed loss divided by the
            # labelled tokens of the whole global batch, counted across processes (num_items_in_batch), then
            # multiplied by N because DDP averages the gradients (loss.py; the pixel path: transformers itself).
            # transformers' default, stated here because the result depends on it.
            average_tokens_across_devices=True,
        )
    run_name = train_cfg.run_name or f"finetune_{model_dir.name}_{time.strftime('%Y%m%d-%H%M%S')}"
    os.environ.setdefault("WANDB_PROJECT", train_cfg.wandb_project)
    return SFTConfig(
        output_dir=str(resolve(request.checkpoints_dir)),
        per_device_train_batch_size=choice.micro_batch,
        gradient_accumulation_steps=choice.accumulation,
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
        gradient_checkpointing=(on_gpu and backend == "trl" and choice.checkpointing is True
                                and not choice.recompute_in_compiled),
        max_length=request.model.max_seq_length,
        # The filter checks every step's loss on the host, which stalls the GPU once a step; a NaN loss had
        # better show in the logs anyway.
        logging_nan_inf_filter=False,
        report_to=_report_to(),
        run_name=run_name,
        remove_unused_columns=False,
        dataloader_num_workers=choice.loader_workers,
        # Workers kept across epochs: starting them again cost ~0.3-0.5 s at each epoch's start (bench/results run
        # 14: the 10-step windows holding steps 48 and 96 of a 48-step epoch ran ~15% slower).
        dataloader_persistent_workers=choice.loader_workers > 0,
        # Batches copied to the GPU from pinned memory without the host waiting for each copy (six a step).
        accelerator_config={"non_blocking": True} if on_gpu else None,
        disable_tqdm=False,
        **extra_args,
    )


def _rows_and_trainer_class(request: TrainRequest, train_split: Any, pixel_rows: Any, processor: Any,
                            plan: dict[str, Any], choice: LeverChoice, max_length: int | None):
    """(rows, trainer class, its collator arguments): feature rows with FeatureCollator and the labelled-token
    loss, or pixel rows with TRL's own collator and loss."""
    from trl import SFTTrainer

    if choice.features:
        from modal_jobs.encode import FeatureStore

        tokenizer = processor.tokenizer if choice.group_by_length else None
        rows = _feature_rows(request, train_split, tokenizer)
        collator = FeatureCollator(processor, FeatureStore(plan["features_dir"]), max_length=max_length,
                                   completion_only_loss=True, pad_to_multiple_of=choice.pad_to_multiple_of,
                                   pack=choice.pack)
        trainer_class, collator_args = _with_image_features(SFTTrainer), {"data_collator": collator}
    else:
        rows = pixel_rows if pixel_rows is not None else _pixel_rows(request, train_split)
        trainer_class, collator_args = SFTTrainer, {}
    if choice.processes > 1:
        trainer_class = distributed.rank_trainer_class(trainer_class)
    return rows, trainer_class, collator_args


def _apply_model_levers(trainer: Any, backend: str, choice: LeverChoice) -> tuple[bool, int | bool]:
    """Selective recomputation, fused LoRA forwards and compiled layers on the trainer's (PEFT) model:
    (whether layers were compiled, how many LoRA layers were fused)."""
    if choice.on_gpu and backend == "trl" and choice.checkpointing == "selective" and not choice.recompute_in_compiled:
        # On the model rather than through the arguments: the policy is a function, which the arguments (saved
        # with every checkpoint) could not hold.
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=levers.selective_checkpoint_kwargs())
    # Unsloth has its own LoRA forwards and compiles (or not) by its own settings; not ours to redo.
    fused_lora = (choice.features and backend == "trl" and levers.FEATURES_FUSED_LORA
                  and levers.fuse_lora_forwards(trainer.model))
    if choice.compile_layers:
        from modal_jobs.storage import keep_compiled_kernels

        keep_compiled_kernels()
    compiled = choice.compile_layers and levers._compile_layers(
        trainer.model, choice.checkpointing if choice.recompute_in_compiled else False)
    return compiled, fused_lora


def _image_inputs_record(plan: dict[str, Any], choice: LeverChoice, compiled: bool,
                         fused_lora: int | bool) -> dict[str, Any]:
    """How the run was fed and sped up, for the adapter's manifest."""
    return {
        "path": "features" if choice.features else "pixels",
        "features_dir": plan["features_dir"],
        "reasons": plan["reasons"],
        "micro_batch": choice.micro_batch,
        "gradient_accumulation_steps": choice.accumulation,  # per process
        "gpus": choice.processes,
        "global_batch_size": choice.micro_batch * choice.accumulation * choice.processes,
        "gradient_checkpointing": choice.checkpointing,
        "group_by_length": choice.group_by_length,
        "compiled_layers": compiled,
        "recompute_in_compiled_layers": choice.recompute_in_compiled,
        "fused_lora_layers": fused_lora or 0,
        "pad_to_multiple_of": choice.pad_to_multiple_of,
        "packed_sequences": choice.pack,
        "compile_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR") if compiled else None,
    }
