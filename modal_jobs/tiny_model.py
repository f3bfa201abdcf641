"""The built-in tiny Gemma 3 vision model: the production architecture at toy size, built offline.

Run as: `python -m modal_jobs.tiny_model OUTPUT_DIR` (writes the model folder with default settings).

It has the same classes, tokenizer conventions, chat template and processor as `unsloth/gemma-3-4b-it`,
so every stage (LoRA training, merge, `transformers serve`, evaluation) runs the code path it runs in
production, on a CPU, in seconds. Weights are random; the tokenizer is trained here on a LaTeX-like corpus.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

from modal_jobs.config import TinyModelConfig
from modal_jobs.prompts import DEFAULT_INSTRUCTION

# Bump whenever the build below changes what it writes, so cached builds keyed on the old code are not reused.
TINY_MODEL_VERSION = "1"

IMAGE_SIZE = 128  # pixels a side; the production model sees 896
PATCH_SIZE = 16
# (IMAGE_SIZE / PATCH_SIZE) = 8 patches a side must be divisible by sqrt(16) = 4, or the processor inserts a
# different number of placeholders than the vision tower produces.
MM_TOKENS_PER_IMAGE = 16
# A tiny model with tied embeddings at the default std 0.02 cannot produce logits large enough to learn.
EMBEDDING_STD = 0.2
MAX_POSITIONS = 8192

# Gemma's own ids for the first five (pad 0, eos 1, bos 2, unk 3, mask 4), so configs read like the real ones.
SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)
# Byte fallback needs a token for every byte, so no input is ever <unk>.
BYTE_TOKENS = tuple(f"<0x{value:02X}>" for value in range(256))
_CORPUS_SEED = 1234  # fixed: the tokenizer does not change with the model seed


def _chat_template() -> str:
    """The real Gemma 3 chat template, as TRL ships it.

    Used byte for byte, because TRL recognises a model's template by exact comparison (to swap in its
    training variant for assistant-only loss); a look-alike template would not be recognised.
    """
    import importlib.util

    spec = importlib.util.find_spec("trl")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "chat_templates" / "gemma3.jinja"
        if path.is_file():
            return path.read_text()
    raise RuntimeError(
        "the Gemma 3 chat template is read from the installed `trl` package (trl/chat_templates/gemma3.jinja), "
        "which was not found; install the pinned trl version"
    )


def template_digest() -> str:
    from modal_jobs.storage import short_hash

    return short_hash(_chat_template())


# --- tokenizer -----------------------------------------------------------------------------------------

_GREEK = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi pi rho sigma tau upsilon phi chi "
    "psi omega Gamma Delta Theta Lambda Xi Pi Sigma Phi Psi Omega varepsilon varphi"
).split()
_COMMANDS = (
    r"\frac \sqrt \sum \int \prod \lim \infty \partial \nabla \cdot \times \pm \leq \geq \neq \approx \equiv "
    r"\rightarrow \to \mathrm \mathbf \mathbb \mathcal \left( \right) \left[ \right] \left| \right| \hat \bar "
    r"\vec \tilde \dot \sin \cos \tan \log \exp \ln \prime \ldots \cdots \quad \, \; \!"
).split()
_LETTERS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_DIGITS = list("0123456789")
_OPERATORS = list("+-=<>/*|,.;:!'()[]")


def _atom(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.35:
        return rng.choice(_LETTERS)
    if roll < 0.55:
        return rng.choice(_DIGITS) + (rng.choice(_DIGITS) if rng.random() < 0.3 else "")
    return "\\" + rng.choice(_GREEK)


def _expression(rng: random.Random, depth: int = 0) -> str:
    """One im2latex-style expression: tokens separated by spaces, groups as `{ ... }`."""
    parts: list[str] = []
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        if depth < 2 and roll < 0.15:
            parts.append(f"\\frac {{ {_expression(rng, depth + 1)} }} {{ {_expression(rng, depth + 1)} }}")
        elif depth < 2 and roll < 0.25:
            parts.append(f"\\sqrt {{ {_expression(rng, depth + 1)} }}")
        elif depth < 2 and roll < 0.35:
            parts.append(f"\\left( {_expression(rng, depth + 1)} \\right)")
        elif depth < 2 and roll < 0.45:
            big = rng.choice([r"\sum", r"\int", r"\prod", r"\lim"])
            parts.append(f"{big} _ {{ {_atom(rng)} = {_atom(rng)} }} ^ {{ {_atom(rng)} }}")
        elif roll < 0.6:
            parts.append(f"{_atom(rng)} ^ {{ {_atom(rng)} }}")
        elif roll < 0.7:
            parts.append(f"{_atom(rng)} _ {{ {_atom(rng)} }}")
        elif roll < 0.8:
            parts.append(rng.choice(_COMMANDS))
        else:
            parts.append(_atom(rng))
        parts.append(rng.choice(_OPERATORS))
    return " ".join(parts[:-1])


def latex_corpus(lines: int = 3000) -> list[str]:
    """A fixed corpus of LaTeX-like lines in the spacing of im2latex data, plus the instruction."""
    rng = random.Random(_CORPUS_SEED)
    # The chat template's own text (turn headers, the blank lines around an image), minus the special tokens.
    corpus = [f"user\n{DEFAULT_INSTRUCTION}\n\n\n\n\nmodel\n"] * 50
    corpus += [" ".join(_COMMANDS), " ".join("\\" + name for name in _GREEK), " ".join(_LETTERS + _DIGITS)]
    corpus += [_expression(rng) for _ in range(lines)]
    return corpus


def build_tokenizer(vocab_size: int, chat_template: str) -> Any:
    """A GemmaTokenizer (BPE, byte fallback, Gemma's special tokens) trained on the LaTeX corpus."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    # Same normalisation and splitting as GemmaTokenizer, so the trained merges mean the same thing there.
    trainer_tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainer_tokenizer.normalizer = normalizers.Replace(" ", "▁")
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    reserved = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=reserved + vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *BYTE_TOKENS],
        min_frequency=2,
        show_progress=False,
    )
    trainer_tokenizer.train_from_iterator(latex_corpus(), trainer=trainer)
    trained = json.loads(trainer_tokenizer.to_str())["model"]
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ")) for pair in trained["merges"]]

    tokenizer = GemmaTokenizer(
        vocab=trained["vocab"],
        merges=merges,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=MAX_POSITIONS,
    )
    # Turn markers are special so that decoding with skip_special_tokens drops them from served answers.
    tokenizer.add_special_tokens(
        {"extra_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}, replace_extra_special_tokens=False
    )
    tokenizer.chat_template = chat_template
    return tokenizer


# --- model ---------------------------------------------------------------------------------------------


def _model_config(cfg: TinyModelConfig, tokenizer: Any) -> Any:
    from transformers import Gemma3Config

    heads = max(1, cfg.hidden_size // 16)
    vocab = tokenizer.get_vocab()
    eos_ids = [vocab["<eos>"], vocab["<end_of_turn>"]]
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.hidden_size * 2,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "head_dim": cfg.hidden_size // heads,
        "query_pre_attn_scalar": cfg.hidden_size // heads,
        "max_position_embeddings": MAX_POSITIONS,
        "sliding_window": 512,
        # Both attention kinds of the real model, whatever the layer count: sliding first, global last.
        "layer_types": ["sliding_attention"] * (cfg.num_layers - 1) + ["full_attention"],
        "pad_token_id": vocab["<pad>"],
        "bos_token_id": vocab["<bos>"],
        "eos_token_id": eos_ids,
        "tie_word_embeddings": True,
    }
    vision_config = {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.hidden_size * 2,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": heads,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "vision_use_head": False,
    }
    return Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=vocab["<start_of_image>"],
        eoi_token_index=vocab["<end_of_image>"],
        image_token_index=vocab["<image_soft_token>"],
        tie_word_embeddings=True,
        architectures=["Gemma3ForConditionalGeneration"],
    )


