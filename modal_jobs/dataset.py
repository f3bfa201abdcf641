"""prepare_dataset: load a dataset from wherever it lives, check every row, save it in one canonical shape.

Run as: python -m modal_jobs.runner prepare_dataset REQUEST.json RESULT.json

The output (a `save_to_disk` DatasetDict at request.output_dir) always has splits `train` and `test` and
columns `image` (datasets.Image, so rows give PIL images) and `text` (the LaTeX), whatever the source called
them. Nothing is written unless every image decodes and every text is non-blank: a broken row found later,
in the middle of training or evaluation, costs far more than failing here.

Sources (`DatasetConfig.source`), and how their splits are named:

- `builtin:synthetic-latex-ocr`: formulas rendered with matplotlib (see modal_jobs.synthetic); `train`, `test`.
- A hub id `owner/name`: `datasets.load_dataset`, pinned to the commit sha that `source_fingerprint` resolved
  from `revision`, so the data and its fingerprint agree. The dataset's own split names.
- A `save_to_disk` folder of a DatasetDict (it has dataset_dict.json): the DatasetDict's keys.
- An image folder: images plus metadata.jsonl, metadata.csv or metadata.parquet (a `file_name` column and the
  text column). With metadata at the top, the whole folder is one split, `train`; with a metadata file in
  each subfolder (`train/`, `test/`, ...), each such subfolder is a split named after it.
- A folder of parquet files, e.g. a hub repo's `data/` folder: a file's split is its name up to the first
  `-` or `.` (`train.parquet`, `train-00000-of-00002.parquet` -> `train`), or the name of the folder it is in
  when that part is only digits (`train/0000.parquet` -> `train`). Files of one split are concatenated.
- One `.parquet` file: if it has a `split` column, its values name the splits (and the column is dropped);
  otherwise the file is one split, named by the rule above. We never carve a test split out of training data
  behind the user's back: evaluation on rows the model trained on would look like success. Asked to, with
  `dataset.test_size`, we hold out a seeded share of the train split (or of a source's only split) as `test`,
  and the manifest records how.

Sources are only read: nothing is ever written into a source folder (every `select` keeps its index in
memory; `datasets` would otherwise put a cache-*.arrow next to the source's data and change its fingerprint).
Stages that read a prepared dataset open it with `open_prepared`, which checks it against its manifest first.

Anything that exists on disk is a local path; otherwise `owner/name` is looked up on the hub.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modal_jobs import hub
from modal_jobs.config import BUILTIN_DATASET, DatasetConfig
from modal_jobs.errors import InputError
from modal_jobs.schemas import PrepareDatasetRequest, PrepareDatasetResult
from modal_jobs.storage import atomic_output, fingerprint_path, read_manifest, short_hash
from modal_jobs.synthetic import SYNTHETIC_VERSION

if TYPE_CHECKING:
    import datasets

STAGE = "prepare_dataset"
# Part of every source fingerprint: bump it when this module changes what it writes for the same input.
PREPARE_VERSION = "1"
MAX_REPORTED_BAD_ROWS = 10
METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
SPLIT_COLUMN = "split"
# dataset.test_size draws its held-out rows with this seed (the recipe's), so the same config gives the same split.
TEST_SPLIT_SEED = 3407

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


# --- where the source is ------------------------------------------------------------------------------


def _locate(source: str) -> tuple[str, Path | None]:
    """("builtin" | "local" | "hub", the local path or None)."""
    if source == BUILTIN_DATASET:
        return "builtin", None
    path = Path(source).expanduser()
    if path.exists():
        return "local", path.resolve()
    if source.startswith("builtin:"):
        raise InputError(f"dataset.source {source!r}: no such built-in dataset; there is {BUILTIN_DATASET!r}")
    if _HUB_ID.match(source):
        if hub.hub_reachable():
            return "hub", None
        raise InputError(hub.unreachable_message("dataset", source))
    raise InputError(
        f"dataset.source {source!r}: no such file or folder ({path.absolute()}), and it is not a hub id of the "
        f"form owner/name; give an existing path, a hub id, or {BUILTIN_DATASET!r}"
    )


def _output_fields(dataset: DatasetConfig) -> dict[str, Any]:
    """The config fields, besides the source itself, that change what prepare_dataset writes (or whether it
    accepts the data at all)."""
    return dataset.model_dump(
        include={"train_split", "test_split", "image_column", "text_column", "max_image_pixels", "test_size"}
    )


def source_fingerprint(dataset: DatasetConfig) -> str:
    """A key for the prepared output, cheap enough to compute before any job runs.

    Built-in: the synthetic config and generator version. Local path: a content hash of its files (memoised
    by path, size and mtime, so an unchanged folder costs a few stat calls). Hub: the commit sha that
    `revision` points to now. Each is combined with the fields that change the prepared output (split and
    column names, the pixel limit) and PREPARE_VERSION.
    """
    kind, path = _locate(dataset.source)
    if kind == "builtin":
        identity: dict[str, Any] = {"synthetic": dataset.synthetic.model_dump(), "synthetic_version": SYNTHETIC_VERSION}
    elif kind == "local":
        assert path is not None
        identity = {"content": fingerprint_path(path)}
    else:
        identity = {"hub": dataset.source, "sha": hub.revision_sha("dataset", dataset.source, dataset.revision)}
    return short_hash({"kind": kind, **identity, "fields": _output_fields(dataset), "prepare_version": PREPARE_VERSION})


# --- loading ------------------------------------------------------------------------------------------


@contextmanager
def _scratch() -> Iterator[str]:
    """A throwaway datasets cache for local loads: the arrow copies they make are not worth keeping (the
    prepared output is the copy we keep), and they must not land in the user's ~/.cache."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vlmpipe-dataset-") as folder:
        yield folder


