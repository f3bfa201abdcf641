"""What a user sees at the command line: one line for an error they can fix (exit 2), `--json` failures,
`--debug`, a bad model folder refused before any job, run names, the promotion table.

The CLI runs in real subprocesses with the real Prefect engine (ephemeral API), as a user would run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.prefect_homes import fresh_prefect_home

REPO = Path(__file__).resolve().parents[1]


def vlmpipe(home: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    prefect_home = fresh_prefect_home(home.parent / "prefect-home")
    env = {**os.environ, "VLMPIPE_HOME": str(home), "PREFECT_HOME": str(prefect_home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, check=False)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def error_text(stderr: str) -> str:
    """The error message as printed, from its `error:` line to the end (a listing of bad rows spans lines)."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(starts) == 1, stderr[-3000:]
    return "\n".join(lines[starts[0]:])


def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lora_r: [1\n")
    home = tmp_path / "home"

    plain = vlmpipe(home, "run", "--config", str(bad))
    assert plain.returncode == 2, plain.stderr
    assert plain.stderr.strip().splitlines() == error_lines(plain.stderr)  # nothing but the one line
    (line,) = error_lines(plain.stderr)
    assert str(bad) in line and "line 3, column 1" in line and "line 2, column 11" in line, line
    assert "<unicode string>" not in line

    as_json = vlmpipe(home, "run", "--config", str(bad), "--json")
    assert as_json.returncode == 2
    failure = json.loads(as_json.stdout.strip().splitlines()[-1])
    assert failure["stage"] == "config" and failure["error"] == line.removeprefix("error: ")

    debug = vlmpipe(home, "run", "--config", str(bad), "--debug")
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr


def test_a_config_value_error_names_the_line_of_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lora_r: 8\n  learning_rate: -1\n")
    completed = vlmpipe(tmp_path / "home", "run", "--config", str(bad))
    assert completed.returncode == 2
    (line,) = error_lines(completed.stderr)
    assert "train.learning_rate" in line and f"({bad}, line 3)" in line, line


@pytest.mark.integration
def test_a_model_folder_without_config_json_fails_before_any_job_in_one_line(tmp_path, tiny_model_dir):
    """Issue 21 #7 and #6: the model source is checked beside the dataset source, before prepare_dataset runs;
    the user's error is one line (Prefect's traceback of it stays in the run's log file), exit 2."""
    import shutil

    folder = tmp_path / "no-config"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "config.json").unlink()
    home = tmp_path / "home"
    completed = vlmpipe(home, "run", "--json", "--set", f"model.source={folder}")
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    (line,) = error_lines(completed.stderr)
    assert "config.json" in line and str(folder) in line
    assert completed.stderr.count("config.json") == 1  # not repeated by Prefect's "Finished in state Failed"
    failure = json.loads(completed.stdout.strip().splitlines()[-1])
    assert failure["stage"] == "prepare_model" and "config.json" in failure["error"]
    # No job ran: no job log, no dataset prepared; the run's own log keeps the traceback.
    assert not list((home / "logs").glob("*.log")) and not (home / "datasets").exists()
    assert "Traceback (most recent call last)" in Path(failure["log"]).read_text()


@pytest.mark.integration
def test_bad_rows_found_by_a_job_are_one_line_and_exit_2(tmp_path, tiny_dataset_dir):
    """An InputError raised inside a job (here prepare_dataset) reaches the terminal as its one line."""
    from datasets import load_from_disk

    source = tmp_path / "parquet"
    source.mkdir()
    dataset = load_from_disk(str(tiny_dataset_dir))
    dataset["train"].map(lambda row, i: {"text": "  " if i == 4 else row["text"]}, with_indices=True).to_parquet(
        str(source / "train.parquet"))
    dataset["test"].to_parquet(str(source / "test.parquet"))
    completed = vlmpipe(tmp_path / "home", "run", "--set", f"dataset.source={source}")
    assert completed.returncode == 2, completed.stderr[-3000:]
    # Nothing from Prefect about it: no traceback, and no noise from prepare_model, stopped as the flow failed.
    assert "Traceback" not in completed.stderr and "| ERROR" not in completed.stderr, completed.stderr[-3000:]
    message = error_text(completed.stderr)
    assert message.startswith("error: prepare_dataset failed") and "row 4: text is blank" in message, message


def test_run_names_differ_when_seed_or_epochs_differ():
    from flows.pipeline import _run_name
    from modal_jobs.config import PipelineConfig

    base = PipelineConfig.embedded()
    names = {_run_name(base)}
    for section, key, value in [("train", "seed", 1), ("train", "num_epochs", 2), ("train", "lora_dropout", 0.1)]:
        changed = base.model_copy(deep=True)
        setattr(getattr(changed, section), key, value)
        names.add(_run_name(changed))
    assert len(names) == 4, names
    assert _run_name(base) == _run_name(PipelineConfig.embedded())
    assert "-seed3407-" in _run_name(base) and "-ep4-" in _run_name(base)


def test_the_promotion_table_compares_the_numbers_its_sentence_compares(vlmpipe_home):
    """Both sides have bootstrap intervals: the decision compares interval ends, and the table's "compared
    value" row must show those, not the champion's point value."""
    from flows.retrain import promotion_markdown
    from modal_jobs.config import PromoteConfig
    from modal_jobs.registry import Entry, Registry, judge

    def entry(merged: str, cer: float, interval: list[float]) -> Entry:
        metrics = {"cer": cer, "intervals": {"cer": interval}, "num_scored": 40, "num_failed": 0}
        return Entry(event="promoted", merged_dir=merged, metric="cer", metrics=metrics)

    champion = entry("runs/a/merged", 0.9384, [0.9154, 0.9601])
    candidate = entry("runs/b/merged", 0.9512, [0.9301, 0.9720])
    decision = judge(Registry(champion=champion, history=[champion]), candidate, None, PromoteConfig())
    assert decision.verdict == "rejected"
    assert "compared at 0.9154" in decision.reason and "compared at 0.9720" in decision.reason
    markdown = promotion_markdown("embedded", decision, candidate, champion, None)
    (row,) = [line for line in markdown.splitlines() if line.startswith("| compared value |")]
    assert row == "| compared value | 0.9720 | 0.9154 |", row
