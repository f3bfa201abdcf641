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
from modal_jobs.storage import (
    atomic_output,
    atomic_write_json,
    is_complete,
    read_manifest,
    resolve,
    short_hash,
)

# LoRA targets: the language model's attention and MLP projections only (the vision tower stays frozen).
LANGUAGE_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_TARGETS = r".*vision_tower.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"
# Files a Trainer checkpoint has once it is whole; a folder missing one was cut off mid-save.
_CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def choose_backend(requested: str, features_expected: bool = False) -> str:
    """auto: on cached features, HF + PEFT with our labelled-token loss and compiled layers (faster there than
    Unsloth, whose gains are on the pixel path: bench/train_speed.py); on pixels, Unsloth when CUDA has it."""
    if requested != "auto":
        return requested
    import torch

    if not features_expected and torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None:
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


# --- levers of the cached-features path (measured by bench/train_speed.py; numbers in BENCHMARKS.md) -----
# Without the vision tower, a step of a 4B model is short enough that Python and kernel-launch overhead and
# unfused element-wise kernels (norms, casts, LoRA scaling) took most of it on an H100 (bench/step_breakdown.py).
# Fusing gradient accumulation into a larger micro-batch keeps the optimizer's batch (and, with the loss
# normalised by the accumulated label count, the update) the same while each step does more work.
FEATURES_MAX_MICRO_BATCH = 16
# Recompute activations in the backward pass: True, False, or "selective" (`selective_checkpoint_kwargs`: keep
# the outputs of the narrow matmuls and of attention, recompute the MLP's wide gate/up and the element-wise work).
# Measured in bench/step_breakdown.py's loop (fused LoRA, padded to 64, 16 a micro-batch, compiled, H100):
# selective inside the compiled layers 51.6 samples/s at 18.1 GiB, full recomputation inside 42.4 at 12.3,
# around them 39.6 at 12.3; none at all kept ~3 GiB a sample (16 x 1 peaked at 53 GiB under the trainer).
FEATURES_GRADIENT_CHECKPOINTING: bool | str = "selective"
# torch.compile each decoder layer (CUDA only; dynamic shapes): fuses element-wise work and cuts launches.
# Compiling costs ~1-2 minutes once per process; a couple of early batches recompile (duck-sized mask shapes).
FEATURES_COMPILE = True
# Inductor options for the compiled layers (torch.compile's `options`; empty: its defaults).
FEATURES_COMPILE_OPTIONS: dict[str, Any] = {}
# Where compiled, recompute inside each compiled layer (the compiler sees both passes, the selective policy sees
# the matmuls) rather than around it with transformers' checkpointing.
FEATURES_RECOMPUTE_IN_COMPILED = True
# Batches of similar length pad less (length-sorted: 48.6 vs 42.4 samples/s in the loop, full recomputation; packed
# rows, below, have no padding to save), but
# they change which samples share a batch and in what order (transformers' sampler sweeps each group from long to
# short), and that changed what is learned: the embedded default's fine-tuned CER went from 0.837 to 0.904 and a
# 100-step retrain no longer beat a 2-step one. Off; a lever for those who accept that.
FEATURES_GROUP_BY_LENGTH = False
# Processes collating batches (chat template, tokenizer, feature reads) while the GPU trains (CUDA only).
FEATURES_LOADER_WORKERS = 2
# LoRA layers computed as one matmul-with-add (`fuse_lora_forwards`) instead of PEFT's cast-to-float32, two
# matmuls, scale and add: the same arithmetic under autocast, without the element-wise passes over activations.
FEATURES_FUSED_LORA = True
# Where compiled, pad each batch's length (packed: its one row's) up to a multiple of this (None: not at all).
# Fewer distinct shapes for the compiled layers to specialise on; the padding is masked and unlabelled, so the
# loss is unchanged.
FEATURES_PAD_TO_MULTIPLE: int | None = 64
# Where compiled, a batch's rows go end to end in one row of their real tokens (`FeatureCollator(pack=True)`)
# instead of each padded to the batch's longest: with LaTeX_OCR-like lengths about a fifth of a padded batch of 16
# was padding, which every matmul paid for. The same rows make up the same batch, each attending only to itself
# (FlexAttention over a block mask built from the rows' positions, skipping the blocks between rows), so the loss
# and gradients are those of the padded batch (tests/test_encode.py). Loop on an H200 (fwd+bwd, 16, selective,
# compiled): padded to 64, 54.6 samples/s at 18.1 GiB; packed, 66.0 at 15.9 GiB.
FEATURES_PACK_SEQUENCES = True