def _split_of_parquet(file: Path) -> str:
    head = re.split(r"[-.]", file.name, maxsplit=1)[0]
    return file.parent.name if head.isdigit() or not head else head


def _load_local(path: Path, cache_dir: str) -> dict[str, datasets.Dataset]:
    import datasets

    if path.is_file():
        if path.suffix != ".parquet":
            raise InputError(
                f"dataset.source {str(path)!r}: a {path.suffix or 'suffix-less'} file is not a supported source; "
                "give a .parquet file, a folder of parquet files, a save_to_disk folder or an image folder"
            )
        import pyarrow.parquet as pq

        if pq.ParquetFile(path).metadata.num_rows == 0:
            raise InputError(f"dataset.source {str(path)!r}: the parquet file has no rows")
        table = _load_parquet({"file": [path]}, cache_dir)["file"]
        if SPLIT_COLUMN in table.column_names:
            return _group_by_split_column(table, path)
        return {_split_of_parquet(path): table}

    if (path / "dataset_dict.json").is_file():
        return dict(datasets.load_from_disk(str(path)))
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        raise InputError(
            f"dataset.source {str(path)!r} is a single Dataset saved with save_to_disk, which has no splits; save "
            "a DatasetDict instead: DatasetDict({'train': train, 'test': test}).save_to_disk(folder)"
        )

    if any((path / name).is_file() for name in METADATA_NAMES):
        return {"train": _load_imagefolder(path, cache_dir)}
    split_folders = sorted(
        child
        for child in path.iterdir()
        if child.is_dir() and any((child / name).is_file() for name in METADATA_NAMES)
    )
    if split_folders:
        return {child.name: _load_imagefolder(child, cache_dir) for child in split_folders}

    # Hidden folders (.git, .cache, our own .tmp-*) hold no data a user meant to give.
    files = sorted(
        file
        for file in path.rglob("*.parquet")
        if not any(part.startswith(".") for part in file.relative_to(path).parts)
    )
    if files:
        by_split: dict[str, list[Path]] = {}
        for file in files:
            by_split.setdefault(_split_of_parquet(file), []).append(file)
        return _load_parquet(by_split, cache_dir)

    raise InputError(
        f"dataset.source {str(path)!r}: a folder with no dataset_dict.json, no {'/'.join(METADATA_NAMES)} and no "
        ".parquet files; see `modal_jobs.dataset`'s docstring for the layouts it reads"
    )


def _load_parquet(files_by_split: Mapping[str, list[Path]], cache_dir: str) -> dict[str, datasets.Dataset]:
    import datasets
    import pyarrow.parquet as pq

    # The loader takes only split names like `train` or `a.b` (and not `all`); ours come from file names.
    keys = {f"split{index}": name for index, name in enumerate(files_by_split)}
    with_rows = {}
    for key, name in keys.items():
        # datasets' parquet reader fails on a file with no rows instead of giving an empty split.
        files = [str(f) for f in files_by_split[name] if pq.ParquetFile(f).metadata.num_rows > 0]
        if files:
            with_rows[key] = files
    loaded = dict(datasets.load_dataset("parquet", data_files=with_rows, cache_dir=cache_dir)) if with_rows else {}
    splits = {}
    for key, name in keys.items():
        if key in loaded:
            splits[name] = loaded[key]
        else:  # every file of this split is empty: keep the split, with no rows, for _pick to report
            splits[name] = datasets.Dataset(pq.read_table(files_by_split[name][0]))
    return splits


