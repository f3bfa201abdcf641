"""The `vlmpipe` command: run the pipeline, evaluate an endpoint, serve a model folder.

Run as: vlmpipe run [--config FILE] [--set section.key=value ...] [--json] [--refresh]
        vlmpipe eval --base-url URL --model NAME [--config FILE] [--set ...]
        vlmpipe serve MODEL_DIR [--port N]
        vlmpipe deploy [--config FILE] [--pool NAME]      (against PREFECT_API_URL)
        vlmpipe retrain [--config FILE] [--set ...] [--json] [--refresh]
        vlmpipe registry [--name NAME] [--json]            vlmpipe rollback [--name NAME]

With no --config, `vlmpipe run` is the embedded default: a tiny Gemma 3 vision model, a synthetic LaTeX OCR
set and a local server, all on this machine, with Prefect's ephemeral API.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

# Prefect's anonymous usage heartbeat writes to the same SQLite file as the run; nothing here needs it.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])

ConfigOption = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="A YAML config; without it, the embedded default.")
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override one setting, e.g. --set train.learning_rate=1e-4 (repeatable)."),
]


def _config(path: Path | None, overrides: list[str] | None):
    from pydantic import ValidationError

    from modal_jobs.config import load_config

    try:
        return load_config(path, overrides)
    except ValidationError as error:
        problems = "\n".join(
            f"  {'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        typer.echo(f"error: invalid config\n{problems}", err=True)
    except (ValueError, FileNotFoundError) as error:
        typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)


def _fail(error: Exception) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(1)


def _run_flow(flow: Any, pipeline_config: Any, refresh: bool, as_json: bool) -> Any:
    """Run a pipeline flow; its result, or None once `--json` has printed it. Any failure exits 1 with the reason."""
    try:
        result = flow(config=pipeline_config, refresh=refresh)
    except Exception as error:
        _fail(error)
    if as_json:
        sys.stdout.write(result.model_dump_json() + "\n")
        return None
    typer.echo("")
    return result


@app.command()
def run(
    config: ConfigOption = None,
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object last: states, paths, metrics.")] = False,
    refresh: Annotated[bool, typer.Option("--refresh", help="Recompute every stage, ignoring the cache.")] = False,
) -> None:
    """Run the whole pipeline: prepare data and model, train, export, serve, evaluate."""
    pipeline_config = _config(config, set_)
    from flows.pipeline import finetune_pipeline

    result = _run_flow(finetune_pipeline, pipeline_config, refresh, as_json)
    if result is None:
        return
    for stage, outcome in result.stages.items():
        typer.echo(f"  {stage:<20} {outcome.state}")
    typer.echo(f"\nmerged model:  {result.merged_dir}\nLoRA adapter:  {result.adapter_dir}")
    for label, metrics in result.metrics.items():
        typer.echo(
            f"{label + ':':<14} CER {metrics['cer']:.3f}  WER {metrics['wer']:.3f}  exact match "
            f"{metrics['exact_match']:.3f}  ({metrics['num_scored']} scored, {metrics['num_failed']} failed)  "
            f"{result.results_files[label]}"
        )


@app.command("eval")
def eval_(
    base_url: Annotated[str, typer.Option(help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")],
    model: Annotated[str, typer.Option(help="The model name the endpoint expects.")],
    config: ConfigOption = None,
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Evaluate a running endpoint on the configured dataset's test split."""
    pipeline_config = _config(config, set_)
    from flows.pipeline import evaluate_endpoint

    try:
        result = evaluate_endpoint(base_url=base_url, model_name=model, config=pipeline_config)
    except Exception as error:
        _fail(error)
    if as_json:
        sys.stdout.write(result.model_dump_json() + "\n")
    else:
        typer.echo(json.dumps(result.metrics.model_dump(), indent=2))
        typer.echo(f"results: {result.results_path}")


