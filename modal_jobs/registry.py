"""The model registry: the champion of each registry name and every decision that touched it.

One JSON file per name on the storage root, `<root>/registry/<name>.json`:

    {"champion": entry | null, "history": [entry, ...]}     (history: oldest first)

An entry is what was decided about one merged model: `event` (promoted, rejected, rollback), the model
(`merged_dir`, storage-relative), what made it (train and export keys, dataset key and fingerprint, model
source), its held-out `metrics`, the metric and margin the decision used, and a `reason` a person reads.

Updates are read-modify-write under an exclusive `fcntl.flock` on `<name>.lock` beside the file, and the
file is replaced atomically (`atomic_write_json`), so two retrains finishing at once lose nothing and a
reader never sees half a file. A promotion carries the champion it was decided against: if the champion
changed in between, `record` raises `ChampionChanged` and the caller decides again.

Plain Python (no Prefect): `vlmpipe registry`, `vlmpipe rollback` and the retrain flow all use it.
"""

from __future__ import annotations

import fcntl
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from modal_jobs.config import PromoteConfig
from modal_jobs.storage import atomic_write_json, storage_root

# Metrics where a larger value is better; every other metric (cer, wer, ...) is an error rate.
HIGHER_IS_BETTER = frozenset({"exact_match", "normalized_exact_match", "render_match"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

Event = Literal["promoted", "rejected", "rollback"]


class RegistryError(Exception):
    """A registry operation that cannot be done (bad name, nothing to roll back to)."""


class ChampionChanged(RegistryError):
    """The champion changed between a decision and its recording: decide again against the new one."""


class Entry(BaseModel):
    """One decision about one merged model (unknown keys from newer versions are kept, not rejected)."""

    model_config = ConfigDict(extra="allow")

    event: Event
    merged_dir: str = Field(description="The merged model folder, relative to the storage root.")
    metric: str
    metric_value: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict, description="The full held-out metrics of the model.")
    reason: str = ""
    decided_at: str = ""
    against: str | None = Field(None, description="merged_dir of the champion at decision time (None: no champion).")
    against_value: float | None = None
    margin: float | None = None
    model_identity: str | None = Field(None, description="What evaluation keys call the model: export:<export key>.")
    train_key: str | None = None
    export_key: str | None = None
    dataset_key: str | None = None
    dataset_fingerprint: str | None = None
    eval_basis: str | None = Field(None, description="Hash of test set + evaluation settings the metrics came from.")
    model_source: str | None = None
    flow_run_id: str | None = None


class Registry(BaseModel):
    champion: Entry | None = None
    history: list[Entry] = Field(default_factory=list)


class Decision(BaseModel):
    """Whether a candidate replaces the champion, and the numbers that decided it."""

    verdict: Literal["promoted", "rejected", "unchanged"]
    reason: str
    metric: str
    lower_is_better: bool
    margin: float
    candidate_value: float | None = None
    candidate_interval: list[float] | None = None
    compared_value: float | None = Field(
        None, description="The candidate number actually compared: its value, or the conservative interval end."
    )
    champion_value: float | None = None
    champion_interval: list[float] | None = Field(
        None, description="The champion's interval on the metric, when it has one: its optimistic end is the bar."
    )
    champion_compared_value: float | None = Field(
        None, description="The champion number actually compared: its optimistic interval end, or its value."
    )
    champion_merged_dir: str | None = None

    @property
    def promote(self) -> bool:
        return self.verdict == "promoted"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def registry_path(name: str) -> Path:
    if not _NAME.match(name):
        raise RegistryError(
            f"registry name {name!r} is not usable as a file name: use letters, digits, '.', '_' or '-'"
        )
    return storage_root() / "registry" / f"{name}.json"


def read_registry(name: str) -> Registry:
    """The registry as it is now; an empty one (no champion, no history) if nothing was ever recorded."""
    path = registry_path(name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Registry()
    return Registry.model_validate_json(text)


@contextmanager
def _locked(name: str) -> Iterator[Path]:
    path = registry_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    # flock locks belong to the open file description, so two threads of one process exclude each other
    # as well as two processes; the lock file is never deleted, so everyone locks the same inode.
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write(path: Path, registry: Registry) -> None:
    atomic_write_json(path, registry.model_dump(mode="json"))


# --- the decision -------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


def decide(candidate_metrics: dict[str, Any], champion: Entry | None, promote: PromoteConfig) -> Decision:
    """Promote the candidate only if it beats the champion on `promote.metric` by at least `promote.margin`.

    - cer/wer (and any error rate): lower is better; exact_match: higher is better.
    - "Beats by the margin": improvement >= margin and > 0, so a tie never replaces the champion.
    - If the candidate's metrics carry a confidence interval for the metric (`intervals: {"cer": [lo, hi]}`),
      its conservative end (hi for an error rate, lo for exact match) is compared instead of the point value:
      the candidate must be better by the margin even at the pessimistic end of its interval. The champion's
      point value is the bar (keeping it simple: one interval, not an interval-overlap test).
    - A candidate with failed requests, no scored samples or no value for the metric is never promoted: its
      number does not describe the model.
    - No champion: a candidate that passes those checks is promoted.

    `champion.metrics` must have been measured on the same test set and settings as the candidate (the retrain
    flow re-scores the champion when they differ).
    """
    metric, margin = promote.metric, promote.margin
    lower = metric not in HIGHER_IS_BETTER
    value = candidate_metrics.get(metric)
    interval = (candidate_metrics.get("intervals") or {}).get(metric)
    interval = [float(x) for x in interval] if interval and len(interval) == 2 else None
    bar = champion.metrics.get(metric) if champion is not None else None
    champion_interval = (champion.metrics.get("intervals") or {}).get(metric) if champion is not None else None
    champion_interval = [float(x) for x in champion_interval] if champion_interval and len(champion_interval) == 2 else None
    base = dict(metric=metric, lower_is_better=lower, margin=margin, candidate_value=value,
                candidate_interval=interval, champion_value=bar,
                champion_merged_dir=champion.merged_dir if champion is not None else None,
                champion_interval=champion_interval)

    failed = candidate_metrics.get("num_failed") or 0
    scored = candidate_metrics.get("num_scored") or 0
    if failed > 0:
        return Decision(verdict="rejected", **base, reason=(
            f"rejected: {failed} evaluation requests failed, so its {metric} does not describe the model; "
            "fix the endpoint or the evaluation and retrain"))
    if scored <= 0 or value is None:
        return Decision(verdict="rejected", **base, reason=f"rejected: no scored samples, so no {metric} to judge by")

    compared = value
    if interval is not None:
        compared = interval[1] if lower else interval[0]
    base["compared_value"] = compared
    if champion is None:
        return Decision(verdict="promoted", **base, reason=(
            f"promoted: there was no champion; {metric} {_fmt(value)} over {scored} scored samples"))

    if bar is None:
        return Decision(verdict="promoted", **base, reason=(
            f"promoted: the champion has no {metric} value to defend; candidate {metric} {_fmt(value)}"))
    # Both intervals known: compare intervals, not points. The candidate's pessimistic end must beat the
    # champion's optimistic end (lo for an error rate, hi for exact match) by the margin: the intervals must
    # not overlap. The champion's point value is the bar only when it has no interval (an older evaluation).
    if interval is not None and champion_interval is not None:
        bar = champion_interval[0] if lower else champion_interval[1]
    base["champion_compared_value"] = bar
    improvement = (bar - compared) if lower else (compared - bar)
    direction = "lower" if lower else "higher"
    if interval is not None and champion_interval is not None:
        what_bar = (f"{_fmt(champion.metrics.get(metric))} (interval {_fmt(champion_interval[0])}–"
                    f"{_fmt(champion_interval[1])}, compared at {_fmt(bar)}; intervals compared, not point values)")
    else:
        what_bar = _fmt(bar) + ("" if interval is None else " (point value: the champion has no interval)")
    what = f"{metric} {_fmt(value)}" + (
        f" (interval {_fmt(interval[0])}–{_fmt(interval[1])}, compared at {_fmt(compared)})" if interval else "")
    if improvement > 0 and improvement >= margin - 1e-12:
        return Decision(verdict="promoted", **base, reason=(
            f"promoted: candidate {what} beats the champion's {what_bar} by {_fmt(improvement)} "
            f"({direction} is better; margin {margin:g})"))
    if improvement > 0:
        why = f"better by only {_fmt(improvement)}, less than the margin {margin:g}"
    elif improvement == 0:
        why = "no better (a tie keeps the champion)"
    else:
        why = f"worse by {_fmt(-improvement)}"
    return Decision(verdict="rejected", **base, reason=(
        f"rejected: candidate {what} is {why} than the champion's {what_bar} ({direction} is better)"))


def _rolled_back(registry: Registry, merged_dir: str) -> Entry | None:
    """The rollback that removed this model from the champion seat, if one did."""
    for entry in reversed(registry.history):
        if entry.event == "rollback" and entry.against == merged_dir:
            return entry
    return None


def judge(registry: Registry, candidate: Entry, champion_metrics: dict[str, Any] | None,
          promote: PromoteConfig) -> Decision:
    """`decide`, plus what only the registry knows.

    - The candidate is already the champion (same merged model: nothing changed): "unchanged".
    - The candidate was already refused against this same champion, on the same test set and settings:
      "unchanged" (a nightly run with no new data must not grow the history every night).
    - The candidate was rolled back from champion: refused, or the next scheduled run would undo the rollback.
    `champion_metrics` are the champion's metrics on the candidate's test set (None: use the recorded ones).
    """
    champion = registry.champion
    if champion is not None and champion_metrics is not None:
        champion = champion.model_copy(update={"metrics": champion_metrics})
    lower = promote.metric not in HIGHER_IS_BETTER
    common = dict(metric=promote.metric, lower_is_better=lower, margin=promote.margin,
                  candidate_value=candidate.metrics.get(promote.metric),
                  champion_value=champion.metrics.get(promote.metric) if champion else None,
                  champion_merged_dir=champion.merged_dir if champion else None)
    if champion is not None and champion.merged_dir == candidate.merged_dir:
        return Decision(verdict="unchanged", **common, reason=(
            "unchanged: champion kept (the candidate is the champion itself: same data, model and settings)"))
    current = champion.merged_dir if champion else None
    for entry in reversed(registry.history):
        if entry.merged_dir != candidate.merged_dir:
            continue
        if entry.event == "rejected" and entry.against == current and entry.eval_basis == candidate.eval_basis:
            return Decision(verdict="unchanged", **common, reason=(
                f"unchanged: champion kept (this candidate was already refused against it on {entry.decided_at}: "
                f"{entry.reason})"))
        break
    rollback = _rolled_back(registry, candidate.merged_dir)
    if rollback is not None:
        return Decision(verdict="rejected", **common, reason=(
            f"rejected: this model was rolled back from champion on {rollback.decided_at}; it is not promoted "
            "again automatically (retrain with changed data or settings to get a new candidate)"))
    return decide(candidate.metrics, champion, promote)


# --- updates ------------------------------------------------------------------------------------------


def record(name: str, decision: Decision, entry: Entry) -> Registry:
    """Write a decision: a promotion replaces the champion and is appended to the history; a rejection is
    appended only. "unchanged" writes nothing. Raises ChampionChanged if the champion is no longer the one
    the decision was made against."""
    if decision.verdict == "unchanged":
        return read_registry(name)
    with _locked(name) as path:
        registry = read_registry(name)
        current = registry.champion.merged_dir if registry.champion else None
        if current != decision.champion_merged_dir:
            raise ChampionChanged(
                f"registry {name!r}: the champion changed from {decision.champion_merged_dir} to {current} while "
                "this candidate was being judged; decide again against the new champion"
            )
        entry = entry.model_copy(update={
            "event": decision.verdict, "metric": decision.metric, "metric_value": decision.candidate_value,
            "reason": decision.reason, "decided_at": entry.decided_at or _now(), "against": current,
            "against_value": decision.champion_value, "margin": decision.margin,
        })
        registry.history.append(entry)
        if decision.promote:
            registry.champion = entry
        _write(path, registry)
        return registry


def _champion_stack(registry: Registry) -> list[Entry]:
    """Champions in the order they took the seat, with rolled-back ones removed: the last is the champion."""
    stack: list[Entry] = []
    for entry in registry.history:
        if entry.event == "promoted":
            stack.append(entry)
        elif entry.event == "rollback" and stack:
            stack.pop()
    return stack


def rollback(name: str, reason: str = "rolled back by hand") -> Registry:
    """Restore the champion before the current one; the rolled-back model is never auto-promoted again.

    Rolling back twice goes back two champions (a stack, not a toggle)."""
    with _locked(name) as path:
        registry = read_registry(name)
        if registry.champion is None:
            raise RegistryError(f"registry {name!r} has no champion: nothing to roll back "
                                f"({registry_path(name)})")
        stack = _champion_stack(registry)
        if len(stack) < 2:
            raise RegistryError(
                f"registry {name!r}: the champion {registry.champion.merged_dir} has no previous champion to "
                "restore (it was the first one promoted, or every earlier one was already rolled back)"
            )
        previous = stack[-2]
        removed = registry.champion
        restored = previous.model_copy(update={
            "event": "rollback", "decided_at": _now(), "against": removed.merged_dir,
            "against_value": removed.metric_value,
            "reason": f"{reason}: {removed.merged_dir} -> {previous.merged_dir} (champion since {previous.decided_at})",
        })
        registry.history.append(restored)
        # The seat goes back to the entry that won it, with its original reason and numbers.
        registry.champion = previous
        _write(path, registry)
        return registry