def _load_imagefolder(folder: Path, cache_dir: str) -> datasets.Dataset:
    import datasets

    # drop_labels: otherwise the loader may invent a `label` column from subfolder names.
    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=cache_dir, drop_labels=True)
    if len(loaded) != 1:
        raise InputError(
            f"image folder {str(folder)!r}: expected one split, the loader found {sorted(loaded)}; put a metadata "
            "file in each split's own subfolder"
        )
    return next(iter(loaded.values()))


def _group_by_split_column(table: datasets.Dataset, path: Path) -> dict[str, datasets.Dataset]:
    import numpy as np
    import pyarrow.compute as pc

    column = table.data.column(SPLIT_COLUMN)
    if column.null_count:
        raise InputError(f"{str(path)!r}: the {SPLIT_COLUMN!r} column has {column.null_count} empty value(s)")
    names = pc.cast(column, "string")
    groups = {}
    for value in sorted(pc.unique(names).to_pylist()):
        indices = np.flatnonzero(pc.equal(names, value).to_numpy(zero_copy_only=False))
        groups[value] = table.select(indices, keep_in_memory=True).remove_columns(SPLIT_COLUMN)
    return groups


def _load(
    dataset: DatasetConfig, kind: str, path: Path | None, cache_dir: str
) -> tuple[dict[str, datasets.Dataset], dict[str, Any]]:
    """(split name -> Dataset as the source names things, extra manifest facts)."""
    if kind == "builtin":
        from modal_jobs.synthetic import synthetic_latex_ocr

        return dict(synthetic_latex_ocr(dataset.synthetic)), {}
    if kind == "hub":
        import datasets

        sha = hub.revision_sha("dataset", dataset.source, dataset.revision)
        loaded = datasets.load_dataset(dataset.source, revision=sha, token=hub.hub_token())
        return dict(loaded), {"source_revision": sha}
    assert path is not None
    try:
        return _load_local(path, cache_dir), {"source_path": str(path)}
    except InputError:
        raise
    except Exception as error:
        # Local files do not fail transiently: whatever the loader tripped on is in the data.
        raise InputError(f"dataset.source {str(path)!r} could not be read: {type(error).__name__}: {error}") from error


def _hold_out_test(
    raw: Mapping[str, datasets.Dataset], dataset: DatasetConfig
) -> tuple[dict[str, datasets.Dataset], dict[str, Any]]:
    """With dataset.test_size: the train split (or the source's only split, whatever the file called it) cut
    into train and test, seeded. The manifest gets the facts, so the held-out rows can be told apart later."""
    if dataset.test_size is None:
        return dict(raw), {}
    source = dataset.source
    if dataset.test_split in raw:
        raise InputError(
            f"dataset {source!r} already has a split {dataset.test_split!r} (dataset.test_split), and dataset.test_size "
            f"asks to carve one out of the train split: unset dataset.test_size, or name another dataset.test_split"
        )
    if dataset.train_split in raw:
        name = dataset.train_split
    elif len(raw) == 1:
        name = next(iter(raw))
    else:
        available = ", ".join(repr(n) for n in sorted(raw)) or "none"
        raise InputError(
            f"dataset {source!r} has no split {dataset.train_split!r} (dataset.train_split) to hold out "
            f"dataset.test_size={dataset.test_size} from; its splits: {available}"
        )
    rows = len(raw[name])
    held_out = dataset.test_size if isinstance(dataset.test_size, int) else round(dataset.test_size * rows)
    if not 1 <= held_out < rows:
        raise InputError(
            f"dataset {source!r}: dataset.test_size={dataset.test_size} of split {name!r}'s {rows} rows leaves "
            f"{held_out} test and {rows - held_out} train rows; both need at least one"
        )
    import numpy as np

    # What datasets' train_test_split does, by hand: it puts its index files next to the data (in a save_to_disk
    # source, the user's folder) even when asked to keep them in memory. Ours stay in memory.
    order = np.random.default_rng(TEST_SPLIT_SEED).permutation(rows)
    test = raw[name].select(order[:held_out], keep_in_memory=True)
    train = raw[name].select(order[held_out:], keep_in_memory=True)
    facts = {
        "held_out_test": {"from_split": name, "test_size": dataset.test_size, "seed": TEST_SPLIT_SEED,
                          "rows": {"train": len(train), "test": len(test)}},
    }
    kept = {other: split for other, split in raw.items() if other != name}
    return {**kept, dataset.train_split: train, dataset.test_split: test}, facts


