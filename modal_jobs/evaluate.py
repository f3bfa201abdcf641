"""The `evaluate` stage: ask an OpenAI-compatible endpoint to transcribe test images, score the answers.

Run as: python -m modal_jobs.runner evaluate REQUEST.json RESULT.json

Any endpoint works (the `serve` stage's local server, a Modal web server, a hosted API); the messages come
from `modal_jobs.prompts`, as in training. A request that still fails after the client's retries is counted
as failed and kept with its error, never scored as an empty prediction: a flaky server must not pass for a
model that writes nothing. The results JSON holds every sample with its counts, so a report (and every
metric) can be rebuilt from it; `report_markdown` renders one.

Throughput: at most `evaluate.concurrency` requests are in flight; rows are read from the memory-mapped
Arrow split and decoded one at a time as slots free up (the split is never loaded whole); each answer is
scored on the main thread while the next requests run. Per request the results record the server's time
(the HTTP round trip, as httpx measures it) and the client's own time (PNG encoding, building the request,
parsing the answer), and their totals under `timing`. Decoding is greedy by default (temperature 0); the
sampling settings are recorded under `sampling`.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from modal_jobs.errors import InputError
from modal_jobs.metrics import (
    HIGHER_IS_BETTER,
    METRIC_NAMES,
    RenderCheck,
    aggregate,
    length_buckets,
    sample_counts,
    sample_rate,
)
from modal_jobs.prompts import openai_messages
from modal_jobs.schemas import EvaluateRequest, EvaluateResult, Metrics
from modal_jobs.storage import atomic_write_json, resolve

FAILED_IN_REPORT = 20


def _api_key(request: EvaluateRequest) -> str:
    # Servers without auth accept any key, but the client insists on one.
    env_name = request.api_key_env
    if env_name:
        key = os.environ.get(env_name)
        if not key:
            raise InputError(f"api_key_env names {env_name}, which is unset or empty: export it first")
        return key
    return "EMPTY"


class _Progress:
    """One plain line on stderr every tenth of the requests (or every 30 s, whichever comes first): the job's log
    reads line by line, and `vlmpipe run` relays these lines (`evaluate LABEL: N/M requests ...`) to the terminal."""

    EVERY_S = 30.0

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.step = max(1, -(-total // 10))
        self.done = self.failed = 0
        self.started = self.last = time.perf_counter()

    def update(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        now = time.perf_counter()
        if self.done % self.step and self.done != self.total and now - self.last < self.EVERY_S:
            return
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        left = f", ~{(self.total - self.done) / rate:.0f} s left" if self.done < self.total else ""
        print(f"evaluate {self.label}: {self.done}/{self.total} requests ({self.failed} failed), {rate:.1f}/s{left}",
              file=sys.stderr, flush=True)


def _open_split(request: EvaluateRequest) -> Any:
    from modal_jobs.dataset import open_prepared

    path = resolve(request.dataset_dir)
    if not path.is_dir():
        raise InputError(f"dataset_dir {path} is not a folder: run prepare_dataset first")
    splits = open_prepared(path)
    if request.split not in splits:
        raise InputError(f"split {request.split!r} is not in {path}; it has {', '.join(splits)}")
    split = splits[request.split]
    missing = {"image", "text"} - set(split.column_names)
    if missing:
        raise InputError(f"{path} split {request.split!r} lacks column(s) {sorted(missing)}: re-run prepare_dataset")
    if len(split) == 0:
        raise InputError(f"split {request.split!r} of {path} is empty")
    return split


def _ask(client: Any, request: EvaluateRequest, image: Any) -> tuple[str | None, str | None, dict[str, float | None]]:
    """(prediction, error, timing): exactly one of prediction and error is None.

    timing: encode_s (image to data URI), total_s (the create call, retries included), server_s (the last
    attempt's HTTP round trip: the server's time plus the network's; None when no response came back).
    """
    cfg = request.evaluate
    started = time.perf_counter()
    encoded = server_s = None
    try:
        messages = openai_messages(image, request.instruction)
        encoded = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(
            model=request.model_name,
            messages=messages,
            temperature=cfg.temperature,
            # max_tokens, not max_completion_tokens: transformers serve ignores the newer name.
            max_tokens=cfg.max_tokens,
        )
        server_s = raw.elapsed.total_seconds()
        response = raw.parse()
        # A 200 with no text is the model's answer (it wrote nothing), unlike a failed request.
        prediction, error = response.choices[0].message.content or "", None
    except Exception as caught:  # one bad sample or a dead server: recorded per sample, judged by the caller
        encoded = encoded or time.perf_counter()
        prediction, error = None, _describe(caught)
    finished = time.perf_counter()
    return prediction, error, {"encode_s": encoded - started, "total_s": finished - encoded, "server_s": server_s}


def _describe(error: BaseException) -> str:
    # The client's connection errors say only "Connection error."; the cause says refused, reset or DNS.
    text = f"{type(error).__name__}: {error}"
    cause = error.__cause__
    if cause is not None and str(cause) not in text:
        text += f" ({type(cause).__name__}: {cause})"
    return text


def _timing_summary(records: list[dict[str, Any]], elapsed: float, scoring_s: float) -> dict[str, Any]:
    answered = [r for r in records if r.get("server_s") is not None]
    client = [r["client_s"] for r in answered]
    server = [r["server_s"] for r in answered]
    return {
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(records) / elapsed, 3) if elapsed > 0 else None,
        "answered": len(answered),
        "server_s_mean": round(statistics.fmean(server), 5) if server else None,
        "server_s_median": round(statistics.median(server), 5) if server else None,
        "client_s_mean": round(statistics.fmean(client), 5) if client else None,
        "client_s_median": round(statistics.median(client), 5) if client else None,
        # The share of a request's time spent in this process rather than waiting on the server.
        "client_overhead_fraction": round(sum(client) / (sum(client) + sum(server)), 5) if answered else None,
        "scoring_s": round(scoring_s, 4),
        "scoring_s_per_sample": round(scoring_s / len(records), 6) if records else None,
    }


def evaluate(request: EvaluateRequest) -> EvaluateResult:
    """Score the first evaluate.num_samples rows of the split; write the results JSON at request.output_path.

    Raises InputError for a missing dataset or split, RuntimeError (after writing the results) when every
    request failed.
    """
    from openai import OpenAI

    cfg = request.evaluate
    split = _open_split(request)
    num_samples = min(cfg.num_samples, len(split))
    client = OpenAI(
        base_url=request.base_url,
        api_key=_api_key(request),
        timeout=cfg.request_timeout_s,
        # The client's own retries back off exponentially on connection errors, timeouts, 429 and 5xx.
        max_retries=cfg.max_retries,
    )
    render = RenderCheck() if cfg.render_check else None

    started = time.perf_counter()
    records, scoring_s = _ask_all(client, request, split, num_samples, render)
    elapsed = time.perf_counter() - started
    records.sort(key=lambda record: record["index"])

    scored = [record for record in records if record["error"] is None]
    failed = [record for record in records if record["error"] is not None]
    metrics, by_length, aggregate_s = _aggregate(scored, len(records), len(failed), cfg)
    scoring_s += aggregate_s
    timing = _timing_summary(records, elapsed, scoring_s)
    _write_results(request, records, scored, failed, metrics, by_length, timing)
    print(
        f"evaluate {request.label}: {len(records)} requests in {elapsed:.1f} s; per request the server took "
        f"{timing['server_s_mean']} s and this client {timing['client_s_mean']} s on average "
        f"(client share {timing['client_overhead_fraction']}); scoring {scoring_s:.2f} s",
        file=sys.stderr,
    )
    if not scored:
        raise RuntimeError(f"all {len(records)} requests to {request.base_url} failed: {failed[0]['error']}")
    if failed:
        print(
            f"warning: {len(failed)} of {len(records)} requests to {request.base_url} failed and were not scored; "
            f"first: {failed[0]['error']}",
            file=sys.stderr,
        )
    return EvaluateResult(results_path=request.output_path, label=request.label, metrics=metrics)


def _ask_all(client: Any, request: EvaluateRequest, split: Any, num_samples: int,
             render: RenderCheck | None) -> tuple[list[dict[str, Any]], float]:
    """One request per row, at most `concurrency` in flight, each answer scored as it arrives: the records (in
    the order the answers came) and the seconds spent scoring."""
    cfg = request.evaluate
    records: list[dict[str, Any]] = []
    scoring_s = 0.0
    # Rows are decoded one at a time as slots free up, so at most `concurrency` images are in memory.
    rows = enumerate(split.select(range(num_samples)))
    in_flight: dict[Future, dict[str, Any]] = {}
    progress = _Progress(request.label, num_samples)
    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:

        def submit_next() -> bool:
            index, row = next(rows, (None, None))
            if row is None:
                return False
            record = {"index": index, "reference": row["text"]}
            in_flight[pool.submit(_ask, client, request, row["image"])] = record
            return True

        while len(in_flight) < cfg.concurrency and submit_next():
            pass
        while in_flight:
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                record = in_flight.pop(future)
                submit_next()  # first, so the server is never idle while this answer is scored
                prediction, error, timing = future.result()
                _record_answer(record, prediction, error, timing)
                scoring_started = time.perf_counter()
                _score(record, prediction, cfg, render)
                scoring_s += time.perf_counter() - scoring_started
                records.append(record)
                progress.update(error is not None)
    return records, scoring_s


def _record_answer(record: dict[str, Any], prediction: str | None, error: str | None,
                   timing: dict[str, float | None]) -> None:
    record.update(prediction=prediction, error=error, latency_s=round(timing["total_s"], 5))
    server_s = timing["server_s"]
    record["server_s"] = None if server_s is None else round(server_s, 5)
    record["client_s"] = None if server_s is None else round(timing["encode_s"] + timing["total_s"] - server_s, 5)


def _score(record: dict[str, Any], prediction: str | None, cfg: Any, render: RenderCheck | None) -> None:
    """The sample's counts and rates; None for a failed request, which is never scored as an empty answer."""
    if prediction is None:
        record.update(cer=None, normalized_cer=None, counts=None)
        return
    counts = sample_counts(prediction, record["reference"], cfg.normalize_left_right)
    if render is not None:
        counts.update(render(prediction, record["reference"], counts["normalized_exact"]))
    record.update(cer=sample_rate(counts, "cer"), normalized_cer=sample_rate(counts, "normalized_cer"), counts=counts)


def _aggregate(scored: list[dict[str, Any]], num_samples: int, num_failed: int,
               cfg: Any) -> tuple[Metrics, list[dict[str, Any]], float]:
    """Corpus metrics with their intervals and the per-length breakdown, over the scored samples; and the
    seconds that took (counted as scoring time)."""
    started = time.perf_counter()
    counts = [record["counts"] for record in scored]
    summary = aggregate(counts, cfg.bootstrap_resamples, cfg.confidence_level, cfg.bootstrap_seed)
    by_length = length_buckets(counts, cfg.length_buckets)
    aggregate_s = time.perf_counter() - started
    metrics = Metrics(
        **{name: summary[name] for name in METRIC_NAMES},
        render_failed=summary["render_failed"],
        render_reference_failed=summary["render_reference_failed"],
        intervals=summary["intervals"],
        confidence_level=cfg.confidence_level if summary["intervals"] else None,
        bootstrap_resamples=cfg.bootstrap_resamples if summary["intervals"] else None,
        num_samples=num_samples,
        num_scored=len(scored),
        num_failed=num_failed,
    )
    return metrics, by_length, aggregate_s


def _write_results(request: EvaluateRequest, records: list[dict[str, Any]], scored: list[dict[str, Any]],
                   failed: list[dict[str, Any]], metrics: Metrics, by_length: list[dict[str, Any]],
                   timing: dict[str, Any]) -> None:
    cfg = request.evaluate
    worst = sorted(scored, key=lambda r: (r["normalized_cer"], r["cer"]), reverse=True)[: cfg.worst_in_report]
    atomic_write_json(
        request.output_path,
        {
            "label": request.label,
            "endpoint": request.base_url,
            "model_name": request.model_name,
            "dataset_dir": request.dataset_dir,
            "split": request.split,
            "instruction": request.instruction,
            "evaluate": cfg.model_dump(mode="json"),
            "sampling": {
                "temperature": cfg.temperature,
                "greedy": cfg.temperature == 0,
                "max_tokens": cfg.max_tokens,
                "top_p": None,  # not sent: the server's default applies (irrelevant when greedy)
            },
            "metrics": metrics.model_dump(mode="json"),
            "by_length": by_length,
            "timing": timing,
            "elapsed_s": timing["elapsed_s"],
            "requests_per_s": timing["requests_per_s"],
            "examples": records[: cfg.examples_in_report],
            "worst": worst,
            "failed": [{"index": r["index"], "reference": r["reference"], "error": r["error"]} for r in failed],
            "samples": records,
        },
    )


# --- the report ----------------------------------------------------------------------------------------

METRIC_LABELS = {
    "normalized_exact_match": "exact match (normalized)",
    "normalized_cer": "CER (normalized)",
    "normalized_wer": "token error rate (normalized)",
    "token_edit_rate": "token edit rate (im2latex tokens)",
    "render_match": "render match",
    "exact_match": "exact match (raw)",
    "cer": "CER (raw)",
    "wer": "WER (raw, whitespace words)",
}


def format_metric(metrics: dict[str, Any], name: str) -> str:
    """`0.412 [0.371, 0.455]`, or the point value alone when there is no interval."""
    value = metrics.get(name)
    if value is None:
        return "—"
    interval = (metrics.get("intervals") or {}).get(name)
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else f"{value:.3f}"


def metric_rows(evaluations: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per metric, one column per evaluated model: the table both artifacts show."""
    rows = []
    for name, label in METRIC_LABELS.items():
        if all(m.get(name) is None for m in evaluations.values()):
            continue
        rows.append(
            {"metric": label, "better": "higher" if name in HIGHER_IS_BETTER else "lower"}
            | {model: format_metric(m, name) for model, m in evaluations.items()}
        )
    counts = {model: f"{m.get('num_scored')} scored / {m.get('num_samples')}" for model, m in evaluations.items()}
    failures = {model: str(m.get("num_failed")) for model, m in evaluations.items()}
    rows.append({"metric": "samples", "better": ""} | counts)
    rows.append({"metric": "failed requests", "better": "lower"} | failures)
    if any(m.get("render_failed") is not None for m in evaluations.values()):
        rows.append({"metric": "predictions that do not render", "better": "lower"}
                    | {model: _fmt(m.get("render_failed")) for model, m in evaluations.items()})
    return rows


def _cell(text: Any, limit: int = 90) -> str:
    if text is None:
        return "—"
    if not str(text).strip():
        return "(empty)" if not text else "(whitespace only)"
    text = str(text).replace("|", "\\|").replace("`", "'").replace("\n", " ")
    return f"`{text[:limit]}{'…' if len(text) > limit else ''}`"


def _table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(column)) for column in columns) + " |")
    return lines


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def report_markdown(details: dict[str, dict[str, Any]]) -> str:
    """The eval report from results JSONs ({label: results}): metrics with intervals, per-length breakdown,
    worst predictions beside their references, failed requests, throughput."""
    sections = ["# Evaluation report", ""]
    metrics = {label: d["metrics"] for label, d in details.items()}
    first = next(iter(metrics.values()), {})
    level = first.get("confidence_level")
    sections.append(
        f"Intervals: {int(round(100 * level))}% percentile bootstrap over scored samples, "
        f"{first.get('bootstrap_resamples')} resamples. "
        if level else "No intervals (evaluate.bootstrap_resamples is 0). "
    )
    sections[-1] += ("Normalized metrics compare LaTeX normal forms (modal_jobs/latex_norm.py lists the rules). "
                     "A difference counts only where the intervals do not overlap.")
    sections += ["", *_table(metric_rows(metrics)), ""]
    for label, d in details.items():
        cfg = d.get("evaluate", {})
        sampling = d.get("sampling", {})
        timing = d.get("timing", {})
        sections += [
            f"## {label}",
            "",
            f"endpoint `{d.get('endpoint')}`, model `{d.get('model_name')}`, split `{d.get('split')}`; "
            f"decoding: {'greedy' if sampling.get('greedy') else 'sampling'} (temperature {sampling.get('temperature')}, "
            f"max_tokens {sampling.get('max_tokens')}); `\\left(` = `(`: {cfg.get('normalize_left_right')}; "
            f"render check: {cfg.get('render_check')}",
            "",
        ]
        if timing:
            sections += [
                f"Throughput: {timing.get('requests_per_s')} requests/s at concurrency {cfg.get('concurrency')}; "
                f"per request the server took {timing.get('server_s_mean')} s (mean), this client "
                f"{timing.get('client_s_mean')} s (client share {timing.get('client_overhead_fraction')}); "
                f"scoring {timing.get('scoring_s')} s in all.",
                "",
            ]
        if d.get("by_length"):
            keep = ("tokens", "samples", "normalized_exact_match", "normalized_cer", "token_edit_rate", "cer")
            rows = [{key: row.get(key) for key in keep} for row in d["by_length"]]
            sections += ["### By reference length (im2latex tokens)", "", *_table(rows), ""]
        worst = d.get("worst", [])
        if worst:
            sections += ["### Worst predictions", "", "| # | reference | prediction | CER (normalized) | CER (raw) |",
                         "|---|---|---|---|---|"]
            for sample in worst:
                sections.append(
                    f"| {sample.get('index')} | {_cell(sample.get('reference'))} | {_cell(sample.get('prediction'))} | "
                    f"{_fmt(sample.get('normalized_cer'))} | {_fmt(sample.get('cer'))} |"
                )
            sections.append("")
        failed = d.get("failed")
        if failed is None:  # results written before `failed` existed
            failed = [s for s in d.get("samples", []) if s.get("error")]
        if failed:
            sections += [f"### Failed requests ({len(failed)}, not scored)", "", "| # | error |", "|---|---|"]
            for sample in failed[:FAILED_IN_REPORT]:
                sections.append(f"| {sample.get('index')} | {_cell(sample.get('error'), 200)} |")
            if len(failed) > FAILED_IN_REPORT:
                sections.append(f"| … | {len(failed) - FAILED_IN_REPORT} more in the results JSON |")
            sections.append("")
    return "\n".join(sections)
