"""What the trainer is fed: the train split, its rows (pixels or cached features) and their collation.

Pixel rows carry the image and go through TRL's own vision collator. Feature rows carry the row's index into an
encode_images cache instead; `FeatureCollator` collates them as TRL does, with the cached features in place of
pixel_values, and `merge_image_features` scatters those into the token embeddings where the model's forward
would put the vision tower's output. `packed_attention_masks` builds the masks of a packed batch (its rows end
to end in one row) without the host reads transformers' own checks make.
"""

from __future__ import annotations

import sys
from typing import Any

from modal_jobs.errors import InputError
from modal_jobs.schemas import TrainRequest


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
    from modal_jobs.train import distributed

    cache = dataset_cache_dir(request.dataset_dir)
    cache.mkdir(parents=True, exist_ok=True)
    name = f"pixel-rows-{short_hash([train_split._fingerprint, request.instruction])}.arrow"
    # Written afresh each time: the name does not cover this function's code, so an old file must not be reused.
    # Under DDP rank 0 writes it and the other processes then read that file, rather than all writing one file.
    with distributed.rank_zero_first():
        return train_split.map(to_row, remove_columns=["text"], desc="formatting",
                               cache_file_name=str(cache / name), load_from_cache_file=not distributed.is_rank_zero())


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
        prompts, completions = self._chat_texts(examples)
        pad_id = self.processor.tokenizer.pad_token_id
        input_ids, attention_mask, completion_mask, extra = self._tokenized(prompts, completions, pad_id)
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
            input_ids, attention_mask, labels, extra = self._padded_to_multiple(
                input_ids, attention_mask, labels, extra, pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **extra,
                "image_features": features}

    def _chat_texts(self, examples: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
        """Each row's prompt and completion through the chat template, the prompt with a stand-in image."""
        from trl.data_utils import apply_chat_template, prepare_multimodal_messages

        prompts, completions = [], []
        for example in examples:
            message = {
                "prompt": prepare_multimodal_messages(example["prompt"], images=[self._stand_in]),
                "completion": prepare_multimodal_messages(example["completion"]),
            }
            text = apply_chat_template(message, self.processor)
            prompts.append(text["prompt"])
            completions.append(text["completion"])
        return prompts, completions

    def _tokenized(self, prompts: list[str], completions: list[str], pad_id: int) -> tuple[Any, Any, Any, dict]:
        """(input_ids, attention_mask, completion_mask, token-type tensors by name) of the batch: prompt and
        completion tokens concatenated, flushed left and cut at max_length, as TRL's collator makes them."""
        import torch
        from trl.trainer.utils import flush_left

        # The prompts, left-padded as the processor pads them (pad id, mask 0, type 0).
        encoded = [self._prompt(text) for text in prompts]
        width = max(len(e["input_ids"]) for e in encoded)

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
        return input_ids, attention_mask, completion_mask, extra

    def _padded_to_multiple(self, input_ids, attention_mask, labels, extra, pad_id) -> tuple[Any, Any, Any, dict]:
        """Right padding past every row's end, up to a multiple of `pad_to_multiple_of` (at most max_length):
        masked, unlabelled, so no row's loss or gradient changes."""
        import torch

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
        return input_ids, attention_mask, labels, padded

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


def packed_attention_masks(config: Any, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """Gemma 3's FlexAttention masks for one packed row, keyed by layer type: the (query, key) pairs that
    transformers' own masks allow for the same position_ids and token_type_ids (tests/test_encode.py compares the
    two), built without reading anything back and with one mask function for both layer kinds.

    transformers first checks on the host whether the positions are packed at all, once per mask (three times a
    forward): each check empties the GPU's queue. Here the row is packed by construction. Its masks are two
    different functions (compositions of and_masks and or_masks), and torch.compile guards on a mask's code: the
    layer compiled for one kind was compiled again for the other, and so was create_block_mask. Here the kinds
    differ only in tensors the function reads, so both share one compiled layer and one compiled mask builder.
    None where the model is not Gemma 3 under FlexAttention (these are Gemma3Model's masks); the model then
    builds its own."""
    import torch
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
    batch_size, length, device = embeds.shape[0], embeds.shape[1], embeds.device
    # A new row starts wherever the position does not follow on (transformers' find_packed_sequence_indices).
    step = position_ids.diff(dim=-1, prepend=position_ids[:, :1] - 1)
    row_ids = (step != 1).cumsum(-1)
    image_ids = get_block_sequence_ids_for_mask(token_types, device=device)

    def scalar(value: int | bool, dtype: Any) -> Any:
        return torch.full((), value, dtype=dtype, device=device)  # a fill on the device: no host-to-device copy

    unbounded = 2 ** 30  # a window no row reaches: the full layers'
    kinds = {"full_attention": (unbounded, False),
             "sliding_attention": (getattr(text_config, "sliding_window", None) or unbounded, True)}
    return {kind: _block_mask(_packed_row_mask(row_ids, image_ids, scalar(window, torch.int32),
                                               scalar(sliding, torch.bool)), batch_size, length, device)
            for kind, (window, sliding) in kinds.items() if kind in layer_types}


def _packed_row_mask(row_ids: Any, image_ids: Any, window: Any, sliding: Any) -> Any:
    """Gemma 3's mask over a packed row, for either layer kind (`sliding`, a boolean tensor):
    full:    (causal and same row) or same image
    sliding: (causal or same image) and same row and within the window (`window`, an int tensor)
    where an image's tokens see each other both ways, as in transformers' blockwise_overlay."""

    def packed_row_mask(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> Any:
        same_row = row_ids[batch_idx, q_idx] == row_ids[batch_idx, kv_idx]
        q_image = image_ids[batch_idx, q_idx]
        same_image = (q_image == image_ids[batch_idx, kv_idx]) & (q_image >= 0)
        allowed = ((kv_idx <= q_idx) & same_row) | same_image
        return allowed & (same_row | ~sliding) & (kv_idx > q_idx - window)

    return packed_row_mask


_compiled_create_block_mask = None


def _block_mask(mask_function: Any, batch_size: int, length: int, device: Any) -> Any:
    """The BlockMask that transformers' flex_attention_mask builds for a row of `length` tokens with no padding and
    no offsets, from a create_block_mask compiled once per process with dynamic shapes. transformers compiles it
    with static shapes, so the first batches of other lengths compiled it again, for each mask kind: 4 compiles in
    the H200 smoke's record (levers.compilation_record; BENCHMARKS, third session). With dynamic shapes and one
    mask function for both kinds (packed_attention_masks), it compiles once."""
    global _compiled_create_block_mask
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    if _compiled_create_block_mask is None:
        _compiled_create_block_mask = torch.compile(create_block_mask, dynamic=True)
    return _compiled_create_block_mask(mask_function, batch_size, None, length, length, device=device)

