"""The `evaluate` stage: ask an OpenAI-compatible endpoint to transcribe test images, score the answers.

Run as: python -m modal_jobs.runner evaluate REQUEST.json RESULT.json

Any endpoint works (the `serve` stage's local server, a Modal web server, a hosted API); the messages come
from `modal_jobs.prompts`, as in training. A request that still fails after the client's retries is counted
as failed and kept with its error, never scored as an empty prediction: a flaky server must not pass for a
model that writes nothing. The results JSON holds every sample, so a report can be rebuilt from it.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from modal_jobs.errors import InputError
from modal_jobs.metrics import sample_cer, score
from modal_jobs.prompts import openai_messages
from modal_jobs.schemas import EvaluateRequest, EvaluateResult, Metrics
from modal_jobs.storage import atomic_write_json, resolve

WORST_IN_REPORT = 10


def _api_key(request: EvaluateRequest) -> str:
    # Servers without auth accept any key, but the client insists on one.
    env_name = request.api_key_env
    if env_name:
        key = os.environ.get(env_name)
        if not key:
            raise InputError(f"api_key_env names {env_name}, which is unset or empty: export it first")
        return key
    return "EMPTY"


def _open_split(request: EvaluateRequest) -> Any:
    from datasets import load_from_disk

    path = resolve(request.dataset_dir)
    if not path.is_dir():
        raise InputError(f"dataset_dir {path} is not a folder: run prepare_dataset first")
    splits = load_from_disk(str(path))
    if request.split not in splits:
        raise InputError(f"split {request.split!r} is not in {path}; it has {', '.join(splits)}")
    split = splits[request.split]
    missing = {"image", "text"} - set(split.column_names)
    if missing:
        raise InputError(f"{path} split {request.split!r} lacks column(s) {sorted(missing)}: re-run prepare_dataset")
    if len(split) == 0:
        raise InputError(f"split {request.split!r} of {path} is empty")
    return split


def _ask(client: Any, request: EvaluateRequest, image: Any) -> tuple[str | None, str | None, float]:
    """(prediction, error, latency_s): exactly one of prediction and error is None."""
    cfg = request.evaluate
    started = time.perf_counter()
    try:
        response = client.chat.completions.create(
            model=request.model_name,
            messages=openai_messages(image, request.instruction),
            temperature=cfg.temperature,
            # max_tokens, not max_completion_tokens: transformers serve ignores the newer name.
            max_tokens=cfg.max_tokens,
        )
        # A 200 with no text is the model's answer (it wrote nothing), unlike a failed request.
        prediction = response.choices[0].message.content or ""
        return prediction, None, time.perf_counter() - started
    except Exception as error:  # one bad sample or a dead server: recorded per sample, judged by the caller
        return None, _describe(error), time.perf_counter() - started


def _describe(error: BaseException) -> str:
    # The client's connection errors say only "Connection error."; the cause says refused, reset or DNS.
    text = f"{type(error).__name__}: {error}"
    cause = error.__cause__
    if cause is not None and str(cause) not in text:
        text += f" ({type(cause).__name__}: {cause})"
    return text


def evaluate(request: EvaluateRequest) -> EvaluateResult:
    """Score the first evaluate.num_samples rows of the split; write the results JSON at request.output_path.

    Raises InputError for a missing dataset or split, RuntimeError (after writing the results) when every
    request failed.
    """
    from openai import OpenAI
    from tqdm import tqdm

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

    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    # Rows are decoded one at a time as slots free up, so at most `concurrency` images are in memory.
    rows = iter(split.select(range(num_samples)))
    in_flight: dict[Future, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool, tqdm(
        total=num_samples, desc=f"evaluate {request.label}", unit="req", file=sys.stderr, mininterval=1.0
    ) as progress:

        def submit_next() -> bool:
            index = len(records) + len(in_flight)
            row = next(rows, None)
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
                prediction, error, latency = future.result()
                record.update(prediction=prediction, error=error, latency_s=round(latency, 4))
                record["cer"] = None if prediction is None else sample_cer(prediction, record["reference"])
                records.append(record)
                progress.update(1)
                submit_next()
    elapsed = time.perf_counter() - started
    records.sort(key=lambda record: record["index"])

    scored = [record for record in records if record["error"] is None]
    failed = [record for record in records if record["error"] is not None]
    scores = score([r["prediction"] for r in scored], [r["reference"] for r in scored])
    metrics = Metrics(
        exact_match=scores["exact_match"],
        cer=scores["cer"],
        wer=scores["wer"],
        num_samples=len(records),
        num_scored=len(scored),
        num_failed=len(failed),
    )
    worst = sorted(scored, key=lambda record: record["cer"], reverse=True)[:WORST_IN_REPORT]
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
            "sampling": {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens},
            "metrics": metrics.model_dump(mode="json"),
            "elapsed_s": round(elapsed, 3),
            "requests_per_s": round(len(records) / elapsed, 3) if elapsed > 0 else None,
            "examples": records[: cfg.examples_in_report],
            "worst": worst,
            "samples": records,
        },
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
