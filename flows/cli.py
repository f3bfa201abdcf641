"""The `vlmpipe` command: run the pipeline, evaluate an endpoint, serve a model folder.

Run as: vlmpipe run [--config FILE] [--set section.key=value ...] [--json] [--refresh] [--debug]
        vlmpipe eval --base-url URL --model NAME [--config FILE] [--set ...]
        vlmpipe serve MODEL_DIR [--port N]
        vlmpipe deploy [--config FILE] [--pool NAME]      (against PREFECT_API_URL)
        vlmpipe retrain [--config FILE] [--set ...] [--json] [--refresh]
        vlmpipe registry [--name NAME] [--json]            vlmpipe rollback [--name NAME]
        vlmpipe sweep [--config FILE] --grid train.KEY=V1,V2 [--grid ...] [--random N --seed S] [--promote-best]
        vlmpipe pull PATH [--to DIR]                       (an output on the Modal Volume)

With no --config, `vlmpipe run` is the embedded default: a tiny Gemma 3 vision model, a synthetic LaTeX OCR
set and a local server, all on this machine, with Prefect's ephemeral API.

What a failure looks like: a bad input (config, data, model folder, storage root) prints one `error:` line
and exits 2; any other failure prints its line and exits 1; Ctrl-C stops the running stage, says so, and
exits 130. Tracebacks go to the run's log file (`$VLMPIPE_HOME/logs/cli/`, or a job's log in `logs/`), and
to the terminal only with `--debug`. With `--json`, a failure prints `{"error": ..., "stage": ...}` on stdout.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


DebugOption = Annotated[
    bool, typer.Option("--debug", help="On a failure, print the full traceback (it is always in the run's log file).")
]

# Exit codes: 2 is the user's to fix (as for a bad command line), 1 is ours or the environment's, 130 is Ctrl-C.
EXIT_USER, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130
# After Ctrl-C, how long the flow gets to stop its jobs and servers and record the crash before the CLI leaves
# anyway (jobs and the API server die with this process: PR_SET_PDEATHSIG).
INTERRUPT_GRACE_S = 10.0
# Stage names by the module of modal_jobs whose code raised (for errors raised before a job started).
_STAGE_OF_MODULE = {
    "dataset": "prepare_dataset", "model": "prepare_model", "encode": "encode_images", "train": "train",
    "export": "export", "serve": "serve", "evaluate": "evaluate", "consistency": "consistency",
    "storage": "storage", "registry": "promote",
}


def _config(path: Path | None, overrides: list[str] | None, as_json: bool = False, debug: bool = False):
    from modal_jobs.config import load_config

    try:
        return load_config(path, overrides)
    except (ValueError, FileNotFoundError) as error:  # ValidationError and InputError are ValueErrors
        _fail(error, as_json=as_json, debug=debug, stage="config", config_path=path, exit_code=EXIT_USER)


def is_user_error(error: BaseException) -> bool:
    """Bad config, bad data, a bad model folder, an unusable storage root: the user fixes it, a retry cannot."""
    from pydantic import ValidationError

    from modal_jobs.errors import InputError

    return isinstance(error, (InputError, ValidationError, PermissionError))


def _yaml_line(path: Path, loc: tuple) -> str:
    """` (FILE, line N)` for a validation error's location when the key is in the YAML file, else ''."""
    import yaml

    try:
        node = yaml.compose(path.read_text())
    except (OSError, yaml.YAMLError):  # the message stands without a line
        return ""
    line = None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((key, value) for key, value in node.value if key.value == str(part)), None)
        if match is None:
            break
        line, node = match[0].start_mark.line + 1, match[1]
    return f" ({path}, line {line})" if line else ""