def _build_weights(config: Any, seed: int) -> Any:
    import torch
    from transformers import Gemma3ForConditionalGeneration

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(config).to(torch.float32).eval()
        with torch.no_grad():
            embeddings = model.get_input_embeddings().weight
            embeddings.normal_(0.0, EMBEDDING_STD)
            # Gemma 3 initialises the projector to zeros: every image embedding would be 0 and the model blind.
            # Match the scale of the (sqrt(hidden)-scaled) text embeddings the image tokens sit among.
            projector = model.model.multi_modal_projector.mm_input_projection_weight
            vision_hidden, text_hidden = projector.shape
            projector.normal_(0.0, EMBEDDING_STD * (text_hidden / vision_hidden) ** 0.5)
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def _generation_config(tokenizer: Any) -> Any:
    from transformers import GenerationConfig

    vocab = tokenizer.get_vocab()
    return GenerationConfig(
        bos_token_id=vocab["<bos>"],
        pad_token_id=vocab["<pad>"],
        # A chat turn ends with <end_of_turn>; without it a served answer runs on to max_tokens.
        eos_token_id=[vocab["<eos>"], vocab["<end_of_turn>"]],
        do_sample=False,
        max_new_tokens=256,
    )


def build_tiny_gemma3(output_dir: Path, cfg: TinyModelConfig) -> None:
    """Write a complete model folder (weights, configs, tokenizer, processor, chat template) to `output_dir`.

    The same `cfg` always gives the same bytes, so the folder's content hash is a stable cache key.
    """
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    template = _chat_template()
    tokenizer = build_tokenizer(cfg.vocab_size, template)
    image_processor = Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=template,
        image_seq_length=MM_TOKENS_PER_IMAGE,
    )
    config = _model_config(cfg, tokenizer)
    model = _build_weights(config, cfg.seed)
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m modal_jobs.tiny_model OUTPUT_DIR")
    build_tiny_gemma3(Path(sys.argv[1]), TinyModelConfig())
