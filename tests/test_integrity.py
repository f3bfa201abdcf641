"""Finished outputs are verified on every cache hit and recomputed when damaged; a damaged prepared dataset is
named, not retried. The whole-pipeline checks (finished folders never change; sources are never written) are
in tests/test_sources_read_only.py.

Run as: python -m pytest tests/test_integrity.py -q
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from modal_jobs import storage
from modal_jobs.config import DatasetConfig, EvaluateConfig, ExportConfig
from modal_jobs.errors import InputError
from modal_jobs.jobs import run_job
from modal_jobs.schemas import EvaluateRequest, ExportRequest, PrepareDatasetRequest


@pytest.fixture(autouse=True)
def home(vlmpipe_home) -> Path:
    return vlmpipe_home


def flip_byte(file: Path, offset: int | None = None, keep_mtime: bool = False) -> None:
    """Flip one bit in place, as a bad disk write or a stray editor would; optionally put the mtime back."""
    stat = file.stat()
    offset = stat.st_size // 2 if offset is None else offset
    with open(file, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))
    if keep_mtime:
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert file.stat().st_mtime_ns == stat.st_mtime_ns and file.stat().st_size == stat.st_size


def finished(location: str, files: dict[str, bytes]) -> Path:
    with storage.atomic_output(location, {"stage": "demo"}) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    return storage.resolve(location)


# --- verify_output: what the cheap check catches, and what needs a full one ------------------------------


def test_a_finished_folder_verifies_and_its_first_check_reads_nothing(home):
    folder = finished("runs/a/merged", {"model.safetensors": os.urandom(4096), "config.json": b"{}"})
    check = storage.verify_output("runs/a/merged")
    assert check.state == "intact" and check.usable
    # atomic_output remembered what it hashed under the final names, so that check was stat calls only.
    memo = json.loads((home / ".hash-memo.json").read_text())
    assert str((folder / "model.safetensors").resolve()) in memo


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["mtime moved", "mtime put back with os.utime"])
def test_a_flipped_byte_is_a_mismatch_naming_both_fingerprints(home, keep_mtime):
    folder = finished("runs/a/merged", {"model.safetensors": os.urandom(4096), "config.json": b"{}"})
    written = storage.read_manifest(folder)["content_fingerprint"]
    flip_byte(folder / "model.safetensors", keep_mtime=keep_mtime)
    check = storage.verify_output("runs/a/merged")
    assert check.state == "mismatch" and not check.usable
    assert check.expected == written and check.actual != written
    assert str(folder) in check.describe() and written in check.describe() and check.actual in check.describe()


def test_an_added_or_removed_file_is_a_mismatch(home):
    folder = finished("datasets/a", {"data.arrow": b"x" * 100})
    (folder / "cache-123.arrow").write_bytes(b"a cache a library left behind")
    assert storage.verify_output("datasets/a").state == "mismatch"
    (folder / "cache-123.arrow").unlink()
    assert storage.verify_output("datasets/a").state == "intact"
    (folder / "data.arrow").unlink()
    assert storage.verify_output("datasets/a").state == "mismatch"


def test_the_limit_a_change_the_filesystem_never_saw_needs_a_full_check(home, monkeypatch):
    """Bit rot on the medium changes bytes without touching size, mtime, ctime or inode. The memo cannot see
    it (that is what makes a check cheap); `full=True` or VLMPIPE_VERIFY=full re-reads every byte."""
    folder = finished("runs/a/merged", {"model.safetensors": os.urandom(4096)})
    file = (folder / "model.safetensors").resolve()
    memo_before = json.loads((home / ".hash-memo.json").read_text())[str(file)]
    flip_byte(file)
    # What the memo would hold had the flip happened below the filesystem: today's stat, yesterday's digest.
    memo = json.loads((home / ".hash-memo.json").read_text())
    stat = file.stat()
    memo[str(file)] = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, memo_before[-1]]
    (home / ".hash-memo.json").write_text(json.dumps(memo))

    assert storage.verify_output("runs/a/merged").state == "intact"  # the documented blind spot
    assert storage.verify_output("runs/a/merged", full=True).state == "mismatch"
    monkeypatch.setenv("VLMPIPE_VERIFY", "full")
    assert storage.verify_output("runs/a/merged").state == "mismatch"


def test_files_have_no_manifest_and_folders_need_one(home):
    (home / "evals").mkdir(parents=True)
    (home / "evals" / "k.json").write_text("{}")
    assert storage.verify_output("evals/k.json").state == "file"
    assert storage.verify_output("evals/gone.json").state == "missing"
    assert storage.verify_output("runs/none").state == "missing"
    (home / "runs" / "half").mkdir(parents=True)
    assert storage.verify_output("runs/half").state == "unfinished"


def test_the_local_executor_refuses_a_damaged_output_and_says_so(home, capsys):
    from tasks.executors import LocalExecutor

    folder = finished("runs/a/merged", {"model.safetensors": os.urandom(4096)})
    assert LocalExecutor().output_exists("runs/a/merged")
    flip_byte(folder / "model.safetensors")
    assert not LocalExecutor().output_exists("runs/a/merged")
    warning = capsys.readouterr().err
    assert str(folder) in warning and "no longer matches its manifest" in warning and "recomputing" in warning


# --- a job recomputes a damaged output instead of serving it ---------------------------------------------


def test_a_damaged_merged_model_is_recomputed_not_served(home, tiny_model_dir, tmp_path, capsys):
    """The issue's case: one flipped byte in the merged model.safetensors was served as Cached."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    adapter = tmp_path / "adapter"
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    get_peft_model(model, LoraConfig(r=4, target_modules=r".*language_model.*\.q_proj")).save_pretrained(adapter)
    request = ExportRequest(export=ExportConfig(), model_dir=str(tiny_model_dir), adapter_dir=str(adapter),
                            output_dir="runs/r/merged")
    first = run_job("export", request)
    merged = storage.resolve("runs/r/merged")
    written = storage.read_manifest(merged)["content_fingerprint"]
    assert not first.cached and run_job("export", request).cached

    flip_byte(next(merged.glob("*.safetensors")), keep_mtime=True)
    again = run_job("export", request)
    assert not again.cached
    assert "no longer matches its manifest" in capsys.readouterr().err
    assert storage.verify_output("runs/r/merged", full=True).state == "intact"
    assert storage.read_manifest(merged)["content_fingerprint"] == written  # the same bytes as before the damage
    assert not [p for p in merged.parent.iterdir() if p.name.startswith(".tmp-")]


