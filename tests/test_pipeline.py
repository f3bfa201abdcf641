"""The whole pipeline through the real CLI, the real Prefect engine, real jobs and a real server.

Each `vlmpipe run` is a new process with its own ephemeral Prefect API, as a user would run it. The runs that the
tests only read are conftest.py's whole runs (started in the background, shared with test_sources_read_only).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.prefect_homes import fresh_prefect_home
from tests.whole_runs import states, vlmpipe_run

pytestmark = pytest.mark.integration

CACHEABLE = ("prepare_dataset", "prepare_model", "train", "export", "consistency", "evaluate_base", "evaluate_finetuned")


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prefect-home")


def test_embedded_default_learns_then_hits_the_cache(embedded_default_runs):
    runs = embedded_default_runs  # the first two runs, shared with test_sources_read_only (conftest.py)
    home, prefect_home, first, second = runs["home"], runs["prefect_home"], runs["first"], runs["second"]
    # Tokens reach jobs through the environment only: never a parameter, log, artifact, manifest or the database.
    assert runs["after_first"]["files_with_the_canary"] == []
    assert all(state == "Completed" for state in states(first).values()), states(first)
    base, finetuned = first["metrics"]["base"], first["metrics"]["finetuned"]
    assert base["num_failed"] == 0 and finetuned["num_failed"] == 0
    assert finetuned["num_scored"] == base["num_scored"] > 0
    assert finetuned["cer"] < base["cer"] - 0.05, (base, finetuned)
    merged = Path(first["merged_dir"])
    assert (merged / "vlmpipe_manifest.json").exists() and list(merged.glob("*.safetensors"))
    report = json.loads(Path(first["results_files"]["finetuned"]).read_text())
    assert len(report["samples"]) == finetuned["num_samples"]

    # A second run in a new process: every stage comes from the cache, and no job runs.
    assert {name: states(second)[name] for name in CACHEABLE} == dict.fromkeys(CACHEABLE, "Cached")
    assert states(second)["serve_base"] == states(second)["serve_finetuned"] == "Skipped"
    assert runs["after_second"]["logs"] == runs["after_first"]["logs"]
    assert second["metrics"] == first["metrics"]

    # An output deleted behind the cache's back is recomputed, never handed back as a missing path.
    shutil.rmtree(merged)
    third, _ = vlmpipe_run(home, prefect_home)
    assert states(third)["export"] == "Completed"
    assert states(third)["train"] == states(third)["prepare_model"] == "Cached"
    assert (merged / "vlmpipe_manifest.json").exists()


def test_one_changed_label_recomputes_what_depends_on_the_data(folder_sources_runs):
    # A dataset folder's first run, then (after the identical second one) one label edited in place and a third run:
    # conftest.py's whole run, shared with test_sources_read_only.
    first, second = folder_sources_runs["first"], folder_sources_runs["after_one_changed_label"]
    assert all(state == "Completed" for state in states(first).values())
    assert states(second)["prepare_model"] == "Cached"
    for stage in ("prepare_dataset", "train", "export", "evaluate_finetuned", "evaluate_base"):
        assert states(second)[stage] == "Completed", (stage, states(second))
    assert second["merged_dir"] != first["merged_dir"]


def test_bad_input_fails_before_any_job_with_the_problem_named(tmp_path, prefect_home):
    home = tmp_path / "home"
    env = {**os.environ, "VLMPIPE_HOME": str(home), "PREFECT_HOME": str(fresh_prefect_home(prefect_home)),
           "HF_HUB_OFFLINE": "1"}
    bad_rate = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--set", "train.learning_rate=-1"],
                              check=False, env=env, capture_output=True, text=True, timeout=120)
    assert bad_rate.returncode == 2 and "train.learning_rate" in bad_rate.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--set", f"dataset.source={tmp_path / 'nowhere'}"],
        check=False, env=env, capture_output=True, text=True, timeout=300,
    )
    assert missing.returncode == 2 and "nowhere" in missing.stderr  # the user's to fix: exit 2, as a bad config
    assert not (home / "runs").exists() and not list((home / "logs").glob("*.log"))  # no job ran
