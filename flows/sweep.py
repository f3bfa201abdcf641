"""The sweep flow: many trainings of one base model on one dataset, sharing what they can.

    prepare_dataset ─┐                      ┌─> trial 1: train ─> export ─> serve ─> evaluate
                     ├─> encode_images ─────┼─> trial 2: train ─> export ─> serve ─> evaluate   at most
    prepare_model ───┘   (once, shared)     └─> ...                                            sweep.max_parallel
                                                                                                at once
    ─> leaderboard (table artifact) + plot (image artifact) ─> optional: the best trial through the promotion gate

Every trial is the pipeline's own body (flows.pipeline) as a subflow `sweep-trial`, so its stages are cached by the
same content keys: the shared stages come back Cached in every trial, and a re-run of a sweep with one more grid
value trains only the new trial (the others are Cached from train to evaluate). All trials are scored on the same
prepared test split with the same evaluation settings, each against a server of its own.

Trials vary `train.*` settings only: a trial with another dataset, model or evaluation setting would share nothing
and could not be ranked against the others.

Run as: vlmpipe sweep [--config FILE] --grid train.learning_rate=1e-4,3e-4 --grid train.lora_r=16,32
                      [--random N --seed S] [--max-parallel N] [--promote-best]
"""

from __future__ import annotations

import base64
import contextvars
import io
import itertools
import json
import random
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from flows.pipeline import PipelineResult, StageOutcome
from modal_jobs.config import PipelineConfig
from modal_jobs.errors import InputError

# How often the sweep looks at its trials and at its own state (a cancel from the UI), in seconds.
POLL_S = 1.0
# Grid keys must start with this: see the module docstring.
SWEPT_SECTION = "train."
# Shown with every metric; the promotion metric comes first.
METRICS = ("cer", "wer", "exact_match", "normalized_cer", "normalized_wer", "normalized_exact_match")
HIGHER_IS_BETTER = {"exact_match", "normalized_exact_match", "render_match"}


