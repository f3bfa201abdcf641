"""A stand-in for Modal's service, for rehearsing the Modal path here (no network, no token).

Only the service is stood in for; what it runs is real. It keeps Modal's semantics where the executor and the app
depend on them:
- `Function.spawn` returns a call id at once; the call runs the app function's real body (modal_jobs.app.<stage>,
  the code `modal deploy` ships) in a process of its own, a "container", with the image's environment
  (VLMPIPE_HOME = the Volume's folder, HF_HOME on it) and `_in_container()` true, so the body reloads and commits.
- `FunctionCall.get(timeout)` raises modal's TimeoutError while the call runs, returns the function's return value,
  or re-raises the remote exception with its own type; a cancelled call raises a bare RemoteError and its call graph
  says TERMINATED. `FunctionCall.from_id` re-attaches from any process. Fault injection: ConnectionError on `get`.
- The function's `modal.Retries` (train): a container that dies or raises is replaced by a fresh one, up to
  max_retries, as Modal does after a preemption.
- The Volume is a folder; what a container writes becomes visible to `read_file` (the client's view) only once it
  commits, as on Modal.
- A Sandbox (the evaluation server) runs its command's stand-in: vLLM cannot run on this CPU, so a real
  `transformers serve` serves the model behind a small proxy that answers under vLLM's --served-model-name.

Run as a library from tests (StandInModal); the module's `__main__` is the container/supervisor entry point.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def _read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


class FolderVolume:
    """modal.Volume as a folder: commit() publishes the current files to readers outside containers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = root / "volume"
        self.commits = root / "volume-commits.json"

    def reload(self) -> None:
        pass  # containers share the folder: they already see what others committed (and more: see read_file)

    def commit(self) -> None:
        files = [p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file()]
        _write_json(self.commits, sorted(files))

    def committed(self) -> set[str]:
        return set(_read_json(self.commits, []))

    def read_file(self, path: str):  # modal yields chunks
        path = path.lstrip("/")
        if path not in self.committed() or not (self.folder / path).is_file():
            raise FileNotFoundError(f"{path} is not on the Volume (or not committed yet)")
        yield (self.folder / path).read_bytes()


# --- the client side: what tasks.modal_executor.ModalClient does against Modal ---------------------------------


