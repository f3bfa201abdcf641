"""Stage locks that a killed run cannot leave behind, and that a waiter can see.

Two runs with the same stage key take turns: one computes, the other waits and reuses the result (Prefect's
SERIALIZABLE cache isolation). Prefect's FileSystemLockManager writes `{"holder": <uuid>, "expiration": null}`:
a run killed while holding it (kill -9, an OOM kill, a container stop) leaves a lock that every later run of
that config waits on, silently and forever. Here a lock file also says who holds it:

    {"holder": <Prefect's holder id>, "pid": 4242, "host": "box", "pidns": "pid:[4026531836]",
     "started": <the holder process's start time>, "acquired_at": ..., "expiration": ..., "stage": "train"}

and a waiter judges it:
- on this host (same host name and pid namespace): dead when the pid is gone, a zombie, or now belongs to a
  process that started at another time (a recycled pid). The kernel knows; no clock or heartbeat is involved.
- from another host (a storage root on a shared file system): dead when `expiration` has passed. The holder
  refreshes it every HEARTBEAT_S while it lives, so a holder that is gone stops renewing it within TTL_S.
- written without a pid (by a vlmpipe from before this module): dead. Only the old, buggy lock manager wrote
  those, and its holder cannot be checked; waiting on it is what hung runs forever.

A dead holder's lock is taken over at once, with a warning that names it. A waiter logs what it waits for
every LOG_EVERY_S and gives up after VLMPIPE_LOCK_WAIT_S seconds (default 24 h: a live holder may be training
for hours) with LockWaitTimeout, which names the lock file and how to clear it.

Run as: used by flows/pipeline.py::_stage_task; `python -m pytest tests/test_locks.py` tries it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from prefect.locking.filesystem import FileSystemLockManager

from modal_jobs.errors import InputError

WAIT_ENV = "VLMPIPE_LOCK_WAIT_S"
DEFAULT_WAIT_S = 24 * 3600.0
LOG_EVERY_S = 30.0
HEARTBEAT_S = 30.0
# Ten missed heartbeats: generous for clock skew between hosts and for a holder paused by a busy machine.
TTL_S = 300.0
_POLL_S = 0.2
# A lock file that never becomes valid JSON (a writer killed between creating and filling it) is dead after this.
_UNREADABLE_GRACE_S = 10.0
# Process start times are compared with a tolerance: they are derived from the boot time, which a clock step moves.
_START_TOLERANCE_S = 1.0


class LockWaitTimeout(InputError):
    """A live holder kept a stage's lock past the waiting bound; waiting again would not help, so no retry."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _process_started(pid: int) -> float | None:
    """When `pid` started (epoch seconds); None when there is no such live process (or only its zombie)."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        return math.nan  # alive, but not ours to inspect: never judged dead on that ground


def _pid_namespace() -> str | None:
    # Two containers may share a host name and a storage root but not their pids.
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _this_process() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "pidns": _pid_namespace(),
            "started": _process_started(os.getpid())}


def dead_reason(info: dict[str, Any]) -> str | None:
    """Why the holder recorded in a lock file is gone, or None while it may still be working."""
    pid, host = info.get("pid"), info.get("host")
    if pid is None:
        return "it does not record its holder's process (written by a vlmpipe from before holders were recorded)"
    me = _this_process()
    if host == me["host"] and info.get("pidns") == me["pidns"]:
        if pid == me["pid"]:
            return None
        started = _process_started(pid)
        if started is None:
            return f"its holder, pid {pid} on {host}, is gone"
        if not math.isnan(started) and info.get("started") is not None and (
            abs(started - info["started"]) > _START_TOLERANCE_S
        ):
            return f"pid {pid} on {host} is now another process (started {started:.0f}, the holder {info['started']:.0f})"
        return None
    expiration = info.get("expiration")
    if expiration is not None and datetime.fromisoformat(expiration) < _now():
        return f"its holder on {host} (pid {pid}) stopped renewing it; it expired at {expiration}"
    return None


def _describe(info: dict[str, Any]) -> str:
    if info.get("pid") is None:
        return f"holder {info.get('holder')} (process not recorded)"
    return f"pid {info['pid']} on {info.get('host')} since {info.get('acquired_at')}"


def _read(path: Path) -> dict[str, Any] | None:
    """The lock file's record; None if there is none; {} while it is not (yet) valid JSON."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _write_new(path: Path, info: dict[str, Any]) -> bool:
    """Create `path` holding `info` in one step (readers never see it half written); False if it exists."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(info))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        pass  # a file system without hard links: create-exclusive, then fill (readers allow for the gap)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as handle:
        handle.write(json.dumps(info))
    return True


def _replace(path: Path, info: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


@contextlib.contextmanager
def _guard(directory: Path) -> Iterator[None]:
    """Serialises take-over, renewal and release in one lock directory (each lasts milliseconds).

    An flock dies with its process, so the guard itself can never be left behind."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): two waiters taking over the same dead lock at once is the risk
        yield
        return
    with open(directory / ".guard", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:  # outside a flow or task run
        return logging.getLogger("vlmpipe.locks")


# Locks held by this process (path -> Prefect holder id), renewed by one heartbeat thread while it lives.
_HELD: dict[Path, str] = {}
_HELD_LOCK = threading.Lock()
_heartbeat: threading.Thread | None = None


def renew_held_locks() -> None:
    """Push the expiration of every lock this process holds TTL_S into the future (the heartbeat's beat)."""
    with _HELD_LOCK:
        held = dict(_HELD)
    for path, holder in held.items():
        with _guard(path.parent):
            info = _read(path)
            if info and info.get("holder") == holder:
                info["expiration"] = (_now() + timedelta(seconds=TTL_S)).isoformat()
                _replace(path, info)
                continue
        with _HELD_LOCK:
            still_held = _HELD.pop(path, None) is not None  # not merely released since the copy above
        if still_held:
            _logger().warning("lock %s was taken over while this process held it (its heartbeat was late)", path)


def _beat() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        try:
            renew_held_locks()
        except Exception:  # a full disk for a moment must not stop the heartbeat for good
            logging.getLogger("vlmpipe.locks").exception("renewing stage locks failed")


def _start_heartbeat() -> None:
    global _heartbeat
    with _HELD_LOCK:
        if _heartbeat is None or not _heartbeat.is_alive():
            _heartbeat = threading.Thread(target=_beat, name="vlmpipe-lock-heartbeat", daemon=True)
            _heartbeat.start()


class StageLockManager(FileSystemLockManager):
    """Prefect's lock protocol on files that record their holder; see the module docstring.

    `on_acquired(key)` runs once the lock is held, before Prefect looks for a cached result: what must be
    decided under the lock (is a cache record still backed by its output?) is decided there.
    """

    def __init__(
        self,
        lock_files_directory: Path,
        stage: str | None = None,
        wait_timeout_s: float | None = None,
        on_acquired: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(lock_files_directory)
        self.stage = stage
        self.wait_timeout_s = (
            wait_timeout_s if wait_timeout_s is not None else float(os.environ.get(WAIT_ENV) or DEFAULT_WAIT_S)
        )
        self.on_acquired = on_acquired

    def _lock_path_for_key(self, key: str) -> Path:
        # The same name Prefect's manager uses, so that a lock it left behind is found (and judged) here.
        return self.lock_files_directory.joinpath(key).with_suffix(".lock")

    def _take_over_if_dead(self, path: Path, info: dict[str, Any]) -> bool:
        """Remove the lock if its holder is dead (True: look again). `info` is what the caller judged."""
        if info == {}:
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                return True
            if age < _UNREADABLE_GRACE_S:
                return False
            reason = f"it has held no readable record for {age:.0f} s"
        else:
            reason = dead_reason(info)
            if reason is None:
                return False
        with _guard(path.parent):
            if _read(path) != info:
                return True  # renewed, released or taken over meanwhile: judge it again
            path.unlink(missing_ok=True)
        _logger().warning("taking over stage lock %s: %s", path, reason)
        return True

    def _wait(self, key: str, bound: float, until_free: Callable[[], bool | dict[str, Any]]) -> bool:
        """Poll `until_free` (True: done; a dict: the live holder's record) up to `bound` seconds, saying why."""
        path = self._lock_path_for_key(key)
        started = time.monotonic()
        next_log = started
        while True:
            outcome = until_free()
            if outcome is True:
                return True
            holder = outcome if isinstance(outcome, dict) else {}
            waited = time.monotonic() - started
            if waited >= bound:
                return False
            if time.monotonic() >= next_log:
                _logger().info(
                    "waiting for the %s lock %s, held by %s (another run computing the same output); %.0f s so far, "
                    "giving up after %.0f s (%s)", self.stage or key, path, _describe(holder), waited, bound, WAIT_ENV,
                )
                next_log += LOG_EVERY_S
            time.sleep(_POLL_S)

    def _timeout_error(self, key: str, bound: float) -> LockWaitTimeout:
        path = self._lock_path_for_key(key)
        info = _read(path) or {}
        return LockWaitTimeout(
            f"gave up after {bound:.0f} s waiting for the {self.stage or key} lock {path}, held by {_describe(info)}. "
            f"If no vlmpipe run is computing this stage any more, delete {path} and run again; to wait longer, "
            f"set {WAIT_ENV} (seconds)."
        )

    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        if hold_timeout is not None:
            raise ValueError("StageLockManager renews its locks while the holder lives; hold_timeout is not supported")
        self._ensure_lock_files_directory_exists()
        path = self._lock_path_for_key(key)
        me = {"holder": holder, **_this_process(), "stage": self.stage}

        def try_once() -> bool | dict[str, Any]:
            while True:
                stamp = _now()
                record = {**me, "acquired_at": stamp.isoformat(),
                          "expiration": (stamp + timedelta(seconds=TTL_S)).isoformat()}
                if _write_new(path, record):
                    return True
                info = _read(path)
                if info is None:
                    continue  # released between the two calls
                if info.get("holder") == holder:
                    return True
                if not self._take_over_if_dead(path, info):
                    return info

        bound = acquire_timeout if acquire_timeout is not None else self.wait_timeout_s
        if not self._wait(key, bound, try_once):
            if acquire_timeout is not None:
                return False
            # Prefect ignores a False here and would run on unlocked: an error is the only way to stop.
            raise self._timeout_error(key, bound)
        with _HELD_LOCK:
            _HELD[path] = holder
        _start_heartbeat()
        if self.on_acquired is not None:
            try:
                self.on_acquired(key)
            except BaseException:
                self.release_lock(key, holder)
                raise
        return True

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        import anyio

        return await anyio.to_thread.run_sync(lambda: self.acquire_lock(key, holder, acquire_timeout, hold_timeout))

    def release_lock(self, key: str, holder: str) -> None:
        path = self._lock_path_for_key(key)
        with _HELD_LOCK:
            _HELD.pop(path, None)
        with _guard(path.parent):
            info = _read(path)
            if info and info.get("holder") == holder:
                path.unlink()
                return
        # Not an error: the work under the lock is done, and raising would fail a finished stage.
        _logger().warning("stage lock %s was no longer held by this run when it released it (taken over?)", path)

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        path = self._lock_path_for_key(key)
        while (info := _read(path)) is not None:
            if not self._take_over_if_dead(path, info):
                return True
        return False

    def is_lock_holder(self, key: str, holder: str) -> bool:
        info = _read(self._lock_path_for_key(key))
        return bool(info) and info.get("holder") == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        bound = timeout if timeout is not None else self.wait_timeout_s

        def free() -> bool | dict[str, Any]:
            return not self.is_locked(key) or (_read(self._lock_path_for_key(key)) or {})

        if self._wait(key, bound, free):
            return True
        if timeout is not None:
            return False
        raise self._timeout_error(key, bound)

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        import anyio

        return await anyio.to_thread.run_sync(lambda: self.wait_for_lock(key, timeout))
