"""Whole `vlmpipe` runs for the tests, started early in a background thread, and what they share.

A fixture made with `@whole_run` is a function of a fresh folder (and of other session fixtures) that only starts
processes and reads files: its own storage root, its own Prefect home, nothing that a test before it changes. As the
first test sets up, the session starts every such fixture that the selected tests use, one at a time, in the order
the tests first need them; the fixture then waits only for what is not done yet. The unit tests keep about one core
busy, a whole run in its subprocesses the other (CI has two): the slow set-ups overlap the fast tests instead of
following them. A fixture that nothing started (its test asked for it by name at run time) runs where it is asked.

A function that fails fails every test that uses it, with its own message, as any fixture would.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.prefect_homes import fresh_prefect_home

# The environment as the session began: a run in the background must not inherit what the test running at that
# moment has monkeypatched (a storage root, HOME, a deleted token). One thread a process: a whole run shares the
# two cores with the tests around it, and torch's second thread, spinning at every barrier, takes more of theirs
# than it gives (the embedded default: same metrics, same wall time, 13% less CPU). And the ephemeral API's 20 s
# start-up budget is not always enough on a machine shared with other test runs.
ENVIRON = {"OMP_NUM_THREADS": "1", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", **os.environ}
# Background runs yield the CPU to the tests in the foreground (whose own timings matter, Ctrl-C's for one).
BACKGROUND_NICENESS = 10

# A token value that no file a run writes may contain (tokens reach jobs through the environment only).
CANARY = "hf_canary_5f0c2d9e7b"

_FUNCTIONS: dict[str, Callable[..., Any]] = {}


def whole_run(function: Callable[..., Any]):
    """A session fixture named after `function(root, **session_fixtures)`, computed in the background."""
    name = function.__name__
    _FUNCTIONS[name] = function

    @pytest.fixture(scope="session", name=name)
    def fixture(request, tmp_path_factory):
        return BACKGROUND.result(name, request, tmp_path_factory)

    fixture.__doc__ = function.__doc__
    return fixture


def reads_a_whole_run(item: pytest.Item) -> bool:
    return any(name in _FUNCTIONS for name in getattr(item, "fixturenames", ()))


class _Background:
    def __init__(self) -> None:
        self._futures: dict[str, Future] = {}
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def start(self, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
        needed: list[str] = []
        for item in filter(reads_a_whole_run, request.session.items):
            needed += [name for name in item.fixturenames if name in _FUNCTIONS and name not in needed]
        if not needed:
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="whole-runs")
        for name in needed:
            try:
                call = self._bound(name, request, tmp_path_factory)
            except Exception as error:  # noqa: BLE001 - a fixture it needs failed: the tests that wait for it fail
                call = partial(_reraise, error)
            self._futures[name] = pool.submit(call)
        # Its thread ends once the list is done: a process with a second thread renders images serially.
        pool.shutdown(wait=False)

    def _bound(self, name: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
        # Folders and other fixtures are made here, in the main thread; the thread only runs the function.
        function = _FUNCTIONS[name]
        fixtures = {p: request.getfixturevalue(p) for p in list(inspect.signature(function).parameters)[1:]}
        return partial(function, tmp_path_factory.mktemp(name), **fixtures)

    def result(self, name: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
        future = self._futures.get(name)
        if future is None:
            return self._bound(name, request, tmp_path_factory)()
        return future.result()

    def run(self, args: list[str], timeout: float, **popen: Any) -> subprocess.CompletedProcess:
        with self._lock:
            if self._stopping:
                raise RuntimeError("the test session is ending: no new run")
            process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
            self._running.add(process)
        if threading.current_thread() is not threading.main_thread():
            # Before it starts anything (its children inherit it): importing Python's packages takes far longer.
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, process.pid, BACKGROUND_NICENESS)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException:
            process.kill()
            process.communicate()
            raise
        finally:
            with self._lock:
                self._running.discard(process)
        return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)

    def stop(self) -> None:
        """At the session's end (early too: -x, Ctrl-C): what has not started never starts, what runs is killed."""
        with self._lock:
            self._stopping = True
            for process in self._running:
                process.kill()
        for future in self._futures.values():
            future.cancel()


def _reraise(error: BaseException) -> None:
    raise error


BACKGROUND = _Background()


def run(args: list[str], timeout: float, **popen: Any) -> subprocess.CompletedProcess:
    """`subprocess.run(args, capture_output=True, text=True, timeout=...)`, killed if the session ends first."""
    return BACKGROUND.run(args, timeout, **popen)


# --- `vlmpipe run` and what the tests read from it ---------------------------------------------------------------


def vlmpipe_run(home: Path, prefect_home: Path, *args: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    """`vlmpipe run --json ARGS` in a new process with its own ephemeral Prefect API, as a user would run it:
    its JSON summary and its stderr. It must succeed, and print no token."""
    env = {**ENVIRON, "VLMPIPE_HOME": str(home), "PREFECT_HOME": str(fresh_prefect_home(prefect_home)),
           "HF_HUB_OFFLINE": "1",
           **(env or {})}
    completed = run([sys.executable, "-m", "flows.cli", "run", "--json", *args], env=env, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert CANARY not in completed.stdout + completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed.stderr


def states(result: dict) -> dict[str, str]:
    return {name: stage["state"] for name, stage in result["stages"].items()}


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every path under a folder, folders included, with its bytes: what 'unchanged' means for a source."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else b"<dir>") for p in folder.rglob("*")}


def damaged_outputs(home: Path) -> list[str]:
    """Finished folders whose files, hashed afresh (no memo), differ from what their manifest recorded."""
    from modal_jobs.storage import MANIFEST_NAME, fingerprint_path, read_manifest

    return [
        str(manifest.parent.relative_to(home))
        for manifest in sorted(home.rglob(MANIFEST_NAME))
        if fingerprint_path(manifest.parent, memo=False) != read_manifest(manifest.parent)["content_fingerprint"]
    ]


def identical_runs(root: Path, args: list[str], sources: list[Path], first_env: dict[str, str] | None = None) -> dict:
    """Two identical `vlmpipe run`s on one storage root, with what the sources, outputs and logs looked like around
    them: the tests of the first run, of the cache and of read-only sources read this."""
    home, prefect_home = root / "home", root / "prefect"
    before = {source: snapshot(source) for source in sources}
    first, _ = vlmpipe_run(home, prefect_home, *args, env=first_env)
    after_first = {
        "sources": {source: snapshot(source) for source in sources},
        "damaged": damaged_outputs(home),
        "logs": sorted((home / "logs").iterdir()),
        # Checked at once: a later run rewrites some of these files.
        "files_with_the_canary": files_containing(home, CANARY.encode()) + files_containing(prefect_home,
                                                                                             CANARY.encode()),
    }
    second, _ = vlmpipe_run(home, prefect_home, *args)
    after_second = {"sources": {source: snapshot(source) for source in sources}, "damaged": damaged_outputs(home),
                    "logs": sorted((home / "logs").iterdir())}
    return {"home": home, "prefect_home": prefect_home, "args": args, "sources": sources, "before": before,
            "first": first, "after_first": after_first, "second": second, "after_second": after_second}
