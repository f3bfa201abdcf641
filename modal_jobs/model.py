"""The `prepare_model` stage: put a vision-language model folder into storage, checked and fingerprinted.

Run as part of the pipeline, or alone:
    python -c "from modal_jobs.jobs import run_job; print(run_job('prepare_model',
        {'model': {'source': 'builtin:tiny-gemma3'}, 'output_dir': 'models/tiny'}))"

A source is the built-in tiny Gemma 3 (built offline), a local model folder (copied), or a hub model id
(downloaded at the revision's commit sha, so the output matches its cache key). Only safetensors weights are
ever taken: pickled `.bin`/`.pt` files can run arbitrary code when loaded.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path
from typing import Any

from modal_jobs import hub
from modal_jobs.config import BUILTIN_MODEL, ModelConfig
from modal_jobs.errors import InputError
from modal_jobs.schemas import PrepareModelRequest, PrepareModelResult
from modal_jobs.storage import MANIFEST_NAME, atomic_output, fingerprint_path, read_manifest, resolve, short_hash

# Weight formats that are pickles (or not loadable by transformers as safetensors); never copied or downloaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Besides pickles: llama.cpp files and Meta's original checkpoints duplicate the weights in formats we never load.
HUB_IGNORE_PATTERNS = [
    *(f"*{suffix}" for suffix in PICKLE_SUFFIXES), "*.gguf", "original/*", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data",
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _local_folder(source: str) -> Path | None:
    path = Path(source).expanduser()
    return path if path.is_dir() else None


def source_fingerprint(model: ModelConfig) -> str:
    """A cheap key for the source, for cache keys: it changes when the model it names would change."""
    if model.source == BUILTIN_MODEL:
        from modal_jobs.tiny_model import TINY_MODEL_VERSION

        return short_hash({"builtin": model.source, "tiny": model.tiny.model_dump(), "version": TINY_MODEL_VERSION})
    folder = _local_folder(model.source)
    if folder is not None:
        # The flow computes this before any job starts: a folder that cannot become a model fails here, not
        # after the dataset has been prepared (and before its bytes are hashed).
        check_model_folder(folder, model.source)
        return fingerprint_path(folder)
    if not _HUB_ID.match(model.source):
        raise InputError(
            f"model source {model.source!r} is not an existing folder, a hub model id (owner/name) or "
            f"{BUILTIN_MODEL!r}"
        )
    if not hub.hub_reachable():
        raise InputError(hub.unreachable_message("model", model.source))
    return hub.revision_sha("model", model.source, model.revision)


# --- validation ------------------------------------------------------------------------------------------


def _weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    safetensors = sorted(folder.rglob("*.safetensors"))
    pickles = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    return safetensors, pickles


def check_model_folder(folder: Path, source: str) -> None:
    """Fail before copying anything when the folder cannot become a servable vision-language model."""
    if not (folder / "config.json").is_file():
        raise InputError(f"model {source!r}: {folder} has no config.json; save the model with `save_pretrained`")
    safetensors, pickles = _weight_files(folder)
    if not safetensors:
        found = ", ".join(p.name for p in pickles[:3]) or "no weight files"
        raise InputError(
            f"model {source!r}: {folder} has {found} but no .safetensors weights. Only safetensors are loaded, "
            f"because pickled .bin/.pt files can run arbitrary code when loaded; re-save the model with "
            f"`model.save_pretrained(folder, safe_serialization=True)`"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            f"model {source!r}: {folder} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); save the processor beside "
            f"the weights with `processor.save_pretrained(folder)`"
        )
    if not any((folder / name).is_file() for name in IMAGE_PROCESSOR_FILES):
        raise InputError(
            f"model {source!r}: {folder} has no image processor config ({' or '.join(IMAGE_PROCESSOR_FILES)}); save "
            f"the processor beside the weights with `processor.save_pretrained(folder)`"
        )


def _vision_language_architecture(folder: Path, model: ModelConfig) -> str:
    """Read the config (never the weights) and name the architecture; refuse models that cannot see."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        hint = "" if model.trust_remote_code else " (if it ships code you trust, set model.trust_remote_code)"
        raise InputError(
            f"model {model.source!r}: its config.json does not load with transformers{hint}: {error}"
        ) from error
    known = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(config.model_type)
    if known is None and getattr(config, "vision_config", None) is None:
        raise InputError(
            f"model {model.source!r} is a {config.model_type!r} model without a vision tower; this pipeline "
            f"fine-tunes image-text-to-text models such as Gemma 3 (e.g. unsloth/gemma-3-4b-it)"
        )
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures:
        return architectures[0]
    if known is None:
        raise InputError(f"model {model.source!r}: config.json names no architecture")
    return known