class StandInModal:
    """Drop-in for tasks.modal_executor.CLIENT. `root` holds the Volume folder, the calls and the sandboxes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.volume = FolderVolume(root)
        self.volume.folder.mkdir(parents=True, exist_ok=True)
        (root / "calls").mkdir(exist_ok=True)
        (root / "sandboxes").mkdir(exist_ok=True)
        self.faults = root / "faults.json"

    # faults
    def fail_gets_with_connection_error(self, times: int) -> None:
        _write_json(self.faults, {"connection_errors": times})

    def delay_container_starts(self, seconds: float) -> None:
        """Calls wait this long for a container, as a cold start or a queue does: time to cancel them."""
        _write_json(self.faults, {**_read_json(self.faults, {}), "container_start_delay_s": seconds})

    def _take_fault(self) -> bool:
        faults = _read_json(self.faults, {})
        if faults.get("connection_errors", 0) > 0:  # (a read-modify-write: one process asks at a time here)
            faults["connection_errors"] -= 1
            _write_json(self.faults, faults)
            return True
        return False

    # ModalClient
    def credentials_configured(self) -> bool:
        return True

    def function(self, app_name: str, stage: str) -> StandInFunction:
        return StandInFunction(self, stage)

    def call(self, call_id: str) -> StandInCall:
        if not (self.root / "calls" / call_id).is_dir():
            import modal.exception

            raise modal.exception.NotFoundError(f"no function call {call_id}")
        return StandInCall(self, call_id)

    def read_file(self, path: str) -> bytes:
        return b"".join(self.volume.read_file(path))

    def list_files(self, path: str) -> list[str]:
        prefix = path.strip("/") + "/"
        return sorted(p for p in self.volume.committed() if p == path.strip("/") or p.startswith(prefix))

    def write_file(self, path: str, data: bytes) -> None:
        target = self.volume.folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        self.volume.commit()

    def terminate_sandbox(self, sandbox_id: str) -> None:
        StandInSandbox.from_id(sandbox_id, root=self.root).terminate()

    # for assertions
    def calls(self, stage: str | None = None) -> list[dict[str, Any]]:
        found = [_read_json(d / "status.json") | {"id": d.name} for d in (self.root / "calls").iterdir()]
        return sorted((c for c in found if stage is None or c["stage"] == stage), key=lambda c: c["spawned_at"])

    def sandboxes(self) -> list[dict[str, Any]]:
        return [_read_json(p) for p in (self.root / "sandboxes").glob("*.json")]


class StandInFunction:
    """modal.Function: `with_options` returns a new handle whose calls run with the options asked for (recorded in
    each call's status: gpu, cpu, memory); unset options keep the deployed function's, as on Modal."""

    def __init__(self, modal: StandInModal, stage: str, gpu: str | None = None,
                 options: dict[str, Any] | None = None) -> None:
        self.modal, self.stage, self.gpu = modal, stage, gpu
        self.options = options or {}

    def with_options(self, gpu: str | None = None, cpu: float | None = None, memory: int | None = None,
                     **others: Any) -> StandInFunction:
        import inspect

        import modal

        # Modal's own signature: an option it does not know is a TypeError here as there.
        inspect.signature(modal.Function.with_options).bind(None, gpu=gpu, cpu=cpu, memory=memory, **others)
        asked = {name: value for name, value in (("cpu", cpu), ("memory", memory)) if value is not None}
        return StandInFunction(self.modal, self.stage, gpu or self.gpu, {**self.options, **asked})

    def spawn(self, payload: dict[str, Any]) -> StandInCall:
        from modal_jobs.app import STAGE_SPECS

        call_id = f"fc-{uuid.uuid4().hex[:12]}"
        folder = self.modal.root / "calls" / call_id
        folder.mkdir()
        (folder / "request.json").write_text(json.dumps(payload))
        retries = STAGE_SPECS[self.stage].retries
        status = {"stage": self.stage, "gpu": self.gpu, **self.options, "state": "running", "spawned_at": time.time(),
                  "max_retries": retries.max_retries if retries else 0, "attempts": 0}
        _write_json(folder / "status.json", status)
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "tests.modal_standin", "supervise", str(self.modal.root), call_id],
            cwd=REPO, start_new_session=True, stdout=open(folder / "log.txt", "ab"), stderr=subprocess.STDOUT,
        )
        _write_json(folder / "status.json", {**status, "supervisor_pid": supervisor.pid})
        return StandInCall(self.modal, call_id)


class StandInCall:
    def __init__(self, modal: StandInModal, call_id: str) -> None:
        self.modal, self.object_id = modal, call_id
        self.folder = modal.root / "calls" / call_id

    def status(self) -> dict[str, Any]:
        return _read_json(self.folder / "status.json", {})

    def get(self, timeout: float | None = None) -> Any:
        import modal.exception

        if self.modal._take_fault():
            raise modal.exception.ConnectionError("stand-in: lost the connection to Modal's API")
        deadline = time.monotonic() + (timeout or 0)
        while True:
            status = self.status()
            if status["state"] == "cancelled":
                raise modal.exception.RemoteError("Function call was cancelled")  # what Modal gives for TERMINATED
            if status["state"] == "done":
                outcome = _read_json(self.folder / "outcome.json")
                if outcome["kind"] == "return":
                    return outcome["value"]
                raise pickle.loads(base64.b64decode(outcome["pickled"]))
            if time.monotonic() >= deadline:
                raise modal.exception.TimeoutError("stand-in: the call is still running")
            time.sleep(0.1)

    def cancel(self, terminate_containers: bool = False) -> None:
        status = self.status()
        if status.get("state") != "running":
            return
        _write_json(self.folder / "status.json", {**status, "state": "cancelled"})
        try:
            os.killpg(status["supervisor_pid"], signal.SIGKILL)
        except (ProcessLookupError, KeyError):
            pass

    def get_call_graph(self) -> list[Any]:
        from modal.call_graph import InputInfo, InputStatus

        state = self.status().get("state")
        status = {"cancelled": InputStatus.TERMINATED, "done": InputStatus.SUCCESS}.get(state, InputStatus.PENDING)
        return [InputInfo("in-0", self.object_id, "ta-0", status, self.status().get("stage", ""), "app", [])]

    def container_pid(self) -> int | None:
        pid_file = self.folder / "container.pid"
        return int(pid_file.read_text()) if pid_file.exists() else None


# --- sandboxes --------------------------------------------------------------------------------------------------


class _Tunnel:
    def __init__(self, url: str) -> None:
        self.url = url


class StandInSandbox:
    """modal.Sandbox: `create` runs the command's stand-in as a process group of its own; named per app."""

    ROOT: Path | None = None  # set in a container by _install

    def __init__(self, root: Path, record: dict[str, Any]) -> None:
        self.root, self.record, self.object_id = root, record, record["id"]

    @classmethod
    def _path(cls, root: Path, sandbox_id: str) -> Path:
        return root / "sandboxes" / f"{sandbox_id}.json"

    @classmethod
    def create(cls, *argv: str, name: str | None = None, encrypted_ports: Any = (), **options: Any) -> StandInSandbox:
        root = cls.ROOT
        sandbox_id = f"sb-{uuid.uuid4().hex[:12]}"
        log = open(root / "sandboxes" / f"{sandbox_id}.log", "ab")
        process = subprocess.Popen([sys.executable, "-m", "tests.modal_standin", "vllm", str(root), sandbox_id,
                                    json.dumps(list(argv))], cwd=REPO, start_new_session=True, stdout=log,
                                   stderr=subprocess.STDOUT)
        record = {"id": sandbox_id, "name": name, "argv": list(argv), "pid": process.pid, "state": "running",
                  "options": {k: v for k, v in options.items() if k in ("gpu", "timeout", "idle_timeout", "cpu",
                                                                         "memory")}}
        _write_json(cls._path(root, sandbox_id), record)
        return cls(root, record)

    @classmethod
    def from_name(cls, app_name: str, name: str) -> StandInSandbox:
        import modal.exception

        for path in (cls.ROOT / "sandboxes").glob("*.json"):
            record = _read_json(path)
            if record.get("name") == name and record["state"] == "running" and _alive(record["pid"]):
                return cls(cls.ROOT, record)
        raise modal.exception.NotFoundError(f"no running sandbox named {name}")

    @classmethod
    def from_id(cls, sandbox_id: str, root: Path | None = None) -> StandInSandbox:
        root = root or cls.ROOT
        return cls(root, _read_json(cls._path(root, sandbox_id)))

    def tunnels(self, timeout: int = 50) -> dict[int, _Tunnel]:
        deadline = time.monotonic() + timeout
        while "port" not in self.record:
            if time.monotonic() > deadline:
                raise TimeoutError("stand-in: the sandbox opened no port")
            time.sleep(0.1)
            self.record = _read_json(self._path(self.root, self.object_id))
        return {8000: _Tunnel(f"http://127.0.0.1:{self.record['port']}")}

    def poll(self) -> int | None:
        return None if _alive(self.record["pid"]) else 1

    def terminate(self) -> None:
        try:
            os.killpg(self.record["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while _alive(self.record["pid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            os.killpg(self.record["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
        record = _read_json(self._path(self.root, self.object_id))
        _write_json(self._path(self.root, self.object_id), {**record, "state": "terminated"})


def _vllm_stand_in(root: Path, sandbox_id: str, argv: list[str]) -> None:
    """What the Sandbox runs instead of `vllm serve`: a real `transformers serve` on the same model, behind a proxy
    that answers under the served model name (transformers serve answers only to the model's path)."""
    from modal_jobs.config import ServeConfig
    from modal_jobs.schemas import ServeRequest
    from modal_jobs.serve import serve, stop_server

    options = dict(zip(argv[3::2], argv[4::2]))
    model_path = (root / "volume" / Path(argv[2]).relative_to("/data")).as_posix()
    served_name = options["--served-model-name"]
    backend = serve(ServeRequest(serve=ServeConfig(backend="transformers"), model_dir=model_path))
    signal.signal(signal.SIGTERM, lambda *_: (stop_server(backend.pid), os._exit(0)))

    class Proxy(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/v1/models":
                self._answer(200, json.dumps({"object": "list", "data": [{"id": served_name}]}).encode())
            else:
                self._answer(200 if self.path == "/health" else 404, b"{}")

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body.get("model") != served_name:
                self._answer(404, json.dumps({"error": f"model {body.get('model')} is not served"}).encode())
                return
            body["model"] = backend.model_name
            request = urllib.request.Request(backend.base_url.removesuffix("/v1") + self.path,
                                             data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=600) as response:
                    answer = json.loads(response.read())
            except urllib.error.HTTPError as error:
                self._answer(error.code, error.read())
                return
            answer["model"] = served_name
            self._answer(200, json.dumps(answer).encode())

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    record = _read_json(StandInSandbox._path(root, sandbox_id))
    _write_json(StandInSandbox._path(root, sandbox_id), {**record, "port": server.server_address[1]})
    server.serve_forever()


# --- the container side -----------------------------------------------------------------------------------------


def _install(root: Path) -> Any:
    """Make this process a container of the app: the Volume mounted, Sandboxes stood in for."""
    import modal

    import modal_jobs.app as app

    app.volume = FolderVolume(root)
    app._in_container = lambda: True
    StandInSandbox.ROOT = root
    modal.Sandbox = StandInSandbox
    modal.App.lookup = staticmethod(lambda *args, **kwargs: None)
    modal.Secret.from_dict = staticmethod(lambda values: ("secret", sorted(values)))
    return app


def _container(root: Path, call_id: str) -> int:
    folder = root / "calls" / call_id
    (folder / "container.pid").write_text(str(os.getpid()))
    app = _install(root)
    status = _read_json(folder / "status.json")
    request = json.loads((folder / "request.json").read_text())
    try:
        value = getattr(app, status["stage"])._raw_f_(request)
    except BaseException as error:  # the remote exception, re-raised with its type by `get`
        try:
            pickled = pickle.dumps(error)
        except Exception:
            import modal.exception

            pickled = pickle.dumps(modal.exception.ExecutionError(f"{type(error).__name__}: {error}"))
        _write_json(folder / "raised.json", {"kind": "raise", "pickled": base64.b64encode(pickled).decode(),
                                             "type": type(error).__name__, "message": str(error)})
        return 1
    _write_json(folder / "returned.json", {"kind": "return", "value": value})
    return 0


def _supervise(root: Path, call_id: str) -> int:
    """Modal's scheduler for one call: containers until one returns, or the retries are spent."""
    folder = root / "calls" / call_id
    env = dict(os.environ, VLMPIPE_HOME=str(root / "volume"), HF_HOME=str(root / "volume" / "hf-cache"),
               PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    status = _read_json(folder / "status.json")
    time.sleep(_read_json(root / "faults.json", {}).get("container_start_delay_s", 0))
    for attempt in range(status["max_retries"] + 1):
        for name in ("returned.json", "raised.json"):
            (folder / name).unlink(missing_ok=True)
        _write_json(folder / "status.json", {**_read_json(folder / "status.json"), "attempts": attempt + 1})
        code = subprocess.call([sys.executable, "-m", "tests.modal_standin", "container", str(root), call_id],
                               cwd=REPO, env=env)
        outcome = _read_json(folder / "returned.json")
        if outcome is not None:
            break
        outcome = _read_json(folder / "raised.json") or {
            "kind": "raise", "pickled": base64.b64encode(pickle.dumps(__import__("modal").exception.InternalFailure(
                f"container exited with code {code}"))).decode()}
        print(f"stand-in: attempt {attempt + 1} of {call_id} failed (exit {code})", flush=True)
    _write_json(folder / "outcome.json", outcome)
    current = _read_json(folder / "status.json")
    if current["state"] == "running":
        _write_json(folder / "status.json", {**current, "state": "done"})
    return 0


if __name__ == "__main__":
    command, root = sys.argv[1], Path(sys.argv[2])
    if command == "supervise":
        sys.exit(_supervise(root, sys.argv[3]))
    if command == "container":
        sys.exit(_container(root, sys.argv[3]))
    if command == "vllm":
        _vllm_stand_in(root, sys.argv[3], json.loads(sys.argv[4]))
