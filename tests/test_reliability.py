"""Faults and bad input: what is rejected, what is skipped, and that nothing half-written looks finished."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from modal_jobs.config import DatasetConfig, ExportConfig
from modal_jobs.errors import InputError
from modal_jobs.schemas import ExportRequest, PrepareDatasetRequest
from modal_jobs.storage import is_complete
from tests.prefect_homes import fresh_prefect_home


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
    argv, _name, env = serve._command("vllm", tmp_path, ServeConfig(api_key_env="ENDPOINT_KEY"), 8000)
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
                             check=False, capture_output=True, text=True)
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
        check=False, env={**os.environ, "VLMPIPE_HOME": str(tiny_disk)}, capture_output=True, timeout=300,
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


# --- Ctrl-C and kill -9 of `vlmpipe run` (issue 21 #4) ---------------------------------------------------


@contextlib.contextmanager
def _vlmpipe_run(home, *args: str):
    """`vlmpipe run` in its own process group, as a terminal starts it (Ctrl-C signals the whole group);
    whatever is left of the group is killed at the end."""
    prefect_home = fresh_prefect_home(home.parent / "prefect-home")
    env = {**os.environ, "VLMPIPE_HOME": str(home), "PREFECT_HOME": str(prefect_home), "HF_HUB_OFFLINE": "1"}
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", *args], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        yield run
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _alive(processes) -> list:
    import psutil

    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


# The embedded default, shortened: checkpoints often enough that Ctrl-C lands after one (and 80 steps before the
# end), a third of the training images, and a short evaluation.
_INTERRUPTIBLE = ("--set", "train.max_steps=100", "--set", "train.save_steps=20", "--set", "evaluate.num_samples=8",
                  "--set", "dataset.synthetic.train_size=200", "--set", "evaluate.max_tokens=16")


@pytest.mark.integration
def test_ctrl_c_during_training_returns_in_seconds_and_the_next_run_resumes(tmp_path):
    import psutil

    home = tmp_path / "home"
    with _vlmpipe_run(home, *_INTERRUPTIBLE) as run:
        from modal_jobs.train import latest_complete_checkpoint

        # A complete checkpoint (its folder appears before its files are written: Ctrl-C then has nothing to resume).
        _wait_for(lambda: any(latest_complete_checkpoint(folder) for folder in home.glob("runs/*/checkpoints"))
                  or run.poll() is not None, 900, "the first complete checkpoint")
        assert run.poll() is None, run.communicate()[1][-3000:]
        children = psutil.Process(run.pid).children(recursive=True)
        assert any("uvicorn" in " ".join(c.cmdline()) for c in children)  # the API server, which must survive
        interrupted = time.time()
        os.killpg(run.pid, signal.SIGINT)
        _, stderr = run.communicate(timeout=120)
        took = time.time() - interrupted
    assert took < 15, f"Ctrl-C took {took:.1f} s"
    assert run.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "EventsWorker" not in stderr and "Connection refused" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert "stopped train" in line and "run the same command again to resume" in line, line
    time.sleep(1)
    assert _alive(children) == [], [c.cmdline() for c in _alive(children)]

    # The next run resumes training from the checkpoint and finishes, showing progress on the way.
    with _vlmpipe_run(home, "--json", *_INTERRUPTIBLE) as again:
        stdout, stderr = again.communicate(timeout=1500)
    assert again.returncode == 0, stderr[-3000:]
    states = {name: stage["state"] for name, stage in json.loads(stdout.strip().splitlines()[-1])["stages"].items()}
    assert states["prepare_dataset"] == states["prepare_model"] == states["encode_images"] == "Cached", states
    assert states["train"] == states["evaluate_finetuned"] == "Completed", states
    assert len([log for log in home.glob("logs/train-*.log") if "resuming from" in log.read_text()]) == 1
    assert "train started" in stderr and re.search(r"evaluate finetuned: (\d+)/\1 requests", stderr), stderr[-3000:]

    # A third run, all from the cache: its summary ends with where the logs are and what to try next.
    with _vlmpipe_run(home, *_INTERRUPTIBLE) as third:
        stdout, stderr = third.communicate(timeout=600)
    assert third.returncode == 0, stderr[-3000:]
    tail = stdout.strip().splitlines()[-3:]
    assert tail[0].startswith(f"logs:   {home / 'logs' / 'cli'}"), tail
    assert tail[1].startswith("next:   vlmpipe serve ") and tail[2].startswith(
        "next:   vlmpipe retrain --set train.max_steps=100 --set train.save_steps=20"), tail


@pytest.mark.integration
def test_kill_9_of_vlmpipe_run_leaves_no_api_server_behind(tmp_path):
    import psutil

    home = tmp_path / "home"
    with _vlmpipe_run(home) as run:
        _wait_for(lambda: list((home / "logs").glob("prepare_*.log")) or run.poll() is not None, 300, "a job")
        servers = [c for c in psutil.Process(run.pid).children(recursive=True) if "uvicorn" in " ".join(c.cmdline())]
        assert servers, "no Prefect API server started"
        run.kill()  # the main process alone, as an OOM kill would
        run.wait()
        deadline = time.time() + 5
        while _alive(servers) and time.time() < deadline:
            time.sleep(0.1)
        assert _alive(servers) == [], "the Prefect API server outlived its vlmpipe run"
