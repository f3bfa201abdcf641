"""The encode_images stage: run the frozen vision tower + projector once per image and cache what comes out.

With the vision layers frozen (the default recipe), what the vision tower and the multi-modal projector make of
an image never changes during training, yet the pixel path recomputes it for every image in every epoch of
every run: for Gemma 3 4B that is ~5.5 TFLOP an image, ~40% of a training step's work. This stage computes it
once; the train job then scatters the cached features into the token embeddings (modal_jobs.train).

Cache format, under <storage root>/features/<key>/ (written atomically, manifest last):

    index.json                  {"split", "num_images", "mm_tokens", "hidden_size", "dtype", "shard_size", "shards"}
    shard-00000.safetensors     "features": [n, mm_tokens, hidden] in the dtype training embeds in (bf16 on a GPU),
                                "rows": [n] int64, the dataset row of each image (row i is shard i // shard_size)
    vlmpipe_manifest.json       the key and its components (see `cache_components`), so a reader can check them

The key (modal_jobs.keys.encode_features_key) is computed here, from the inputs themselves: the dataset's
content fingerprint, a fingerprint of the vision tower and projector weights only (so a retrain or a sweep on
the same base model reuses the cache, and a different tower never does), the processor's image settings, the
dtype the tower ran in and the torch/transformers versions. The train job recomputes the same components and
falls back to pixels when any differs.

Run as: python -m modal_jobs.runner encode_images REQUEST.json RESULT.json
"""

from __future__ import annotations

import json
import os
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import Field, PositiveInt

from modal_jobs.config import ModelConfig
from modal_jobs.errors import InputError
from modal_jobs.schemas import Message
from modal_jobs.storage import (
    MANIFEST_NAME,
    atomic_output,
    atomic_write_json,
    fingerprint_path,
    hash_range_into,
    read_manifest,
    relative,
    resolve,
    short_hash,
    storage_root,
)

STAGE = "encode_images"
INDEX_NAME = "index.json"
# Tensor names (after any "model." prefix) that make up the image path: everything before the token embeddings.
VISION_PARTS = ("vision_tower.", "multi_modal_projector.")
# Config keys that name or describe a file rather than change what the tower computes.
_CONFIG_NOISE = {"_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype", "model_type"}


class EncodeRequest(Message):
    model: ModelConfig = Field(description="dtype and trust_remote_code matter here; the weights come from model_dir.")
    dataset_dir: str = Field(description="A prepared dataset (save_to_disk layout, column `image`).")
    model_dir: str
    split: str = "train"
    features_root: str = Field(
        "features", description="Without output_dir, the cache lands in <features_root>/<key>, the key computed here."
    )
    output_dir: str | None = Field(
        None,
        description=(
            "Where to write instead, for an orchestrator that names outputs by its own key (keys.encode_images_key, "
            "from the whole model's fingerprint). The manifest still records the exact components."
        ),
    )
    batch_size: PositiveInt = Field(32, description="Images per vision-tower forward.")
    num_workers: int | None = Field(
        None, ge=0, description="Image decoding/preprocessing processes; None: all cores but two (0 on 2 cores)."
    )
    shard_size: PositiveInt = Field(1024, description="Images per safetensors shard (~1.3 GB for Gemma 3 4B in bf16).")
    compile_tower: bool = Field(
        True, description="On a GPU, torch.compile the vision encoder's layers and the projector (fused norms and "
                          "activations); kernels are cached on the storage root.",
    )


class EncodeResult(Message):
    features_dir: str
    key: str
    components: dict[str, Any]
    num_images: int
    mm_tokens: int
    hidden_size: int
    dtype: str
    size_bytes: int
    images_per_s: float | None = Field(
        None, description="Throughput of the encode loop after its first batch (model load, worker start-up and "
                          "compiling excluded)."
    )
    first_batch_s: float | None = Field(None, description="The first batch: preprocessing, compiling, forward.")
    compiled_tower: bool = False
    runtime_s: float
    cached: bool = False


# --- what the cache depends on --------------------------------------------------------------------------


def _safetensors_entries(path: Path) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    header.pop("__metadata__", None)
    return 8 + header_len, header


