"""prepare_dataset on real sources written into tmp_path: the built-in synthetic set, parquet, save_to_disk,
an image folder, and broken variants of them.

Run as: python -m pytest tests/test_prepare_dataset.py -q
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from modal_jobs import storage
from modal_jobs.config import BUILTIN_DATASET, DatasetConfig, SyntheticDatasetConfig
from modal_jobs.dataset import prepare_dataset, source_fingerprint
from modal_jobs.errors import InputError
from modal_jobs.schemas import PrepareDatasetRequest
from modal_jobs.synthetic import MAX_TOKENS, MIN_TOKENS, synthetic_latex_ocr

SMALL = SyntheticDatasetConfig(train_size=20, test_size=5, seed=0)


@pytest.fixture(autouse=True)
def home(vlmpipe_home) -> Path:
    return vlmpipe_home  # offline by declaration too: tests/conftest.py sets HF_HUB_OFFLINE for every test


@pytest.fixture(scope="module")
def small():
    return synthetic_latex_ocr(SMALL)


def _features():
    import datasets

    return datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})


def _png_bytes(split) -> list[bytes]:
    import datasets

    return [row["bytes"] for row in split.cast_column("image", datasets.Image(decode=False))["image"]]


def _prepare(source: str | Path, output_dir: str = "datasets/out", **fields) -> tuple:
    request = PrepareDatasetRequest(
        dataset=DatasetConfig(source=str(source), synthetic=SMALL, **fields), output_dir=output_dir
    )
    return request, prepare_dataset(request)


def _load_prepared(result):
    import datasets

    return datasets.load_from_disk(str(storage.resolve(result.path)))


def _assert_canonical(prepared, train_texts: list[str], test_texts: list[str]) -> None:
    from PIL import Image

    assert set(prepared) == {"train", "test"}
    for split in prepared.values():
        assert split.features == _features()
        row = split[0]
        assert isinstance(row["image"], Image.Image) and row["image"].width > 0
    assert sorted(prepared["train"]["text"]) == sorted(train_texts)
    assert sorted(prepared["test"]["text"]) == sorted(test_texts)


# --- the synthetic set --------------------------------------------------------------------------------


def test_synthetic_same_seed_same_rows_other_seed_other_rows(small):
    from PIL import Image

    again = synthetic_latex_ocr(SMALL)
    other = synthetic_latex_ocr(SMALL.model_copy(update={"seed": 1}))
    assert {name: len(split) for name, split in small.items()} == {"train": 20, "test": 5}
    for name in ("train", "test"):
        assert small[name].features == _features()
        assert small[name]["text"] == again[name]["text"]
        assert _png_bytes(small[name]) == _png_bytes(again[name])
        assert small[name]["text"] != other[name]["text"]
    assert not set(small["train"]["text"]) & set(small["test"]["text"])

    for row in small["train"]:
        tokens = row["text"].split(" ")
        assert MIN_TOKENS <= len(tokens) <= MAX_TOKENS and "" not in tokens  # im2latex-style single spaces
        assert "\\begin" not in row["text"] and "\\dfrac" not in row["text"]
        image: Image.Image = row["image"]
        assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)
        assert 30 <= image.height <= 250 and image.width >= 20


_PARALLEL_RENDER = """
import hashlib, sys
import datasets
from modal_jobs import synthetic
from modal_jobs.config import SyntheticDatasetConfig
synthetic.PARALLEL_MIN_ROWS = 1
pool = synthetic._render_pool(25)
assert pool is not None, "expected worker processes"
pool.shutdown()
rows = synthetic.synthetic_latex_ocr(SyntheticDatasetConfig(train_size=20, test_size=5, seed=0))
digest = hashlib.sha256()
for name in ("train", "test"):
    for text, image in zip(rows[name]["text"], rows[name].cast_column("image", datasets.Image(decode=False))["image"]):
        digest.update(text.encode() + image["bytes"])
