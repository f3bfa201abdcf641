"""A taken serve.port: refused at once naming its holder; a server that is not ours is never reported as ours.

Run as: python -m pytest tests/test_serve_port.py -q   (~20 s on 2 CPU cores: one real `transformers serve` start)
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from modal_jobs.config import ServeConfig, TinyModelConfig
from modal_jobs.errors import InputError
from modal_jobs.schemas import ServeRequest
from modal_jobs.serve import _free_port, serve, stop_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180, method="thread")]


@pytest.fixture(scope="module")
def model_dir(module_home: Path) -> str:
    from modal_jobs.tiny_model import build_tiny_gemma3

    build_tiny_gemma3(module_home / "models" / "tiny", TinyModelConfig())
    return "models/tiny"


class _Healthy(BaseHTTPRequestHandler):
    """Any other web service on the port: answers /health 200 (and everything else 404)."""

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args: object) -> None:
        pass


def _http_server(port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", port), _Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _servers_on(port: int) -> list[int]:
    """Live processes started to serve on `port` (whoever started them: the check must not depend on what else
    the test process has running, such as a compile worker pool or a Prefect API server started by earlier tests)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        argv = process.info["cmdline"] or []
        if process.info["status"] != psutil.STATUS_ZOMBIE and "serve" in argv and f"{port}" in argv:
            found.append(process.pid)
    return found


def _request(model_dir: str, port: int) -> ServeRequest:
    return ServeRequest(serve=ServeConfig(backend="transformers", port=port, startup_timeout_s=60), model_dir=model_dir)


@pytest.fixture
def port() -> Iterator[int]:
    yield _free_port("127.0.0.1")


def test_a_port_held_by_a_plain_socket_fails_at_once_naming_the_port_and_the_holder(model_dir, port, module_home):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        start = time.monotonic()
        with pytest.raises(InputError) as raised:
            serve(_request(model_dir, port))
    assert time.monotonic() - start < 5  # no server start, no retries
    assert f"serve.port {port}" in str(raised.value) and f"pid {os.getpid()}" in str(raised.value)
    assert not (module_home / "logs" / f"serve-{port}.log").exists(), "a server was started"


def test_a_port_held_by_a_healthy_web_server_is_refused_not_taken_for_ours(model_dir, port, module_home):
    other = _http_server(port)
    try:
        with pytest.raises(InputError, match=f"serve.port {port} on 127.0.0.1 is already in use by pid {os.getpid()}"):
            serve(_request(model_dir, port))
    finally:
        other.shutdown()
        other.server_close()
    assert not (module_home / "logs" / f"serve-{port}.log").exists(), "a server was started"


def test_a_port_taken_after_the_check_is_not_reported_as_our_server(model_dir, port, module_home):
    """Free when checked, taken by another web server before ours binds: /health says 200, but not from ours."""
    log = module_home / "logs" / f"serve-{port}.log"
    log.unlink(missing_ok=True)
    taken: list[ThreadingHTTPServer] = []

    def take_the_port_once_the_server_is_starting() -> None:
        deadline = time.monotonic() + 60
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        taken.append(_http_server(port))  # `transformers serve` takes seconds to import before it binds

    thief = threading.Thread(target=take_the_port_once_the_server_is_starting, daemon=True)
    thief.start()
    try:
        with pytest.raises(InputError, match=f"port {port} was taken by pid {os.getpid()}"):
            result = serve(_request(model_dir, port))
            stop_server(result.pid)
    finally:
        thief.join(60)
        for server in taken:
            server.shutdown()
            server.server_close()
    assert taken, "the test's server never took the port"
    assert log.exists(), "our server was never started"
    assert _servers_on(port) == [], "the server that lost the port was left running"
