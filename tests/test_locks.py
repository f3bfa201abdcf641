"""Stage locks: a killed holder never blocks a later run; a waiter says what it waits for and gives up.

Run as: python -m pytest tests/test_locks.py -q   (~1 min on 2 CPU cores: real processes are killed, and the
last tests run real flows on the real Prefect engine)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest

from tasks import locks
from tasks.locks import LockWaitTimeout, StageLockManager
from tests.prefect_homes import fresh_prefect_home

# A lock bug shows up as a hang: fail instead (the thread method: a Prefect flow takes SIGALRM for itself).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(420, method="thread")]

REPO = Path(__file__).resolve().parents[1]
KEY = "train-runs-0123abcd-lora"

# A holder in its own process: takes the lock through the manager, says so, then works until killed.
HOLD = """
import sys, time
from pathlib import Path
from tasks.locks import StageLockManager
StageLockManager(Path(sys.argv[1]), stage="train").acquire_lock(sys.argv[2], holder="the-first-run")
print("held", flush=True)
time.sleep(600)
"""


def _holder_process(lock_dir: Path, key: str = KEY) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_dir), key], cwd=REPO, stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)  # kill -9, an OOM kill: nothing the holder can clean up
    process.wait(10)


def test_a_killed_holders_lock_is_taken_over_at_once(tmp_path, caplog):
    lock_file = tmp_path / f"{KEY}.lock"
    holder = _holder_process(tmp_path)
    record = json.loads(lock_file.read_text())
    assert record["pid"] == holder.pid and record["started"] and record["acquired_at"] and record["expiration"]
    _kill(holder)

    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert StageLockManager(tmp_path, stage="train").acquire_lock(KEY, holder="the-next-run", acquire_timeout=20)
    assert time.monotonic() - start < 2
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    assert f"taking over stage lock {lock_file}: its holder, pid {holder.pid}" in caplog.text


def test_a_live_holder_is_waited_for_with_a_log_line_then_given_up_on_naming_the_lock(tmp_path, caplog):
    lock_file = tmp_path / f"{KEY}.lock"
    holder = _holder_process(tmp_path)
    try:
        manager = StageLockManager(tmp_path, stage="train", wait_timeout_s=1.0)
        assert manager.acquire_lock(KEY, holder="a-second-run", acquire_timeout=0.3) is False
        with caplog.at_level(logging.INFO), pytest.raises(LockWaitTimeout) as raised:
            manager.acquire_lock(KEY, holder="a-second-run")
        message = str(raised.value)
        assert str(lock_file) in message and f"pid {holder.pid}" in message and "delete" in message
        assert f"waiting for the train lock {lock_file}, held by pid {holder.pid}" in caplog.text
        assert json.loads(lock_file.read_text())["pid"] == holder.pid  # a live holder keeps its lock
        assert manager.is_locked(KEY)
    finally:
        _kill(holder)
    assert not manager.is_locked(KEY)


def test_a_recycled_pid_is_not_mistaken_for_the_holder(tmp_path):
    # A live process with the recorded pid, but not the one that took the lock: it started later.
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = psutil.Process(stranger.pid).create_time()
        (tmp_path / f"{KEY}.lock").write_text(json.dumps({
            "holder": "long-gone", "pid": stranger.pid, "host": socket.gethostname(),
            "pidns": locks._pid_namespace(), "started": started - 3600,
            "acquired_at": "2026-01-01T00:00:00+00:00", "expiration": None,
        }))
        assert StageLockManager(tmp_path).acquire_lock(KEY, holder="me", acquire_timeout=5)
    finally:
        stranger.kill()
        stranger.wait()


def test_a_lock_left_by_prefects_own_manager_is_taken_over(tmp_path):
    # What the issue found after a killed run: a holder id and no expiration, nothing to check it by.
    (tmp_path / f"{KEY}.lock").write_text('{"holder":"0b6f4c5e-5a1c-4a44-a4f4-1c9f6f0bd3b8","expiration":null}')
    assert StageLockManager(tmp_path).acquire_lock(KEY, holder="me", acquire_timeout=5)


def test_another_hosts_lock_holds_until_its_heartbeat_stops(tmp_path):
    def elsewhere(expires_in_s: float) -> None:
        (tmp_path / f"{KEY}.lock").write_text(json.dumps({
            "holder": "a-run-elsewhere", "pid": 1, "host": "another-host", "pidns": None, "started": 0.0,
            "acquired_at": "2026-01-01T00:00:00+00:00",
            "expiration": (datetime.now(timezone.utc) + timedelta(seconds=expires_in_s)).isoformat(),
        }))

    manager = StageLockManager(tmp_path)
    elsewhere(expires_in_s=60)
    assert manager.acquire_lock(KEY, holder="me", acquire_timeout=0.5) is False
    elsewhere(expires_in_s=-1)
    assert manager.acquire_lock(KEY, holder="me", acquire_timeout=5)

    # While this process holds it, the heartbeat keeps pushing the expiration forward.
    lock_file = tmp_path / f"{KEY}.lock"
    first = datetime.fromisoformat(json.loads(lock_file.read_text())["expiration"])
    time.sleep(0.05)
    locks.renew_held_locks()
    assert datetime.fromisoformat(json.loads(lock_file.read_text())["expiration"]) > first
    manager.release_lock(KEY, holder="me")
    assert not lock_file.exists()


# --- on the real Prefect engine, through the pipeline's own _submit ---------------------------------------

# The embedded default's cheapest stage, with a per-test output folder.
RUN_STAGE = """
import sys
from prefect import flow
from flows.pipeline import _submit
from modal_jobs.config import DatasetConfig, PipelineConfig
from modal_jobs.schemas import PrepareDatasetRequest
from tasks import stages

