"""Stage name -> job function and request type. The one table both executors (local, Modal) read.

Job modules are imported on first use, so `import modal_jobs.jobs` stays light.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from modal_jobs import consistency, encode, schemas  # request and result types (pydantic only at import)

# stage name: (module, function, request type, result type)
JOBS: dict[str, tuple[str, str, type[BaseModel], type[BaseModel]]] = {
    "prepare_dataset": (
        "modal_jobs.dataset", "prepare_dataset", schemas.PrepareDatasetRequest, schemas.PrepareDatasetResult
    ),
    "prepare_model": ("modal_jobs.model", "prepare_model", schemas.PrepareModelRequest, schemas.PrepareModelResult),
    "train": ("modal_jobs.train.job", "train", schemas.TrainRequest, schemas.TrainResult),
    "encode_images": ("modal_jobs.encode", "encode_images", encode.EncodeRequest, encode.EncodeResult),
    "export": ("modal_jobs.export", "export", schemas.ExportRequest, schemas.ExportResult),
    "serve": ("modal_jobs.serve", "serve", schemas.ServeRequest, schemas.ServeResult),
    "evaluate": ("modal_jobs.evaluate", "evaluate", schemas.EvaluateRequest, schemas.EvaluateResult),
    "consistency": (
        "modal_jobs.consistency", "consistency", consistency.ConsistencyRequest, consistency.ConsistencyResult
    ),
}


def job_function(stage: str) -> Callable[[Any], BaseModel]:
    if stage not in JOBS:
        raise KeyError(f"unknown stage {stage!r}; stages are {', '.join(JOBS)}")
    module, function, _, _ = JOBS[stage]
    return getattr(importlib.import_module(module), function)


def request_type(stage: str) -> type[BaseModel]:
    return JOBS[stage][2]


def result_type(stage: str) -> type[BaseModel]:
    return JOBS[stage][3]


def output_location(request: BaseModel) -> str | None:
    """The storage-relative folder (with its manifest) or file a request's job writes, when the request names
    it; the same rule as tasks.stages.output_location."""
    if isinstance(request, schemas.TrainRequest):
        return request.adapter_dir
    return getattr(request, "output_dir", None) or getattr(request, "output_path", None)


def discard_if_corrupted(stage: str, request: BaseModel) -> str | None:
    """Every job reuses a finished output it finds at its location (and says `cached`); one whose files no
    longer match its manifest must be recomputed instead, never served. Returns the warning, if any."""
    import sys

    from modal_jobs.storage import discard_output, verify_output

    location = output_location(request)
    if not location:
        return None
    check = verify_output(location)
    if check.state != "mismatch":
        return None
    warning = f"warning: {stage}: {check.describe()}; not reused: recomputing it"
    print(warning, file=sys.stderr)
    discard_output(location)
    return warning


def run_job(stage: str, request: BaseModel | dict[str, Any]) -> BaseModel:
    """Validate the request and run the stage's job function here, in this process."""
    typed = request_type(stage).model_validate(request if isinstance(request, dict) else request.model_dump())
    discard_if_corrupted(stage, typed)
    return job_function(stage)(typed)