class SweepSettings(BaseModel):
    """What to try and how many at once (the `sweep` parameter of the flow: a form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid")

    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Setting -> values to try, e.g. {'train.learning_rate': [1e-4, 3e-4], 'train.lora_r': [16, 32]}; "
        "every combination is a trial. train.* settings only.",
    )
    random: PositiveInt | None = Field(
        None, description="Try this many combinations drawn at random from the grid (seeded) instead of all of them."
    )
    seed: int = Field(0, description="Seed of the random draw: the same seed draws the same trials.")
    max_parallel: PositiveInt = Field(
        2, description="Trials running at once. On Modal each trial's train is a GPU container of its own; locally "
        "every trial shares this machine's cores, so 1 or 2.",
    )
    promote_best: bool = Field(
        False, description="Send the best trial through the promotion gate of `vlmpipe retrain` (registry champion).",
    )

    @field_validator("grid")
    @classmethod
    def _train_settings_only(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not key.startswith(SWEPT_SECTION) or key.count(".") != 1:
                raise ValueError(
                    f"{key!r}: a sweep varies train.* settings only (e.g. train.learning_rate); trials with another "
                    "dataset, model or evaluation setting share nothing and cannot be ranked against each other"
                )
            if not values:
                raise ValueError(f"{key}: no values to try; give at least one, e.g. {key}=1e-4,3e-4")
        return grid


class Trial(BaseModel):
    number: int
    values: dict[str, Any]
    config: PipelineConfig

    @property
    def name(self) -> str:
        return f"trial-{self.number:02d}-" + "-".join(f"{k.split('.', 1)[1]}{_short(v)}" for k, v in self.values.items())


class TrialOutcome(BaseModel):
    number: int
    name: str
    values: dict[str, Any]
    status: str  # trained | cached | failed | cancelled | not started
    stages: dict[str, str] = {}
    steps: int | None = None
    seconds: float | None = None
    cost_usd: float | None = None
    metrics: dict[str, Any] = {}
    error: str | None = None
    merged_dir: str | None = None
    flow_run_id: str | None = None
    # The trial's whole result, for the promotion gate; not on the board.
    result: PipelineResult | None = Field(None, exclude=True, repr=False)


class SweepResult(BaseModel):
    state: str
    shared: dict[str, StageOutcome]
    trials: list[TrialOutcome]
    metric: str
    best: int | None = None
    base_metrics: dict[str, Any] = {}
    leaderboard_path: str
    plot_path: str | None = None
    promotion: str | None = None
    storage_root: str


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _dotted(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def plan_trials(config: PipelineConfig, settings: SweepSettings) -> list[Trial]:
    """Every trial's config, validated before anything runs: a bad value names its trial, key and fix.
    Combinations that validate to the same config are one trial (1e-4 and 0.0001)."""
    from pydantic import ValidationError

    from modal_jobs.config import _set_dotted
    from modal_jobs.storage import short_hash

    if not settings.grid:
        raise InputError("the sweep has no grid: give at least one --grid KEY=V1,V2 (e.g. train.learning_rate=1e-4,3e-4)")
    keys = list(settings.grid)
    combinations = list(itertools.product(*(settings.grid[key] for key in keys)))
    if settings.random is not None and settings.random < len(combinations):
        combinations = random.Random(settings.seed).sample(combinations, settings.random)
    base = config.model_dump(mode="json")
    trials: list[Trial] = []
    seen: set[str] = set()
    for combination in combinations:
        tree = json.loads(json.dumps(base))
        for key, value in zip(keys, combination):
            _set_dotted(tree, key, value)
        try:
            trial_config = PipelineConfig.model_validate(tree)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            given = ", ".join(f"{k}={v}" for k, v in zip(keys, combination))
            raise InputError(f"sweep trial {given}: {problems}; fix or drop that value in --grid") from None
        identity = short_hash(trial_config.model_dump(mode="json"))
        if identity in seen:
            continue
        seen.add(identity)
        dumped = trial_config.model_dump(mode="json")
        trials.append(Trial(number=len(trials) + 1, values={k: _dotted(dumped, k) for k in keys}, config=trial_config))
    return trials


# --- the shared stages: once for every trial ----------------------------------------------------------------


def _prepare_shared(config: PipelineConfig, trials: list[Trial], refresh: bool
                    ) -> tuple[dict[str, StageOutcome], dict[str, Any]]:
    """prepare_dataset, prepare_model, encode_images and the base model's evaluation as the pipeline runs them (same
    keys, same requests), so every trial finds them Cached; returns their outcomes and the base model's metrics.
    encode_images is skipped when every trial's adapter is already on disk."""
    from flows.pipeline import _encode, _evaluate_model, _prepare, _Run
    from modal_jobs import keys

    run = _Run(config, refresh)
    dataset, model = _prepare(run)
    versions = run.where("train").library_versions()
    train_keys = [keys.train_key(dataset.fingerprint, model.fingerprint, t.config.train, t.config.model,
                                 t.config.instruction, versions).key for t in trials]
    if all(t.config.train.finetune_vision_layers for t in trials):
        run.skip("encode_images", "every trial trains its vision layers")
    elif not refresh and all(run.where("train").output_exists(f"runs/{key}/lora") for key in train_keys):
        run.skip("encode_images", "every trial's adapter already on disk")
    else:
        _encode(run, dataset, model)
    # The base model's score, once: trials started together would otherwise each start a server for it. The same
    # key and output as the pipeline's base evaluation, so every trial finds it Cached.
    base = _evaluate_model(run, "base", model.path, model.fingerprint, dataset.fingerprint, dataset.path)
    return run.outcomes, base.metrics.model_dump()


# --- one trial ----------------------------------------------------------------------------------------------


