"""Promotion: the decision on hand numbers, the registry's atomic updates and rollback, then the retrain flow
through the real CLI (real training, real server, real evaluation) promoting a better model, refusing a worse
one, keeping an unchanged one without growing the history, and rolling back.

The worse models are made honestly: the same data and settings with far fewer optimizer steps (2 or 3
instead of 100). The integration tests read one story told on one storage root (~4 minutes on 2 idle cores: two
trainings, then cache hits, one 3-step training and a re-scored champion): `retrain_story`, a whole run
(tests/whole_runs.py) started in the background as the session begins.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from modal_jobs.config import PromoteConfig
from modal_jobs.registry import (
    ChampionChanged,
    Entry,
    RegistryError,
    decide,
    judge,
    read_registry,
    record,
    registry_path,
    rollback,
)
from tests import whole_runs
from tests.whole_runs import whole_run


def metrics(cer: float | None = 0.5, wer: float | None = 0.8, exact: float | None = 0.1, scored: int = 20,
            failed: int = 0, **extra) -> dict:
    return {"cer": cer, "wer": wer, "exact_match": exact, "num_samples": scored + failed, "num_scored": scored,
            "num_failed": failed, **extra}


def entry(merged_dir: str, **metric_values) -> Entry:
    return Entry(event="rejected", merged_dir=merged_dir, metric="cer", metrics=metrics(**metric_values),
                 eval_basis="basis-1")


def champion(merged_dir: str = "runs/a/merged", **metric_values) -> Entry:
    return entry(merged_dir, **metric_values).model_copy(update={"event": "promoted"})


# --- decide: hand numbers -----------------------------------------------------------------------------


def test_no_champion_promotes_a_scored_candidate():
    decision = decide(metrics(cer=0.9), None, PromoteConfig())
    assert decision.promote and decision.verdict == "promoted"
    assert "no champion" in decision.reason


def test_lower_error_rate_wins_by_the_margin_and_a_tie_or_a_near_miss_does_not():
    bar = champion(cer=0.50)
    promote = PromoteConfig(metric="cer", margin=0.05)
    better = decide(metrics(cer=0.40), bar, promote)
    assert better.promote and better.champion_value == 0.50 and better.candidate_value == 0.40
    assert "beats the champion's 0.5000 by 0.1000" in better.reason

    near = decide(metrics(cer=0.47), bar, promote)
    assert not near.promote and "less than the margin 0.05" in near.reason
    worse = decide(metrics(cer=0.60), bar, promote)
    assert not worse.promote and "worse by 0.1000" in worse.reason
    tie = decide(metrics(cer=0.50), bar, PromoteConfig(metric="cer", margin=0.0))
    assert not tie.promote and "tie" in tie.reason
    exactly_the_margin = decide(metrics(cer=0.45), bar, promote)
    assert exactly_the_margin.promote


def test_exact_match_is_higher_is_better():
    bar = champion(exact=0.30)
    promote = PromoteConfig(metric="exact_match", margin=0.02)
    assert decide(metrics(exact=0.40), bar, promote).promote
    refused = decide(metrics(exact=0.20), bar, promote)
    assert not refused.promote and not refused.lower_is_better and "higher is better" in refused.reason


def test_failed_requests_or_nothing_scored_never_promote_even_with_no_champion():
    failed = decide(metrics(cer=0.01, failed=1), None, PromoteConfig())
    assert not failed.promote and "1 evaluation requests failed" in failed.reason
    empty = decide(metrics(cer=None, scored=0), None, PromoteConfig())
    assert not empty.promote and "no scored samples" in empty.reason


def test_a_candidate_with_failed_requests_is_recorded_as_refused_and_the_champion_stays(vlmpipe_home):
    promote_into("failures", entry("runs/a/m", cer=0.6))
    decision, registry = promote_into("failures", entry("runs/b/m", cer=0.1, failed=2))
    assert decision.verdict == "rejected" and decision.champion_value == 0.6
    assert registry.champion.merged_dir == "runs/a/m" and registry.history[-1].event == "rejected"


def test_an_interval_is_judged_at_its_pessimistic_end():
    bar = champion(cer=0.50)
    promote = PromoteConfig(metric="cer", margin=0.05)
    # Point value 0.40 would win by 0.10, but the interval reaches 0.48: only 0.02 better at worst.
    wide = decide(metrics(cer=0.40, intervals={"cer": [0.31, 0.48]}), bar, promote)
    assert not wide.promote and wide.compared_value == 0.48 and "interval" in wide.reason
    narrow = decide(metrics(cer=0.40, intervals={"cer": [0.37, 0.43]}), bar, promote)
    assert narrow.promote and narrow.compared_value == 0.43
    # For exact match the pessimistic end is the low one.
    exact = decide(metrics(exact=0.5, intervals={"exact_match": [0.28, 0.7]}), champion(exact=0.3),
                   PromoteConfig(metric="exact_match"))
    assert not exact.promote and exact.compared_value == 0.28


# --- the registry: record, judge, rollback ------------------------------------------------------------


def promote_into(name: str, candidate: Entry, promote: PromoteConfig = PromoteConfig()):
    decision = judge(read_registry(name), candidate, None, promote)
    return decision, record(name, decision, candidate)


def test_record_promotes_rejects_and_rollback_restores_the_previous_champion(vlmpipe_home):
    name = "unit"
    assert read_registry(name).champion is None and not registry_path(name).exists()
    a, b, worse = entry("runs/a/merged", cer=0.6), entry("runs/b/merged", cer=0.4), entry("runs/w/merged", cer=0.9)

    decision, registry = promote_into(name, a)
    assert decision.verdict == "promoted" and registry.champion.merged_dir == "runs/a/merged"
    decision, registry = promote_into(name, b)
    assert decision.verdict == "promoted" and registry.champion.merged_dir == "runs/b/merged"
    assert registry.champion.against == "runs/a/merged" and registry.champion.against_value == 0.6
    decision, registry = promote_into(name, worse)
    assert decision.verdict == "rejected" and registry.champion.merged_dir == "runs/b/merged"
    assert [(e.event, e.merged_dir) for e in registry.history] == [
        ("promoted", "runs/a/merged"), ("promoted", "runs/b/merged"), ("rejected", "runs/w/merged")]
    assert registry.history[-1].metric_value == 0.9 and "worse by 0.5000" in registry.history[-1].reason

    # The same candidates again: nothing changed, nothing appended.
    assert promote_into(name, b)[0].verdict == "unchanged"
    assert promote_into(name, worse)[0].verdict == "unchanged"
    assert len(read_registry(name).history) == 3

    restored = rollback(name)
    assert restored.champion.merged_dir == "runs/a/merged" and restored.champion.event == "promoted"
    assert restored.history[-1].event == "rollback" and restored.history[-1].against == "runs/b/merged"
    assert read_registry(name) == restored  # on disk, not only in memory
    # The rolled-back model does not come straight back on the next scheduled run ...
    decision, registry = promote_into(name, b)
    assert decision.verdict == "rejected" and "rolled back" in decision.reason
    assert registry.champion.merged_dir == "runs/a/merged"
    # ... and a second rollback has nothing earlier than the first champion to go to.
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(name)


def test_a_refused_candidate_is_judged_again_on_a_new_test_set(vlmpipe_home):
    promote_into("basis", entry("runs/a/m", cer=0.4))
    assert promote_into("basis", entry("runs/b/m", cer=0.5))[0].verdict == "rejected"
    assert promote_into("basis", entry("runs/b/m", cer=0.5))[0].verdict == "unchanged"
    rescored = entry("runs/b/m", cer=0.3).model_copy(update={"eval_basis": "basis-2"})
    decision, registry = promote_into("basis", rescored)
    assert decision.verdict == "promoted" and registry.champion.merged_dir == "runs/b/m"


def test_rollback_is_a_stack_and_explains_an_empty_registry(vlmpipe_home):
    with pytest.raises(RegistryError, match="no champion"):
        rollback("empty")
    for directory, cer in (("runs/1/m", 0.9), ("runs/2/m", 0.8), ("runs/3/m", 0.7)):
        promote_into("stack", entry(directory, cer=cer))
    assert rollback("stack").champion.merged_dir == "runs/2/m"
    assert rollback("stack").champion.merged_dir == "runs/1/m"
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback("stack")


def test_bad_registry_names_are_refused(vlmpipe_home):
    with pytest.raises(RegistryError, match="not usable as a file name"):
        read_registry("../escape")


def test_a_decision_against_a_champion_that_has_since_changed_is_not_recorded(vlmpipe_home):
    promote_into("race", entry("runs/a/m", cer=0.6))
    registry = read_registry("race")
    first = judge(registry, entry("runs/b/m", cer=0.5), None, PromoteConfig())
    second = judge(registry, entry("runs/c/m", cer=0.4), None, PromoteConfig())
    record("race", first, entry("runs/b/m", cer=0.5))
    with pytest.raises(ChampionChanged, match="decide again"):
        record("race", second, entry("runs/c/m", cer=0.4))
    assert read_registry("race").champion.merged_dir == "runs/b/m"


def test_concurrent_records_lose_nothing(vlmpipe_home):
    promote_into("busy", entry("runs/champ/m", cer=0.1))
    registry = read_registry("busy")
    candidates = [entry(f"runs/{i}/m", cer=0.5 + i / 1000) for i in range(24)]
    decisions = [judge(registry, c, None, PromoteConfig()) for c in candidates]
    assert all(d.verdict == "rejected" for d in decisions)
    start = threading.Barrier(len(candidates))
    errors: list[BaseException] = []

    def write(decision, candidate):
        start.wait()
        try:
            record("busy", decision, candidate)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=pair) for pair in zip(decisions, candidates)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    history = read_registry("busy").history
    assert sorted(e.merged_dir for e in history[1:]) == sorted(c.merged_dir for c in candidates)
    assert read_registry("busy").champion.merged_dir == "runs/champ/m"


def test_concurrent_promotions_against_one_champion_seat_exactly_one(vlmpipe_home):
    promote_into("seat", entry("runs/champ/m", cer=0.9))
    registry = read_registry("seat")
    candidates = [entry(f"runs/{i}/m", cer=0.5) for i in range(8)]
    decisions = [judge(registry, c, None, PromoteConfig()) for c in candidates]
    start = threading.Barrier(len(candidates))
    outcomes: list[str] = []

    def write(decision, candidate):
        start.wait()
        try:
            record("seat", decision, candidate)
            outcomes.append("recorded")
        except ChampionChanged:
            outcomes.append("changed")

    threads = [threading.Thread(target=write, args=pair) for pair in zip(decisions, candidates)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["changed"] * 7 + ["recorded"]
    assert [e.event for e in read_registry("seat").history] == ["promoted", "promoted"]


# --- the retrain flow through the CLI -----------------------------------------------------------------

# Small but learning: 200 rows x 4 epochs at batch 8 (100 steps) brings CER well below the untrained model's;
# two or three steps leave it where it started.
SMALL = ["--set", "dataset.synthetic.train_size=200", "--set", "evaluate.num_samples=16",
         "--set", "evaluate.max_tokens=32", "--set", "promote.margin=0.02", "--set", "promote.registry_name=it"]


class Cli:
    def __init__(self, home: Path, prefect_home: Path) -> None:
        self.env = {**whole_runs.ENVIRON, "VLMPIPE_HOME": str(home), "PREFECT_HOME": str(prefect_home),
                    "HF_HUB_OFFLINE": "1"}

    def __call__(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
        completed = whole_runs.run([sys.executable, "-m", "flows.cli", *args], env=self.env, timeout=600)
        assert completed.returncode == expect, completed.stderr[-4000:]
        return completed

    def retrain(self, *args: str) -> dict:
        return json.loads(self("retrain", "--json", *SMALL, *args).stdout.strip().splitlines()[-1])

    def registry(self) -> dict:
        return json.loads(self("registry", "--name", "it", "--json").stdout.strip().splitlines()[-1])


@whole_run
def retrain_story(root: Path) -> dict:
    """The retrain flow's story on one storage root, in order, each step's output kept for the test that reads it:
    a barely trained model (2 steps) becomes the first champion and the properly trained one replaces it; the 2-step
    model again is refused and an unchanged run changes nothing; a rollback, then one with nothing to go back to; a
    fresh 3-step model is judged against the champion scored again on new settings."""
    cli = Cli(root / "retrain-home", root / "prefect-home")
    story: dict = {"home": Path(cli.env["VLMPIPE_HOME"])}
    story["weak"] = cli.retrain("--set", "train.max_steps=2")
    story["good"] = cli.retrain()
    story["registry after good"] = cli.registry()
    story["worse"] = cli.retrain("--set", "train.max_steps=2")
    story["again"] = cli.retrain()
    story["registry after again"] = cli.registry()
    story["rollback"] = cli("rollback", "--name", "it").stdout
    story["registry after rollback"] = cli.registry()
    story["second rollback"] = cli("rollback", "--name", "it", expect=1).stderr
    story["registry before fresh"] = cli.registry()
    story["fresh"] = cli.retrain("--set", "train.max_steps=3", "--set", "evaluate.num_samples=12")
    story["registry after fresh"] = cli.registry()
    return story


@pytest.mark.integration
def test_retrain_promotes_the_first_and_then_a_better_model(retrain_story):
    weak, good = retrain_story["weak"], retrain_story["good"]
    assert weak["verdict"] == "promoted" and "no champion" in weak["decision"]["reason"]
    assert good["verdict"] == "promoted", good["decision"]
    assert good["candidate_metrics"]["cer"] < weak["candidate_metrics"]["cer"] - 0.02
    assert good["champion_merged_dir"] == good["candidate_merged_dir"] != weak["candidate_merged_dir"]
    assert good["stages"]["prepare_dataset"] == good["stages"]["evaluate_base"] == "Cached"
    registry = retrain_story["registry after good"]
    assert [e["event"] for e in registry["history"]] == ["promoted", "promoted"]
    assert registry["champion"]["against_value"] == weak["candidate_metrics"]["cer"]


@pytest.mark.integration
def test_retrain_refuses_a_worse_model_and_an_unchanged_run_changes_nothing(retrain_story):
    weak, good = retrain_story["weak"], retrain_story["good"]
    # The 2-step configuration again, now that the 100-step model is champion: its model (from the cache)
    # is judged against the champion and refused.
    worse = retrain_story["worse"]
    assert worse["verdict"] == "rejected", worse["decision"]
    assert worse["stages"]["train"] == "Cached" and worse["candidate_merged_dir"] == weak["candidate_merged_dir"]
    assert worse["decision"]["champion_value"] == good["candidate_metrics"]["cer"]
    assert worse["candidate_metrics"]["cer"] > good["candidate_metrics"]["cer"]
    assert worse["champion_merged_dir"] == good["candidate_merged_dir"]
    assert "worse by" in worse["decision"]["reason"]

    again = retrain_story["again"]  # nothing changed: every stage from the cache, champion kept, history as it was
    assert again["verdict"] == "unchanged" and "champion kept" in again["decision"]["reason"]
    assert {again["stages"][s] for s in ("prepare_dataset", "prepare_model", "train", "export",
                                         "evaluate_base", "evaluate_finetuned")} == {"Cached"}
    registry = retrain_story["registry after again"]
    assert [e["event"] for e in registry["history"]] == ["promoted", "promoted", "rejected"]
    assert Path(retrain_story["home"], registry["champion"]["merged_dir"]) == Path(good["candidate_merged_dir"])


@pytest.mark.integration
def test_rollback_restores_the_previous_champion(retrain_story):
    weak = retrain_story["weak"]
    assert weak["candidate_merged_dir"] in retrain_story["rollback"]
    registry = retrain_story["registry after rollback"]
    assert Path(retrain_story["home"], registry["champion"]["merged_dir"]) == Path(weak["candidate_merged_dir"])
    assert registry["history"][-1]["event"] == "rollback"
    # The weak model was the first champion: nothing before it (the second rollback exited 1).
    assert "no previous champion" in retrain_story["second rollback"]


@pytest.mark.integration
def test_a_fresh_worse_model_is_refused_against_a_champion_scored_again_on_new_settings(retrain_story):
    # A new model (3 steps) and other evaluation settings (fewer samples): the champion's recorded numbers
    # are not comparable, so the champion is served and scored again on these settings before the decision.
    before = retrain_story["registry before fresh"]["champion"]
    result = retrain_story["fresh"]
    assert result["stages"]["train"] == "Completed" and result["stages"]["evaluate_champion"] == "Completed"
    assert result["champion_metrics"]["num_samples"] == 12
    assert result["decision"]["champion_value"] == result["champion_metrics"]["cer"]
    assert result["verdict"] == "rejected", result["decision"]
    assert retrain_story["registry after fresh"]["champion"] == before


def test_intervals_on_both_sides_are_compared_not_point_values():
    promote = PromoteConfig(metric="cer", margin=0.0)
    bar = champion(cer=0.50, intervals={"cer": [0.45, 0.55]})
    # The candidate's worst case (0.47) beats the champion's point (0.50) but not its best case (0.45).
    overlapping = decide(metrics(cer=0.40, intervals={"cer": [0.33, 0.47]}), bar, promote)
    assert not overlapping.promote and overlapping.champion_interval == [0.45, 0.55]
    assert "intervals compared, not point values" in overlapping.reason
    separated = decide(metrics(cer=0.30, intervals={"cer": [0.25, 0.35]}), bar, promote)
    assert separated.promote and "intervals compared, not point values" in separated.reason
    # Exact match: higher is better, so the champion's high end is the bar.
    exact = decide(metrics(exact=0.6, intervals={"exact_match": [0.5, 0.7]}),
                   champion(exact=0.4, intervals={"exact_match": [0.3, 0.55]}), PromoteConfig(metric="exact_match"))
    assert not exact.promote
