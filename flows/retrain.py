"""The retrain flow: run the pipeline, then promote the new model only if it beats the champion.

    finetune-pipeline (subflow; unchanged inputs are cache hits) ─> judge against the registry ─> record
                                                                      └─> `promotion` artifact (the numbers)

The champion lives in `<storage root>/registry/<promote.registry_name>.json` (modal_jobs.registry). The
candidate is the fine-tuned model's held-out metric (`promote.metric`); it must beat the champion by
`promote.margin`. Both sides must be scored on the same test set with the same settings: when the champion
was scored on another one (new data, other evaluation settings), it is served and scored again on this one
(a cached evaluation when that was done before).

Run as: vlmpipe retrain [--config FILE] [--set ...] [--json]      then: vlmpipe registry / vlmpipe rollback
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel

from flows.pipeline import PipelineResult, StageOutcome, finetune_pipeline
from modal_jobs.config import PipelineConfig
from modal_jobs.registry import (
    ChampionChanged,
    Decision,
    Entry,
    judge,
    read_registry,
    record,
    registry_path,
)
from modal_jobs.storage import (
    check_writable,
    read_manifest,
    resolve,
    short_hash,
)
from tasks.champion import publish_champion

# Each attempt re-reads the registry; another retrain can only win the race so many times in a row.
_DECIDE_ATTEMPTS = 3


class RetrainResult(BaseModel):
    verdict: str
    decision: Decision
    registry: str
    champion_merged_dir: str | None
    candidate_merged_dir: str
    candidate_metrics: dict[str, Any]
    champion_metrics: dict[str, Any] | None
    stages: dict[str, str]


def describe(config: PipelineConfig) -> str:
    """What a run trains, at a glance: the name finetune-pipeline gives its runs (flows.pipeline._run_name)."""
    from flows.pipeline import _run_name

    return _run_name(config)


def _run_name() -> str:
    from prefect.runtime import flow_run

    config = PipelineConfig.model_validate(flow_run.parameters.get("config") or {})
    return "retrain-" + describe(config)


def eval_basis(dataset_fingerprint: str, config: PipelineConfig) -> str:
    """What makes two evaluations comparable: the same test set, settings and instruction (the evaluate key
    without the model)."""
    settings = config.evaluate.model_dump(include={"num_samples", "temperature", "max_tokens"})
    return short_hash({"dataset": dataset_fingerprint, "evaluate": settings, "instruction": config.instruction})


def _candidate(result: PipelineResult, config: PipelineConfig) -> tuple[Entry, str]:
    from prefect.runtime import flow_run

    dataset_key = result.stages["prepare_dataset"].key or ""
    # The content fingerprint is what the pipeline's evaluation keys use; the key is a fine stand-in when
    # the manifest is not readable here (a Modal volume).
    fingerprint = (read_manifest(result.stages["prepare_dataset"].output or "") or {}).get("content_fingerprint") or dataset_key
    export_key = result.stages["export"].key
    entry = Entry(
        event="rejected", merged_dir=result.stages["export"].output, metric=config.promote.metric,
        metrics=result.metrics["finetuned"], model_identity=f"export:{export_key}",
        train_key=result.stages["train"].key, export_key=export_key, dataset_key=dataset_key,
        dataset_fingerprint=fingerprint, eval_basis=eval_basis(fingerprint, config),
        model_source=config.model.source, flow_run_id=str(flow_run.id) if flow_run.id else None,
    )
    return entry, fingerprint


def _champion_metrics(champion: Entry | None, candidate: Entry, config: PipelineConfig, result: PipelineResult,
                      dataset_fingerprint: str, outcomes: dict[str, StageOutcome]) -> dict[str, Any] | None:
    """The champion's metrics on the candidate's test set: the recorded ones if they are from it, else a new
    evaluation of the champion model (served from its merged folder)."""
    from flows.pipeline import _evaluate_model, _Run

    if champion is None or champion.merged_dir == candidate.merged_dir or champion.eval_basis == candidate.eval_basis:
        return None
    get_run_logger().info("the champion was scored on another test set or settings: scoring it on this one")
    evaluation = _evaluate_model(
        _Run(config, refresh=False, outcomes=outcomes), "champion", champion.merged_dir,
        champion.model_identity or f"merged:{champion.merged_dir}", dataset_fingerprint,
        result.stages["prepare_dataset"].output,
    )
    return evaluation.metrics.model_dump()


def _number(value: Any) -> str:
    return "—" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def promotion_markdown(registry_name: str, decision: Decision, candidate: Entry,
                       champion: Entry | None, champion_metrics: dict[str, Any] | None) -> str:
    """The numbers that decided it, for a promotion and a rejection alike: the decision's sentence, then a table
    whose "compared value" row holds the very numbers the sentence compares."""
    metric = decision.metric
    theirs = champion_metrics or (champion.metrics if champion else {})
    ours = candidate.metrics

    def interval(metrics: dict[str, Any]) -> str:
        found = (metrics.get("intervals") or {}).get(metric)
        return f"{found[0]:.4f} – {found[1]:.4f}" if found else "—"

    rows = [
        # Storage-relative: the same on this machine and on a Modal volume, and short enough to read.
        ("model", f"`{candidate.merged_dir}`", f"`{champion.merged_dir}`" if champion else "none"),
        (f"**{metric}**", _number(ours.get(metric)), _number(theirs.get(metric))),
        (f"{metric} interval", interval(ours), interval(theirs)),
        # The champion's side is what `decide` compared: its optimistic interval end when both have intervals.
        ("compared value", _number(decision.compared_value),
         _number(decision.champion_value if decision.champion_compared_value is None
                 else decision.champion_compared_value)),
        *[(name, _number(ours.get(name)), _number(theirs.get(name)))
          for name in ("cer", "wer", "exact_match") if name != metric],
        ("scored / failed", f"{ours.get('num_scored')} / {ours.get('num_failed')}",
         f"{theirs.get('num_scored')} / {theirs.get('num_failed')}" if theirs else "—"),
        ("train key", f"`{candidate.train_key}`", f"`{champion.train_key}`" if champion else "—"),
        ("dataset key", f"`{candidate.dataset_key}`", f"`{champion.dataset_key}`" if champion else "—"),
    ]
    table = "\n".join(f"| {name} | {a} | {b} |" for name, a, b in rows)
    rescored = " (re-scored on this test set)" if champion_metrics else ""
    return (
        f"# {decision.verdict.upper()}\n\n{decision.reason}\n\n"
        f"registry `{registry_name}` (`{registry_path(registry_name)}`); metric `{metric}` ({'lower' if decision.lower_is_better else 'higher'} is "
        f"better); margin {decision.margin:g}\n\n| | candidate | champion{rescored} |\n|---|---|---|\n{table}\n"
    )


def publish_promotion(registry_name: str, decision: Decision, candidate: Entry,
                      champion: Entry | None, champion_metrics: dict[str, Any] | None) -> None:
    from prefect.artifacts import create_markdown_artifact

    markdown = promotion_markdown(registry_name, decision, candidate, champion, champion_metrics)
    create_markdown_artifact(markdown, key="promotion",
                             description=f"{decision.verdict}: candidate vs champion on {decision.metric}")


def promote_if_better(result: PipelineResult, config: PipelineConfig, outcomes: dict[str, StageOutcome]) -> tuple:
    """The promotion gate for a finished pipeline result: judge it against the registry's champion on the same
    test set, record the decision (deciding again if the champion changed meanwhile), publish the champion to the
    production endpoint if promoted, and publish the numbers. Returns (decision, registry, candidate, the champion
    it was judged against, that champion's metrics)."""
    logger = get_run_logger()
    name = config.promote.registry_name
    candidate, fingerprint = _candidate(result, config)
    for attempt in range(_DECIDE_ATTEMPTS):
        registry = read_registry(name)
        judged_against = registry.champion
        champion_metrics = _champion_metrics(judged_against, candidate, config, result, fingerprint, outcomes)
        decision = judge(registry, candidate, champion_metrics, config.promote)
        try:
            registry = record(name, decision, candidate)
            break
        except ChampionChanged as changed:
            if attempt == _DECIDE_ATTEMPTS - 1:
                raise
            logger.warning("%s", changed)
    logger.info("%s", decision.reason)
    if decision.verdict == "promoted":
        published = publish_champion(config, registry.champion)
        if published:
            logger.info("the production endpoint now serves %s (%s)", registry.champion.merged_dir, published)
    publish_promotion(name, decision, candidate, judged_against, champion_metrics)
    return decision, registry, candidate, judged_against, champion_metrics


@flow(name="retrain", flow_run_name=_run_name, log_prints=True)
def retrain(config: PipelineConfig = PipelineConfig(), refresh: bool = False) -> RetrainResult:
    """Fine-tune (cached stages are reused), then promote the model only if it beats the registry's champion."""
    check_writable()
    name = config.promote.registry_name
    read_registry(name)  # a bad registry name or a corrupt file fails before any training

    result = finetune_pipeline.with_options(flow_run_name=describe(config))(config=config, refresh=refresh)
    outcomes = dict(result.stages)
    decision, registry, candidate, judged_against, champion_metrics = promote_if_better(result, config, outcomes)
    return RetrainResult(
        verdict=decision.verdict, decision=decision, registry=name,
        champion_merged_dir=str(resolve(registry.champion.merged_dir)) if registry.champion else None,
        candidate_merged_dir=str(resolve(candidate.merged_dir)), candidate_metrics=candidate.metrics,
        champion_metrics=champion_metrics or (judged_against.metrics if judged_against else None),
        stages={stage: outcome.state for stage, outcome in outcomes.items()},
    )
