"""The deployments against a real Prefect server and a real process worker, run from the shell.

One whole run, in the background as the session starts (tests/whole_runs.py): start `prefect server start` (its own
PREFECT_HOME and SQLite file), register the deployments, read back the nightly retrain's cron and the scheduled
runs it made, start `prefect worker start`, then `prefect deployment run 'finetune-pipeline/embedded' --params ...
--watch` with a tiny config, and read the run and its artifacts through the API. Every process is stopped by pid
(its whole process group, then any descendant left) in a finally. The test asserts what was read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests import whole_runs
from tests.whole_runs import whole_run

# Generous: the run goes on in the background at nice 10, beside the tests, on a CI machine of 2 cores that may be
# ~2x slower than the one that measured it (whole in ~130 s in the foreground there).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "vlmpipe-test-pool"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # A new session: the process and everything it spawns share a process group we can signal as one.
    process = subprocess.Popen(args, env=env, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    # A background run's processes yield the CPU to the tests in the foreground, as whole_runs.run's do.
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, process.pid, whole_runs.BACKGROUND_NICENESS)
    return process


def _stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM to the process group, SIGKILL after `timeout`; then SIGKILL any descendant that escaped it."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait(timeout=timeout)
    _, alive = psutil.wait_procs(descendants, timeout=5)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"prefect server not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@whole_run
def deployment_run_from_the_shell(root: Path) -> dict:
    """A real server, the deployments registered, a process worker, and `prefect deployment run ... --watch` of
    the embedded deployment with a tiny config: what the API and the storage root say afterwards. In the
    background (tests/whole_runs.py): it only starts processes and reads what they wrote and served."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from modal_jobs.config import PipelineConfig

    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    prefect_home = root / "prefect-home"
    env = {
        **whole_runs.ENVIRON,
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_PROFILES_PATH": str(prefect_home / "profiles.toml"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_API_URL": api_url,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "VLMPIPE_HOME": str(root / "vlmpipe-home"),
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{BIN}{os.pathsep}{whole_runs.ENVIRON.get('PATH', '')}",
    }
    config = PipelineConfig.embedded().model_dump(mode="json")
    config["dataset"]["synthetic"].update(train_size=32, test_size=4)
    config["train"].update(max_steps=4, logging_steps=1)
    config["evaluate"].update(num_samples=4, max_tokens=8)
    params = json.dumps({"config": config, "refresh": False})

    seen: dict = {"vlmpipe_home": root / "vlmpipe-home"}
    procs: list[subprocess.Popen] = []
    server_log, worker_log = root / "server.log", root / "worker.log"
    try:
        server = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                        env, server_log)
        procs.append(server)
        _wait_healthy(api_url, server, server_log)

        deployed = whole_runs.run([sys.executable, "-m", "deployments.deploy", "--pool", POOL], env=env, cwd=REPO,
                                  timeout=300)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr

        with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            names = {"finetune-pipeline/latex-ocr", "retrain/nightly", "finetune-pipeline/embedded", "evaluate/adhoc"}
            seen["deployments"] = {name: client.read_deployment_by_name(name) for name in names}
            nightly = seen["deployments"]["retrain/nightly"]
            # The server schedules runs right after the deployment is written, but not always before
            # the deploy call returns: poll briefly.
            deadline = time.monotonic() + 30
            while True:
                scheduled = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id])),
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
                )
                if scheduled or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            seen["nightly_scheduled"] = scheduled
            # The worker must never pick up a production run here (a test started just before 03:00 UTC).
            # Pausing also removes its scheduled runs.
            client.pause_deployment(nightly.id)

        worker = _start([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"],
                        env, worker_log)
        procs.append(worker)

        command = f"prefect deployment run 'finetune-pipeline/embedded' --params {shlex.quote(params)} --watch"
        ran = whole_runs.run(["bash", "-c", command], env=env, cwd=root, timeout=900)
        assert ran.returncode == 0, f"{ran.stdout}\n{ran.stderr}\n--- worker log ---\n{_tail(worker_log)}"

        with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            embedded = client.read_deployment_by_name("finetune-pipeline/embedded")
            seen["embedded_runs"] = runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[embedded.id])))
            seen["artifacts"] = [
                client.read_artifacts(
                    artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
                for run in runs]
    finally:
        for proc in reversed(procs):
            _stop(proc)
    return seen


def test_embedded_deployment_runs_from_the_shell(deployment_run_from_the_shell):
    from prefect.client.schemas.objects import StateType

    from modal_jobs.config import PipelineConfig

    seen = deployment_run_from_the_shell
    deployments = seen["deployments"]
    assert all(d.work_pool_name == POOL for d in deployments.values())
    assert deployments["finetune-pipeline/latex-ocr"].parameters["config"] == PipelineConfig().model_dump(mode="json")
    assert deployments["finetune-pipeline/embedded"].parameters["config"] == \
        PipelineConfig.embedded().model_dump(mode="json")
    nightly = deployments["retrain/nightly"]
    assert nightly.entrypoint == "flows.retrain.retrain"
    assert [s.schedule.cron for s in nightly.schedules] == ["0 3 * * *"]
    assert nightly.schedules[0].parameters["config"] == PipelineConfig().model_dump(mode="json")
    assert seen["nightly_scheduled"], "the nightly cron schedule created no scheduled runs"
    assert all(run.parameters["config"]["model"]["source"] == "unsloth/gemma-3-4b-it"
               for run in seen["nightly_scheduled"])

    (run,) = seen["embedded_runs"]
    assert run.state is not None and run.state.type == StateType.COMPLETED, run.state
    assert run.parameters["config"]["train"]["max_steps"] == 4
    keys = {artifact.key for artifact in seen["artifacts"][0]}
    assert {"metrics", "merged-model"} <= keys, keys
    assert any((seen["vlmpipe_home"] / "runs").iterdir()), "the run wrote nothing under VLMPIPE_HOME"