@flow
def prepare(output_dir: str, refresh: bool = False) -> str:
    request = PrepareDatasetRequest(dataset=DatasetConfig(source="builtin:synthetic-latex-ocr",
                                    synthetic={"train_size": 40, "test_size": 4}), output_dir=output_dir)
    future = _submit(stages.prepare_dataset, request, PipelineConfig.embedded(), refresh)
    future.result()
    return future.state.name

if __name__ == "__main__":
    print(prepare(sys.argv[1]), flush=True)
"""


@pytest.fixture(scope="module")
def run_stage(tmp_path_factory):
    """The flow above, importable here too (the same code as in the killed process)."""
    import importlib.util

    path = tmp_path_factory.mktemp("flows") / "run_stage.py"
    path.write_text(RUN_STAGE)
    spec = importlib.util.spec_from_file_location("run_stage", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.path = path
    return module


@pytest.fixture(scope="module")
def prefect_engine():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_a_run_killed_inside_a_stage_does_not_hold_up_the_next_run(vlmpipe_home, run_stage, tmp_path,
                                                                   prefect_engine):
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    # Prefect's 20 s default for its API server to start is too short on a loaded 2-core CI machine.
    env.update(VLMPIPE_HOME=str(vlmpipe_home), PREFECT_HOME=str(fresh_prefect_home(tmp_path / "prefect")),
               HF_HUB_OFFLINE="1",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    lock_file = vlmpipe_home / "locks" / "prepare_dataset-datasets-killed.lock"
    first_log = tmp_path / "first-run.log"
    with open(first_log, "w") as log:
        first = subprocess.Popen([sys.executable, str(run_stage.path), "datasets/killed"], cwd=REPO, env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
    orphans: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while not lock_file.exists():
            assert first.poll() is None and time.monotonic() < deadline, (
                f"the first run never took the stage lock; its output:\n{first_log.read_text()[-3000:]}")
            time.sleep(0.1)
        # Its ephemeral API server outlives a kill -9, as it would here; the test ends it, not the session.
        orphans = psutil.Process(first.pid).children(recursive=True)
    finally:
        _kill(first)
    try:
        assert json.loads(lock_file.read_text())["pid"] == first.pid  # left behind, as after a real kill -9

        # In a thread with a bound: a run stuck on the dead run's lock waits forever, and a test must fail instead.
        outcome: dict[str, str] = {}
        second = threading.Thread(target=lambda: outcome.update(state=run_stage.prepare("datasets/killed")),
                                  daemon=True)
        second.start()
        second.join(150)
        assert outcome.get("state") == "Completed", "the next run is still waiting on the killed run's lock"
        assert (vlmpipe_home / "datasets" / "killed" / "vlmpipe_manifest.json").exists()
        assert not lock_file.exists()
    finally:
        for orphan in orphans:
            with contextlib.suppress(psutil.NoSuchProcess):
                orphan.kill()


def test_two_identical_runs_at_once_compute_once_and_the_second_reports_cached(vlmpipe_home, run_stage,
                                                                              prefect_engine):
    from concurrent.futures import ThreadPoolExecutor

    both_started = threading.Barrier(2)

    def run(_: int) -> str:
        both_started.wait(60)  # both decide about the cache before either has an output
        return run_stage.prepare("datasets/twice")

    with ThreadPoolExecutor(2) as pool:
        assert sorted(pool.map(run, range(2))) == ["Cached", "Completed"]
    assert len(list((vlmpipe_home / "logs").glob("prepare_dataset-*.log"))) == 1

    # An output deleted behind the cache is recomputed; --refresh recomputes whatever is there.
    output = vlmpipe_home / "datasets" / "twice"
    shutil.rmtree(output)
    assert run_stage.prepare("datasets/twice") == "Completed"
    assert run_stage.prepare("datasets/twice") == "Cached"
    assert run_stage.prepare("datasets/twice", refresh=True) == "Completed"
    assert (output / "vlmpipe_manifest.json").exists()


def test_a_second_identical_run_waits_for_the_first_before_deciding_it_needs_a_server(vlmpipe_home):
    """The flow decides whether to start a server from whether consistency's output is there; deciding that while
    an identical run still computes it started a second server. It is decided once that run's lock is free."""
    import threading

    from flows.pipeline import _on_disk
    from modal_jobs.config import PipelineConfig
    from modal_jobs.consistency import ConsistencyRequest
    from tasks import stages

    request = ConsistencyRequest(model_dir="models/m", adapter_dir="runs/k/lora", merged_dir="runs/k/merged",
                                 dataset_dir="datasets/d", instruction="x", output_path="runs/k/consistency-c.json")
    first_run = _holder_process(vlmpipe_home / "locks", stages.cache_key("consistency", request))
    answers: list[bool] = []
    waiter = threading.Thread(target=lambda: answers.append(
        _on_disk(stages.consistency, request, PipelineConfig.embedded())), daemon=True)
    waiter.start()
    try:
        waiter.join(2)
        assert waiter.is_alive() and not answers  # waiting on the first run, not deciding from a half-done state
        (vlmpipe_home / "runs" / "k").mkdir(parents=True)
        (vlmpipe_home / "runs" / "k" / "consistency-c.json").write_text("{}")  # the first run finishes its check
    finally:
        _kill(first_run)
    waiter.join(30)
    assert answers == [True]  # on disk: no server needed