def describe_error(error: BaseException, config_path: Path | None = None) -> str:
    """The one message a person reads: a validation error lists each field (with its line in the YAML file)."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}"
            + (_yaml_line(config_path, e["loc"]) if config_path else "")
            for e in error.errors()
        )
        return f"invalid config: {problems}"
    return str(error)


def failed_stage(error: BaseException) -> str:
    """Which stage an error belongs to: a job's error names it ("train failed: ..."); otherwise the deepest
    frame of a stage's task, or of a stage's module in modal_jobs, says."""
    stages = set(_STAGE_OF_MODULE.values())
    head = str(error).split(" failed: ", 1)
    if len(head) == 2 and head[0] in stages:
        return head[0]
    stage = "pipeline"
    for frame, _ in traceback.walk_tb(error.__traceback__):
        path = Path(frame.f_code.co_filename)
        if path.parent.name == "tasks" and path.name == "stages.py" and frame.f_code.co_name in stages:
            stage = frame.f_code.co_name
        elif path.parent.name == "modal_jobs" and path.stem in _STAGE_OF_MODULE:
            stage = _STAGE_OF_MODULE[path.stem]
    return stage


def _fail(error: BaseException, as_json: bool = False, debug: bool = False, stage: str | None = None,
          log_path: Path | None = None, config_path: Path | None = None, exit_code: int | None = None) -> None:
    """One line on stderr (and one JSON object on stdout with --json), then exit 2 for the user's errors, 1 else."""
    message = describe_error(error, config_path)
    stage = stage or failed_stage(error)
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    where = f" (traceback in {log_path})" if log_path is not None and not debug else ""
    typer.echo(f"error: {message}{where}", err=True)
    if as_json:
        sys.stdout.write(json.dumps({"error": message, "stage": stage, "log": str(log_path) if log_path else None})
                         + "\n")
    raise typer.Exit(exit_code or (EXIT_USER if is_user_error(error) else EXIT_FAILURE))


# --- around a flow call: the API server, the console, Ctrl-C, progress -------------------------------------


# Runs first in the API server's process, then becomes the server (execv keeps PR_SET_PDEATHSIG): SIGTERM
# when the thread that started it ends, so it dies with this process even on SIGKILL. Not a preexec_fn: code
# between fork and exec can deadlock on a lock another thread held at the fork.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):  # the parent died before the line above\n"
    "    sys.exit(1)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)


def _start_api_server() -> None:
    """Start Prefect's ephemeral API server ourselves when no PREFECT_API_URL is set.

    Prefect starts it lazily in this process's group, so the terminal's Ctrl-C kills it too and the
    interrupted flow then retries a dead server for minutes; and a `kill -9` of this process leaves it
    running. Here it gets its own session (the terminal's SIGINT does not reach it) and dies with this
    process (PR_SET_PDEATHSIG). Prefect's own lookup (SubprocessASGIServer(), one instance per process)
    then finds this server running, and stops it at exit as it would its own."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    )

    if PREFECT_API_URL.value() or sys.platform != "linux":
        return
    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class OwnSessionServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            # As SubprocessASGIServer._run_uvicorn_command in Prefect 3.9.1, plus the session and PDEATHSIG.
            return subprocess.Popen(
                args=[sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()),
                      "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
                      "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                      "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                     "PREFECT__SERVER_FINAL": "1",
                     **get_current_settings().to_environment_variables(exclude_unset=True)},
                start_new_session=True,
            )

    # Started from the main thread: PDEATHSIG fires when the thread that forked the child ends. Prefect's 20 s
    # start-up allowance is too tight on a busy 2-core machine (measured: 18-30 s while tests ran beside it).
    OwnSessionServer().start(timeout=max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), 90))


class _Console(logging.Filter):
    """On the terminal only (the log file keeps everything): nothing from Prefect once a user's error is logged
    (its traceback, and the other stages the failing flow stops, are noise: the CLI prints the one line) or once
    Ctrl-C was pressed (the CLI prints what stopped)."""

    USER_ERROR_NAMES = ("InputError:", "StorageFullError:", "ValidationError:", "PermissionError:")

    def __init__(self) -> None:
        super().__init__()
        self.silent = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.silent:
            return False
        if record.exc_info and record.exc_info[1] is not None and is_user_error(record.exc_info[1]):
            self.silent = True  # never retried (tasks.stages.is_transient): the run is failing
            return False
        if isinstance(record.msg, str) and record.msg.startswith(("Finished in state Failed", "Encountered exception")):
            return not any(name in record.getMessage() for name in self.USER_ERROR_NAMES)
        return True


def _console_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    found: list[logging.Handler] = []
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                    and handler not in found:
                found.append(handler)
    return found


def _open_log_file(command: str) -> tuple[Path | None, logging.Handler | None]:
    """`<storage root>/logs/cli/<command>-<time>-<pid>.log`: this run's whole Prefect log, tracebacks included."""
    from prefect.logging.formatters import PrefectFormatter

    from modal_jobs.storage import storage_root

    try:
        folder = storage_root() / "logs" / "cli"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:  # an unwritable storage root: the flow says so in its own words
        return None, None
    handler.setFormatter(PrefectFormatter(
        format="%(asctime)s | %(levelname)-7s | %(name)s - %(message)s",
        flow_run_fmt="%(asctime)s | %(levelname)-7s | Flow run %(flow_run_name)r - %(message)s",
        task_run_fmt="%(asctime)s | %(levelname)-7s | Task run %(task_run_name)r - %(message)s",
    ))
    return path, handler


