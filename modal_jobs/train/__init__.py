"""The train stage: LoRA on the language layers of a vision-language model, vision tower frozen.

Backends: on pixels, Unsloth's FastVisionModel when CUDA is present (or asked for), TRL's SFTTrainer + PEFT
otherwise; on cached features, TRL's SFTTrainer + PEFT with `labelled_token_loss` and, on CUDA, compiled decoder
layers (faster there than Unsloth: BENCHMARKS.md). All train on the same rows (modal_jobs.prompts.training_row: a
conversational prompt/completion pair plus the image) and collate them as TRL's vision collator does, so the loss
covers the answer tokens only either way.

Image inputs, chosen by the job: with `request.features_dir` set (an encode_images output) and the vision layers
frozen, the vision tower is not run at all. `FeatureCollator` builds input_ids, labels, attention_mask and
token_type_ids exactly as TRL's collator does but returns the cached image features instead of pixel_values,
and the trainer scatters them into the token embeddings at the image-token positions (what the model's own
forward does with the tower's output), then scores only the labelled positions, so the loss on a batch is the
same number. On a GPU the batch's rows are packed end to end (no padding; each row attends only to itself). The
cache is used only if its recorded components (dataset, vision weights, processor settings, dtype, libraries)
match this job's; otherwise, or when vision layers are trained, the job trains from pixels and says why.

Checkpoints go to <run>/checkpoints/ every `save_steps`; a re-run (or a retried task, or a preempted Modal
container) resumes from the latest complete checkpoint. The adapter and processor land in <run>/lora/,
written atomically with a manifest. Training progress is mirrored to <run>/progress.json for the
orchestrator to show.

Run as: python -m modal_jobs.runner train REQUEST.json RESULT.json

Modules, one concern each (none imports torch, transformers, trl, peft or unsloth at import time):
    job.py     train(request) -> TrainResult: resume from the latest complete checkpoint, run, save the adapter
    setup.py   build_trainer: backend, model + LoRA loading, image-input plan, which levers, the trainer's
               arguments (_training_arguments), rows and collator, progress file
    rows.py    the train split, pixel and feature rows, FeatureCollator, image-feature merge, packed masks
    loss.py    labelled_token_loss and the trainer class that uses it
    levers.py  speed-lever settings (FEATURES_*: set them on modal_jobs.train.levers, where they are read) and
               what applies them: selective recomputation, fused LoRA forwards, compiled layers, FlexAttention
    distributed.py  train.gpus > 1: the job launches one process per GPU with torchrun (__main__.py is each
               process's entry), commits their checkpoints, returns rank 0's result; what the trainer needs under DDP
"""

# The FEATURES_* settings are not re-exported: a copy here would not be what the job reads, so setting it would
# silently change nothing. Read and set them on modal_jobs.train.levers.
from modal_jobs.train.job import latest_complete_checkpoint, train
from modal_jobs.train.levers import (
    _compile_layers,
    fuse_lora_forwards,
    selective_checkpoint_kwargs,
)
from modal_jobs.train.loss import _head_and_backbone, labelled_token_loss
from modal_jobs.train.rows import (
    FeatureCollator,
    merge_image_features,
    packed_attention_masks,
)
from modal_jobs.train.setup import (
    LANGUAGE_TARGETS,
    VISION_TARGETS,
    TrainerSetup,
    _micro_batch,
    build_trainer,
    choose_backend,
    plan_image_inputs,
)

__all__ = [
    "LANGUAGE_TARGETS",
    "VISION_TARGETS",
    "FeatureCollator",
    "TrainerSetup",
    "_compile_layers",
    "_head_and_backbone",
    "_micro_batch",
    "build_trainer",
    "choose_backend",
    "fuse_lora_forwards",
    "labelled_token_loss",
    "latest_complete_checkpoint",
    "merge_image_features",
    "packed_attention_masks",
    "plan_image_inputs",
    "selective_checkpoint_kwargs",
    "train",
]