def selective_checkpoint_kwargs(max_saved_width: int | None = None) -> dict[str, Any]:
    """gradient_checkpointing_kwargs for selective recomputation: the backward keeps what the matmuls and the
    attention kernels produced and recomputes only the cheap element-wise work between them (norms, activations,
    casts, rotary embeddings). For a Gemma 3 4B layer that keeps ~1/3 of the activations for ~2% more work,
    where full recomputation costs a whole extra forward. `max_saved_width`: recompute matmul outputs wider than
    this too (the MLP's gate and up projections: most of the memory, under half of the matmul work)."""
    import functools

    import torch
    from torch.utils.checkpoint import (
        CheckpointPolicy,
        create_selective_checkpoint_contexts,
    )

    aten = torch.ops.aten
    keep = {aten.mm.default, aten.addmm.default, aten.bmm.default}
    if hasattr(torch.ops.higher_order, "flex_attention"):  # packed batches' attention
        keep.add(torch.ops.higher_order.flex_attention)
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward"):
        if hasattr(aten, name):
            keep.add(getattr(aten, name).default)

    matmuls = {aten.mm.default, aten.addmm.default}

    def policy(ctx, op, *args, **kwargs):
        if op not in keep:
            return CheckpointPolicy.PREFER_RECOMPUTE
        if max_saved_width is not None and op in matmuls and args[-1].shape[-1] > max_saved_width:
            return CheckpointPolicy.PREFER_RECOMPUTE  # a wide output (the MLP's gate/up): cheaper to recompute
        return CheckpointPolicy.MUST_SAVE

    return {"use_reentrant": False,
            "context_fn": functools.partial(create_selective_checkpoint_contexts, policy)}


def _train_split(request: TrainRequest):
    from modal_jobs.dataset import open_prepared

    train_split = open_prepared(request.dataset_dir)["train"]
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
    return train_split


def _pixel_rows(request: TrainRequest, train_split):
    from modal_jobs.prompts import training_row

    def to_row(example: dict[str, Any]) -> dict[str, Any]:
        row = training_row(example["image"], example["text"], request.instruction)
        return {"prompt": row["prompt"], "completion": row["completion"]}

    # The image column stays as it is (TRL's collator accepts a single `image`); only text is reshaped. The rows
    # carry every image, too many to hold in memory for a large set: their cache file goes beside the outputs,
    # never into the finished dataset folder (datasets' default), which must keep matching its manifest.
    from modal_jobs.storage import dataset_cache_dir, short_hash

    cache = dataset_cache_dir(request.dataset_dir)
    cache.mkdir(parents=True, exist_ok=True)
    name = f"pixel-rows-{short_hash([train_split._fingerprint, request.instruction])}.arrow"
    # Written afresh each time: the name does not cover this function's code, so an old file must not be reused.
    return train_split.map(to_row, remove_columns=["text"], desc="formatting", cache_file_name=str(cache / name),
                           load_from_cache_file=False)


def _feature_rows(request: TrainRequest, train_split, tokenizer: Any = None):
    """The same prompt/completion as the pixel rows, with the row's index into the feature cache instead of the
    image (the image column is never decoded)."""
    from modal_jobs.prompts import assistant_turn, user_turn

    def to_row(example: dict[str, Any], index: int) -> dict[str, Any]:
        row = {"prompt": [user_turn(request.instruction)], "completion": [assistant_turn(example["text"])],
               "feature_index": index}
        if tokenizer is not None:
            row["length"] = len(tokenizer(example["text"], add_special_tokens=False)["input_ids"])
        return row

    # `select(range(n))` keeps rows 0..n-1, so a row's index here is its row in the split the cache was made of.
    # In memory (text only: 18 MB for LaTeX_OCR's 68,686 rows, no slower than a file), so nothing is written into
    # the finished dataset folder, which must keep matching its manifest.
    return train_split.select_columns(["text"]).map(to_row, with_indices=True, remove_columns=["text"],
                                                     desc="formatting", keep_in_memory=True)


def _training_rows(request: TrainRequest):
    """Rows for the pixel path (kept for callers that want them without building a trainer)."""
    return _pixel_rows(request, _train_split(request))


# --- cached image features ------------------------------------------------------------------------------