def _running_stages() -> list[str]:
    """Stages whose job process this process is waiting on (`python -m modal_jobs.runner STAGE ...`)."""
    executors = sys.modules.get("tasks.executors")
    processes = list(getattr(executors, "_RUNNING_PROCESSES", ()))
    return sorted({p.args[3] for p in processes if isinstance(p.args, list) and len(p.args) > 3})


class _Progress(threading.Thread):
    """Stage starts and evaluation progress on the terminal, read from the job logs this run writes
    (`logs/<stage>-<time>-<pid>.log`): the flow's own log says only when a stage has ended."""

    JOB_LOG = re.compile(r"^([a-z_]+)-\d{8}-\d{6}-(\d+)\.log$")  # tasks.executors: <stage>-<time>-<pid>.log

    def __init__(self, logs: Path) -> None:
        super().__init__(daemon=True, name="vlmpipe-progress")
        self.logs = logs
        self.seen: set[Path] = set(logs.glob("*.log")) if logs.is_dir() else set()
        self.offsets: dict[Path, int] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            try:
                self.poll()
            except OSError:  # a log removed or unreadable: progress is a courtesy, never a failure
                pass

    def poll(self) -> None:
        if not self.logs.is_dir():
            return
        for path in sorted(self.logs.glob("*.log"), key=lambda p: p.stat().st_mtime):
            # This run's jobs only: not a server's own log (serve-<port>.log), not another run's on this root.
            job = self.JOB_LOG.match(path.name)
            stage = job.group(1) if job and int(job.group(2)) == os.getpid() else None
            if path not in self.seen:
                self.seen.add(path)
                if stage in _STAGE_OF_MODULE.values():
                    self.say(f"{stage} started (log {path})")
                    self.offsets[path] = 0
            if stage == "evaluate" and path in self.offsets:
                with open(path, "rb") as handle:
                    handle.seek(self.offsets[path])
                    text = handle.read()
                complete = text[: text.rfind(b"\n") + 1]
                self.offsets[path] += len(complete)
                for line in complete.decode(errors="replace").splitlines():
                    if line.startswith("evaluate ") and " requests" in line:
                        self.say(line)

    def say(self, line: str) -> None:
        if not self.stopped.is_set():
            typer.echo(f"{time.strftime('%H:%M:%S')}     | vlmpipe | {line}", err=True)


@contextmanager
def _flow_session(command: str, debug: bool) -> Iterator[dict[str, Any]]:
    """Around a flow call: the API server, the run's log file, a quiet console for user errors, progress,
    Ctrl-C. Yields what the messages after it need (the log file; the stages Ctrl-C stopped)."""
    from modal_jobs.storage import storage_root

    facts: dict[str, Any] = {"log": None, "interrupted": None}
    log_path, file_handler = _open_log_file(command)
    root = logging.getLogger()
    if file_handler is not None:
        facts["log"] = log_path
        root.addHandler(file_handler)
    console = _Console()
    if not debug:
        for handler in _console_handlers():
            handler.addFilter(console)
    progress = _Progress(storage_root() / "logs")
    previous = signal.getsignal(signal.SIGINT)

    def force_exit(why: str) -> None:
        # Stop the jobs and leave without waiting for the flow (the API server dies with us: PDEATHSIG).
        from tasks.executors import stop_running_jobs

        stop_running_jobs()
        _say_interrupted(facts, forced=why)
        os._exit(EXIT_INTERRUPTED)

    def on_sigint(signum: int, frame: Any) -> None:
        if facts["interrupted"] is not None:
            force_exit("a second Ctrl-C")
        facts["interrupted"] = _running_stages()
        console.silent = True
        progress.stopped.set()
        timer = threading.Timer(INTERRUPT_GRACE_S, force_exit,
                                [f"the flow had not stopped after {INTERRUPT_GRACE_S:g} s"])
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        _start_api_server()
        progress.start()
        yield facts
    finally:
        progress.stopped.set()
        signal.signal(signal.SIGINT, previous)
        console.silent = True  # Prefect's exit-time lines (stopping the API server) add nothing
        if file_handler is not None:
            root.removeHandler(file_handler)
            file_handler.close()


def _say_interrupted(facts: dict[str, Any], forced: str | None = None, as_json: bool = False) -> None:
    stages = facts.get("interrupted") or []
    what = f"stopped {', '.join(stages)}" if stages else "stopped between stages"
    resume = " (training resumes from its latest checkpoint)" if "train" in stages else ""
    line = (f"interrupted: {what}; finished stages are kept: run the same command again to resume{resume}"
            + (f" (left at once: {forced})" if forced else ""))
    typer.echo(line, err=True)
    if as_json:
        sys.stdout.write(json.dumps({"error": line, "stage": ", ".join(stages) or None}) + "\n")
    sys.stderr.flush()
    sys.stdout.flush()


