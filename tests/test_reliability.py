"""Faults and bad input: what is rejected, what is skipped, and that nothing half-written looks finished."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest

from modal_jobs.config import DatasetConfig, ExportConfig
from modal_jobs.errors import InputError
from modal_jobs.schemas import ExportRequest, PrepareDatasetRequest
from modal_jobs.storage import is_complete


@pytest.fixture
def parquet_with_two_bad_rows(tmp_path, tiny_dataset_dir):
    from datasets import Dataset, load_from_disk

    good = load_from_disk(str(tiny_dataset_dir))
    rows = [{"image": {"bytes": _png(row["image"]), "path": None}, "text": row["text"]} for row in good["train"]]
    rows[3]["image"] = {"bytes": rows[3]["image"]["bytes"][:40], "path": None}  # truncated PNG
    rows[7]["text"] = "   "
    folder = tmp_path / "parquet"
    folder.mkdir()
    Dataset.from_list(rows).to_parquet(str(folder / "train.parquet"))
    test_rows = [{"image": {"bytes": _png(row["image"]), "path": None}, "text": row["text"]} for row in good["test"]]
    Dataset.from_list(test_rows).to_parquet(str(folder / "test.parquet"))
    return folder


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_rows_fail_by_default_naming_each_row(vlmpipe_home, parquet_with_two_bad_rows):
    from modal_jobs.dataset import prepare_dataset

    request = PrepareDatasetRequest(dataset=DatasetConfig(source=str(parquet_with_two_bad_rows)), output_dir="d/x")
    with pytest.raises(InputError) as caught:
        prepare_dataset(request)
    message = str(caught.value)
    assert "row 3" in message and "row 7" in message and "max_bad_rows" in message
    assert not is_complete("d/x")


def test_a_tolerance_skips_and_reports_bad_rows(vlmpipe_home, parquet_with_two_bad_rows):
    from modal_jobs.dataset import prepare_dataset

    source = str(parquet_with_two_bad_rows)
    too_strict = PrepareDatasetRequest(dataset=DatasetConfig(source=source, max_bad_rows=1), output_dir="d/strict")
    with pytest.raises(InputError, match="allows 1"):
        prepare_dataset(too_strict)
    request = PrepareDatasetRequest(dataset=DatasetConfig(source=source, max_bad_rows=2), output_dir="d/tolerant")
    result = prepare_dataset(request)
    assert result.splits["train"] == 32 - 2
    assert len(result.skipped_rows) == 2
    assert result.skipped_rows[0].startswith("train row 3") and "blank" in result.skipped_rows[1]


def test_export_killed_midway_leaves_nothing_that_looks_finished(vlmpipe_home, tiny_model_dir, tmp_path):
    """Kill the export job (SIGKILL) while it writes; a later export finishes normally."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    adapter = tmp_path / "adapter"
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    get_peft_model(model, LoraConfig(r=4, target_modules=r".*language_model.*\.q_proj")).save_pretrained(adapter)
    request = ExportRequest(export=ExportConfig(), model_dir=str(tiny_model_dir), adapter_dir=str(adapter),
                            output_dir="runs/kill/merged")
    request_path = tmp_path / "request.json"
    request_path.write_text(request.model_dump_json())
    child = subprocess.Popen(
        [sys.executable, "-m", "modal_jobs.runner", "export", str(request_path), str(tmp_path / "result.json")],
        env={**os.environ, "VLMPIPE_HOME": str(vlmpipe_home)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    runs = vlmpipe_home / "runs" / "kill"
    deadline = time.time() + 60
    while time.time() < deadline and not (runs.exists() and any(p.name.startswith(".tmp-") for p in runs.iterdir())):
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not is_complete(runs / "merged")

    from modal_jobs.export import export

    result = export(request)
    assert not result.cached and is_complete(runs / "merged")


def test_vllm_command_binds_loopback_bounds_requests_and_keeps_the_key_out_of_argv(tmp_path, monkeypatch):
    """The vLLM command line as built here (vLLM itself is a CUDA build that does not run on this machine)."""
    from modal_jobs import serve
    from modal_jobs.config import ServeConfig

    monkeypatch.setattr(serve, "_executable", lambda name, hint: f"/usr/bin/{name}")
    monkeypatch.setenv("ENDPOINT_KEY", "sk-canary-123")
    argv, name, env = serve._command("vllm", tmp_path, ServeConfig(api_key_env="ENDPOINT_KEY"), 8000)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--max-model-len") + 1] == "8192"
    assert argv[argv.index("--limit-mm-per-prompt") + 1] == '{"image": 1}'
    assert "--trust-remote-code" not in argv
    assert "sk-canary-123" not in " ".join(argv) and env["VLLM_API_KEY"] == "sk-canary-123"


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MB tmpfs as the storage root: a real full disk (needs root, as here and in CI)."""
    mount_point = tmp_path / "tiny-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_fails_with_a_clear_message_and_no_finished_output(tiny_disk, tmp_path):
    import json

    from modal_jobs.config import SyntheticDatasetConfig
    from tasks.executors import raise_job_error

    request = PrepareDatasetRequest(
        dataset=DatasetConfig(source="builtin:synthetic-latex-ocr", synthetic=SyntheticDatasetConfig(train_size=400)),
        output_dir="datasets/too-big",
    )
    request_path = tmp_path / "request.json"
    request_path.write_text(request.model_dump_json())
    result_path = tmp_path / "result.json"
    subprocess.run(
        [sys.executable, "-m", "modal_jobs.runner", "prepare_dataset", str(request_path), str(result_path)],
        env={**os.environ, "VLMPIPE_HOME": str(tiny_disk)}, capture_output=True, timeout=300,
    )
    outcome = json.loads(result_path.read_text())
    assert outcome["error_type"] == "StorageFullError"
    assert "no space left on the storage root" in outcome["message"] and str(tiny_disk) in outcome["message"]
    assert not is_complete(tiny_disk / "datasets" / "too-big")
    with pytest.raises(InputError):  # not retried: the disk stays full until someone acts
        raise_job_error("prepare_dataset", outcome["error_type"], outcome["message"])


def _zero_size_png() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)  # a header that claims a 0 x 0 image
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_zero_size_images_and_non_string_texts_are_named(vlmpipe_home, tmp_path, tiny_dataset_dir):
    from datasets import Dataset, DatasetDict, load_from_disk

    from modal_jobs.dataset import prepare_dataset

    good = load_from_disk(str(tiny_dataset_dir))
    images = [{"bytes": _png(row["image"]), "path": None} for row in good["train"]]
    images[2] = {"bytes": _zero_size_png(), "path": None}
    train = Dataset.from_dict({"image": images, "text": list(good["train"]["text"])}).cast(good["train"].features)
    DatasetDict({"train": train, "test": good["test"]}).save_to_disk(str(tmp_path / "zero"))
    with pytest.raises(InputError, match="'train' row 2: image"):
        prepare_dataset(PrepareDatasetRequest(dataset=DatasetConfig(source=str(tmp_path / "zero")), output_dir="d/z"))

    numbers = good["test"].remove_columns("text").add_column("text", list(range(len(good["test"]))))
    DatasetDict({"train": good["train"], "test": numbers}).save_to_disk(str(tmp_path / "numbers"))
    with pytest.raises(InputError, match="column 'text' .* holds Value\\('int64'\\), not text"):
        prepare_dataset(PrepareDatasetRequest(dataset=DatasetConfig(source=str(tmp_path / "numbers")),
                                              output_dir="d/n"))
    assert not is_complete("d/z") and not is_complete("d/n")
