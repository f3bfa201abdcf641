"""Run one stage's job in this process: what the local executor starts as a subprocess.

Run as: python -m modal_jobs.runner STAGE REQUEST.json RESULT.json

The result is written atomically; on failure the error (type, message) goes to RESULT.json instead, so
the caller can tell bad input (never retried) from a transient failure.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from modal_jobs.jobs import run_job
from modal_jobs.storage import atomic_write_json


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
        atomic_write_json(
            Path(result_path).absolute(),
            {"ok": False, "error_type": type(error).__name__, "message": str(error)},
        )
        return 1
    atomic_write_json(Path(result_path).absolute(), {"ok": True, "result": result.model_dump(mode="json")})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
