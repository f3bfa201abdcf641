"""The `serve` stage: start an OpenAI-compatible server for a merged model and return once it answers.

Run as: python -m modal_jobs.runner serve REQUEST.json RESULT.json  (the pipeline stops it later with
`stop_server(pid)`), or from Python:

    with running_server(ServeRequest(serve=ServeConfig(), model_dir="runs/<key>/merged")) as endpoint:
        OpenAI(base_url=endpoint.base_url, api_key="EMPTY").chat.completions.create(model=endpoint.model_name, ...)

Backends: `vllm serve` on a GPU machine with vLLM installed, `transformers serve` everywhere else. The server
runs in its own session so that it outlives the short-lived job process that started it; its output goes to
`<storage root>/logs/serve-<port>.log`.
"""

from __future__ import annotations

import errno
import importlib.util
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from modal_jobs.config import ServeConfig
from modal_jobs.errors import InputError
from modal_jobs.schemas import ServeRequest, ServeResult
from modal_jobs.storage import relative, resolve, storage_root

_POLL_S = 0.25
_LOG_TAIL_LINES = 30

# Servers started by this process, kept so that stop_server can reap them (no zombies, no ResourceWarning).
_STARTED: dict[int, subprocess.Popen] = {}


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def choose_backend(requested: str) -> str:
    """`auto` means vLLM only where it can run: installed and with a CUDA GPU (its wheel is a CUDA build)."""
    vllm_installed = importlib.util.find_spec("vllm") is not None
    if requested == "auto":
        return "vllm" if vllm_installed and _cuda_available() else "transformers"
    if requested == "vllm" and not vllm_installed:
        raise InputError("serve.backend is 'vllm' but vllm is not installed: install it, or set serve.backend=auto")
    return requested


def _executable(name: str, install_hint: str) -> str:
    # The console script beside this interpreter first: a job started as `.venv/bin/python -m ...` without an
    # activated venv must still find the venv's server, not another one on PATH.
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise InputError(f"`{name}` is not on PATH: {install_hint}")
    return found


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _port_holders(port: int) -> list[int | None] | None:
    """Pids listening on TCP `port` on this machine (None in the list: a process of another user); None when
    that cannot be read here (no psutil and no /proc, or macOS without root)."""
    try:
        import psutil
    except ImportError:
        return _proc_port_holders(port)
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return _proc_port_holders(port)
    return [c.pid for c in connections if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port]


def _proc_port_holders(port: int) -> list[int | None] | None:
    inodes: set[str] = set()
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not any(table.exists() for table in tables):
        return None
    for table in tables:
        try:
            rows = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()  # sl local_address rem_address st ... inode; "0A" is LISTEN
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    holders: list[int | None] = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) in inodes for fd in fd_dir.iterdir()):
                holders.append(int(fd_dir.parent.name))
        except OSError:
            continue  # another user's process, or gone
    return holders or [None] * bool(inodes)


def _describe_holders(holders: list[int | None] | None) -> str:
    known = sorted({pid for pid in holders or [] if pid is not None})
    if not known:
        return " by a process this user cannot see" if holders else ""
    described = []
    for pid in known:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            command = " ".join(part.decode(errors="replace") for part in argv if part)
        except OSError:
            command = ""
        described.append(f"pid {pid} ({command[:120]})" if command else f"pid {pid}")
    return " by " + ", ".join(described)


def _check_port_free(host: str, port: int) -> None:
    """A fixed serve.port that is taken fails at once (InputError: a retry would meet the same holder)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # Bound as the servers bind (uvicorn and vLLM set SO_REUSEADDR): a port in TIME_WAIT is free to them.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise InputError(
                    f"serve.port {port} on {host} is already in use{_describe_holders(_port_holders(port))}: "
                    "stop that process, or set serve.port to a free port (or leave it unset to pick one)"
                ) from None
            raise InputError(
                f"cannot listen on serve.host {host}, serve.port {port} ({error.strerror}): use an address of this "
                "machine, and a port above 1023 unless the server runs as root"
            ) from None


def _group(pgid: int) -> set[int]:
    """The processes of a server's group (it leads one; vLLM may answer from a child process)."""
    members = {pgid}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(entry.name)
        if fields is not None and int(fields[2]) == pgid:
            members.add(int(entry.name))
    return members


def _served_models(base: str, api_key: str | None) -> list[str]:
    request = urllib.request.Request(f"{base}/v1/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return [entry.get("id") for entry in json.loads(response.read()).get("data", [])]
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError, AttributeError):
        return []