# --- a damaged prepared dataset: named, with the fix, never retried ---------------------------------------


def _evaluate_request(dataset_dir: str) -> EvaluateRequest:
    # The endpoint is never reached: the dataset is opened first.
    return EvaluateRequest(evaluate=EvaluateConfig(num_samples=2), base_url="http://127.0.0.1:9/v1", model_name="m",
                           dataset_dir=dataset_dir, instruction="Write the LaTeX.", output_path="evals/x.json")


def test_a_damaged_dataset_shard_is_an_input_error_naming_the_folder(home, tiny_dataset_dir):
    from tasks.executors import LocalExecutor

    run_job("prepare_dataset", PrepareDatasetRequest(dataset=DatasetConfig(source=str(tiny_dataset_dir)),
                                                     output_dir="datasets/d"))
    shard = next(storage.resolve("datasets/d").glob("test/data-*.arrow"))
    # Arrow keeps no checksums: this flip goes unnoticed by the reader, and the rows would be used as they are.
    flip_byte(shard, offset=16, keep_mtime=True)
    # Through the executor, as the pipeline runs it: an InputError is never retried (tasks.stages.is_transient).
    with pytest.raises(InputError) as caught:
        LocalExecutor().run("evaluate", _evaluate_request("datasets/d"))
    message = str(caught.value)
    assert str(storage.resolve("datasets/d")) in message and "no longer matches its manifest" in message
    assert "run the pipeline again" in message


def test_an_unreadable_dataset_without_a_manifest_names_the_folder_and_the_fix(home, tiny_dataset_dir, tmp_path):
    import shutil

    copy = tmp_path / "dataset"
    shutil.copytree(tiny_dataset_dir, copy)
    shard = next(copy.glob("test/data-*.arrow"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(InputError) as caught:
        run_job("evaluate", _evaluate_request(str(copy)))
    assert str(copy) in str(caught.value) and "cannot be read" in str(caught.value)
    assert "delete the folder and run the pipeline again" in str(caught.value)