def count_parameters(folder: Path) -> int:
    """Sum of tensor element counts in the safetensors headers: the parameter count, without loading weights.

    (Tied weights are stored once, so they count once, as in `model.num_parameters()`. Pre-quantised
    checkpoints store packed integers, so their count is of stored elements, not of logical parameters.)
    """
    total = 0
    for file in sorted(folder.rglob("*.safetensors")):
        with open(file, "rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for size in entry["shape"]:
                count *= size
            total += count
    return total


# --- materialising a source ----------------------------------------------------------------------------


def _copy_local(folder: Path, destination: Path) -> list[str]:
    """Copy the folder, leaving out pickles, VCS/cache folders and a previous stage's manifest."""
    skipped: list[str] = []

    def ignore(directory: str, names: list[str]) -> set[str]:
        dropped = {
            name
            for name in names
            if name.endswith(PICKLE_SUFFIXES) or name in {".git", ".cache", "__pycache__", MANIFEST_NAME}
            or name.startswith(".tmp-")
        }
        skipped.extend(str(Path(directory, name).relative_to(folder)) for name in sorted(dropped))
        return dropped

    # Follows symlinks, so a Hugging Face cache snapshot (links into blobs/) is copied as real files.
    shutil.copytree(folder, destination, ignore=ignore, dirs_exist_ok=True)
    return skipped


def _download(model: ModelConfig, sha: str, destination: Path) -> None:
    from huggingface_hub import snapshot_download

    # The sha, not the requested branch, so what lands here is exactly what the source fingerprint names.
    snapshot_download(
        model.source,
        revision=sha,
        local_dir=destination,
        ignore_patterns=HUB_IGNORE_PATTERNS,
        token=hub.hub_token(),
    )
    # snapshot_download keeps its bookkeeping inside local_dir; it is not part of the model.
    shutil.rmtree(destination / ".cache", ignore_errors=True)


def _cached_result(request: PrepareModelRequest, manifest: dict[str, Any]) -> PrepareModelResult:
    return PrepareModelResult(
        path=request.output_dir,
        fingerprint=manifest["content_fingerprint"],
        source_fingerprint=manifest["source_fingerprint"],
        architecture=manifest["architecture"],
        num_parameters=manifest["num_parameters"],
        cached=True,
    )


def prepare_model(request: PrepareModelRequest) -> PrepareModelResult:
    """Build, copy or download the model into `request.output_dir` (atomically), or reuse a finished one."""
    model = request.model
    manifest = read_manifest(request.output_dir)
    if manifest is not None:
        return _cached_result(request, manifest)

    folder = None if model.source == BUILTIN_MODEL else _local_folder(model.source)
    source_fp = source_fingerprint(model)  # checks a local folder before hashing it

    manifest = {
        "stage": "prepare_model",
        "model": model.model_dump(),
        "source_fingerprint": source_fp,
    }
    with atomic_output(request.output_dir, manifest) as tmp:
        if model.source == BUILTIN_MODEL:
            from modal_jobs.tiny_model import TINY_MODEL_VERSION, build_tiny_gemma3

            build_tiny_gemma3(tmp, model.tiny)
            manifest["tiny_model_version"] = TINY_MODEL_VERSION
        elif folder is not None:
            manifest["source_path"] = str(folder.resolve())
            manifest["skipped_files"] = _copy_local(folder, tmp)
        else:
            _download(model, source_fp, tmp)
            manifest["hub_revision"] = source_fp
            check_model_folder(tmp, model.source)
        manifest["architecture"] = _vision_language_architecture(tmp, model)
        manifest["num_parameters"] = count_parameters(tmp)

    # Read back rather than trust `manifest`: a concurrent run with the same key may have finished first, and
    # its (equivalent) output is the one now in place.
    written = read_manifest(request.output_dir)
    if written is None:
        raise RuntimeError(f"prepare_model: {resolve(request.output_dir)} has no manifest after it was written")
    return _cached_result(request, written).model_copy(update={"cached": False})