@flow(name="sweep-trial", log_prints=True)
def sweep_trial(config: PipelineConfig, refresh: bool = False) -> PipelineResult:
    """One trial: the pipeline's body (flows.pipeline), whose stages are cached by the same content keys.

    Not `finetune_pipeline` itself: on a failure that flow stops every job of its process, which in a sweep would
    be the other trials' jobs. A trial's failure ends only its own stages (its server is stopped by `serving`);
    stopping everything is the sweep's business, on a cancel or Ctrl-C."""
    from prefect.exceptions import CancelledRun
    from prefect.states import Cancelled

    from flows.pipeline import _finetune_pipeline

    try:
        return _finetune_pipeline(config, refresh)
    except CancelledRun as cancelled:
        return Cancelled(message=str(cancelled))


def _trial_cost(flow_run_id: str | None) -> float | None:
    """The sum of the `cost-*` artifacts (tasks.modal_executor) of a trial's runs: known on Modal, None locally."""
    if flow_run_id is None:
        return None
    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterId,
            FlowRunFilterParentFlowRunId,
        )

        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
            total, found = 0.0, False
            for run in [*runs, *children]:
                for artifact in client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))):
                    if (artifact.key or "").startswith("cost-") and isinstance(artifact.data, (list, str)):
                        rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
                        for row in rows:
                            if row.get("estimated_usd") is not None:
                                total, found = total + row["estimated_usd"], True
            return round(total, 4) if found else None
    except Exception:  # bookkeeping: the board goes on without a price
        return None


def _steps(result: PipelineResult, config: PipelineConfig) -> int | None:
    from flows.pipeline import _where

    try:
        stats = json.loads(_where(config, "train").read_text(f"{result.stages['train'].output}/training_stats.json"))
        return max(int(entry["step"]) for entry in stats if "step" in entry)
    except Exception:  # an adapter without its stats file: the board shows a dash
        return None


def run_trial(trial: Trial, refresh: bool = False) -> TrialOutcome:
    """Run one trial as a subflow of the sweep and describe how it ended; a failed trial is an outcome, not an
    exception, so the sweep finishes the others.

    Called in a plain thread, not as a Prefect task: a subflow inside a task runs inside the task's transaction,
    which holds every stage's cache lock until the whole trial ends, so trials would wait on each other."""
    started = time.monotonic()
    state = sweep_trial.with_options(flow_run_name=trial.name)(config=trial.config, refresh=refresh, return_state=True)
    flow_run_id = str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None
    outcome = TrialOutcome(number=trial.number, name=trial.name, values=trial.values, status="failed",
                           seconds=round(time.monotonic() - started, 1), flow_run_id=flow_run_id)
    if state.is_cancelled():
        return outcome.model_copy(update={"status": "cancelled", "error": state.message})
    try:
        result: PipelineResult = state.result()
    except BaseException as error:  # the trial's own failure, reported on the board
        return outcome.model_copy(update={"error": f"{type(error).__name__}: {error}"[:500]})
    stages = {name: stage.state for name, stage in result.stages.items()}
    return outcome.model_copy(update={
        "status": "cached" if stages.get("train") == "Cached" else "trained", "stages": stages,
        "metrics": result.metrics.get("finetuned", {}), "steps": _steps(result, trial.config),
        "cost_usd": _trial_cost(flow_run_id), "merged_dir": result.stages["export"].output, "result": result,
    })


# --- the board ----------------------------------------------------------------------------------------------


def _lower_is_better(metric: str) -> bool:
    return metric not in HIGHER_IS_BETTER


def rank(outcomes: list[TrialOutcome], metric: str) -> list[TrialOutcome]:
    """Scored trials best first (by the point value of `metric`), then the others in trial order."""
    scored = [o for o in outcomes if o.metrics.get(metric) is not None]
    scored.sort(key=lambda o: o.metrics[metric] * (1 if _lower_is_better(metric) else -1))
    return scored + sorted((o for o in outcomes if o not in scored), key=lambda o: o.number)