# --- checks -------------------------------------------------------------------------------------------


def _pick(raw: Mapping[str, datasets.Dataset], dataset: DatasetConfig) -> dict[str, datasets.Dataset]:
    """canonical split -> the source's split, after checking splits and columns exist; before any row is read."""
    import datasets

    source = dataset.source
    available = ", ".join(repr(name) for name in sorted(raw)) or "none"
    if dataset.image_column == dataset.text_column:
        raise InputError(f"dataset.image_column and dataset.text_column are both {dataset.image_column!r}")
    if dataset.train_split == dataset.test_split:
        print(
            f"warning: dataset.train_split and dataset.test_split are both {dataset.train_split!r}: evaluation "
            "will score rows the model trained on",
            file=sys.stderr,
        )
    picked = {}
    requested = (("train", dataset.train_split, "train_split"), ("test", dataset.test_split, "test_split"))
    for canonical, name, field in requested:
        if name not in raw:
            hint = ""
            if canonical == "test" and dataset.train_split in raw:
                hint = (f"; or set dataset.test_size (e.g. 0.1) to hold out a seeded share of "
                        f"{dataset.train_split!r} as the test split")
            elif len(raw) == 1:
                hint = (f"; the source is one split ({available}: a single parquet file without a {SPLIT_COLUMN!r} "
                        "column is named after the file): set dataset.test_size (e.g. 0.1) to split it into train "
                        "and test, seeded")
            raise InputError(
                f"dataset {source!r} has no split {name!r} (dataset.{field}); its splits: {available}{hint}"
            )
        split = raw[name]
        if len(split) == 0:
            raise InputError(f"dataset {source!r}: split {name!r} (dataset.{field}) is empty")
        columns = ", ".join(repr(c) for c in split.column_names)
        for column, column_field in ((dataset.image_column, "image_column"), (dataset.text_column, "text_column")):
            if column not in split.column_names:
                raise InputError(
                    f"dataset {source!r}: split {name!r} has no column {column!r} (dataset.{column_field}); "
                    f"its columns: {columns}"
                )
        text_feature = split.features[dataset.text_column]
        if not (isinstance(text_feature, datasets.Value) and text_feature.dtype in ("string", "large_string")):
            raise InputError(
                f"dataset {source!r}: split {name!r} column {dataset.text_column!r} (dataset.text_column) holds "
                f"{text_feature}, not text"
            )
        if not isinstance(split.features[dataset.image_column], datasets.Image):
            try:
                split = split.cast_column(dataset.image_column, datasets.Image(decode=False))
            except Exception as error:
                raise InputError(
                    f"dataset {source!r}: split {name!r} column {dataset.image_column!r} (dataset.image_column) "
                    f"holds {split.features[dataset.image_column]}, not images (image bytes, file paths, or "
                    f"{{bytes, path}} structs)"
                ) from error
        picked[canonical] = split
    return picked


def _image_problem(value: dict[str, Any] | None, max_pixels: int) -> str | None:
    """Why this stored image is unusable, or None. Reads the header first, so a decompression bomb is
    rejected before its pixels are allocated, then decodes it all, so truncated files are caught."""
    import io
    import warnings

    from PIL import Image

    if value is None or (value.get("bytes") is None and not value.get("path")):
        return "no image"
    source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
    try:
        with warnings.catch_warnings():
            # Our own limit is the one that applies; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
                if width <= 0 or height <= 0:
                    return f"image has size {width}x{height}"
                if width * height > max_pixels:
                    return (
                        f"image is {width}x{height} = {width * height} pixels, over dataset.max_image_pixels "
                        f"({max_pixels})"
                    )
                image.load()
    except Exception as error:  # PIL reports broken files with many exception types
        return f"image cannot be decoded ({type(error).__name__}: {error})"
    return None


def _text_problem(value: Any) -> str | None:
    if value is None:
        return "text is missing"
    if not isinstance(value, str):
        return f"text is a {type(value).__name__}, not a string"
    if not value.strip():
        return f"text is blank ({value!r})"
    return None


