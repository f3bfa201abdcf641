"""Prefect artifacts for stage outputs, cache decisions and metrics, under stable keys.

Keys are fixed per kind (`dataset`, `train-adapter`, `metrics`, ...) so the latest version of each is one
click away in the UI and in `prefect artifact ls`.
"""

from __future__ import annotations

import json
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from modal_jobs.storage import resolve

# Outputs are read where they live: `where` is the executor that wrote them (local disk, or the Modal Volume).
# Without one, the local storage root.


def location_link(path: str, where: Any = None) -> str:
    """file:// for an output on this machine; its place on the Modal Volume (e.g. vlmpipe-data:/runs/...) otherwise."""
    if where is not None and where.name == "modal":
        return where.display_path(path)
    return resolve(path).as_uri()


def _display(path: str, where: Any = None) -> str:
    return where.display_path(path) if where is not None else str(resolve(path))


def _read_text(path: str, where: Any = None) -> str:
    return where.read_text(path) if where is not None else resolve(path).read_text()


def publish_output(key: str, path: str, description: str, where: Any = None) -> None:
    create_link_artifact(location_link(path, where), link_text=_display(path, where), key=key, description=description)


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


def publish_checkpoints(checkpoints_dir: str, where: Any = None) -> None:
    folder = resolve(checkpoints_dir)
    local = where is None or where.name != "modal"
    found = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])) if local and folder.exists() else []
    lines = [f"- [{p.name}]({location_link(str(p))})" for p in found] or [f"`{_display(checkpoints_dir, where)}`"]
    create_markdown_artifact("# Checkpoints\n\n" + "\n".join(lines), key="train-checkpoints",
                             description="Every saved training checkpoint")


def publish_training_stats(adapter_dir: str, where: Any = None) -> None:
    """The trainer's logged steps (loss, learning rate, grad norm) as a table, read where the adapter is."""
    try:
        stats = json.loads(_read_text(f"{adapter_dir}/training_stats.json", where))
    except Exception:  # an adapter from before the stats were written (a missing file on the Volume is NotFoundError)
        return
    keep = ("step", "epoch", "loss", "learning_rate", "grad_norm", "train_runtime", "train_samples_per_second")
    rows = [{k: entry[k] for k in keep if k in entry} for entry in stats]
    create_table_artifact(rows, key="training-stats", description="Training log: loss and learning rate by step")


def publish_metrics(evaluations: dict[str, Any]) -> None:
    """One row per metric, one column per model: point value [95% bootstrap interval], and the sample counts."""
    from modal_jobs.evaluate import metric_rows

    rows = metric_rows({label: result.metrics.model_dump() for label, result in evaluations.items()})
    create_table_artifact(
        rows, key="metrics",
        description="Held-out metrics with bootstrap intervals; a difference counts only where intervals do not overlap",
    )


def publish_eval_report(evaluations: dict[str, Any], where: Any = None) -> None:
    """Metrics table with intervals, per-length breakdown, worst predictions, failed requests (from the results
    JSONs; an evaluation whose JSON is not readable here is reported from its metrics alone)."""
    from modal_jobs.evaluate import report_markdown

    details = {}
    for label, result in evaluations.items():
        try:
            details[label] = json.loads(_read_text(result.results_path, where))
        except Exception:  # unreadable: the metrics alone still make a report
            details[label] = {"metrics": result.metrics.model_dump(),
                              "endpoint": f"(results {_display(result.results_path, where)} not readable)"}
    create_markdown_artifact(report_markdown(details), key="eval-report",
                             description="Metrics with intervals, by length, worst predictions, failed requests")


def publish_consistency(result: Any, where: Any = None) -> None:
    """The train/serve consistency report: each check with its verdict, and the answers side by side."""
    from modal_jobs.consistency import report_markdown

    try:
        report = json.loads(_read_text(result.report_path, where))
    except Exception:  # unreadable: the result's own fields still make a report
        report = result.model_dump(mode="json")
    create_markdown_artifact(report_markdown(report), key="consistency",
                             description="Train/serve consistency: files, prompt, merged vs adapter, endpoint")
