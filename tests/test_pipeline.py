"""The whole pipeline through the real CLI, the real Prefect engine, real jobs and a real server.

Each `vlmpipe run` is a new process with its own ephemeral Prefect API, as a user would run it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CACHEABLE = ("prepare_dataset", "prepare_model", "train", "export", "consistency", "evaluate_base", "evaluate_finetuned")


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prefect-home")


CANARY = "hf_canary_5f0c2d9e7b"


def vlmpipe(home: Path, prefect_home: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    env = {**os.environ, "VLMPIPE_HOME": str(home), "PREFECT_HOME": str(prefect_home), "HF_HUB_OFFLINE": "1",
           **(env or {})}
    completed = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--json", *args], env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert CANARY not in completed.stdout + completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def states(result: dict) -> dict[str, str]:
    return {name: stage["state"] for name, stage in result["stages"].items()}


def test_embedded_default_learns_then_hits_the_cache(tmp_path, prefect_home):
    home = tmp_path / "home"
    first = vlmpipe(home, prefect_home, env={"HF_TOKEN": CANARY, "WANDB_API_KEY": CANARY})
    # Tokens reach jobs through the environment only: never a parameter, log, artifact, manifest or the database.
    assert files_containing(home, CANARY.encode()) == []
    assert files_containing(prefect_home, CANARY.encode()) == []
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
    jobs_before = sorted((home / "logs").iterdir())
    second = vlmpipe(home, prefect_home)
    assert {name: states(second)[name] for name in CACHEABLE} == dict.fromkeys(CACHEABLE, "Cached")
    assert states(second)["serve_base"] == states(second)["serve_finetuned"] == "Skipped"
    assert sorted((home / "logs").iterdir()) == jobs_before
    assert second["metrics"] == first["metrics"]

    # An output deleted behind the cache's back is recomputed, never handed back as a missing path.
    shutil.rmtree(merged)
    third = vlmpipe(home, prefect_home)
    assert states(third)["export"] == "Completed"
    assert states(third)["train"] == states(third)["prepare_model"] == "Cached"
    assert (merged / "vlmpipe_manifest.json").exists()


def test_one_changed_label_recomputes_what_depends_on_the_data(tmp_path, prefect_home, tiny_dataset_dir):
    from datasets import load_from_disk

    source = tmp_path / "parquet"
    source.mkdir()
    dataset = load_from_disk(str(tiny_dataset_dir))
    for split in ("train", "test"):
        dataset[split].to_parquet(str(source / f"{split}.parquet"))
    home = tmp_path / "home"
    overrides = [
        "--set", f"dataset.source={source}", "--set", "train.max_steps=4", "--set", "evaluate.num_samples=4",
        "--set", "evaluate.max_tokens=8",
    ]
    first = vlmpipe(home, prefect_home, *overrides)
    assert all(state == "Completed" for state in states(first).values())

    edited = dataset["train"].map(lambda row, i: {"text": row["text"] + " x" if i == 0 else row["text"]},
                                  with_indices=True)
    edited.to_parquet(str(source / "train.parquet"))
    second = vlmpipe(home, prefect_home, *overrides)
    assert states(second)["prepare_model"] == "Cached"
    for stage in ("prepare_dataset", "train", "export", "evaluate_finetuned", "evaluate_base"):
        assert states(second)[stage] == "Completed", (stage, states(second))
    assert second["merged_dir"] != first["merged_dir"]


def test_bad_input_fails_before_any_job_with_the_problem_named(tmp_path, prefect_home):
    home = tmp_path / "home"
    env = {**os.environ, "VLMPIPE_HOME": str(home), "PREFECT_HOME": str(prefect_home), "HF_HUB_OFFLINE": "1"}
    bad_rate = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--set", "train.learning_rate=-1"],
                              env=env, capture_output=True, text=True, timeout=120)
    assert bad_rate.returncode == 2 and "train.learning_rate" in bad_rate.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--set", f"dataset.source={tmp_path / 'nowhere'}"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert missing.returncode == 2 and "nowhere" in missing.stderr  # the user's to fix: exit 2, as a bad config
    assert not (home / "runs").exists() and not list((home / "logs").glob("*.log"))  # no job ran
