"""A PREFECT_HOME whose Prefect database is already migrated, for tests that start `vlmpipe` in a new home.

The first `vlmpipe run` in an empty PREFECT_HOME creates and migrates Prefect's SQLite database: on the 2-core CI
machine the same failing run took 19.0 s in a new home and 11.1 s in one holding a migrated copy (2026-12-02).
Tests that start `vlmpipe` in a new home each time get a copy of one database, migrated once per test session by
Prefect's own CLI (`prefect server database upgrade`). What they test does not depend on the database being new.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

_LOCK = threading.Lock()  # the background whole runs ask from their own thread
_MIGRATED: list[Path] = []


def _migrated_database() -> Path:
    with _LOCK:
        if not _MIGRATED:
            folder = Path(tempfile.mkdtemp(prefix="vlmpipe-prefect-template-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            env = {**os.environ, "PREFECT_HOME": str(folder), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
            env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)  # the default: prefect.db in PREFECT_HOME
            prefect = Path(sys.executable).parent / "prefect"
            completed = subprocess.run([str(prefect), "server", "database", "upgrade", "-y"], env=env,
                                       capture_output=True, text=True, timeout=300, check=False)
            assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
            _MIGRATED.append(folder / "prefect.db")
        return _MIGRATED[0]


def fresh_prefect_home(path: Path) -> Path:
    """`path`, holding a copy of the migrated database unless it has a database already (a later run in the same
    home keeps what the earlier ones wrote)."""
    if not (path / "prefect.db").exists():
        path.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_migrated_database(), path / "prefect.db")
    return path
