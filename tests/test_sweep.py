"""The sweep flow on the embedded default: a real Prefect engine, real jobs, a real `transformers serve` per trial.

One storage root and one Prefect database for the module: the 2x2 sweep runs once, and the later sweeps reuse its
cached stages, as a user's next sweep would.

Run as: python -m pytest tests/test_sweep.py -q
"""

from __future__ import annotations

import threading
import time

import pytest

from modal_jobs.errors import InputError

pytestmark = pytest.mark.integration

# Tiny in every dimension that costs time: 2 optimizer steps, 2 test images, 8 generated tokens.
TINY = ["dataset.synthetic.train_size=32", "dataset.synthetic.test_size=2", "train.max_steps=2",
        "evaluate.num_samples=2", "evaluate.max_tokens=8", "evaluate.bootstrap_resamples=200"]
SHARED = ("prepare_dataset", "prepare_model", "encode_images")


@pytest.fixture(scope="module")
def sweep_env(module_home, tmp_path_factory):
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, temporary_settings

    database = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('prefect') / 'prefect.db'}"
    with pytest.MonkeyPatch.context() as patch, temporary_settings({PREFECT_API_DATABASE_CONNECTION_URL: database}):
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        yield module_home


def run_sweep(grid: dict, *overrides: str, **settings):
    from flows.sweep import SweepSettings, sweep
    from modal_jobs.config import load_config

    config = load_config(None, [*TINY, *overrides])
    return sweep(config=config, sweep=SweepSettings(grid=grid, **settings), return_state=True)


@pytest.fixture(scope="module")
def two_by_two(sweep_env):
    started = time.monotonic()
    state = run_sweep({"train.learning_rate": [1e-3, 3e-3], "train.lora_r": [4, 8]}, max_parallel=2)
    return state.result(), time.monotonic() - started


def test_a_2x2_grid_trains_4_trials_on_stages_shared_once(two_by_two):
    result, seconds = two_by_two
    print(f"2x2 sweep: {seconds:.0f} s")
    assert [t.status for t in result.trials] == ["trained"] * 4, [(t.name, t.error) for t in result.trials]
    assert {tuple(t.values.values()) for t in result.trials} == {(1e-3, 4), (1e-3, 8), (3e-3, 4), (3e-3, 8)}
    # The shared stages ran once, in the sweep; every trial found them in the cache.
    assert {name: result.shared[name].state for name in SHARED} == dict.fromkeys(SHARED, "Completed")
    for trial in result.trials:
        assert {name: trial.stages[name] for name in SHARED} == dict.fromkeys(SHARED, "Cached"), trial.name
        assert trial.stages["train"] == trial.stages["evaluate_finetuned"] == "Completed"
        # The base model was scored once, in the sweep: no trial started a server for it.
        assert (trial.stages["serve_base"], trial.stages["evaluate_base"]) == ("Skipped", "Cached")
        assert trial.steps == 2 and trial.seconds > 0
        assert set(trial.metrics["intervals"]) >= {"cer", "wer", "exact_match"}
    # Four trainings, four different adapters, all scored on the same test set (same count, same dataset).
    assert len({t.merged_dir for t in result.trials}) == 4
    assert {t.metrics["num_samples"] for t in result.trials} == {2}


