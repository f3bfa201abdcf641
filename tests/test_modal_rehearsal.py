"""Rehearsal of the Modal path: the whole pipeline with `executor: modal`, through the executor's real spawn / poll /
re-attach / cancel code, each app function's real body run in a container of its own, against a stand-in for
Modal's service (tests/modal_standin.py says what it keeps of Modal's semantics). Only the service is stood in
for: Modal cannot be reached from here, and vLLM's GPU build cannot run on this CPU (the Sandbox serves the model
with a real `transformers serve` under vLLM's served name).

Run as: python -m pytest tests/test_modal_rehearsal.py -q
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

import tasks.modal_executor as modal_executor
from modal_jobs.config import ModalConfig, PipelineConfig
from modal_jobs.schemas import PrepareDatasetRequest, PrepareModelRequest
from tasks import stages
from tasks.executors import ExecutorSpec
from tests.modal_standin import StandInModal

pytestmark = pytest.mark.integration

FAST = {"poll_interval_s": 0.5}


@pytest.fixture(scope="module", autouse=True)
def prefect_engine():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def standin(tmp_path, vlmpipe_home, monkeypatch) -> StandInModal:
    client = StandInModal(tmp_path / "modal")
    monkeypatch.setattr(modal_executor, "CLIENT", client)
    return client


def _modal_config(**modal_settings) -> PipelineConfig:
    config = PipelineConfig.embedded().model_dump(mode="json")
    config["executor"] = "modal"
    config["modal"] = {**config["modal"], **FAST, **modal_settings}
    # Small enough for CI, big enough to checkpoint before the end (the preemption case) and to score something.
    config["dataset"]["synthetic"] = {"train_size": 64, "test_size": 8}
    config["train"] = {**config["train"], "max_steps": 12, "save_steps": 4}
    config["evaluate"] = {**config["evaluate"], "num_samples": 8}
    return PipelineConfig.model_validate(config)


def _kill_train_container_at_first_checkpoint(standin: StandInModal, killed: list[str], stop: threading.Event):
    """A preemption: the train container dies once a checkpoint is committed; Modal's retry starts a fresh one."""
    import os
    import signal

    while not stop.is_set():
        for call in standin.calls("train"):
            checkpoints = [p for p in standin.volume.committed() if "/checkpoints/checkpoint-" in p]
            pid = standin.call(call["id"]).container_pid()
            if checkpoints and pid and not killed:
                os.kill(pid, signal.SIGKILL)
                killed.append(call["id"])
                return
        time.sleep(0.2)


def test_the_whole_pipeline_runs_on_the_modal_path(standin, vlmpipe_home):
    from flows.pipeline import finetune_pipeline

    config = _modal_config()
    killed: list[str] = []
    stop = threading.Event()
    preemption = threading.Thread(target=_kill_train_container_at_first_checkpoint, args=(standin, killed, stop),
                                  daemon=True)
    preemption.start()
    try:
        result = finetune_pipeline(config=config)
    finally:
        stop.set()

    states = {stage: outcome.state for stage, outcome in result.stages.items()}
    assert set(states.values()) <= {"Completed", "Skipped"}, states
    assert states["train"] == states["export"] == states["consistency"] == "Completed"

    # Every job stage ran once, as a call of its own function; serve twice (fine-tuned, base), nothing respawned.
    spawned = [call["stage"] for call in standin.calls()]
    for stage in ("prepare_dataset", "prepare_model", "encode_images", "train", "export", "consistency"):
        assert spawned.count(stage) == 1, (stage, spawned)
    assert spawned.count("serve") == 2 and spawned.count("evaluate") == 2

    # The preempted train resumed from its checkpoint in a fresh container.
    assert killed, "the train container was never preempted"
    train_call = standin.calls("train")[0]
    assert train_call["attempts"] == 2
    adapter = result.stages["train"].output
    manifest = json.loads(standin.read_file(f"{adapter}/vlmpipe_manifest.json"))
    assert manifest["result"]["resumed_from"], manifest["result"]

    # Outputs stayed on the Volume and are named as such; nothing of them was written locally.
    assert result.merged_dir == f"vlmpipe-data:/{result.stages['export'].output}"
    assert result.remote_outputs["merged"] == result.stages["export"].output
    assert not (vlmpipe_home / result.stages["export"].output).exists()
    assert (standin.volume.folder / result.stages["export"].output / "model.safetensors").is_file()

    # Each evaluation had its own server, a GPU Sandbox with the serve config applied, stopped when done.
    sandboxes = standin.sandboxes()
    assert len(sandboxes) == 2 and {s["state"] for s in sandboxes} == {"terminated"}
    served = {s["argv"][2] for s in sandboxes}
    assert served == {f"/data/{result.stages['export'].output}", f"/data/{result.stages['prepare_model'].output}"}
    for sandbox in sandboxes:
        argv = " ".join(sandbox["argv"])
        assert f"--max-model-len {config.serve.max_model_len}" in argv
        assert '--limit-mm-per-prompt {"image": 1}' in argv
        assert sandbox["options"]["gpu"] == "L40S" and sandbox["options"]["idle_timeout"] > 0
    # ... and the production endpoint's instructions were not touched by either evaluation.
    assert not (standin.volume.folder / "serving").exists()

    # The report was read back from the Volume: its detailed sections are there.
    from prefect.artifacts import Artifact

    report = Artifact.get("eval-report")
    assert report is not None and "not readable" not in report.data
    assert "Worst" in report.data or "worst" in report.data

    # A second run: every stage from the cache, no new call.
    again = finetune_pipeline(config=config)
    assert len(standin.calls()) == len(spawned)
    for stage in ("prepare_dataset", "prepare_model", "train", "export", "consistency", "evaluate_finetuned"):
        assert again.stages[stage].state == "Cached", (stage, again.stages[stage].state)