def _answering_is_ours(process: subprocess.Popen, port: int, base: str, backend: str, model_name: str,
                       api_key: str | None) -> bool:
    """Whether what answers on `port` is the server we started, not another process that holds the port.

    The listening socket must belong to our server's process group (where sockets can be read), and vLLM must
    list our model in /v1/models. (`transformers serve` lists only models of the hub cache there, never the
    folder it was started with, so for it the socket is the proof.)"""
    if process.poll() is not None:
        return False
    holders = [pid for pid in _port_holders(port) or [] if pid is not None]
    if holders and not set(holders) & _group(process.pid):
        return False
    return backend != "vllm" or model_name in _served_models(base, api_key)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host` (a wildcard bind is not an address)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _log_tail(log_path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(log {log_path} unreadable: {error})"


def _model_dir(request: ServeRequest) -> Path:
    model_dir = resolve(request.model_dir)
    if not model_dir.is_dir():
        raise InputError(f"model_dir {model_dir} is not a folder: export a merged model there first")
    if not (model_dir / "config.json").is_file():
        raise InputError(
            f"model_dir {model_dir} has no config.json: point it at a saved model (the export stage's merged folder)"
        )
    return model_dir


def vllm_arguments(executable: str, model_path: str, model_name: str, cfg: ServeConfig, host: str,
                   port: int) -> list[str]:
    """`vllm serve` as the serve config asks, here and on Modal alike. No --api-key: a key goes through the
    environment (VLLM_API_KEY), out of `ps` and the logs. No --trust-remote-code: Gemma 3 is built into vLLM."""
    argv = [
        executable, "serve", model_path,
        "--host", host,
        "--port", str(port),
        "--served-model-name", model_name,
        "--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
        "--tensor-parallel-size", "1",
        # Request size limits: a bounded context and one image per request (what this task sends).
        "--max-model-len", str(cfg.max_model_len),
        "--limit-mm-per-prompt", json.dumps({"image": cfg.max_images_per_request}),
    ]
    if cfg.enforce_eager:
        argv.append("--enforce-eager")
    return argv


def _command(backend: str, model_dir: Path, cfg: ServeConfig, port: int) -> tuple[list[str], str, dict[str, str]]:
    """(argv, the `model` name requests must carry, extra environment)."""
    env: dict[str, str] = {}
    if cfg.api_key_env is not None:
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise InputError(f"serve.api_key_env names {cfg.api_key_env}, which is unset or empty: export it first")
    if backend == "vllm":
        # Named by its storage-relative path: the same on this machine and on the Modal Volume.
        model_name = relative(model_dir)
        executable = _executable("vllm", "pip install vllm (a CUDA build, for GPU machines)")
        argv = vllm_arguments(executable, str(model_dir), model_name, cfg, cfg.host, port)
        if cfg.api_key_env is not None:
            # vLLM reads VLLM_API_KEY like --api-key; the environment keeps the key out of `ps` and the log.
            env["VLLM_API_KEY"] = os.environ[cfg.api_key_env]
        return argv, model_name, env
    if cfg.api_key_env is not None:
        if not _is_loopback(cfg.host):
            raise InputError(
                f"transformers serve cannot require an API key, and serve.host={cfg.host} is reachable from other "
                "machines: bind to 127.0.0.1, use serve.backend=vllm, or unset serve.api_key_env"
            )
        print(
            f"warning: transformers serve ignores serve.api_key_env={cfg.api_key_env}; the endpoint is open, "
            f"but only on loopback ({cfg.host})",
            file=sys.stderr,
        )
    # transformers serve answers only requests whose `model` is exactly the path it was started with.
    model_name = str(model_dir)
    argv = [
        _executable("transformers", "pip install 'transformers[serving]'"),
        "serve", model_name,
        "--host", cfg.host,
        "--port", str(port),
        "--device", "cuda" if _cuda_available() else "cpu",
    ]
    return argv, model_name, env


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        # Refused while binding, 503 while loading, a reset mid-start: all mean "not yet".
        return False


def serve(request: ServeRequest) -> ServeResult:
    """Start the server and return only once GET /health answers 200 from the server it started.

    Raises InputError (nothing started) for a missing model folder, a backend that cannot run here or a
    serve.port that is taken (naming its holder), RuntimeError with the log's last lines if the server exits while starting, TimeoutError (server killed)
    if it is not healthy within serve.startup_timeout_s.
    """
    cfg = request.serve
    model_dir = _model_dir(request)
    backend = choose_backend(cfg.backend)
    if cfg.port:
        _check_port_free(cfg.host, cfg.port)
    port = cfg.port or _free_port(cfg.host)
    argv, model_name, extra_env = _command(backend, model_dir, cfg, port)

    log_path = storage_root() / "logs" / f"serve-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **extra_env, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            # Its own session (and process group): it survives the job process that starts it, and
            # stop_server can signal the whole group (vLLM runs its engine in child processes).
            start_new_session=True,
        )
    _STARTED[process.pid] = process

    base = f"http://{_url_host(cfg.host)}:{port}"
    started = time.monotonic()
    api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    try:
        # Healthy is not enough: whatever else holds the port may answer /health 200 too.
        while not (_healthy(f"{base}/health") and _answering_is_ours(process, port, base, backend, model_name, api_key)):
            code = process.poll()
            if code is not None:
                holders = _port_holders(port) or []
                if any(pid != process.pid for pid in holders):
                    # Taken between the check and the bind: fixed, it stays taken; a free port chosen here may not.
                    error = InputError if cfg.port else RuntimeError
                    raise error(
                        f"{backend} server for {model_dir} could not listen: port {port} was taken"
                        f"{_describe_holders(holders)}; set serve.port to a free port (or leave it unset). "
                        f"Last lines of {log_path}:\n{_log_tail(log_path)}"
                    )
                raise RuntimeError(
                    f"{backend} server for {model_dir} exited with code {code} before it was healthy; "
                    f"last lines of {log_path}:\n{_log_tail(log_path)}"
                )
            if time.monotonic() - started > cfg.startup_timeout_s:
                raise TimeoutError(
                    f"{backend} server for {model_dir} was not healthy after {cfg.startup_timeout_s:.0f} s "
                    f"(serve.startup_timeout_s); it was stopped. Last lines of {log_path}:\n{_log_tail(log_path)}"
                )
            time.sleep(_POLL_S)
    except BaseException:
        # Never leave a half-started server behind, whatever interrupted the wait.
        stop_server(process.pid)
        raise
    print(f"{backend} server healthy in {time.monotonic() - started:.1f} s at {base}/v1 (log: {log_path})",
          file=sys.stderr)
    return ServeResult(base_url=f"{base}/v1", model_name=model_name, backend=backend, pid=process.pid)


def _stat(pid: int | str) -> list[str] | None:
    """/proc/<pid>/stat after the command name: [state, ppid, pgrp, ...] (state Z: exited, not reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _gone(pid: int) -> bool:
    """True once `pid` has exited (reaping it first if it is our child)."""
    process = _STARTED.get(pid)
    if process is not None:
        if process.poll() is None:
            return False
        _STARTED.pop(pid, None)
        return True
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        pass  # not our child: the job process that started it has exited, and its new parent reaps it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    # Someone else's zombie is dead already, whether or not its parent ever reaps it.
    fields = _stat(pid)
    return fields is not None and fields[0] == "Z"


def _group_alive(pgid: int) -> bool:
    """Whether any live process is left in the group (vLLM's engine processes may outlive the server)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.glob("[0-9]*"):
        fields = _stat(entry.name)
        if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _signal(pid: int, group: bool, sig: signal.Signals) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait(pid: int, group: bool, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not (_gone(pid) and not (group and _group_alive(pid))):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop_server(pid: int, timeout_s: float = 10) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after `timeout_s`. No error if it is gone."""
    try:
        # serve() makes the server a group leader; anything else gets only its own signal.
        group = os.getpgid(pid) == pid
    except ProcessLookupError:
        # The server is gone, but helpers it started may still hold its group. Linux does not reuse a pid
        # while it is still a group id, so signalling that group reaches nothing else.
        group = True
    _signal(pid, group, signal.SIGTERM)
    if _wait(pid, group, timeout_s):
        return
    _signal(pid, group, signal.SIGKILL)
    if not _wait(pid, group, 5):
        raise RuntimeError(f"server process {pid} survived SIGKILL")


@contextmanager
def running_server(request: ServeRequest) -> Iterator[ServeResult]:
    """A server for the duration of a `with` block, stopped however the block ends."""
    result = serve(request)
    try:
        yield result
    finally:
        if result.pid is not None:
            stop_server(result.pid)