def _run_flow(command: str, call: Callable[[], Any], as_json: bool, debug: bool) -> tuple[Any, Path | None]:
    """Run a flow: (its result, or None once `--json` has printed it; the run's log file). A failure prints one
    line (exit 2 for the user's errors, 1 otherwise); Ctrl-C prints what it stopped (exit 130)."""
    facts: dict[str, Any] = {}
    try:
        with _flow_session(command, debug) as facts:
            result = call()
    except KeyboardInterrupt:
        _say_interrupted(facts, as_json=as_json)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as error:
        _fail(error, as_json=as_json, debug=debug, log_path=facts.get("log"))
    if as_json:
        sys.stdout.write(result.model_dump_json() + "\n")
        return None, facts.get("log")
    typer.echo("")
    return result, facts.get("log")


def _same_inputs(config: Path | None, overrides: list[str] | None) -> str:
    """` --config FILE --set k=v ...` as given, for a next command on the same inputs."""
    import shlex

    args = (["--config", str(config)] if config else []) + [part for o in overrides or [] for part in ("--set", o)]
    return " " + shlex.join(args) if args else ""


def _next_steps(log_path: Path | None, *commands: str) -> None:
    from modal_jobs.storage import storage_root

    typer.echo(f"\nlogs:   {log_path or storage_root() / 'logs' / 'cli'}  (each job's log: {storage_root() / 'logs'})")
    for command in commands:
        typer.echo(f"next:   {command}")


@app.command()
def run(
    config: ConfigOption = None,
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object last: states, paths, metrics.")] = False,
    refresh: Annotated[bool, typer.Option("--refresh", help="Recompute every stage, ignoring the cache.")] = False,
    debug: DebugOption = False,
) -> None:
    """Run the whole pipeline: prepare data and model, train, export, serve, evaluate."""
    pipeline_config = _config(config, set_, as_json, debug)
    from flows.pipeline import finetune_pipeline

    result, log_path = _run_flow(
        "run", lambda: finetune_pipeline(config=pipeline_config, refresh=refresh), as_json, debug
    )
    if result is None:
        return
    for stage, outcome in result.stages.items():
        typer.echo(f"  {stage:<20} {outcome.state}")
    typer.echo(f"\nmerged model:  {result.merged_dir}\nLoRA adapter:  {result.adapter_dir}")
    for what, location in result.remote_outputs.items():
        typer.echo(f"  the {what} stays on the Modal Volume; fetch it: vlmpipe pull {location} --to ./{what}")
    for label, metrics in result.metrics.items():
        typer.echo(
            f"{label + ':':<14} CER {metrics['cer']:.3f}  WER {metrics['wer']:.3f}  exact match "
            f"{metrics['exact_match']:.3f}  ({metrics['num_scored']} scored, {metrics['num_failed']} failed)  "
            f"{result.results_files[label]}"
        )
    same = _same_inputs(config, set_)
    _next_steps(log_path, f"vlmpipe serve {result.merged_dir}    # an OpenAI-compatible endpoint for this model",
                f"vlmpipe retrain{same}    # the same run, then promote the model if it beats the champion")