def _validate(picked: Mapping[str, datasets.Dataset], dataset: DatasetConfig) -> dict[str, dict[int, str]]:
    """Check every row of every split. Returns the bad rows (split -> row -> reason) when there are no more
    than `dataset.max_bad_rows`; otherwise raises one InputError that lists the first bad rows and counts all."""
    import datasets
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm

    source_names = {"train": dataset.train_split, "test": dataset.test_split}
    bad_rows: dict[str, dict[int, str]] = {canonical: {} for canonical in picked}
    problems: list[str] = []
    total = 0
    batch_size = 256
    # PIL releases the GIL while it inflates PNG data, so threads decode in parallel.
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        for canonical, split in picked.items():
            name = source_names[canonical]
            total += len(split)
            images = split.select_columns([dataset.image_column]).cast_column(
                dataset.image_column, datasets.Image(decode=False)
            )
            texts = split.select_columns([dataset.text_column])
            rows = zip(images.iter(batch_size=batch_size), texts.iter(batch_size=batch_size))
            start = 0
            with tqdm(total=len(split), desc=f"check {name}", unit="row", file=sys.stderr, leave=False) as bar:
                for image_batch, text_batch in rows:
                    image_values = image_batch[dataset.image_column]
                    image_reasons = pool.map(lambda v: _image_problem(v, dataset.max_image_pixels), image_values)
                    for offset, (image_reason, text) in enumerate(zip(image_reasons, text_batch[dataset.text_column])):
                        reasons = [r for r in (image_reason, _text_problem(text)) if r]
                        if reasons:
                            bad_rows[canonical][start + offset] = "; ".join(reasons)
                            if len(problems) < MAX_REPORTED_BAD_ROWS:
                                problems.append(f"split {name!r} row {start + offset}: {'; '.join(reasons)}")
                    start += len(image_values)
                    bar.update(len(image_values))
    bad = sum(len(rows) for rows in bad_rows.values())
    if bad > dataset.max_bad_rows:
        more = f"\n  ... and {bad - len(problems)} more" if bad > len(problems) else ""
        tolerance = (
            f" (dataset.max_bad_rows allows {dataset.max_bad_rows})" if dataset.max_bad_rows
            else " (set dataset.max_bad_rows to skip a few instead)"
        )
        raise InputError(
            f"dataset {dataset.source!r}: {bad} of {total} rows are unusable{tolerance}, so nothing was written. "
            "Fix or drop them in the source:\n  " + "\n  ".join(problems) + more
        )
    return bad_rows


def _drop_bad_rows(
    picked: Mapping[str, datasets.Dataset], bad_rows: Mapping[str, dict[int, str]], dataset: DatasetConfig
) -> dict[str, datasets.Dataset]:
    kept = {}
    for canonical, split in picked.items():
        skip = bad_rows.get(canonical) or {}
        if skip:
            split = split.select([i for i in range(len(split)) if i not in skip], keep_in_memory=True)
            if len(split) == 0:
                raise InputError(f"dataset {dataset.source!r}: every row of split {canonical!r} is unusable")
        kept[canonical] = split
    return kept


def _workers() -> int:
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8))


def _canonical(
    picked: Mapping[str, datasets.Dataset], dataset: DatasetConfig, key: str, cache_dir: str
) -> datasets.DatasetDict:
    import datasets

    out = {}
    for canonical, split in picked.items():
        split = split.select_columns([dataset.image_column, dataset.text_column])
        renames = {dataset.image_column: "image", dataset.text_column: "text"}
        renames = {old: new for old, new in renames.items() if old != new}
        if renames:  # all at once, so swapped names (image <-> text) cannot collide
            split = split.rename_columns(renames)
        split = split.cast_column("image", datasets.Image())
        if split.features["text"] != datasets.Value("string"):  # e.g. large_string, as pandas writes parquet
            # A cast of a plain column goes through `map`, whose copy datasets puts next to the split's data: for
            # a save_to_disk source that is the user's folder. Put it in the scratch folder instead.
            features = split.features.copy()
            features["text"] = datasets.Value("string")
            split = split.cast(features, cache_file_name=str(Path(cache_dir) / f"text-as-string-{canonical}.arrow"))
        # A fingerprint derived from the source key rather than from the loader's cache paths: the saved
        # state.json, and with it the output's content hash, is then the same every time for the same input.
        out[canonical] = split.select_columns(["image", "text"], new_fingerprint=short_hash([key, canonical]))
    return datasets.DatasetDict(out)