def test_trials_train_side_by_side_at_most_max_parallel_at_once(two_by_two):
    """Two trials' trainings overlap (max_parallel 2), three never do. As Prefect tasks around subflows, the trials
    ran one after the other: each held its stages' cache locks until it ended."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    result, _ = two_by_two
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[t.flow_run_id for t in result.trials])))
    spans = [(r.start_time, r.end_time) for r in runs if r.name.startswith("train-") and r.start_time]
    assert len(spans) == 4
    at_once = [sum(start <= moment < end for start, end in spans) for moment, _ in spans]
    assert max(at_once) == 2, spans


def test_the_board_has_one_row_per_trial_and_a_plot(two_by_two):
    import json
    from pathlib import Path

    result, _ = two_by_two
    rows = json.loads(Path(result.leaderboard_path).read_text())
    assert len(rows) == 4
    assert {"learning_rate", "lora_r", "steps", "seconds", "cost_usd", "cer", "cer_interval"} <= set(rows[0])
    assert rows[0]["rank"] == 1 and rows[0]["trial"] == next(t.name for t in result.trials if t.number == result.best)
    assert [r["cer"] for r in rows] == sorted(r["cer"] for r in rows)  # CER: lower is better, best first
    assert Path(result.plot_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_with_one_added_value_trains_only_the_new_trial(two_by_two):
    state = run_sweep({"train.learning_rate": [1e-3, 3e-3, 1e-2]}, "train.lora_r=4", promote_best=True)
    result = state.result()
    # The best trial went through retrain's gate: the registry was empty, so it is the champion now.
    from modal_jobs.registry import read_registry

    assert result.promotion.startswith("promoted"), result.promotion
    best = next(t for t in result.trials if t.number == result.best)
    assert read_registry("embedded").champion.merged_dir == best.merged_dir
    assert {t.values["train.learning_rate"]: t.status for t in result.trials} == \
        {1e-3: "cached", 3e-3: "cached", 1e-2: "trained"}
    cached = [t for t in result.trials if t.status == "cached"]
    assert all(set(t.stages.values()) <= {"Cached", "Skipped"} for t in cached), [t.stages for t in cached]


def test_a_failing_trial_fails_alone(two_by_two):
    # A value only the trainer can refuse: the config takes any optimizer name, transformers knows which exist.
    state = run_sweep({"train.optim": ["no_such_optimizer", "adamw_torch"]}, "train.learning_rate=1e-3",
                      "train.lora_r=4", max_parallel=2)
    assert state.is_completed()
    result = state.result()
    by_optim = {t.values["train.optim"]: t for t in result.trials}
    assert by_optim["no_such_optimizer"].status == "failed"
    assert "no_such_optimizer" in by_optim["no_such_optimizer"].error
    assert by_optim["adamw_torch"].status == "cached" and by_optim["adamw_torch"].metrics["cer"] is not None
    assert result.best == by_optim["adamw_torch"].number


def test_a_trials_cost_is_the_sum_of_its_stages_cost_artifacts(sweep_env):
    """What the Modal executor publishes per stage (`cost-<stage>` tables), summed per trial; none: unknown."""
    from prefect import flow, task
    from prefect.artifacts import create_table_artifact
    from prefect.runtime import flow_run

    from flows.sweep import _trial_cost

    @task
    def stage(name: str, usd: float) -> None:
        create_table_artifact([{"stage": name, "estimated_usd": usd}], key=f"cost-{name}")

    @flow
    def priced(costs: dict[str, float]) -> str:
        for name, usd in costs.items():
            stage(name, usd)
        return str(flow_run.id)

    assert _trial_cost(priced({"train": 1.25, "serve-sandbox": 0.5})) == 1.75
    assert _trial_cost(priced({})) is None


def _running_train_jobs() -> list:
    from tasks.local_executor import _RUNNING_PROCESSES

    return [p for p in list(_RUNNING_PROCESSES) if isinstance(p.args, list) and "train" in p.args]


def test_cancelling_the_sweep_stops_every_running_trial(sweep_env):
    """A cancel from the UI (the flow run set Cancelling) while two trials train: both stop, none starts after."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelling

    seen: list = []
    cancelled_at: list[float] = []

    problems: list[BaseException] = []

    def cancel_when_two_train():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(_running_train_jobs()) < 2:
            time.sleep(0.5)
        seen.extend(_running_train_jobs())
        try:
            cancel_the_sweep()
        except BaseException as error:  # the test says so below, instead of waiting for 5000 steps
            problems.append(error)
            from tasks.executors import stop_running_jobs

            stop_running_jobs()

    def cancel_the_sweep():
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["sweep"])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
            for run in runs:
                client.set_flow_run_state(run.id, Cancelling(), force=True)
        cancelled_at.append(time.monotonic())

    canceller = threading.Thread(target=cancel_when_two_train, daemon=True)
    canceller.start()
    # Long trainings, new values: they would run for minutes if nothing stopped them.
    state = run_sweep({"train.learning_rate": [5e-3, 7e-3, 9e-3]}, "train.max_steps=5000", max_parallel=2)
    ended = time.monotonic()
    canceller.join(5)
    assert not problems, problems
    assert len(seen) == 2, "two trials should have been training when the sweep was cancelled"
    assert state.is_cancelled(), state
    assert all(process.poll() is not None for process in seen)  # the training processes are gone
    assert _running_train_jobs() == []
    assert ended - cancelled_at[0] < 45
    # The board of a cancelled sweep is written too: the two running trials stopped, the third never started.
    import json

    (written,) = sweep_env.glob("sweeps/*/result.json")
    statuses = [t["status"] for t in json.loads(written.read_text())["trials"]]
    assert statuses == ["cancelled", "cancelled", "not started"], statuses


def test_a_bad_grid_fails_before_any_job(sweep_env):
    from flows.sweep import SweepSettings, plan_trials
    from modal_jobs.config import load_config

    config = load_config(None, TINY)
    with pytest.raises(InputError, match=r"train.lora_r=0.*lora_r"):
        plan_trials(config, SweepSettings(grid={"train.lora_r": [8, 0]}))
    with pytest.raises(ValueError, match="train.\\* settings only"):
        SweepSettings(grid={"evaluate.temperature": [0.0, 0.5]})
    with pytest.raises(InputError, match="no grid"):
        plan_trials(config, SweepSettings())
    # Random draws are seeded: the same seed, the same trials.
    grid = SweepSettings(grid={"train.learning_rate": [1e-4, 2e-4, 3e-4], "train.lora_r": [8, 16]}, random=3, seed=7)
    first, again = plan_trials(config, grid), plan_trials(config, grid)
    assert len(first) == 3 and [t.values for t in first] == [t.values for t in again]


def test_the_cli_refuses_a_bad_grid_in_one_line_before_any_job(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "VLMPIPE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    for grid, message in (("evaluate.temperature=0,0.5", "train.* settings only"),
                          ("train.lora_r=8,0", "sweep trial train.lora_r=0"),
                          ("train.lora_r", "expected KEY=V1,V2")):
        done = subprocess.run([sys.executable, "-m", "flows.cli", "sweep", "--grid", grid], check=False, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1 and not (tmp_path / "home" / "runs").exists()
