"""Prefect artifacts for stage outputs, cache decisions and metrics, under stable keys.

Keys are fixed per kind (`dataset`, `train-adapter`, `metrics`, ...) so the latest version of each is one
click away in the UI and in `prefect artifact ls`.
"""

from __future__ import annotations

import json
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from modal_jobs.storage import resolve


def location_link(path: str) -> str:
    """file:// for a local path; a storage-relative path is shown as the path on the volume otherwise."""
    absolute = resolve(path)
    return absolute.as_uri() if absolute.is_absolute() else path


def publish_output(key: str, path: str, description: str) -> None:
    create_link_artifact(location_link(path), link_text=str(resolve(path)), key=key, description=description)


def publish_skipped_rows(rows: list[str]) -> None:
    create_markdown_artifact(
        f"# {len(rows)} unusable rows skipped\n\n" + "\n".join(f"- {row}" for row in rows),
        key="dataset-skipped-rows", description="Rows left out under dataset.max_bad_rows",
    )


def publish_cache_decision(stage: str, state_name: str, key: str, changed: list[str] | None) -> None:
    if state_name == "Cached":
        why = "hit: every input matched the cached run"
    elif changed is None:
        why = "miss: no earlier run of this stage was found"
    elif changed:
        why = "miss: changed since the last run: " + ", ".join(f"`{name}`" for name in changed)
    else:
        why = "miss: inputs unchanged, but the cached output was missing or a refresh was asked for"
    create_markdown_artifact(
        f"**{stage}** — {state_name}\n\nkey `{key}`\n\n{why}", key=f"cache-{stage.replace('_', '-')}",
        description=f"Why {stage} hit or missed the cache",
    )


def publish_checkpoints(checkpoints_dir: str) -> None:
    folder = resolve(checkpoints_dir)
    found = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])) if folder.exists() else []
    lines = [f"- [{p.name}]({location_link(str(p))})" for p in found] or [f"`{checkpoints_dir}` (not readable here)"]
    create_markdown_artifact("# Checkpoints\n\n" + "\n".join(lines), key="train-checkpoints",
                             description="Every saved training checkpoint")


def publish_training_stats(adapter_dir: str) -> None:
    """The trainer's logged steps (loss, learning rate, grad norm) as a table, when the adapter is readable here."""
    stats_path = resolve(adapter_dir) / "training_stats.json"
    if not stats_path.exists():
        return
    keep = ("step", "epoch", "loss", "learning_rate", "grad_norm", "train_runtime", "train_samples_per_second")
    rows = [{k: entry[k] for k in keep if k in entry} for entry in json.loads(stats_path.read_text())]
    create_table_artifact(rows, key="training-stats", description="Training log: loss and learning rate by step")


def publish_metrics(evaluations: dict[str, Any]) -> None:
    """One row per metric, one column per model: point value [95% bootstrap interval], and the sample counts."""
    from modal_jobs.evaluate import metric_rows

    rows = metric_rows({label: result.metrics.model_dump() for label, result in evaluations.items()})
    create_table_artifact(
        rows, key="metrics",
        description="Held-out metrics with bootstrap intervals; a difference counts only where intervals do not overlap",
    )


def publish_eval_report(evaluations: dict[str, Any]) -> None:
    """Metrics table with intervals, per-length breakdown, worst predictions, failed requests (from the results
    JSONs; an evaluation whose JSON is not readable here is reported from its metrics alone)."""
    from modal_jobs.evaluate import report_markdown

    details = {}
    for label, result in evaluations.items():
        path = resolve(result.results_path)
        try:
            details[label] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            details[label] = {"metrics": result.metrics.model_dump(), "endpoint": f"(results {path} not readable here)"}
    create_markdown_artifact(report_markdown(details), key="eval-report",
                             description="Metrics with intervals, by length, worst predictions, failed requests")


def publish_consistency(result: Any) -> None:
    """The train/serve consistency report: each check with its verdict, and the answers side by side."""
    from modal_jobs.consistency import report_markdown

    try:
        report = json.loads(resolve(result.report_path).read_text())
    except (OSError, json.JSONDecodeError):
        report = result.model_dump(mode="json")
    create_markdown_artifact(report_markdown(report), key="consistency",
                             description="Train/serve consistency: files, prompt, merged vs adapter, endpoint")