@app.command()
def serve(
    model_dir: Annotated[Path, typer.Argument(help="A model folder (e.g. a merged export).")],
    port: Annotated[Optional[int], typer.Option(help="Port (default: a free one).")] = None,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
) -> None:
    """Serve a model folder as an OpenAI-compatible endpoint until interrupted."""
    import signal

    from modal_jobs.config import ServeConfig
    from modal_jobs.schemas import ServeRequest
    from modal_jobs.serve import running_server

    request = ServeRequest(serve=ServeConfig(host=host, port=port), model_dir=str(model_dir.resolve()))
    try:
        with running_server(request) as served:
            typer.echo(f"serving {served.model_name} at {served.base_url} ({served.backend}); Ctrl-C to stop")
            stop_signals = {signal.SIGINT, signal.SIGTERM}
            signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
            signal.sigwait(stop_signals)
    except Exception as error:
        _fail(error)


@app.command()
def deploy(
    config: Annotated[
        Optional[Path],
        typer.Option("--config", "-c", help="YAML config for the production deployments (default: the recipe)."),
    ] = None,
    pool: Annotated[str, typer.Option(help="Work pool; created as a `process` pool if missing.")] = "vlmpipe-local",
) -> None:
    """Register the Prefect deployments on the server at PREFECT_API_URL."""
    from deployments.deploy import deploy as deploy_all

    try:
        ids = deploy_all(work_pool=pool, config_path=config)
    except Exception as error:
        _fail(error)
    typer.echo(f"{len(ids)} deployments on work pool {pool!r}; start a worker: prefect worker start --pool {pool}")


RegistryOption = Annotated[
    Optional[str],
    typer.Option("--name", "-n", help="Registry name (default: promote.registry_name of --config, or the embedded "
                                      "default's without one, as `vlmpipe retrain` would use)."),
]


def _registry_name(name: str | None, config: Path | None) -> str:
    return name or _config(config, None).promote.registry_name


def _entry_line(entry) -> str:
    from modal_jobs.storage import resolve

    value = "—" if entry.metric_value is None else f"{entry.metric_value:.4f}"
    return f"{entry.decided_at}  {entry.event:<9} {entry.metric} {value:<7} {resolve(entry.merged_dir)}"


@app.command()
def retrain(
    config: ConfigOption = None,
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object last: verdict, numbers, paths.")] = False,
    refresh: Annotated[bool, typer.Option("--refresh", help="Recompute every stage, ignoring the cache.")] = False,
) -> None:
    """Run the pipeline, then promote the fine-tuned model only if it beats the registry's champion."""
    pipeline_config = _config(config, set_)
    from flows.retrain import retrain as retrain_flow

    result = _run_flow(retrain_flow, pipeline_config, refresh, as_json)
    if result is None:
        return
    for stage, state in result.stages.items():
        typer.echo(f"  {stage:<20} {state}")
    typer.echo(f"\n{result.decision.reason}\nchampion ({result.registry}): {result.champion_merged_dir}")


@app.command()
def registry(
    name: RegistryOption = None,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the registry file's content.")] = False,
) -> None:
    """Show the champion and the history of promotions, rejections and rollbacks."""
    from modal_jobs.registry import RegistryError, read_registry, registry_path
    from modal_jobs.storage import resolve

    name = _registry_name(name, config)
    try:
        current = read_registry(name)
    except RegistryError as error:
        _fail(error)
    if as_json:
        sys.stdout.write(current.model_dump_json() + "\n")
        return
    typer.echo(f"registry {name} ({registry_path(name)})")
    champion = current.champion
    if champion is None:
        typer.echo("champion: none yet (run `vlmpipe retrain`)")
    else:
        value = "—" if champion.metric_value is None else f"{champion.metric_value:.4f}"
        typer.echo(f"champion: {resolve(champion.merged_dir)}\n  {champion.metric} {value} "
                   f"since {champion.decided_at}: {champion.reason}")
    if current.history:
        typer.echo("history (oldest first):")
        for entry in current.history:
            typer.echo("  " + _entry_line(entry))


@app.command()
def rollback(name: RegistryOption = None, config: ConfigOption = None) -> None:
    """Restore the previous champion (the rolled-back model is not promoted again automatically)."""
    from modal_jobs.registry import RegistryError
    from modal_jobs.registry import rollback as registry_rollback
    from modal_jobs.storage import resolve

    name = _registry_name(name, config)
    try:
        updated = registry_rollback(name)
    except RegistryError as error:
        _fail(error)
    typer.echo(f"{updated.history[-1].reason}\nchampion ({name}): {resolve(updated.champion.merged_dir)}")


if __name__ == "__main__":
    app()