class FeatureCollator:
    """TRL's vision collator (prompt-completion, completion-only loss), with cached features for the pixels.

    input_ids, attention_mask, token_type_ids and labels come out exactly as DataCollatorForVisionLanguageModeling
    makes them (tests/test_encode.py compares them), because they are made the same way: the same chat template
    calls, the same processor calls (the prompt's image placeholders come from the processor, run once per
    distinct prompt on a stand-in image, since their number does not depend on the image), the same
    concatenation, flush-left and truncation. `image_features` [batch, mm_tokens, hidden] replaces pixel_values.
    """

    def __init__(self, processor: Any, store: Any, max_length: int | None = None, completion_only_loss: bool = True,
                 pad_to_multiple_of: int | None = None, pack: bool = False):
        from PIL import Image

        self.processor = processor
        self.store = store
        self.max_length = max_length
        self.completion_only_loss = completion_only_loss
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pack = pack
        self._stand_in = Image.new("RGB", (32, 32), "white")
        # The tokenizer's id is the model's (Gemma 3's processor names the start-of-image token as its own).
        self._image_token_id = _image_token_id(getattr(processor, "tokenizer", processor))
        self._prompts: dict[str, dict[str, list[int]]] = {}

    def _prompt(self, text: str) -> dict[str, list[int]]:
        if text not in self._prompts:
            out = self.processor(images=[[self._stand_in]], text=[text], padding=True, padding_side="left",
                                 return_tensors="pt", add_special_tokens=False)
            keep = out["attention_mask"][0].bool()
            self._prompts[text] = {
                name: out[name][0][keep].tolist()
                for name in ("input_ids", "token_type_ids", "mm_token_type_ids") if name in out
            }
        return self._prompts[text]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch
        from trl.data_utils import apply_chat_template, prepare_multimodal_messages
        from trl.trainer.utils import flush_left

        prompts, completions = [], []
        for example in examples:
            message = {
                "prompt": prepare_multimodal_messages(example["prompt"], images=[self._stand_in]),
                "completion": prepare_multimodal_messages(example["completion"]),
            }
            text = apply_chat_template(message, self.processor)
            prompts.append(text["prompt"])
            completions.append(text["completion"])

        # The prompts, left-padded as the processor pads them (pad id, mask 0, type 0).
        encoded = [self._prompt(text) for text in prompts]
        width = max(len(e["input_ids"]) for e in encoded)
        pad_id = self.processor.tokenizer.pad_token_id

        def left_pad(values: list[int], fill: int) -> list[int]:
            return [fill] * (width - len(values)) + values

        prompt_ids = torch.tensor([left_pad(e["input_ids"], pad_id) for e in encoded])
        prompt_mask = torch.tensor([left_pad([1] * len(e["input_ids"]), 0) for e in encoded])
        completions_out = self.processor(text=completions, padding=True, padding_side="right", return_tensors="pt",
                                         add_special_tokens=False)
        completion_ids, completion_mask = completions_out["input_ids"], completions_out["attention_mask"]

        # From here on, DataCollatorForVisionLanguageModeling._collate_prompt_completion line for line.
        input_ids = torch.cat((prompt_ids, completion_ids), dim=1)
        attention_mask = torch.cat((prompt_mask, completion_mask), dim=1)
        completion_mask = torch.cat((torch.zeros_like(prompt_mask), completion_mask), dim=1)
        extra: dict[str, torch.Tensor] = {}
        if "token_type_ids" in encoded[0]:
            prompt_types = torch.tensor([left_pad(e["token_type_ids"], 0) for e in encoded])
            extra["token_type_ids"] = torch.cat((prompt_types, completions_out["token_type_ids"]), dim=1)
        if "mm_token_type_ids" in encoded[0]:
            prompt_types = torch.tensor([left_pad(e["mm_token_type_ids"], 0) for e in encoded])
            extra["mm_token_type_ids"] = torch.cat((prompt_types, torch.zeros_like(completion_ids)), dim=1)
        attention_mask, input_ids, completion_mask, *flushed = flush_left(
            attention_mask, input_ids, completion_mask, *extra.values()
        )
        extra = dict(zip(extra, flushed))
        if self.max_length is not None:
            input_ids = input_ids[:, : self.max_length]
            attention_mask = attention_mask[:, : self.max_length]
            completion_mask = completion_mask[:, : self.max_length]
            extra = {name: tensor[:, : self.max_length] for name, tensor in extra.items()}
        labels = input_ids.clone()
        labels[attention_mask == 0] = -100
        if self.completion_only_loss:
            labels[completion_mask == 0] = -100
        features = self.store.get([int(example["feature_index"]) for example in examples])
        _check_image_tokens(int((input_ids == self._image_token_id).sum()), features)
        if self.pack:
            packed = self._packed(input_ids, attention_mask, labels, extra, pad_id)
            # Where the loss is computed, known here on the CPU, so the GPU step never waits for the host to
            # find them (labelled_token_loss).
            predicts_label = packed["labels"][0, 1:] != -100
            return {**packed, "image_features": features,
                    "labelled_positions": predicts_label.nonzero().flatten()}
        if self.pad_to_multiple_of:
            # Right padding past every row's end: masked, unlabelled, so no row's loss or gradient changes.
            width = input_ids.shape[1]
            target = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
            if self.max_length is not None:
                target = max(width, min(target, self.max_length))
            fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
            padded = {name: torch.nn.functional.pad(tensor, (0, target - width), value=fill.get(name, 0))
                      for name, tensor in {"input_ids": input_ids, "attention_mask": attention_mask,
                                           "labels": labels, **extra}.items()}
            input_ids, attention_mask, labels = padded.pop("input_ids"), padded.pop("attention_mask"), padded.pop(
                "labels")
            extra = padded
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **extra,
                "image_features": features}

    def _packed(self, input_ids, attention_mask, labels, extra, pad_id) -> dict[str, Any]:
        """The batch's rows end to end in one row of their real tokens, without padding between them.

        Each row keeps its own positions (0, 1, ...), so the model sees where one row ends and the next begins
        (transformers' packed-sequence masks: no token attends across rows); each row's first label is dropped
        (the previous row's last token must not learn to predict it). The row is padded at its end, by a dummy
        row of masked, unlabelled tokens, to a multiple of `pad_to_multiple_of` (fewer shapes to compile for).
        With no attention_mask the model takes its masks from position_ids."""
        import torch

        real = attention_mask.bool()  # flush-left: each row's real tokens come first, and row-major order keeps them
        lengths = real.sum(dim=1)
        positions = torch.cat([torch.arange(int(length)) for length in lengths])
        labels = labels.clone()
        labels[:, 0] = -100
        packed = {"input_ids": input_ids[real], "labels": labels[real], "position_ids": positions,
                  **{name: tensor[real] for name, tensor in extra.items()}}
        total = positions.numel()
        target = -(-total // self.pad_to_multiple_of) * self.pad_to_multiple_of if self.pad_to_multiple_of else total
        if target > total:
            fill = {"input_ids": pad_id, "labels": -100}
            packed = {name: torch.cat((tensor, torch.full((target - total,), fill.get(name, 0), dtype=tensor.dtype)))
                      for name, tensor in packed.items()}
            packed["position_ids"][total:] = torch.arange(target - total)
        return {name: tensor.unsqueeze(0) for name, tensor in packed.items()}


def _image_token_id(config: Any) -> int:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(config).__name__} names no image token (image_token_id)")


