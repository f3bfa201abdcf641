"""The built-in tiny Gemma 3 and the prepare_model stage, on real files: no mocks, no network.

Run as: `python -m pytest tests/test_prepare_model.py -q` (about 10 s on two CPU cores).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from modal_jobs.config import BUILTIN_MODEL, ModelConfig, TinyModelConfig
from modal_jobs.errors import InputError
from modal_jobs.model import prepare_model, source_fingerprint
from modal_jobs.schemas import PrepareModelRequest
from modal_jobs.storage import MANIFEST_NAME, fingerprint_path, is_complete, resolve
from modal_jobs.tiny_model import MM_TOKENS_PER_IMAGE, build_tiny_gemma3


@pytest.fixture
def tiny_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


@pytest.fixture
def home(vlmpipe_home) -> Path:
    return vlmpipe_home  # offline by declaration too: tests/conftest.py sets HF_HUB_OFFLINE for every test


def _equation_image(text: str, background: str = "white"):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (200, 60), background)
    ImageDraw.Draw(image).text((10, 20), text, fill="black" if background == "white" else "white")
    return image


def _request(source: str, output_dir: str = "models/out", **model_fields) -> PrepareModelRequest:
    return PrepareModelRequest(model=ModelConfig(source=source, **model_fields), output_dir=output_dir)


def _assert_nothing_left(output_dir: str) -> None:
    final = resolve(output_dir)
    assert not is_complete(final)
    assert not final.exists()
    assert not final.parent.exists() or not list(final.parent.glob(".tmp-*"))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy_without(src: Path, dst: Path, *names: str) -> Path:
    shutil.copytree(src, dst, ignore=lambda _dir, entries: [n for n in entries if n in names])
    return dst


# --- the tiny model --------------------------------------------------------------------------------------


def test_build_is_deterministic_per_seed(tiny_dir, tmp_path):
    build_tiny_gemma3(tmp_path / "again", TinyModelConfig())
    build_tiny_gemma3(tmp_path / "other_seed", TinyModelConfig(seed=1))

    assert _files(tmp_path / "again") == _files(tiny_dir)
    other = _files(tmp_path / "other_seed")
    assert other["model.safetensors"] != _files(tiny_dir)["model.safetensors"]
    assert other["tokenizer.json"] == _files(tiny_dir)["tokenizer.json"]


def test_folder_has_what_loaders_and_servers_read(tiny_dir):
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        assert (tiny_dir / name).is_file(), name
    assert not list(tiny_dir.glob("*.bin"))

    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    vocab = json.loads((tiny_dir / "tokenizer.json").read_text())["model"]["vocab"]
    # Served generation must stop at the end of the turn as well as at <eos>.
    assert set(generation["eos_token_id"]) == {vocab["<eos>"], vocab["<end_of_turn>"]}
    assert generation["do_sample"] is False


def test_tiny_model_sees_the_image(tiny_dir):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from modal_jobs.prompts import DEFAULT_INSTRUCTION, generation_messages

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_dir)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert model.dtype == torch.float32

    def logits_for(image):
        inputs = processor.apply_chat_template(
            generation_messages(image, DEFAULT_INSTRUCTION),
            add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        )
        ids = inputs["input_ids"][0].tolist()
        assert ids.count(model.config.image_token_id) == MM_TOKENS_PER_IMAGE
        assert ids.count(processor.tokenizer.bos_token_id) == 1
        with torch.no_grad():
            return model(**inputs).logits

    first = logits_for(_equation_image(r"\frac{a}{b}"))
    second = logits_for(_equation_image("x^2", background="black"))
    assert first.shape[-1] == model.config.text_config.vocab_size
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    # A zero projector (Gemma 3's default init) would make every image look the same to the language model.
    assert (first[0, -1] - second[0, -1]).abs().max() > 1e-2


def test_tokenizer_covers_latex_and_any_text(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    for text in (r"\frac { \alpha } { \sqrt { x ^ { 2 } } }", "Write the LaTeX representation for this image.",
                 "ünïcödé ∑ 漢字"):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    # The corpus was LaTeX: a common command is one or two tokens, not one per character.
    assert len(tokenizer(r"\frac", add_special_tokens=False).input_ids) <= 2


# --- prepare_model ---------------------------------------------------------------------------------------


def test_prepare_builtin_then_cached(home, tiny_dir):
    request = _request(BUILTIN_MODEL)

    first = prepare_model(request)
    out = resolve(first.path)
    assert first.path == "models/out" and out == home / "models/out"
    assert not first.cached
    assert first.architecture == "Gemma3ForConditionalGeneration"
    assert first.source_fingerprint == source_fingerprint(request.model)
    assert first.fingerprint == fingerprint_path(out, memo=False)
    # Same bytes as a direct build: the stage adds only its manifest.
    assert {k: v for k, v in _files(out).items() if k != MANIFEST_NAME} == _files(tiny_dir)

    from transformers import AutoModelForImageTextToText

    assert first.num_parameters == AutoModelForImageTextToText.from_pretrained(out).num_parameters()

    second = prepare_model(request)
    assert second.cached
    assert second.model_dump(exclude={"cached"}) == first.model_dump(exclude={"cached"})
    assert not list(out.parent.glob(".tmp-*"))


def test_builtin_source_fingerprint_follows_the_tiny_config(home):
    base = source_fingerprint(ModelConfig(source=BUILTIN_MODEL))
    assert base == source_fingerprint(ModelConfig(source=BUILTIN_MODEL))
    assert base != source_fingerprint(ModelConfig(source=BUILTIN_MODEL, tiny=TinyModelConfig(seed=1)))


def test_prepare_local_folder(home, tiny_dir, tmp_path):
    local = _copy_without(tiny_dir, tmp_path / "my-model")
    (local / "README.md").write_text("a model\n")
    request = _request(str(local), output_dir="models/local")

    first = prepare_model(request)
    out = resolve(first.path)
    assert not first.cached
    assert first.source_fingerprint == fingerprint_path(local)
    assert first.architecture == "Gemma3ForConditionalGeneration"
    assert (out / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()
    assert (out / "README.md").is_file()

    second = prepare_model(request)
    assert second.cached and second.fingerprint == first.fingerprint


def test_local_folder_with_pickled_weights_is_refused(home, tiny_dir, tmp_path):
    import torch

    local = _copy_without(tiny_dir, tmp_path / "pickled", "model.safetensors")
    torch.save({"w": torch.zeros(2)}, local / "pytorch_model.bin")

    with pytest.raises(InputError, match="safetensors") as failure:
        prepare_model(_request(str(local), output_dir="models/pickled"))
    assert "pytorch_model.bin" in str(failure.value)
    _assert_nothing_left("models/pickled")


def test_local_folder_without_processor_is_refused(home, tiny_dir, tmp_path):
    local = _copy_without(tiny_dir, tmp_path / "no-processor", "processor_config.json")

    with pytest.raises(InputError, match="processor"):
        prepare_model(_request(str(local), output_dir="models/no-processor"))
    _assert_nothing_left("models/no-processor")


def test_text_only_model_is_refused(home, tiny_dir, tmp_path):
    local = _copy_without(tiny_dir, tmp_path / "text-only")
    config = json.loads((local / "config.json").read_text())["text_config"]
    config["architectures"] = ["Gemma3ForCausalLM"]
    (local / "config.json").write_text(json.dumps(config))

    with pytest.raises(InputError, match="vision"):
        prepare_model(_request(str(local), output_dir="models/text-only"))
    _assert_nothing_left("models/text-only")


def test_missing_path_with_hub_unreachable_names_it(home):
    for source in ("/nonexistent/model-folder", "someone/not-here"):
        with pytest.raises(InputError, match=source):
            prepare_model(_request(source, output_dir="models/missing"))
        _assert_nothing_left("models/missing")