@app.command("eval")
def eval_(
    base_url: Annotated[str, typer.Option(help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")],
    model: Annotated[str, typer.Option(help="The model name the endpoint expects.")],
    config: ConfigOption = None,
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    debug: DebugOption = False,
) -> None:
    """Evaluate a running endpoint on the configured dataset's test split."""
    pipeline_config = _config(config, set_, as_json, debug)
    from flows.pipeline import evaluate_endpoint

    result, log_path = _run_flow(
        "eval", lambda: evaluate_endpoint(base_url=base_url, model_name=model, config=pipeline_config), as_json, debug
    )
    if result is None:
        return
    typer.echo(json.dumps(result.metrics.model_dump(), indent=2))
    typer.echo(f"results: {result.results_path}")
    _next_steps(log_path)


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
    debug: DebugOption = False,
) -> None:
    """Run the pipeline, then promote the fine-tuned model only if it beats the registry's champion."""
    pipeline_config = _config(config, set_, as_json, debug)
    from flows.retrain import retrain as retrain_flow

    result, log_path = _run_flow(
        "retrain", lambda: retrain_flow(config=pipeline_config, refresh=refresh), as_json, debug
    )
    if result is None:
        return
    for stage, state in result.stages.items():
        typer.echo(f"  {stage:<20} {state}")
    typer.echo(f"\n{result.decision.reason}\nchampion ({result.registry}): {result.champion_merged_dir}")
    _next_steps(log_path, "vlmpipe registry    # the champion and every decision, with the numbers")


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


@app.command()
def pull(
    path: Annotated[str, typer.Argument(help="A storage-relative output on the Modal Volume, e.g. runs/<key>/merged-<key>"
                                              " (what `vlmpipe run` printed after vlmpipe-data:/).")],
    to: Annotated[Path, typer.Option("--to", help="Local folder to copy it into.")] = Path("."),
    config: ConfigOption = None,
) -> None:
    """Download an output (a merged model, an adapter, an evaluation) from the Modal Volume."""
    from tasks.modal_executor import ModalExecutor

    executor = ModalExecutor(_config(config, None).modal)
    try:
        executor.require_credentials("vlmpipe pull")
        written = executor.pull(path.removeprefix("vlmpipe-data:").strip("/"), to)
    except Exception as error:
        _fail(error)
    typer.echo(f"{len(written)} files from {executor.display_path(path.strip('/'))} into {to.resolve()}")


def parse_grid(texts: list[str]) -> dict[str, list[Any]]:
    """`train.lora_r=16,32` -> {"train.lora_r": [16, 32]}; values are read as YAML scalars, as --set's are."""
    import yaml

    grid: dict[str, list[Any]] = {}
    for text in texts:
        key, _, raw = text.partition("=")
        if not key.strip() or not raw.strip():
            raise ValueError(f"--grid {text!r}: expected KEY=V1,V2,..., e.g. train.learning_rate=1e-4,3e-4")
        if key.strip() in grid:
            raise ValueError(f"--grid {key.strip()} given twice: put all its values in one --grid")
        grid[key.strip()] = [yaml.safe_load(value) for value in raw.split(",") if value.strip()]
    return grid


@app.command()
def sweep(
    grid: Annotated[list[str], typer.Option("--grid", "-g", help="Values to try, e.g. --grid train.lora_r=16,32 "
                                                             "(repeatable; every combination is a trial).")],
    config: ConfigOption = None,
    set_: SetOption = None,
    random_trials: Annotated[Optional[int], typer.Option("--random", help="Try N combinations drawn from the grid.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --random draw.")] = 0,
    max_parallel: Annotated[int, typer.Option(help="Trials at once (locally 1-2; on Modal, GPUs at once).")] = 2,
    promote_best: Annotated[bool, typer.Option("--promote-best", help="Send the best trial through the promotion "
                                                                      "gate of `vlmpipe retrain`.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object last: trials, board, best.")] = False,
    refresh: Annotated[bool, typer.Option("--refresh", help="Recompute every stage, ignoring the cache.")] = False,
    debug: DebugOption = False,
) -> None:
    """Train many variants at once on shared data, model and image features; rank them on one test set."""
    pipeline_config = _config(config, set_, as_json, debug)
    from flows.sweep import SweepSettings, leaderboard_rows, plan_trials
    from flows.sweep import sweep as sweep_flow

    try:
        settings = SweepSettings(grid=parse_grid(grid), random=random_trials, seed=seed, max_parallel=max_parallel,
                                 promote_best=promote_best)
        trials = plan_trials(pipeline_config, settings)  # every trial's config checked before the API server starts
    except ValueError as error:
        _fail(error, as_json=as_json, debug=debug, stage="config", exit_code=EXIT_USER)
    typer.echo(f"{len(trials)} trials, at most {max_parallel} at once", err=True)
    result, log_path = _run_flow(
        "sweep", lambda: sweep_flow(config=pipeline_config, sweep=settings, refresh=refresh), as_json, debug
    )
    if result is None:
        return
    metric = result.metric
    for row in leaderboard_rows(result.trials, metric):
        value = "—" if row[metric] is None else f"{row[metric]:.4f} {row[f'{metric}_interval']}"
        typer.echo(f"  {row['rank'] or '-':>3}  {row['trial']:<44} {row['status']:<11} {metric} {value}"
                   + (f"  {row['error']}" if row["error"] else ""))
    typer.echo(f"\nboard: {result.leaderboard_path}\nplot:  {result.plot_path or '—'}")
    if result.promotion:
        typer.echo(f"\n{result.promotion}")
    best = next((t for t in result.trials if t.number == result.best), None)
    if best is None:
        _next_steps(log_path)
        return
    from modal_jobs.storage import resolve

    _next_steps(log_path, f"vlmpipe serve {resolve(best.merged_dir)}    # the best trial's merged model")


if __name__ == "__main__":
    app()