def _check_image_tokens(placeholders: int, features: Any) -> None:
    if placeholders != features.shape[0] * features.shape[1]:
        raise ValueError(
            f"Image features and image tokens do not match: {placeholders} image tokens in the batch, "
            f"{features.shape[0] * features.shape[1]} feature vectors; if model.max_seq_length cut a prompt short, "
            "raise it"
        )


def merge_image_features(model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """Replace input_ids + image_features by inputs_embeds, as the model's forward does with the tower's output:
    token embeddings, then the image features scattered over the image-token positions (in the embeddings'
    dtype). Everything else in `inputs` (attention_mask, token_type_ids for Gemma 3's bidirectional image
    attention, labels) passes through, so the model, its mask and the loss see what they see from pixels."""
    inputs = dict(inputs)
    features = inputs.pop("image_features")
    input_ids = inputs.pop("input_ids")
    embeddings = model.get_input_embeddings()
    image_token_id = _image_token_id(model.config)
    image_mask = input_ids == image_token_id
    # Gemma 3's own forward: an image token id outside the vocabulary is looked up as id 0 (then overwritten).
    lookup_ids = input_ids.masked_fill(image_mask, 0) if image_token_id >= embeddings.weight.shape[0] else input_ids
    embeds = embeddings(lookup_ids)
    if input_ids.device.type == "cpu":  # on a GPU it would stall the step; FeatureCollator checked it already
        _check_image_tokens(int(image_mask.sum()), features)
    features = features.to(embeds.device, embeds.dtype)
    inputs["inputs_embeds"] = embeds.masked_scatter(image_mask.unsqueeze(-1).to(embeds.device), features)
    return inputs


def _head_and_backbone(model: Any) -> tuple[Any, Any]:
    """(the model without its LM head, the LM head) of a PEFT-wrapped or plain vision-language model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = base.get_output_embeddings()
    if backbone is None or head is None or backbone is base:
        raise TypeError(f"{type(base).__name__} does not split into a backbone and an LM head")
    return backbone, head


def packed_attention_masks(config: Any, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """Gemma 3's FlexAttention masks for one packed row, keyed by layer type, as transformers builds them from
    position_ids and token_type_ids (tests/test_encode.py compares the two), without reading anything back.

    transformers first checks on the host whether the positions are packed at all, once per mask (three times a
    forward): each check empties the GPU's queue. Here the row is packed by construction. None where the model
    is not Gemma 3 under FlexAttention (these are Gemma3Model's masks); the model then builds its own."""
    from transformers.masking_utils import (
        and_masks,
        blockwise_overlay,
        causal_mask_function,
        flex_attention_mask,
        or_masks,
        packed_sequence_mask_function,
        sliding_window_overlay,
    )
    from transformers.models.gemma3.modeling_gemma3 import (
        get_block_sequence_ids_for_mask,
    )

    text_config = config.get_text_config()
    layer_types = set(getattr(text_config, "layer_types", None) or ())
    token_types = inputs.get("token_type_ids")
    if (getattr(config, "model_type", None) != "gemma3" or token_types is None
            or getattr(text_config, "_attn_implementation", None) != "flex_attention"
            or not layer_types <= {"full_attention", "sliding_attention"}):
        return None
    embeds, position_ids = inputs["inputs_embeds"], inputs["position_ids"].to(inputs["inputs_embeds"].device)
    # transformers' find_packed_sequence_indices, less its host-side "is anything packed?" branch.
    step = position_ids.diff(dim=-1, prepend=position_ids[:, :1] - 1)
    same_row = packed_sequence_mask_function((step != 1).cumsum(-1))
    image_blocks = blockwise_overlay(get_block_sequence_ids_for_mask(token_types, device=embeds.device))
    shapes = {"batch_size": embeds.shape[0], "q_length": embeds.shape[1], "kv_length": embeds.shape[1],
              "device": embeds.device}
    masks = {}
    if "full_attention" in layer_types:
        masks["full_attention"] = or_masks(and_masks(causal_mask_function, same_row), image_blocks)
    if "sliding_attention" in layer_types:
        masks["sliding_attention"] = and_masks(
            or_masks(causal_mask_function, image_blocks), sliding_window_overlay(text_config.sliding_window),
            same_row)
    return {kind: flex_attention_mask(mask_function=mask, **shapes) for kind, mask in masks.items()}


def labelled_token_loss(model: Any, inputs: dict[str, Any], chunk_tokens: int = 2048) -> tuple[Any, Any]:
    """(summed cross-entropy, number of labelled tokens) of a batch of cached features.

    Next-token cross-entropy over the labelled positions only: the backbone's last hidden states at the positions
    whose next token has a label go through the LM head in chunks, each chunk's logits recomputed in the backward
    pass instead of kept. With Gemma 3's 262k vocabulary and ~1 labelled token in 6, this is ~1/6 of the head's
    work and none of its [batch, length, vocab] memory; the number is the model's own loss (tests/test_encode.py).
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    inputs = dict(inputs)
    positions = inputs.pop("labelled_positions", None)  # a packed batch's, found by the collator on the CPU
    inputs = merge_image_features(model, inputs)
    labels = inputs.pop("labels")
    backbone, head = _head_and_backbone(model)
    if positions is not None:
        masks = packed_attention_masks(backbone.config, inputs)
        if masks is not None:
            inputs["attention_mask"] = masks
    hidden = backbone(**inputs, use_cache=False).last_hidden_state
    if positions is not None:  # one row: position p predicts the label at p + 1
        positions = positions.to(hidden.device)
        targets = labels[0].to(hidden.device).index_select(0, positions + 1)
        hidden = hidden[0].index_select(0, positions)
        # torch.full, not torch.tensor: a number copied to the GPU makes the host wait for it.
        count = torch.full((), positions.numel(), device=hidden.device, dtype=torch.long)
    else:
        targets = labels[:, 1:].to(hidden.device)
        labelled = targets != -100
        hidden, targets = hidden[:, :-1][labelled], targets[labelled]
        count = labelled.sum()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)

    def chunk_loss(states, wanted):
        logits = head(states).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, wanted, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + checkpoint(chunk_loss, hidden[part], targets[part], use_reentrant=False)
    return total, count


def _with_image_features(trainer_class: type) -> type:
    class FeaturesTrainer(trainer_class):
        """The trainer, fed cached image features: embeddings built from the cache, then the labelled-token loss
        normalised as the trainer normalises its own (by the labelled tokens of the whole accumulated batch)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs:  # evaluation asks for the logits: the model's own forward gives them
                inputs = merge_image_features(model, {k: v for k, v in inputs.items() if k != "labelled_positions"})
                return super().compute_loss(model, inputs, return_outputs=True,
                                            num_items_in_batch=num_items_in_batch)
            import torch

            total, count = labelled_token_loss(model, inputs)
            denominator = count if num_items_in_batch is None else num_items_in_batch
            loss = total / torch.as_tensor(denominator, device=total.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages the gradients across ranks
            return loss

    FeaturesTrainer.__name__ = f"Features{trainer_class.__name__}"
    return FeaturesTrainer


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
    """(micro-batch, accumulation steps): the effective batch is kept; with cached features, as few steps as the
    micro-batch cap allows."""
    if not features:
        return train_cfg.per_device_batch_size, train_cfg.gradient_accumulation_steps
    effective = train_cfg.effective_batch_size
    micro = max(d for d in range(1, min(effective, FEATURES_MAX_MICRO_BATCH) + 1) if effective % d == 0)
    return micro, effective // micro


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
    from unsloth import FastVisionModel  # noqa: I001  (Unsloth must be imported before transformers)

    train = request.train
    model, processor = FastVisionModel.from_pretrained(
        str(model_dir),
        load_in_4bit=request.model.load_in_4bit,
        use_gradient_checkpointing=gradient_checkpointing,
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


def _fused_lora_forward(self, x, *args, **kwargs):
    """A PEFT LoRA Linear's forward as base(x) + scaling * (x A^T) B^T, the add done by the second matmul (addmm),
    in the base layer's output dtype: what PEFT computes under autocast, without its float32 copy of the input
    and the separate scale and add passes. Anything but one plain active adapter takes PEFT's own forward."""
    import torch
    import torch.nn.functional as F

    active = self.active_adapters
    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or len(active) != 1:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    name = active[0]
    if name not in self.lora_A:
        return result
    dtype = result.dtype
    low_rank = F.linear(x.to(dtype), self.lora_A[name].weight.to(dtype))
    fused = torch.addmm(result.reshape(-1, result.shape[-1]), low_rank.reshape(-1, low_rank.shape[-1]),
                        self.lora_B[name].weight.to(dtype).t(), alpha=self.scaling[name])
    return fused.view(result.shape)


def fuse_lora_forwards(model: Any) -> int:
    """Give every plain LoRA Linear of `model` (one adapter, no dropout, no DoRA or other variant, no bias on
    lora_B, an nn.Linear base) `_fused_lora_forward`; returns how many. Others keep PEFT's forward."""
    import types

    import torch
    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear) or not isinstance(module.base_layer, torch.nn.Linear):
            continue
        names = list(module.lora_A.keys())
        if len(names) != 1 or getattr(module, "lora_variant", {}).get(names[0]) is not None:
            continue
        if not isinstance(module.lora_dropout[names[0]], torch.nn.Identity) or module.lora_B[names[0]].bias is not None:
            continue
        module.forward = types.MethodType(_fused_lora_forward, module)
        count += 1
    return count


def _recomputed(forward: Any, checkpoint_kwargs: dict[str, Any]) -> Any:
    def call(*args, **kwargs):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(forward, *args, **checkpoint_kwargs, **kwargs)

    return call


def _compile_layers(model: Any, recompute: bool | str = False, backend: str = "inductor") -> bool:
    """torch.compile each decoder layer of the language model in place (one graph per layer kind, shared by the
    layers, shapes dynamic). With `recompute` (True, or "selective" for `selective_checkpoint_kwargs`' policy) the
    layer's activations are recomputed in the backward pass by a checkpoint *inside* the compiled region, where the
    compiler sees both passes and the policy sees its matmuls (around a compiled layer, it sees one opaque call).
    False, with the reason on stderr, where the model has no such layer list."""
    import torch

    backbone, _ = _head_and_backbone(model)
    layers = getattr(getattr(backbone, "language_model", backbone), "layers", None)
    if layers is None:
        print(f"not compiling: {type(backbone).__name__} has no language_model.layers", file=sys.stderr)
        return False
    dynamo = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, limit_name, max(getattr(dynamo, limit_name), 64))  # a guard per layer must not fall back
    # A machine that cannot compile (no C compiler for Triton's launchers, say) trains eagerly, with a warning,
    # rather than failing at its first step.
    dynamo.suppress_errors = True
    # Selective: keep matmul outputs no wider than the hidden size (attention projections, down projection);
    # recompute the MLP's wide gate/up outputs, which hold most of the memory for under half of the matmul work.
    hidden_size = getattr(model.config.get_text_config(), "hidden_size", None)
    checkpoint_kwargs = (selective_checkpoint_kwargs(max_saved_width=hidden_size) if recompute == "selective"
                         else {"use_reentrant": False})
    for layer in layers:
        if recompute:
            layer.forward = _recomputed(layer.forward, checkpoint_kwargs)
        layer.compile(dynamic=True, backend=backend,
                      options=dict(FEATURES_COMPILE_OPTIONS) if backend == "inductor" and FEATURES_COMPILE_OPTIONS
                      else None)
    return True


def _switch_to_flex_attention(model: Any) -> bool:
    try:
        model.set_attn_implementation("flex_attention")
    except (ValueError, ImportError, AttributeError) as error:
        print(f"batches padded, not packed: no FlexAttention for this model ({error})", file=sys.stderr)
        return False
    return True


class TrainerSetup:
    """A built trainer and how it was built (what `train` runs; the benchmark and the tests use it too)."""

    def __init__(self, trainer: Any, processor: Any, rows: Any, backend: str, image_inputs: dict[str, Any]):
        self.trainer = trainer
        self.processor = processor
        self.rows = rows
        self.backend = backend
        self.image_inputs = image_inputs


def build_trainer(request: TrainRequest) -> TrainerSetup:
    model_dir = resolve(request.model_dir)
    checkpoints_dir = resolve(request.checkpoints_dir)
    run_dir = resolve(request.output_dir)
    if not (model_dir / "config.json").exists():
        raise InputError(f"model folder {model_dir} has no config.json")
    # Whether cached features will be used is settled below (it needs transformers); the backend is chosen first,
    # because Unsloth must be imported before transformers. A stale cache then trains from pixels on HF + PEFT.
    features_expected = request.features_dir is not None and not request.train.finetune_vision_layers
    backend = choose_backend(request.train.backend, features_expected)
    if backend == "unsloth":
        import torch

        if not torch.cuda.is_available():
            raise InputError("train.backend=unsloth needs a CUDA GPU; use backend auto or trl on this machine")
        import unsloth  # noqa: F401  (before anything below imports transformers, so all its patches apply)
    train_split = _train_split(request)  # before the model: bad data fails before any weights are loaded
    plan = plan_image_inputs(request)
    features = plan["features_dir"] is not None
    checkpointing = FEATURES_GRADIENT_CHECKPOINTING if features else True  # the levers are the cached path's
    # Pixel rows decode every image: do it before loading the weights, so a broken image fails first.
    pixel_rows = None if features else _pixel_rows(request, train_split)

    if backend == "unsloth":
        model, processor, peft_config = _load_unsloth(request, model_dir, "unsloth" if checkpointing else False)
    else:
        model, processor, peft_config = _load_trl(request, model_dir)

    if features:
        from modal_jobs.encode import processor_settings

        loaded = short_hash(processor_settings(processor), length=32)
        if loaded != plan["components"]["processor_signature"]:
            plan = {**plan, "features_dir": None,
                    "reasons": [f"the {backend} backend's processor differs from the one the cache was made with"]}
            features = False
            checkpointing = True
    if features:
        print(f"image inputs: cached features from {plan['features_dir']}", file=sys.stderr)
    else:
        print(f"image inputs: pixels ({'; '.join(plan['reasons'])})", file=sys.stderr)

    import torch
    from trl import SFTConfig, SFTTrainer

    train_cfg = request.train
    on_gpu = torch.cuda.is_available()
    compile_layers = features and on_gpu and backend == "trl" and FEATURES_COMPILE
    recompute_in_compiled = bool(compile_layers and FEATURES_RECOMPUTE_IN_COMPILED and checkpointing)
    micro_batch, accumulation = _micro_batch(train_cfg, features)
    group_by_length = features and FEATURES_GROUP_BY_LENGTH
    # Packed rows need a mask that keeps them apart; FlexAttention computes only its non-empty blocks (SDPA would
    # get a dense [tokens, tokens] mask over the whole batch). A model without it trains on padded batches.
    pack = bool(compile_layers and FEATURES_PACK_SEQUENCES) and _switch_to_flex_attention(model)
    extra_args: dict[str, Any] = {}
    if features:
        # The rows are already what the collator wants; TRL must not tokenize them itself.
        extra_args["dataset_kwargs"] = {"skip_prepare_dataset": True}
    if group_by_length:
        extra_args["train_sampling_strategy"] = "group_by_length"
    loader_workers = FEATURES_LOADER_WORKERS if features and on_gpu else 0
    run_name = train_cfg.run_name or f"finetune_{model_dir.name}_{time.strftime('%Y%m%d-%H%M%S')}"
    os.environ.setdefault("WANDB_PROJECT", train_cfg.wandb_project)
    args = SFTConfig(
        output_dir=str(checkpoints_dir),
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation,
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
        gradient_checkpointing=on_gpu and backend == "trl" and checkpointing is True and not recompute_in_compiled,
        max_length=request.model.max_seq_length,
        # The filter checks every step's loss on the host, which stalls the GPU once a step; a NaN loss had
        # better show in the logs anyway.
        logging_nan_inf_filter=False,
        report_to=_report_to(),
        run_name=run_name,
        remove_unused_columns=False,
        dataloader_num_workers=loader_workers,
        # Workers kept across epochs: starting them again cost ~0.3-0.5 s at each epoch's start (bench/results run
        # 14: the 10-step windows holding steps 48 and 96 of a 48-step epoch ran ~15% slower).
        dataloader_persistent_workers=loader_workers > 0,
        # Batches copied to the GPU from pinned memory without the host waiting for each copy (six a step).
        accelerator_config={"non_blocking": True} if on_gpu else None,
        disable_tqdm=False,
        **extra_args,
    )
    if features:
        from modal_jobs.encode import FeatureStore

        tokenizer = processor.tokenizer if group_by_length else None
        rows = _feature_rows(request, train_split, tokenizer)
        collator = FeatureCollator(processor, FeatureStore(plan["features_dir"]), max_length=args.max_length,
                                   completion_only_loss=True,
                                   pad_to_multiple_of=FEATURES_PAD_TO_MULTIPLE if compile_layers else None,
                                   pack=pack)
        trainer_class, collator_args = _with_image_features(SFTTrainer), {"data_collator": collator}
    else:
        rows = pixel_rows if pixel_rows is not None else _pixel_rows(request, train_split)
        trainer_class, collator_args = SFTTrainer, {}
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=rows,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[_progress_callback(run_dir / "progress.json")],
        **collator_args,
    )
    if on_gpu and backend == "trl" and checkpointing == "selective" and not recompute_in_compiled:
        # On the model rather than through the arguments: the policy is a function, which the arguments (saved
        # with every checkpoint) could not hold.
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=selective_checkpoint_kwargs())
    # Unsloth has its own LoRA forwards and compiles (or not) by its own settings; not ours to redo.
    fused_lora = features and backend == "trl" and FEATURES_FUSED_LORA and fuse_lora_forwards(trainer.model)
    if compile_layers:
        from modal_jobs.storage import keep_compiled_kernels

        keep_compiled_kernels()
    compiled = compile_layers and _compile_layers(trainer.model, checkpointing if recompute_in_compiled else False)
    image_inputs = {
        "path": "features" if features else "pixels",
        "features_dir": plan["features_dir"],
        "reasons": plan["reasons"],
        "micro_batch": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_checkpointing": checkpointing,
        "group_by_length": group_by_length,
        "compiled_layers": compiled,
        "recompute_in_compiled_layers": recompute_in_compiled,
        "fused_lora_layers": fused_lora or 0,
        "pad_to_multiple_of": FEATURES_PAD_TO_MULTIPLE if compile_layers else None,
        "packed_sequences": pack,
        "compile_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR") if compiled else None,
    }
    return TrainerSetup(trainer, processor, rows, backend, image_inputs)


def train(request: TrainRequest) -> TrainResult:
    adapter_dir = resolve(request.adapter_dir)
    checkpoints_dir = resolve(request.checkpoints_dir)
    if is_complete(adapter_dir):
        return TrainResult.model_validate({**read_manifest(adapter_dir)["result"], "cached": True})

    setup = build_trainer(request)
    trainer = setup.trainer
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
        backend=setup.backend,
        global_step=trainer.state.global_step,
        train_loss=output.training_loss,
        first_logged_loss=losses[0] if losses else None,
        last_logged_loss=losses[-1] if losses else None,
        train_samples=len(setup.rows),
        runtime_s=round(runtime, 2),
        resumed_from=resume_from.name if resume_from else None,
    )
    manifest = {"stage": "train", "request": request.model_dump(mode="json"), "result": result.model_dump(mode="json"),
                "image_inputs": setup.image_inputs, "log_history": trainer.state.log_history}
    with atomic_output(adapter_dir, manifest) as tmp:
        trainer.model.save_pretrained(str(tmp))
        setup.processor.save_pretrained(str(tmp))
        (tmp / "training_stats.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    del trainer, setup
    return result