def _vision_name(name: str) -> str | None:
    """`model.vision_tower.x` and `vision_tower.x` (old and new checkpoint layouts) both give `vision_tower.x`."""
    for part in VISION_PARTS:
        position = name.find(part)
        if position != -1 and (position == 0 or name[position - 1] == "."):
            return name[position:]
    return None


def _vision_memo_path() -> Path:
    return storage_root() / ".vision-hash-memo.json"


def vision_fingerprint(model_dir: str | Path) -> str:
    """xxh3-128 over the vision tower and projector tensors (name, dtype, shape, bytes) and the vision config.

    The language model's weights are left out: a model whose language layers differ (another fine-tune of the
    same base, a merged adapter) gives the same fingerprint when its vision path is the same. Memoised on each
    file's (path, size, mtime), like storage.fingerprint_path.
    """
    import xxhash

    model_dir = resolve(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    config_path = model_dir / "config.json"
    if not files or not config_path.exists():
        raise InputError(f"model folder {model_dir} has no config.json or no *.safetensors weights")
    config = json.loads(config_path.read_text())
    vision_config = {k: v for k, v in (config.get("vision_config") or {}).items() if k not in _CONFIG_NOISE}
    architecture = {
        "vision_config": vision_config,
        "mm_tokens_per_image": config.get("mm_tokens_per_image"),
        "architectures": config.get("architectures"),
    }
    stats = {str(f.resolve()): [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
    memo_key = short_hash(stats)
    try:
        memo = json.loads(_vision_memo_path().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        memo = {}
    if memo_key in memo:
        weights_digest = memo[memo_key]
    else:
        entries = []
        for file in files:
            base, header = _safetensors_entries(file)
            for name, meta in header.items():
                short = _vision_name(name)
                if short is not None:
                    entries.append((short, file, base, meta))
        if not entries:
            raise InputError(
                f"model folder {model_dir} has no vision tower weights (no tensor named vision_tower.* or "
                "multi_modal_projector.*): it is not a vision-language model this stage can encode for"
            )
        digest = xxhash.xxh3_128()
        for short, file, base, meta in sorted(entries, key=lambda entry: entry[0]):
            start, end = meta["data_offsets"]
            digest.update(f"{short}|{meta['dtype']}|{meta['shape']}\n".encode())
            hash_range_into(digest, file, base + start, end - start)
        weights_digest = digest.hexdigest()
        memo[memo_key] = weights_digest
        try:
            atomic_write_json(_vision_memo_path(), memo)
        except OSError:
            pass  # only an optimisation
    return short_hash({"weights": weights_digest, "architecture": architecture}, length=32)


def dataset_fingerprint(dataset_dir: str | Path) -> str:
    """The prepared dataset's content fingerprint (its manifest's, when it has one), blind to the cache-*.arrow
    files that `datasets` writes beside the data whenever a split is mapped: training from the folder must not
    change its identity, or the first training run would make every cache for it stale."""
    dataset_dir = resolve(dataset_dir)
    manifest = read_manifest(dataset_dir)
    if manifest and manifest.get("content_fingerprint"):
        return manifest["content_fingerprint"]
    files = sorted(
        p for p in dataset_dir.rglob("*")
        if p.is_file() and not p.name.startswith(("cache-", "tmp")) and p.name != MANIFEST_NAME
    )
    if not files:
        raise InputError(f"prepared dataset {dataset_dir} holds no files")
    return short_hash([[p.relative_to(dataset_dir).as_posix(), fingerprint_path(p)] for p in files], length=32)


def processor_settings(processor: Any) -> dict[str, Any]:
    """The processor settings that decide pixels and placeholder counts: the image processor's class and
    configuration (size, resampling, rescaling, normalisation, pan-and-scan) and the image sequence length."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise InputError(f"{type(processor).__name__} has no image processor: this model does not take images")
    settings = json.loads(json.dumps(image_processor.to_dict(), sort_keys=True, default=str))
    return {
        "image_processor": type(image_processor).__name__,
        "settings": settings,
        "image_seq_length": getattr(processor, "image_seq_length", None),
    }


def compute_dtype(model: ModelConfig) -> str:
    """The dtype training embeds in, by the train job's rule: model.dtype on a GPU, float32 on a CPU."""
    import torch

    return model.dtype if torch.cuda.is_available() else "float32"


def cache_components(dataset_dir: str | Path, model_dir: str | Path, processor: Any, split: str, dtype: str):
    """The key of the cache these inputs need (a keys.StageKey: key + components)."""
    from modal_jobs.keys import encode_features_key, local_library_versions

    dataset_dir = resolve(dataset_dir)
    return encode_features_key(
        dataset_fingerprint=dataset_fingerprint(dataset_dir),
        split=split,
        vision_fingerprint=vision_fingerprint(model_dir),
        processor_signature=short_hash(processor_settings(processor), length=32),
        dtype=dtype,
        library_versions=local_library_versions(),
    )


def check_cache(features_dir: str | Path, expected_components: dict[str, Any]) -> list[str]:
    """Why this cache cannot stand in for the pixels: [] when it can, else the reasons (changed components)."""
    from modal_jobs.keys import changed_components

    manifest = read_manifest(features_dir)
    if manifest is None or manifest.get("stage") != STAGE:
        return [f"{features_dir} is not a finished encode_images output"]
    changed = changed_components(manifest.get("components") or {}, expected_components)
    return [f"{name} differs" for name in changed]


# --- reading ------------------------------------------------------------------------------------------


class FeatureStore:
    """Random access to cached features by dataset row: `store.get([3, 17, 5])` -> [3, mm_tokens, hidden].

    Shards are memory-mapped and opened on first use in each process (safe across DataLoader workers).
    """

    def __init__(self, features_dir: str | Path):
        self.path = resolve(features_dir)
        self.index = json.loads((self.path / INDEX_NAME).read_text())
        self.num_images = int(self.index["num_images"])
        self.shard_size = int(self.index["shard_size"])
        self.shape = (int(self.index["mm_tokens"]), int(self.index["hidden_size"]))
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.num_images

    def _shard(self, number: int):
        from safetensors import safe_open

        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if number not in self._handles:
            self._handles[number] = safe_open(str(self.path / self.index["shards"][number]), framework="pt")
        return self._handles[number]

    def get(self, rows: list[int]):
        import torch

        parts = []
        for row in rows:
            if not 0 <= row < self.num_images:
                raise IndexError(f"row {row} is outside the feature cache ({self.num_images} images)")
            shard, offset = divmod(int(row), self.shard_size)
            parts.append(self._shard(shard).get_slice("features")[offset : offset + 1])
        return torch.cat(parts)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}


# --- the job ------------------------------------------------------------------------------------------


class _ImageBatches:
    """Map-style dataset over batches of row indices: decodes and preprocesses one batch of images, exactly as
    the processor does it for training (RGB, then the image processor), in a DataLoader worker."""

    def __init__(self, split: Any, image_processor: Any, dtype: Any):
        self.split = split
        self.image_processor = image_processor
        self.dtype = dtype

    def __getitem__(self, rows: list[int]):
        images = [self.split[row]["image"].convert("RGB") for row in rows]
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        if pixel_values.shape[0] != len(images):
            raise InputError(
                f"the image processor made {pixel_values.shape[0]} crops of {len(images)} images (pan-and-scan?): "
                "the feature cache holds one image per row; turn pan-and-scan off or train from pixels"
            )
        # The vision tower casts pixels to its weights' dtype first thing; doing it here halves what crosses
        # from the worker and rounds exactly the same way.
        return rows, pixel_values.to(self.dtype)


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)  # one core a worker: they are many, and preprocessing is per image


def _default_workers() -> int:
    # On the 16-core GPU machines 14 workers fed the compiled tower 65-67 images/s against 72 for the tower alone on
    # random pixels (8 workers fed the eager tower 44 against 55).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 2 else min(16, cores - 2)


def _load_image_path(model_dir: Path, request: EncodeRequest, dtype: Any, device: Any):
    """The vision tower and projector on `device`; the language model stays on the CPU (it is not needed)."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=dtype, trust_remote_code=request.model.trust_remote_code, use_safetensors=True,
        attn_implementation="sdpa",  # fused (flash / memory-efficient) attention for the tower's 4096 patches
    )
    model.eval().requires_grad_(False)
    backbone = model.model
    backbone.vision_tower.to(device)
    backbone.multi_modal_projector.to(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return model, backbone


def _compile_tower(backbone: Any) -> int:
    """Compile each vision encoder layer (one graph, compiled once, serves them all) and the projector; the
    number of modules compiled."""
    from modal_jobs.storage import keep_compiled_kernels

    keep_compiled_kernels()
    tower = backbone.vision_tower
    encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
    modules = list(getattr(encoder, "layers", None) or [tower]) + [backbone.multi_modal_projector]
    for module in modules:
        module.compile()
    return len(modules)


def _image_features(backbone: Any, pixel_values: Any):
    output = backbone.get_image_features(pixel_values=pixel_values)
    # transformers 5 returns the projected features as `pooler_output`; older releases return the tensor.
    return getattr(output, "pooler_output", output)


def encode_images(request: EncodeRequest) -> EncodeResult:
    started = time.time()
    dataset_dir = resolve(request.dataset_dir)
    model_dir = resolve(request.model_dir)
    if not dataset_dir.exists():
        raise InputError(f"prepared dataset {dataset_dir} does not exist")
    if not (model_dir / "config.json").exists():
        raise InputError(f"model folder {model_dir} has no config.json")

    import torch
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=request.model.trust_remote_code)
    dtype_name = compute_dtype(request.model)
    stage_key = cache_components(dataset_dir, model_dir, processor, request.split, dtype_name)
    features_dir = request.output_dir or f"{request.features_root}/{stage_key.key}"
    cached = _cached_result(features_dir, stage_key)
    if cached is not None:
        return cached

    split = _image_split(dataset_dir, request.split)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, dtype_name)
    model, backbone = _load_image_path(model_dir, request, dtype, device)
    compiled = device.type == "cuda" and request.compile_tower and _compile_tower(backbone)
    rows = list(range(len(split)))
    batches = [rows[i : i + request.batch_size] for i in range(0, len(rows), request.batch_size)]
    loader = _image_loader(split, processor, dtype, device, batches, request.num_workers)

    manifest = {"stage": STAGE, "key": stage_key.key, "components": stage_key.components,
                "request": request.model_dump(mode="json")}
    with atomic_output(features_dir, manifest) as tmp:
        encoded = _encode(loader, backbone, tmp, request, device, dtype, compiled)
        index = {"split": request.split, "num_images": encoded.count, "mm_tokens": encoded.mm_tokens,
                 "hidden_size": encoded.hidden_size, "dtype": dtype_name, "shard_size": request.shard_size,
                 "shards": encoded.shards}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        size_bytes = sum(f.stat().st_size for f in tmp.iterdir())
        loop_s, first_batch_s = encoded.loop_s, encoded.first_batch_s
        result = EncodeResult(
            features_dir=features_dir, key=stage_key.key, components=stage_key.components, num_images=encoded.count,
            mm_tokens=encoded.mm_tokens, hidden_size=encoded.hidden_size, dtype=dtype_name, size_bytes=size_bytes,
            images_per_s=(round((encoded.count - len(batches[0])) / loop_s, 2)
                          if len(batches) > 1 and loop_s > 0 else None),
            first_batch_s=round(first_batch_s, 2) if first_batch_s is not None else None,
            compiled_tower=bool(compiled),
            runtime_s=round(time.time() - started, 2),
        )
        manifest["result"] = result.model_dump(mode="json")
    print(f"encoded {encoded.count} images into {relative(resolve(features_dir))} "
          f"({size_bytes / 1e9:.2f} GB, {result.images_per_s} images/s)", file=sys.stderr)
    del model, backbone
    return result


def _cached_result(features_dir: str, stage_key: Any) -> EncodeResult | None:
    """The result a finished cache for these inputs recorded; None when there is no finished output there."""
    manifest = read_manifest(features_dir)
    if manifest is None:
        return None
    changed = check_cache(features_dir, stage_key.components)
    if changed:
        raise InputError(
            f"{features_dir} already holds features made from other inputs "
            f"({', '.join(changed)}): choose another output_dir"
        )
    return EncodeResult.model_validate({**manifest["result"], "cached": True})


def _image_split(dataset_dir: Path, split_name: str) -> Any:
    """The split's `image` column alone (the other columns are never decoded)."""
    from modal_jobs.dataset import open_prepared

    dataset = open_prepared(dataset_dir)
    if split_name not in dataset:
        raise InputError(f"prepared dataset {dataset_dir} has no split {split_name!r} (it has {list(dataset)})")
    split = dataset[split_name].select_columns(["image"])
    if len(split) == 0:
        raise InputError(f"the {split_name} split is empty")
    return split


def _image_loader(split: Any, processor: Any, dtype: Any, device: Any, batches: list[list[int]],
                  num_workers: int | None) -> Any:
    """Preprocessed batches in row order, from worker processes (one core each) while the tower runs."""
    import torch

    workers = _default_workers() if num_workers is None else num_workers
    return torch.utils.data.DataLoader(
        _ImageBatches(split, processor.image_processor, dtype),
        sampler=batches,
        batch_size=None,
        num_workers=workers,
        worker_init_fn=_worker_init if workers else None,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
    )


class _Encoded(NamedTuple):
    count: int
    mm_tokens: int | None
    hidden_size: int | None
    shards: list[str]
    first_batch_s: float | None  # the first batch: workers' start-up, compiling, forward
    loop_s: float  # every batch after the first


def _encode(loader: Any, backbone: Any, folder: Path, request: EncodeRequest, device: Any, dtype: Any,
            compiled: Any) -> _Encoded:
    """Every batch through the tower and projector, the features written into shards in `folder` as they come."""
    import torch

    writer = _ShardWriter(folder, request.shard_size)
    mm_tokens = hidden = None
    encoded = 0
    loop_started = first_batch_s = None
    first_started = time.time()
    with torch.inference_mode(), _autocast(device, dtype):
        for batch_rows, pixel_values in loader:
            if encoded and loop_started is None:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                loop_started = time.time()  # from the end of the first batch (workers' start-up, compiling)
                first_batch_s = loop_started - first_started
            pixel_values = pixel_values.to(device, non_blocking=True)
            count = pixel_values.shape[0]
            if compiled and count < request.batch_size:  # the last batch, padded: one shape to compile for
                padding = pixel_values.new_zeros((request.batch_size - count, *pixel_values.shape[1:]))
                pixel_values = torch.cat((pixel_values, padding))
            features = _image_features(backbone, pixel_values)[:count]
            features = features.to(dtype)  # what the forward does before masked_scatter (inputs_embeds' dtype)
            mm_tokens, hidden = int(features.shape[1]), int(features.shape[2])
            writer.add(batch_rows, features.to("cpu"))
            encoded += len(batch_rows)
    writer.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    loop_s = time.time() - loop_started if loop_started else 0.0
    return _Encoded(encoded, mm_tokens, hidden, writer.names, first_batch_s, loop_s)


def _autocast(device: Any, dtype: Any) -> Any:
    # The train job's forward runs under autocast on a GPU (Trainer's bf16/fp16 mixed precision), and the
    # tower's layer norms then compute in float32: run it the same way, so the features are the same numbers.
    import torch

    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


class _ShardWriter:
    """Collects features into shards of `shard_size` rows and writes each on a background thread, so the GPU
    does not wait on the disk."""

    def __init__(self, folder: Path, shard_size: int):
        self.folder = folder
        self.shard_size = shard_size
        self.pending: list[Any] = []
        self.pending_rows: list[int] = []
        self.names: list[str] = []
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def add(self, rows: list[int], features: Any) -> None:
        expected = len(self.names) * self.shard_size + len(self.pending_rows)
        if rows[0] != expected:
            raise RuntimeError(f"rows arrived out of order: expected {expected}, got {rows[0]}")
        self.pending.append(features)
        self.pending_rows.extend(rows)
        while len(self.pending_rows) >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, count: int) -> None:
        import torch

        stacked = torch.cat(self.pending)
        shard, rest = stacked[:count].contiguous(), stacked[count:]
        rows = torch.tensor(self.pending_rows[:count], dtype=torch.int64)
        self.pending = [rest] if len(rest) else []
        self.pending_rows = self.pending_rows[count:]
        name = f"shard-{len(self.names):05d}.safetensors"
        self.names.append(name)
        self._join()
        self.thread = threading.Thread(target=self._write, args=(name, shard, rows), daemon=True)
        self.thread.start()

    def _write(self, name: str, features: Any, rows: Any) -> None:
        from safetensors.torch import save_file

        try:
            save_file({"features": features, "rows": rows}, str(self.folder / name))
        except BaseException as error:  # re-raised on the caller's thread
            self.error = error

    def _join(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if self.pending_rows:
            self._flush(len(self.pending_rows))
        self._join()