print(digest.hexdigest())
"""


def test_rendering_in_worker_processes_gives_the_same_rows(small):
    import hashlib
    import os
    import subprocess
    import sys

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: rendering is always serial")
    # A fresh interpreter: this one may run other tests' background threads, and a process with threads
    # renders serially (forking it could deadlock), so the worker-process path would not be exercised here.
    child = subprocess.run([sys.executable, "-c", _PARALLEL_RENDER], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    digest = hashlib.sha256()
    for name in ("train", "test"):
        for text, image in zip(small[name]["text"], _png_bytes(small[name])):
            digest.update(text.encode() + image)
    assert child.stdout.strip() == digest.hexdigest()


# --- round trips --------------------------------------------------------------------------------------


def test_builtin_round_trip_then_cached(small):
    request, result = _prepare(BUILTIN_DATASET)
    assert result.splits == {"train": 20, "test": 5} and not result.cached
    assert result.path == "datasets/out" and storage.is_complete(result.path)
    assert result.fingerprint == storage.read_manifest(result.path)["content_fingerprint"]
    assert result.source_fingerprint == source_fingerprint(request.dataset)
    prepared = _load_prepared(result)
    _assert_canonical(prepared, small["train"]["text"], small["test"]["text"])
    assert prepared["train"]["text"] == small["train"]["text"]  # order kept
    assert _png_bytes(prepared["train"]) == _png_bytes(small["train"])

    again = prepare_dataset(request)
    assert again.cached and again.model_dump(exclude={"cached"}) == result.model_dump(exclude={"cached"})

    # The same input written elsewhere hashes the same: downstream keys follow the data, not the run.
    _, elsewhere = _prepare(BUILTIN_DATASET, output_dir="datasets/elsewhere")
    assert not elsewhere.cached and elsewhere.fingerprint == result.fingerprint


def test_parquet_folder_one_file_per_split(tmp_path, small):
    folder = tmp_path / "pq"
    (folder / "data").mkdir(parents=True)
    small["train"].to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    small["test"].to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    _, result = _prepare(folder)
    assert result.splits == {"train": 20, "test": 5}
    prepared = _load_prepared(result)
    _assert_canonical(prepared, small["train"]["text"], small["test"]["text"])
    assert _png_bytes(prepared["test"]) == _png_bytes(small["test"])


def test_single_parquet_file_split_column(tmp_path, small):
    import datasets

    table = datasets.concatenate_datasets(
        [small["train"].add_column("split", ["fit"] * 20), small["test"].add_column("split", ["holdout"] * 5)]
    )
    file = tmp_path / "all.parquet"
    table.to_parquet(str(file))
    _, result = _prepare(file, train_split="fit", test_split="holdout")
    prepared = _load_prepared(result)
    _assert_canonical(prepared, small["train"]["text"], small["test"]["text"])


def test_save_to_disk_folder_with_custom_names(tmp_path, small):
    import datasets

    def renamed(split):
        split = split.rename_columns({"image": "png", "text": "latex"})
        return split.add_column("source_id", list(range(len(split))))

    folder = tmp_path / "saved"
    datasets.DatasetDict({"training": renamed(small["train"]), "validation": renamed(small["test"])}).save_to_disk(
        str(folder)
    )
    _, result = _prepare(
        folder, image_column="png", text_column="latex", train_split="training", test_split="validation"
    )
    assert result.splits == {"train": 20, "test": 5}
    prepared = _load_prepared(result)
    _assert_canonical(prepared, small["train"]["text"], small["test"]["text"])
    assert prepared["train"].column_names == ["image", "text"]


def test_imagefolder_with_metadata_jsonl(tmp_path, small):
    folder = tmp_path / "images"
    for name in ("train", "test"):
        (folder / name).mkdir(parents=True)
        lines = []
        for index, (png, text) in enumerate(zip(_png_bytes(small[name]), small[name]["text"])):
            (folder / name / f"{index:04d}.png").write_bytes(png)
            lines.append(json.dumps({"file_name": f"{index:04d}.png", "text": text}))
        (folder / name / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    _, result = _prepare(folder)
    prepared = _load_prepared(result)
    _assert_canonical(prepared, small["train"]["text"], small["test"]["text"])
    # Images are embedded, not referenced: the output survives the source folder going away.
    assert sorted(_png_bytes(prepared["train"])) == sorted(_png_bytes(small["train"]))


def test_flat_imagefolder_with_metadata_csv_is_one_split(tmp_path, small):
    import csv

    folder = tmp_path / "flat"
    folder.mkdir()
    with open(folder / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "latex"])
        for index, (png, text) in enumerate(zip(_png_bytes(small["train"]), small["train"]["text"])):
            (folder / f"{index}.png").write_bytes(png)
            writer.writerow([f"{index}.png", text])
    # One split only, so train and test must both name it (allowed, with a warning on stderr).
    _, result = _prepare(folder, text_column="latex", test_split="train")
    assert result.splits == {"train": 20, "test": 20}
    _assert_canonical(_load_prepared(result), small["train"]["text"], small["train"]["text"])


# --- errors -------------------------------------------------------------------------------------------


def _saved(tmp_path: Path, train, test) -> Path:
    import datasets

    folder = tmp_path / "bad"
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(folder))
    return folder


def _with_rows(split, replace: dict[int, dict]):
    import datasets

    images = [{"bytes": b, "path": None} for b in _png_bytes(split)]
    texts = list(split["text"])
    for index, row in replace.items():
        if "bytes" in row:
            images[index] = {"bytes": row["bytes"], "path": None}
        if "text" in row:
            texts[index] = row["text"]
    return datasets.Dataset.from_dict({"image": images, "text": texts}, features=_features())


def _missing_path(tmp_path, small):
    return tmp_path / "nope.parquet", {}


def _offline_hub_id(tmp_path, small):
    return "someone/latex-equations", {}


def _missing_text_column(tmp_path, small):
    train, test = (small[name].rename_column("text", "latex") for name in ("train", "test"))
    return _saved(tmp_path, train, test), {}


def _truncated_image(tmp_path, small):
    png = _png_bytes(small["train"])[3]
    return _saved(tmp_path, _with_rows(small["train"], {3: {"bytes": png[: len(png) // 2]}}), small["test"]), {}


def _empty_split(tmp_path, small):
    import pyarrow.parquet as pq

    # Parquet, because datasets cannot save_to_disk a split with no rows.
    folder = tmp_path / "pq"
    folder.mkdir()
    small["train"].to_parquet(str(folder / "train.parquet"))
    pq.write_table(small["test"].data.table.slice(0, 0), folder / "test.parquet")
    return folder, {}


def _blank_text(tmp_path, small):
    return _saved(tmp_path, small["train"], _with_rows(small["test"], {1: {"text": " \t\n"}})), {}


def _many_blank_texts(tmp_path, small):
    return _saved(tmp_path, _with_rows(small["train"], {i: {"text": ""} for i in range(12)}), small["test"]), {}


def _huge_image(tmp_path, small):
    return _saved(tmp_path, small["train"], small["test"]), {"max_image_pixels": 100}


def _missing_split(tmp_path, small):
    return _saved(tmp_path, small["train"], small["test"]), {"test_split": "validation"}


def _single_dataset(tmp_path, small):
    folder = tmp_path / "one"
    small["train"].save_to_disk(str(folder))
    return folder, {}


ERROR_CASES: dict[str, tuple[Callable, list[str]]] = {
    "missing path": (_missing_path, ["nope.parquet", "no such file or folder"]),
    "hub id, hub unreachable": (_offline_hub_id, ["someone/latex-equations", "cannot be reached"]),
    "missing text column": (_missing_text_column, ["no column 'text'", "dataset.text_column", "'latex'"]),
    "truncated image": (_truncated_image, ["split 'train' row 3", "cannot be decoded", "1 of 25 rows"]),
    "empty split": (_empty_split, ["split 'test'", "is empty"]),
    "blank text": (_blank_text, ["split 'test' row 1", "blank"]),
    "many bad rows": (_many_blank_texts, ["12 of 25 rows", "split 'train' row 9", "and 2 more"]),
    "image over the pixel limit": (_huge_image, ["row 0", "over dataset.max_image_pixels (100)"]),
    "missing split": (_missing_split, ["no split 'validation'", "dataset.test_split", "'test', 'train'"]),
    "single Dataset, no splits": (_single_dataset, ["single Dataset", "DatasetDict"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_source_fails_with_a_message_naming_the_problem(case, tmp_path, home, small):
    build, expected = ERROR_CASES[case]
    source, fields = build(tmp_path, small)
    with pytest.raises(InputError) as caught:
        _prepare(source, **fields)
    for text in expected:
        assert text in str(caught.value), f"{text!r} not in: {caught.value}"
    assert not storage.is_complete("datasets/out")
    leftovers = list((home / "datasets").glob(".tmp-*")) if (home / "datasets").exists() else []
    assert leftovers == []


def test_source_fingerprint_follows_content_and_fields(tmp_path, small):
    builtin = DatasetConfig(source=BUILTIN_DATASET, synthetic=SMALL)
    assert source_fingerprint(builtin) == source_fingerprint(builtin.model_copy())
    assert source_fingerprint(builtin) != source_fingerprint(
        builtin.model_copy(update={"synthetic": SMALL.model_copy(update={"seed": 7})})
    )

    file = tmp_path / "train.parquet"
    small["train"].to_parquet(str(file))
    local = DatasetConfig(source=str(file))
    first = source_fingerprint(local)
    assert first == source_fingerprint(local)
    assert first != source_fingerprint(local.model_copy(update={"text_column": "latex"}))
    small["test"].to_parquet(str(file))
    assert first != source_fingerprint(local)


def test_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, modal_jobs.dataset, modal_jobs.synthetic; "
        "heavy = [m for m in ('datasets', 'matplotlib', 'PIL', 'numpy', 'prefect') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])



# --- sources are only read; one file without a split column; an empty file -----------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every path under a folder (folders too) with its bytes: what 'unchanged' means for a source."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else b"<dir>") for p in folder.rglob("*")}


def _save_to_disk_with_large_string_text(tmp_path, small):
    import datasets

    folder = tmp_path / "saved-large"
    # large_string text (as pandas writes it) and one blank row (skipped by max_bad_rows): a cast and a select,
    # each of which datasets would write into the source folder by default.
    train = _with_rows(small["train"], {2: {"text": " "}}).cast_column("text", datasets.Value("large_string"))
    datasets.DatasetDict({"train": train, "test": small["test"]}).save_to_disk(str(folder))
    return folder, {"max_bad_rows": 1}


def _single_parquet_with_split_column(tmp_path, small):
    import datasets

    (tmp_path / "src").mkdir()
    file = tmp_path / "src" / "all.parquet"
    datasets.concatenate_datasets(
        [small["train"].add_column("split", ["train"] * 20), small["test"].add_column("split", ["test"] * 5)]
    ).to_parquet(str(file))
    return file, {}


def _single_parquet_to_split(tmp_path, small):
    (tmp_path / "src").mkdir()
    file = tmp_path / "src" / "data.parquet"
    small["train"].to_parquet(str(file))
    return file, {"test_size": 0.25}


def _parquet_folder(tmp_path, small):
    folder = tmp_path / "pq"
    (folder / "data").mkdir(parents=True)
    small["train"].to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    small["test"].to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    return folder, {}


def _image_folder(tmp_path, small):
    folder = tmp_path / "images"
    for name in ("train", "test"):
        (folder / name).mkdir(parents=True)
        lines = []
        for index, (png, text) in enumerate(zip(_png_bytes(small[name]), small[name]["text"])):
            (folder / name / f"{index:04d}.png").write_bytes(png)
            lines.append(json.dumps({"file_name": f"{index:04d}.png", "text": text}))
        (folder / name / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder, {}


READ_ONLY_SOURCES = {
    "save_to_disk folder": _save_to_disk_with_large_string_text,
    "parquet folder": _parquet_folder,
    "image folder with metadata.jsonl": _image_folder,
    "single parquet file with a split column": _single_parquet_with_split_column,
    "single parquet file split by test_size": _single_parquet_to_split,
}


@pytest.mark.parametrize("case", list(READ_ONLY_SOURCES))
def test_a_source_is_never_written_to(case, tmp_path, small):
    source, fields = READ_ONLY_SOURCES[case](tmp_path, small)
    folder = source if source.is_dir() else source.parent
    before = _snapshot(folder)
    request, result = _prepare(source, **fields)
    assert not result.cached
    assert _snapshot(folder) == before
    # The prepared output is what its manifest says, too.
    assert storage.verify_output(result.path, full=True).state == "intact"
    # The next identical run: the same key (the source's fingerprint held), so a cache hit.
    assert source_fingerprint(request.dataset) == result.source_fingerprint
    assert prepare_dataset(request).cached
    assert _snapshot(folder) == before


def test_an_empty_parquet_file_says_it_has_no_rows(tmp_path, small):
    import pyarrow.parquet as pq

    file = tmp_path / "empty.parquet"
    pq.write_table(small["train"].add_column("split", ["train"] * 20).data.table.slice(0, 0), file)
    with pytest.raises(InputError) as caught:
        _prepare(file)
    assert "empty.parquet" in str(caught.value) and "has no rows" in str(caught.value)


def test_one_parquet_file_without_a_split_column_names_test_size(tmp_path, small):
    file = tmp_path / "data.parquet"
    small["train"].to_parquet(str(file))
    with pytest.raises(InputError) as caught:
        _prepare(file)
    assert "'data'" in str(caught.value) and "dataset.test_size" in str(caught.value)
    named = tmp_path / "train.parquet"
    small["train"].to_parquet(str(named))
    with pytest.raises(InputError) as caught:
        _prepare(named)
    assert "no split 'test'" in str(caught.value) and "dataset.test_size" in str(caught.value)


def test_test_size_holds_out_a_seeded_share_recorded_in_the_manifest(tmp_path, small):
    file = tmp_path / "data.parquet"
    small["train"].to_parquet(str(file))
    request, result = _prepare(file, test_size=0.25)
    assert result.splits == {"train": 15, "test": 5}
    prepared = _load_prepared(result)
    train_texts, test_texts = list(prepared["train"]["text"]), list(prepared["test"]["text"])
    _assert_canonical(prepared, train_texts, test_texts)
    assert sorted(train_texts + test_texts) == sorted(small["train"]["text"])
    held_out = storage.read_manifest(result.path)["held_out_test"]
    assert held_out == {"from_split": "data", "test_size": 0.25, "seed": 3407, "rows": {"train": 15, "test": 5}}

    # Seeded: the same config holds out the same rows; a count works as well as a share.
    _, again = _prepare(file, output_dir="datasets/again", test_size=0.25)
    assert again.fingerprint == result.fingerprint
    _, counted = _prepare(file, output_dir="datasets/counted", test_size=5)
    assert sorted(_load_prepared(counted)["test"]["text"]) == sorted(prepared["test"]["text"])
    # It is part of the key: without it the same file is another (here: unusable) dataset.
    assert source_fingerprint(request.dataset) != source_fingerprint(
        request.dataset.model_copy(update={"test_size": 0.5})
    )


def test_test_size_problems_are_named(tmp_path, small):
    import datasets

    folder = tmp_path / "both"
    datasets.DatasetDict({"train": small["train"], "test": small["test"]}).save_to_disk(str(folder))
    with pytest.raises(InputError, match="already has a split 'test'.*unset dataset.test_size"):
        _prepare(folder, test_size=0.1)
    file = tmp_path / "data.parquet"
    small["train"].to_parquet(str(file))
    with pytest.raises(InputError, match="test_size=0.01 of split 'data''s 20 rows leaves 0 test"):
        _prepare(file, test_size=0.01)
    for bad in (0, 1.0, 1.5, -2):
        with pytest.raises(ValueError, match="test_size"):
            DatasetConfig(source=str(file), test_size=bad)
    # Unset, it is not in the saved config, so the keys of datasets prepared before it existed still hold.
    assert "test_size" not in DatasetConfig().model_dump()
