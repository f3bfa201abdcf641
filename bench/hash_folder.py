"""How fast is a model folder fingerprinted: first time (every byte read) and again (memo on size and mtime).

Run as: python -m bench.hash_folder [--gib 8] [--dir /tmp/hash-bench]

Writes a folder of safetensors-sized files (4 files), hashes it twice with modal_jobs.storage.fingerprint_path
and prints GB/s and milliseconds. Drops the page cache first when it may (root on Linux), so the first pass
reads from disk; says which it measured.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=8.0)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "hash-bench")
    args = parser.parse_args()
    os.environ.setdefault("VLMPIPE_HOME", str(args.dir / "home"))
    from modal_jobs.storage import fingerprint_path

    folder = args.dir / "model"
    shutil.rmtree(args.dir, ignore_errors=True)
    folder.mkdir(parents=True)
    block = os.urandom(64 * 1024 * 1024)
    per_file = int(args.gib * 1024**3 / 4)
    for index in range(4):
        with open(folder / f"model-{index:05d}-of-00004.safetensors", "wb") as handle:
            for _ in range(per_file // len(block)):
                handle.write(block)
    total = sum(p.stat().st_size for p in folder.iterdir())
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        source = "disk (page cache dropped)"
    except OSError:
        source = "page cache (could not drop it)"
    started = time.perf_counter()
    first = fingerprint_path(folder)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    second = fingerprint_path(folder)
    warm = time.perf_counter() - started
    assert first == second
    print(f"{total / 1e9:.2f} GB, {os.cpu_count()} cores, first pass from {source}: {cold:.2f} s "
          f"({total / 1e9 / cold:.2f} GB/s); unchanged, memoised: {warm * 1000:.1f} ms")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
