"""The loss of a batch of cached image features: next-token cross-entropy over its labelled tokens only.

`labelled_token_loss` runs the backbone on the merged embeddings and the LM head only where a label is;
`_with_image_features` makes a trainer class compute it (normalised as the trainer normalises its own loss).
"""

from __future__ import annotations

from typing import Any

from modal_jobs.train.rows import merge_image_features, packed_attention_masks


def _head_and_backbone(model: Any) -> tuple[Any, Any]:
    """(the model without its LM head, the LM head) of a PEFT-wrapped or plain vision-language model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = base.get_output_embeddings()
    if backbone is None or head is None or backbone is base:
        raise TypeError(f"{type(base).__name__} does not split into a backbone and an LM head")
    return backbone, head



def labelled_token_loss(model: Any, inputs: dict[str, Any], chunk_tokens: int | None = None) -> tuple[Any, Any]:
    """(summed cross-entropy, number of labelled tokens) of a batch of cached features.

    Next-token cross-entropy over the labelled positions only: the backbone's last hidden states at the positions
    whose next token has a label go through the LM head in chunks, each chunk's logits recomputed in the backward
    pass instead of kept. With Gemma 3's 262k vocabulary and ~1 labelled token in 6, this is ~1/6 of the head's
    work and none of its [batch, length, vocab] memory; the number is the model's own loss (tests/test_encode.py).
    `chunk_tokens`: labelled tokens a chunk (default levers.FEATURES_LOSS_CHUNK_TOKENS).
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    inputs = dict(inputs)
    positions = inputs.pop("labelled_positions", None)  # a packed batch's, found by the collator on the CPU
    inputs = merge_image_features(model, inputs)
    if torch.is_grad_enabled() and not inputs["inputs_embeds"].requires_grad:
        # torch.compile specialises a layer on whether its input requires grad. The frozen embeddings do not, so
        # layer 0 alone would need a compiled graph of its own (forward and backward), one of three for Gemma 3
        # on an H200 (levers.compilation_record). Asking for the embeddings' gradient keeps layer 0 on the graph
        # the other layers share, for the cost of its input-gradient matmuls.
        inputs["inputs_embeds"] = inputs["inputs_embeds"].detach().requires_grad_()
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

    if chunk_tokens is None:
        from modal_jobs.train import levers

        chunk_tokens = levers.FEATURES_LOSS_CHUNK_TOKENS
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

            from modal_jobs.train.distributed import through_ddp

            total, count = through_ddp(model, labelled_token_loss, inputs)
            denominator = count if num_items_in_batch is None else num_items_in_batch
            loss = total / torch.as_tensor(denominator, device=total.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages the gradients across ranks
            return loss

    FeaturesTrainer.__name__ = f"Features{trainer_class.__name__}"
    return FeaturesTrainer