def _interval(metrics: dict[str, Any], name: str) -> str:
    found = (metrics.get("intervals") or {}).get(name)
    return f"[{found[0]:.4f}, {found[1]:.4f}]" if found else "—"


def leaderboard_rows(outcomes: list[TrialOutcome], metric: str) -> list[dict[str, Any]]:
    """One row per trial, best first: swept values, status, steps, time, cost, every metric with its interval.
    `overlaps_best`: the trial's interval of `metric` overlaps the best trial's, so the test set cannot tell the
    two apart."""
    ranked = rank(outcomes, metric)
    best = ranked[0] if ranked and ranked[0].metrics.get(metric) is not None else None
    best_interval = (best.metrics.get("intervals") or {}).get(metric) if best else None
    names = list(dict.fromkeys((metric, *METRICS)))
    rows = []
    for position, outcome in enumerate(ranked, 1):
        interval = (outcome.metrics.get("intervals") or {}).get(metric)
        row: dict[str, Any] = {"rank": position if outcome.metrics.get(metric) is not None else None,
                               "trial": outcome.name}
        row.update({key.split(".", 1)[1]: value for key, value in outcome.values.items()})
        row.update({"status": outcome.status, "steps": outcome.steps, "seconds": outcome.seconds,
                    "cost_usd": outcome.cost_usd})
        for name in names:
            value = outcome.metrics.get(name)
            row[name] = None if value is None else round(value, 4)
            row[f"{name}_interval"] = _interval(outcome.metrics, name)
        row["overlaps_best"] = (None if not (interval and best_interval) or outcome is best
                                else interval[0] <= best_interval[1] and best_interval[0] <= interval[1])
        row["error"] = outcome.error
        rows.append(row)
    return rows


