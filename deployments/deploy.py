"""The Prefect deployments, declared once: no logic here, only names, parameters and schedules.

    finetune-pipeline/latex-ocr        manual; parameters = the production config (PipelineConfig defaults,
                                       or the file passed as --config); the UI renders the pydantic form
    retrain/nightly                    cron 0 3 * * * UTC, parameters set on the schedule itself: the retrain
                                       flow (pipeline, then promote only if it beats the registry's champion)
    finetune-pipeline/embedded         manual; PipelineConfig.embedded(): finishes on one CPU, for local use
    evaluate/adhoc                     manual; base_url and model_name are asked for at run time
    sweep/grid                         manual; the production config plus a grid (SweepSettings: a form too)

The Python form (not prefect.yaml) so that the parameters are computed from the config models and cannot
drift from them. Entrypoints are module paths (`flows.pipeline.finetune_pipeline`): the worker imports the
installed `vlmpipe` package, so no source pull step and no image are needed.

Run as: python -m deployments.deploy [--pool NAME] [--config FILE]   (needs PREFECT_API_URL -> a server)
then:   prefect worker start --pool vlmpipe-local
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any
from uuid import UUID

LOCAL_POOL = "vlmpipe-local"
NIGHTLY_CRON = "0 3 * * *"
NIGHTLY_TIMEZONE = "UTC"
TAGS = ["vlmpipe"]


def _config_parameters(config) -> dict[str, Any]:
    return {"config": config.model_dump(mode="json")}


def build_deployments(production_config=None) -> list:
    """The RunnerDeployment objects; `production_config` (a PipelineConfig) defaults to PipelineConfig()."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.pipeline import evaluate_endpoint, finetune_pipeline
    from flows.retrain import retrain
    from flows.sweep import SweepSettings, sweep
    from modal_jobs.config import PipelineConfig

    production = production_config or PipelineConfig()
    common: dict[str, Any] = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": TAGS}
    return [
        finetune_pipeline.to_deployment(
            name="latex-ocr",
            description="The production fine-tune, started by hand (UI form or `prefect deployment run`).",
            parameters={**_config_parameters(production), "refresh": False},
            **common,
        ),
        retrain.to_deployment(
            name="nightly",
            description=f"Retrain every night ({NIGHTLY_CRON} {NIGHTLY_TIMEZONE}) and promote the model only if it "
            "beats the registry's champion by the configured margin; unchanged inputs are cache hits, so a night "
            "without new data costs only the key checks and keeps the champion.",
            parameters={**_config_parameters(production), "refresh": False},
            schedules=[
                Cron(NIGHTLY_CRON, timezone=NIGHTLY_TIMEZONE,
                     parameters={**_config_parameters(production), "refresh": False}),
            ],
            # Two retrains at once would train the same thing twice; the registry stays consistent either way.
            concurrency_limit=1,
            **common,
        ),
        finetune_pipeline.to_deployment(
            name="embedded",
            description="The whole pipeline on this machine: tiny model, synthetic data, local server.",
            parameters={**_config_parameters(PipelineConfig.embedded()), "refresh": False},
            **common,
        ),
        evaluate_endpoint.to_deployment(
            name="adhoc",
            description="Evaluate a running OpenAI-compatible endpoint (pass base_url and model_name).",
            parameters={**_config_parameters(production), "label": "endpoint"},
            **common,
        ),
        sweep.to_deployment(
            name="grid",
            description="Many trainings of the production config on shared data, model and image features, at most "
            "sweep.max_parallel at once; a leaderboard and a plot; optionally the best through the promotion gate.",
            parameters={**_config_parameters(production), "refresh": False, "sweep": SweepSettings(
                grid={"train.learning_rate": [1e-4, 3e-4], "train.lora_r": [16, 32]}, max_parallel=4,
            ).model_dump(mode="json")},
            **common,
        ),
    ]


def ensure_work_pool(name: str = LOCAL_POOL, pool_type: str = "process") -> None:
    """Create the work pool if it is missing (a `process` pool: flow runs are subprocesses of the worker)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return
        except ObjectNotFound:
            pass
        template: dict[str, Any] = {}
        if pool_type == "process":
            from prefect.workers.process import ProcessWorker

            template = ProcessWorker.get_default_base_job_template()
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template))
        except ObjectAlreadyExists:
            pass


def deploy(work_pool: str = LOCAL_POOL, config_path: str | Path | None = None, create_pool: bool = True) -> list[UUID]:
    """Register (or update) every deployment on the server PREFECT_API_URL points at."""
    from prefect import deploy as prefect_deploy
    from prefect.settings import PREFECT_API_URL

    from modal_jobs.config import load_config

    if not PREFECT_API_URL.value():
        # Without it Prefect would register them on a throwaway ephemeral API that no worker ever sees.
        raise ValueError("PREFECT_API_URL is not set: point it at a running server, e.g. http://127.0.0.1:4200/api")

    production = load_config(config_path) if config_path else None
    if create_pool:
        ensure_work_pool(work_pool)
    return prefect_deploy(
        *build_deployments(production), work_pool_name=work_pool, build=False, push=False,
        print_next_steps_message=False, ignore_warnings=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Register the vlmpipe deployments on a Prefect server.")
    parser.add_argument("--pool", default=LOCAL_POOL, help="Work pool name (created as `process` if missing).")
    parser.add_argument("--config", default=None, help="YAML config for the production deployments.")
    parser.add_argument("--no-create-pool", action="store_true", help="Fail instead of creating the pool.")
    args = parser.parse_args(argv)
    deploy(args.pool, args.config, create_pool=not args.no_create_pool)


if __name__ == "__main__":
    main()
