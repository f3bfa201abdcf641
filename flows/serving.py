"""A server's life in one place: `with serving(config, model_dir) as endpoint:` starts the serve stage on the
configured executor, yields its ServeResult (base URL, model name) and stops it however the block ends.

Locally the server is a `transformers serve` (or vLLM) process; on Modal it is vLLM in a GPU Sandbox of its own.
Either way it serves one model to one flow run: evaluating a model never changes what any other run, or the
production endpoint, sees.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from modal_jobs.config import PipelineConfig
from modal_jobs.schemas import ServeRequest, ServeResult
from tasks import stages
from tasks.executors import ExecutorSpec, get_executor


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.id


@contextmanager
def serving(config: PipelineConfig, model_dir: str) -> Iterator[ServeResult]:
    spec = ExecutorSpec.for_stage(config, "serve")
    request = ServeRequest(serve=config.serve, model_dir=model_dir, session=_flow_run_id())
    started = time.monotonic()
    served = stages.serve.submit(request, spec).result()
    try:
        yield served
    finally:
        get_executor(spec).stop_serving(served, seconds_up=time.monotonic() - started)


def serving_if(needed: bool, config: PipelineConfig, model_dir: str) -> Any:
    """`serving(...)` when a server is needed; otherwise a block that yields None and starts nothing."""
    return serving(config, model_dir) if needed else nullcontext(None)
