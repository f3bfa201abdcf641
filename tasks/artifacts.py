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
    rows = []
    for label, result in evaluations.items():
        metrics = result.metrics
        rows.append(
            {"model": label, "exact_match": metrics.exact_match, "cer": metrics.cer, "wer": metrics.wer,
             "samples": metrics.num_samples, "failed_requests": metrics.num_failed}
        )
    create_table_artifact(rows, key="metrics", description="Held-out metrics, base vs fine-tuned")


def _cell(text: str | None, limit: int = 80) -> str:
    if text is None:
        return "—"
    text = text.replace("|", "\\|").replace("\n", " ")
    return f"`{text[:limit]}{'…' if len(text) > limit else ''}`"


def publish_eval_report(evaluations: dict[str, Any]) -> None:
    sections = ["# Evaluation report"]
    for label, result in evaluations.items():
        details = json.loads(resolve(result.results_path).read_text())
        metrics = result.metrics
        sections.append(
            f"## {label}\n\nexact match {metrics.exact_match}, CER {metrics.cer}, WER {metrics.wer} "
            f"over {metrics.num_scored} scored samples ({metrics.num_failed} failed requests)\n\n"
            f"results: `{resolve(result.results_path)}`\n\n### Worst predictions\n\n| reference | prediction | CER |\n|---|---|---|"
        )
        for sample in details.get("worst", [])[:10]:
            sections.append(f"| {_cell(sample.get('reference'))} | {_cell(sample.get('prediction'))} | "
                            f"{sample.get('cer', '')} |")
        failed = [s for s in details.get("samples", []) if s.get("error")]
        if failed:
            sections.append(f"\n{len(failed)} failed requests; first error: `{failed[0]['error'][:200]}`")
    create_markdown_artifact("\n".join(sections), key="eval-report", description="Metrics and worst predictions")