# --- reading a prepared dataset (train, encode_images, evaluate, consistency) ---------------------------


def open_prepared(dataset_dir: str | Path) -> datasets.DatasetDict:
    """The prepared dataset at `dataset_dir` (storage-relative or absolute), read-only.

    A finished output is first checked against its manifest (storage.verify_output: a stat call per file when
    nothing changed), so a damaged shard is named before any row of it is used, and a damaged file that
    cannot even be opened is an InputError naming the folder and the fix, not an OSError a retry would repeat.
    Callers must keep it read-only: a `map` or a non-contiguous `select` needs `keep_in_memory=True` or a
    `cache_file_name` outside the folder (storage.dataset_cache_dir), or `datasets` writes into it.
    """
    import datasets

    from modal_jobs.storage import resolve, verify_output

    path = resolve(dataset_dir)
    if not path.is_dir():
        raise InputError(f"prepared dataset {path} does not exist or is not a folder: run prepare_dataset first")
    check = verify_output(path)
    if check.state == "mismatch":
        raise InputError(
            f"prepared dataset {check.describe()}, so it is not used: run the pipeline again (its prepare_dataset "
            "stage sees the mismatch and rebuilds it)"
        )
    try:
        return datasets.load_from_disk(str(path))
    except Exception as error:  # a damaged arrow file or JSON: pyarrow and datasets raise many types for it
        raise InputError(
            f"prepared dataset {path} cannot be read ({type(error).__name__}: {error}): delete the folder and run "
            "the pipeline again; its prepare_dataset stage rebuilds it"
        ) from error


# --- the job ------------------------------------------------------------------------------------------


def _result_from_manifest(
    request: PrepareDatasetRequest, manifest: dict[str, Any], cached: bool
) -> PrepareDatasetResult:
    if manifest.get("stage") != STAGE:
        raise InputError(
            f"{request.output_dir} already holds a finished output of stage {manifest.get('stage')!r}, not {STAGE}"
        )
    return PrepareDatasetResult(
        path=request.output_dir,
        fingerprint=manifest["content_fingerprint"],
        source_fingerprint=manifest["source_fingerprint"],
        splits=manifest["splits"],
        skipped_rows=[f"{r['split']} row {r['row']}: {r['reason']}" for r in manifest.get("skipped_rows", [])],
        cached=cached,
    )


def prepare_dataset(request: PrepareDatasetRequest) -> PrepareDatasetResult:
    """Load, check and save the dataset; a finished output already at request.output_dir is reused as is."""
    import datasets

    existing = read_manifest(request.output_dir)
    if existing is not None:
        return _result_from_manifest(request, existing, cached=True)

    started = time.perf_counter()
    dataset = request.dataset
    kind, path = _locate(dataset.source)
    key = source_fingerprint(dataset)
    with _scratch() as cache_dir:
        raw, facts = _load(dataset, kind, path, cache_dir)
        raw, held_out = _hold_out_test(raw, dataset)
        facts.update(held_out)
        picked = _pick(raw, dataset)
        bad_rows = _validate(picked, dataset)
        prepared = _canonical(_drop_bad_rows(picked, bad_rows, dataset), dataset, key, cache_dir)
        splits = {name: len(split) for name, split in prepared.items()}
        manifest: dict[str, Any] = {
            "stage": STAGE,
            "source": dataset.source,
            "source_kind": kind,
            **facts,
            "source_fingerprint": key,
            "source_splits": {"train": dataset.train_split, "test": dataset.test_split},
            "splits": splits,
            "skipped_rows": [
                {"split": split, "row": row, "reason": reason}
                for split, rows in bad_rows.items() for row, reason in sorted(rows.items())
            ],
            "versions": {"prepare": PREPARE_VERSION, "synthetic": SYNTHETIC_VERSION, "datasets": datasets.__version__},
            "request": request.model_dump(mode="json"),
        }
        with atomic_output(request.output_dir, manifest) as tmp:
            prepared.save_to_disk(str(tmp))
            manifest["duration_s"] = round(time.perf_counter() - started, 3)
    written = read_manifest(request.output_dir)
    if written is None:  # atomic_output returned, so this means the folder vanished under us
        raise RuntimeError(f"{request.output_dir}: output disappeared right after it was written")
    print(f"prepare_dataset: {splits} rows from {dataset.source} in {written.get('duration_s')} s", file=sys.stderr)
    return _result_from_manifest(request, written, cached=False)
