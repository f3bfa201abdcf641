"""On the real Prefect engine: retries (a killed job resumes, bad input is not retried), locks, secret blocks."""

from __future__ import annotations

import os
import threading
import time

import psutil
import pytest
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from modal_jobs.config import DatasetConfig, PipelineConfig
from modal_jobs.schemas import PrepareDatasetRequest, TrainRequest
from tasks import stages

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def prefect_engine():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _kill_job_once_it_checkpoints(checkpoint, stop: threading.Event) -> None:
    while not stop.is_set() and not checkpoint.exists():
        time.sleep(0.1)
    for child in psutil.Process().children(recursive=True):
        if "modal_jobs.runner" in " ".join(child.cmdline()):
            child.kill()  # a preempted machine, an OOM kill: nothing the job could clean up


def test_a_killed_training_job_is_retried_and_resumes(vlmpipe_home, tiny_model_dir, tiny_dataset_dir, tmp_path):
    config = PipelineConfig.embedded()
    train = config.train.model_copy(update={"max_steps": 30, "save_steps": 5, "logging_steps": 5})
    request = TrainRequest(train=train, model=config.model, dataset_dir=str(tiny_dataset_dir),
                           model_dir=str(tiny_model_dir), output_dir="runs/retry", instruction=config.instruction)
    stop = threading.Event()
    killer = threading.Thread(target=_kill_job_once_it_checkpoints, args=(
        vlmpipe_home / "runs/retry/checkpoints/checkpoint-10/trainer_state.json", stop), daemon=True)

    @flow
    def train_once():
        task = stages.train.with_options(retry_delay_seconds=0, refresh_cache=True, result_storage=tmp_path)
        return task(request, return_state=True)

    killer.start()
    try:
        state = train_once()
    finally:
        stop.set()
    result = state.result()
    assert state.is_completed()
    assert result.global_step == 30
    assert result.resumed_from is not None and int(result.resumed_from.split("-")[1]) >= 10
    assert len(list((vlmpipe_home / "logs").glob("train-*.log"))) == 2  # one attempt killed, one retry


def test_bad_data_fails_at_once_and_is_not_retried(vlmpipe_home, tiny_dataset_dir, tmp_path):
    from modal_jobs.errors import InputError

    request = PrepareDatasetRequest(
        dataset=DatasetConfig(source=str(tiny_dataset_dir), text_column="latex"), output_dir="datasets/bad"
    )

    @flow
    def prepare():
        task = stages.prepare_dataset.with_options(retry_delay_seconds=0, refresh_cache=True, result_storage=tmp_path)
        return task(request, return_state=True)

    with pytest.raises(InputError, match="no column 'latex'"):
        prepare()
    assert len(list((vlmpipe_home / "logs").glob("prepare_dataset-*.log"))) == 1


def test_two_runs_with_the_same_key_compute_once(vlmpipe_home):
    from concurrent.futures import ThreadPoolExecutor

    from flows.pipeline import _stage_task

    request = PrepareDatasetRequest(
        dataset=DatasetConfig(source="builtin:synthetic-latex-ocr", synthetic={"train_size": 40, "test_size": 4}),
        output_dir="datasets/same-key",
    )

    @flow
    def prepare():
        return _stage_task(stages.prepare_dataset, refresh=False)(request, return_state=True).name

    with ThreadPoolExecutor(2) as pool:
        names = sorted(pool.map(lambda _: prepare(), range(2)))
    assert names == ["Cached", "Completed"]
    assert len(list((vlmpipe_home / "logs").glob("prepare_dataset-*.log"))) == 1


def test_tokens_come_from_secret_blocks_when_the_environment_has_none(monkeypatch):
    from prefect.blocks.system import Secret

    from tasks.secrets import load_secret_blocks

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    Secret(value="hf_from_block").save("hf-token", overwrite=True)
    assert load_secret_blocks() == ["HF_TOKEN"]
    assert os.environ["HF_TOKEN"] == "hf_from_block"
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert load_secret_blocks() == []  # the environment wins
    assert os.environ["HF_TOKEN"] == "hf_from_env"