def plot_png(outcomes: list[TrialOutcome], metric: str) -> bytes | None:
    """`metric` against each swept value (one panel per setting, one line per combination of the others),
    intervals as error bars. None when no trial was scored."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [o for o in outcomes if o.metrics.get(metric) is not None]
    if not scored:
        return None
    keys = list(scored[0].values)
    figure, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    for axis, key in zip(axes[0], keys):
        others = [k for k in keys if k != key]
        groups: dict[tuple, list[TrialOutcome]] = {}
        for outcome in scored:
            groups.setdefault(tuple(outcome.values[k] for k in others), []).append(outcome)
        numeric = all(isinstance(o.values[key], (int, float)) and not isinstance(o.values[key], bool) for o in scored)
        categories = sorted({str(o.values[key]) for o in scored})
        for group, members in groups.items():
            members.sort(key=lambda o: o.values[key] if numeric else str(o.values[key]))
            xs = [o.values[key] if numeric else categories.index(str(o.values[key])) for o in members]
            ys = [o.metrics[metric] for o in members]
            low = [y - (o.metrics.get("intervals") or {}).get(metric, [y, y])[0] for o, y in zip(members, ys)]
            high = [(o.metrics.get("intervals") or {}).get(metric, [y, y])[1] - y for o, y in zip(members, ys)]
            label = ", ".join(f"{k.split('.', 1)[1]}={_short(v)}" for k, v in zip(others, group)) or None
            axis.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=4, label=label)
        if numeric and "learning_rate" in key and min(o.values[key] for o in scored) > 0:
            axis.set_xscale("log")
        if numeric:  # the values tried, not matplotlib's round numbers between them
            values = sorted({o.values[key] for o in scored})
            axis.set_xticks(values, [_short(v) for v in values])
            axis.minorticks_off()
        else:
            axis.set_xticks(range(len(categories)), categories)
        axis.set_xlabel(key)
        axis.set_ylabel(f"{metric} ({'lower' if _lower_is_better(metric) else 'higher'} is better)")
        if others:
            axis.legend(fontsize="small")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def _publish_board(rows: list[dict[str, Any]], png: bytes | None, metric: str, summary: str) -> None:
    from prefect.artifacts import (
        create_image_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    create_table_artifact(rows, key="sweep-leaderboard",
                          description=f"One row per trial, best {metric} first; intervals are bootstrap intervals "
                          "over the same test set (overlaps_best: not distinguishable from the best on it)")
    image = None
    if png is not None:
        # Prefect 3.9's image artifact shows a URL; the storage root is not on the web, so the PNG travels inline
        # as a data URI (the file is also written beside the leaderboard on the storage root).
        image = "data:image/png;base64," + base64.b64encode(png).decode()
        create_image_artifact(image, key="sweep-plot", description=f"{metric} against each swept value, with intervals")
    create_markdown_artifact(summary + (f"\n\n![{metric} against each swept value]({image})\n" if image else ""),
                             key="sweep-summary", description="The sweep: best trial, failures, where the files are")


# --- the promotion gate -------------------------------------------------------------------------------------


def _promote(result: PipelineResult, config: PipelineConfig) -> str:
    """The best trial through `vlmpipe retrain`'s gate (flows.retrain): judged against the registry's champion on
    the same test set, recorded, and published only if promoted."""
    from flows.retrain import promote_if_better

    decision = promote_if_better(result, config, dict(result.stages))[0]
    return f"{decision.verdict}: {decision.reason}"


# --- the flow -----------------------------------------------------------------------------------------------


def _run_name() -> str:
    from prefect.runtime import flow_run

    settings = SweepSettings.model_validate(flow_run.parameters.get("sweep") or {})
    axes = "x".join(f"{key.split('.', 1)[1]}{len(values)}" for key, values in settings.grid.items())
    return f"sweep-{axes or 'empty'}" + (f"-random{settings.random}-seed{settings.seed}" if settings.random else "")


def _stopping() -> bool:
    from tasks.modal_executor import flow_run_stopping

    return flow_run_stopping()


def _run_trials(trials: list[Trial], settings: SweepSettings, refresh: bool) -> tuple[dict[int, TrialOutcome], bool]:
    """Every trial's chain, at most max_parallel at once: (outcome by trial number, whether the sweep was
    cancelled). A cancelled sweep stops its running trials; trials not started yet are marked so."""
    from tasks.executors import stop_running_jobs

    logger = get_run_logger()
    outcomes: dict[int, TrialOutcome] = {}
    # Bounded submission: at most max_parallel trial threads; the rest wait in the pool's queue.
    pool = ThreadPoolExecutor(max_workers=settings.max_parallel, thread_name_prefix="sweep-trial")
    running = {pool.submit(contextvars.copy_context().run, run_trial, trial, refresh): trial for trial in trials}
    cancelled = False

    def collect(done: set[Future]) -> None:
        for future in done:
            trial = running.pop(future)
            if future.cancelled():
                outcomes[trial.number] = TrialOutcome(number=trial.number, name=trial.name, values=trial.values,
                                                      status="not started", error="the sweep was cancelled")
                continue
            try:
                outcome = future.result()
            except BaseException as error:  # the trial's wrapper itself broke: still this trial's failure alone
                outcome = TrialOutcome(number=trial.number, name=trial.name, values=trial.values, status="failed",
                                       error=f"{type(error).__name__}: {error}")
            if cancelled and outcome.status == "failed":
                outcome = outcome.model_copy(update={"status": "cancelled",
                                                     "error": f"stopped, the sweep was cancelled ({outcome.error})"})
            outcomes[trial.number] = outcome
            logger.info("%s: %s%s", trial.name, outcome.status, f" ({outcome.error})" if outcome.error else "")

    try:
        while running:
            if _stopping():
                cancelled = True
                logger.warning("the sweep is being cancelled: stopping its running trials")
                for future in running:
                    future.cancel()  # the trials not started yet
                break
            collect(wait(running, timeout=POLL_S, return_when=FIRST_COMPLETED).done)
        # A killed local job looks transient to its task, which retries it: keep stopping until every trial ended.
        while running:
            stop_running_jobs()
            collect(wait(running, timeout=POLL_S, return_when=FIRST_COMPLETED).done)
    except BaseException:
        # Ctrl-C or a crash of the sweep itself: no trial's job runs on without it.
        stop_running_jobs()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=False)
    return outcomes, cancelled


def _write_board(config: PipelineConfig, settings: SweepSettings, ordered: list[TrialOutcome],
                 base_metrics: dict[str, Any]) -> tuple[str, str | None, TrialOutcome | None]:
    """The leaderboard and plot under sweeps/<hash of config and sweep>/, and the board artifact:
    (that folder, the plot's path or None, the best scored trial or None)."""
    from modal_jobs.storage import atomic_write_json, resolve, short_hash

    metric = config.promote.metric
    ranked = rank(ordered, metric)
    best = ranked[0] if ranked and ranked[0].metrics.get(metric) is not None else None
    rows = leaderboard_rows(ordered, metric)
    folder = f"sweeps/{short_hash({'config': config.model_dump(mode='json'), 'sweep': settings.model_dump(mode='json')})}"
    atomic_write_json(f"{folder}/leaderboard.json", rows)
    png = plot_png(ordered, metric)
    plot_path = None
    if png is not None:
        plot_path = f"{folder}/plot.png"
        resolve(plot_path).write_bytes(png)
    failed = [o for o in ordered if o.status == "failed"]
    summary = (f"# Sweep: {len(ordered)} trials\n\n"
               + (f"Best {metric}: **{best.name}** ({best.metrics[metric]:.4f} {_interval(best.metrics, metric)})\n\n"
                  if best else "No trial was scored.\n\n")
               + (f"Base model, same test set: {metric} {base_metrics.get(metric)} {_interval(base_metrics, metric)}\n\n")
               + "".join(f"- failed: {o.name}: {o.error}\n" for o in failed)
               + f"\nLeaderboard: `{resolve(folder) / 'leaderboard.json'}`\n")
    _publish_board(rows, png, metric, summary)
    return folder, plot_path, best


@flow(name="sweep", flow_run_name=_run_name, log_prints=True)
def sweep(config: PipelineConfig = PipelineConfig(), sweep: SweepSettings = SweepSettings(),
          refresh: bool = False) -> SweepResult:
    """Shared prepare/encode once, then one train -> export -> evaluate chain per trial, a leaderboard and a plot."""
    from prefect.states import Cancelled

    from flows.pipeline import _check_modal_credentials
    from modal_jobs.storage import (
        atomic_write_json,
        check_writable,
        resolve,
        storage_root,
    )

    settings = sweep
    check_writable()
    _check_modal_credentials(config)
    trials = plan_trials(config, settings)
    get_run_logger().info("%d trials, at most %d at once", len(trials), settings.max_parallel)
    shared, base_metrics = _prepare_shared(config, trials, refresh)
    outcomes, cancelled = _run_trials(trials, settings, refresh)
    ordered = [outcomes[t.number] for t in trials]
    folder, plot_path, best = _write_board(config, settings, ordered, base_metrics)

    promotion = None
    if settings.promote_best and best is not None and not cancelled:
        best_trial = next(t for t in trials if t.number == best.number)
        promotion = _promote(best.result, best_trial.config)
    result = SweepResult(
        state="Cancelled" if cancelled else "Completed", shared=shared, trials=ordered, metric=config.promote.metric,
        best=best.number if best else None, base_metrics=base_metrics, leaderboard_path=str(resolve(folder) / "leaderboard.json"),
        plot_path=str(resolve(plot_path)) if plot_path else None, promotion=promotion,
        storage_root=str(storage_root()),
    )
    if cancelled:
        atomic_write_json(f"{folder}/result.json", result.model_dump(mode="json"))
        return Cancelled(message=f"sweep cancelled; {len([o for o in ordered if o.status == 'cancelled'])} running "
                         f"trials stopped (board: {result.leaderboard_path})")
    return result