def _prepare_model_request() -> PrepareModelRequest:
    return PrepareModelRequest(model=PipelineConfig.embedded().model, output_dir="models/rehearsal")


def test_a_lost_connection_while_polling_reattaches_and_respawns_nothing(standin):
    standin.fail_gets_with_connection_error(3)
    executor = modal_executor.ModalExecutor(ModalConfig(**FAST))
    result = executor.run("prepare_model", _prepare_model_request())
    assert result.path == "models/rehearsal"
    calls = standin.calls()
    assert len(calls) == 1 and calls[0]["state"] == "done"  # never cancelled, never spawned twice


def test_a_prefect_retry_reattaches_to_the_call_still_running(standin, vlmpipe_home):
    """Contact lost for longer than modal.reconnect_timeout_s: the task fails as retryable, the call is left
    running, and Prefect's retry finds it by the id recorded on the storage root."""
    standin.fail_gets_with_connection_error(2)
    spec = ExecutorSpec(name="modal", modal=ModalConfig(poll_interval_s=0.5, reconnect_timeout_s=1.0))

    @flow
    def prepare() -> str:
        future = stages.prepare_model.with_options(retry_delay_seconds=1, refresh_cache=True).submit(_prepare_model_request(), spec)
        return future.result().path

    assert prepare() == "models/rehearsal"
    calls = standin.calls()
    assert len(calls) == 1, calls  # the retry re-attached: one call did the work
    assert calls[0]["state"] == "done"
    assert not list((vlmpipe_home / "modal-calls").glob("*.json"))  # the record is gone once the outcome is known


def test_a_call_cancelled_from_outside_ends_the_task_cancelled_and_is_not_retried(standin):
    spec = ExecutorSpec(name="modal", modal=ModalConfig(**FAST))
    request = PrepareDatasetRequest(dataset=PipelineConfig.embedded().dataset, output_dir="datasets/rehearsal")
    standin.delay_container_starts(30)

    def cancel_from_the_dashboard():
        deadline = time.monotonic() + 60
        while not standin.calls() and time.monotonic() < deadline:
            time.sleep(0.1)
        standin.call(standin.calls()[0]["id"]).cancel()

    threading.Thread(target=cancel_from_the_dashboard, daemon=True).start()

    task_states = []

    @flow
    def prepare():
        future = stages.prepare_dataset.with_options(retry_delay_seconds=0, refresh_cache=True).submit(request, spec)
        future.wait()
        task_states.append(future.state)
        return future.state

    flow_state = prepare(return_state=True)
    assert flow_state.is_cancelled(), flow_state
    assert task_states[0].is_cancelled() and "a cancel is final" in task_states[0].message
    time.sleep(2)
    assert len(standin.calls()) == 1  # no retry spawned a second call
    assert not (standin.volume.folder / "datasets" / "rehearsal").exists()
    assert standin.calls()[0]["state"] == "cancelled"


def test_pull_copies_an_output_from_the_volume(standin, tmp_path):
    executor = modal_executor.ModalExecutor(ModalConfig(**FAST))
    executor.run("prepare_model", _prepare_model_request())
    written = executor.pull("models/rehearsal", tmp_path / "here")
    assert (tmp_path / "here" / "rehearsal" / "config.json") in written
    assert (tmp_path / "here" / "rehearsal" / "vlmpipe_manifest.json").is_file()
    with pytest.raises(FileNotFoundError, match="vlmpipe-data:/models/none"):
        executor.pull("models/none", tmp_path / "x")


def test_the_cost_is_priced_from_each_functions_requests():
    from modal_jobs.app import GPUS, STAGE_SPECS

    executor = modal_executor.ModalExecutor(ModalConfig())
    prices = ModalConfig()
    cpu_only = {stage: executor.hourly_price(None, spec.cpu, spec.memory_mib) for stage, spec in STAGE_SPECS.items()
                if spec.gpu is None}
    assert len(set(cpu_only.values())) > 1, cpu_only  # CPU stages are not all priced alike
    spec = STAGE_SPECS["train"]
    expected = (prices.gpu_price_per_hour[GPUS.train] + spec.cpu * prices.cpu_core_price_per_hour
                + spec.memory_mib / 1024 * prices.memory_gib_price_per_hour)
    assert executor.hourly_price(GPUS.train, spec.cpu, spec.memory_mib) == pytest.approx(expected)
    assert STAGE_SPECS["export"].gpu is None  # the merge runs on the CPU: no idle GPU billed


def test_without_a_token_the_modal_run_fails_at_once_with_the_fix(tmp_path, monkeypatch):
    """The real client (no stand-in) on a machine without credentials: `modal setup`, not an AuthError traceback,
    and before any stage's output is even looked up."""
    from flows.pipeline import finetune_pipeline

    for name in [k for k in __import__("os").environ if k.startswith("MODAL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    started = time.monotonic()
    with pytest.raises(Exception, match="modal setup"):
        finetune_pipeline(config=_modal_config())
    assert time.monotonic() - started < 60


@pytest.fixture
def vlmpipe_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "local-root"
    monkeypatch.setenv("VLMPIPE_HOME", str(home))
    return home
