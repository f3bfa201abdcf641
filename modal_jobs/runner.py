"""Run one stage's job in this process: what the local executor starts as a subprocess.

Run as: python -m modal_jobs.runner STAGE REQUEST.json RESULT.json

The result is written atomically; on failure the error (type, message) goes to RESULT.json instead, so
the caller can tell bad input (never retried) from a transient failure.
"""

from __future__ import annotations

import json
import shutil
import sys
import traceback
from pathlib import Path

from modal_jobs.errors import disk_full
from modal_jobs.jobs import run_job
from modal_jobs.storage import atomic_write_json, storage_root


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    stage, request_path, result_path = argv
    request = json.loads(Path(request_path).read_text())
    try:
        result = run_job(stage, request)
    except Exception as error:  # reported to the parent, which re-raises it with its type
        traceback.print_exc()
        error_type, message = type(error).__name__, str(error)
        if disk_full(error):
            free = shutil.disk_usage(storage_root()).free if storage_root().exists() else 0
            error_type = "StorageFullError"
            message = (f"no space left on the storage root {storage_root()} ({free / 1e6:.1f} MB free) while "
                       f"running {stage}: free some space or set VLMPIPE_HOME to a larger disk")
        atomic_write_json(Path(result_path).absolute(), {"ok": False, "error_type": error_type, "message": message})
        return 1
    atomic_write_json(Path(result_path).absolute(), {"ok": True, "result": result.model_dump(mode="json")})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
