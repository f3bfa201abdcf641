"""Resolve the Modal images' lock files (modal_jobs/locks/<image>.txt) from their inputs (<image>.in) with uv.

Run as: python -m scripts.lock_images                 every image
        python -m scripts.lock_images gpu vllm        some of them
        python -m scripts.lock_images --upgrade       let unpinned requirements move to their newest versions

Needs uv (`pip install uv`) and PyPI. Each lock is resolved for its image's Python and platform (the constants
IMAGE_PYTHON and LOCK_PLATFORM in modal_jobs/app.py), not for this machine, so it can run anywhere. Without
--upgrade, versions already in a lock are kept unless an input asks for another one, so re-running after
editing one line of an .in file changes only what that line needs.

After a change, run `python -m pytest tests/test_modal_images.py`: it checks that every lock satisfies its
inputs and that every module each Modal function imports is in its image's lock.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

RUN_AS = "python -m scripts.lock_images"
REPO = Path(__file__).resolve().parent.parent


def uv_executable() -> str:
    found = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if not Path(found).exists():
        raise SystemExit("uv is not installed: `pip install uv` (in the project's virtual environment), then retry")
    return found


def compile_command(image: str, upgrade: bool) -> list[str]:
    from modal_jobs.app import IMAGE_PYTHON, LOCK_PLATFORM, lock_path

    # Relative paths, run from the repository root: the lock's "# via -r ..." lines then read the same anywhere.
    lock = Path(lock_path(image)).relative_to(REPO)
    command = [
        uv_executable(), "pip", "compile", str(lock.with_suffix(".in")), "--output-file", str(lock),
        "--python-version", IMAGE_PYTHON[image], "--python-platform", LOCK_PLATFORM,
        "--index-url", "https://pypi.org/simple",  # never a mirror from this machine's pip.conf or uv.toml
        "--no-config",
        "--custom-compile-command", f"{RUN_AS} {image}",
        "--quiet",
    ]
    if upgrade:
        command.append("--upgrade")
    return command


def main(argv: list[str]) -> int:
    from modal_jobs.app import IMAGE_PYTHON

    parser = argparse.ArgumentParser(prog=RUN_AS, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("images", nargs="*", help=f"images to lock (default: all of {', '.join(IMAGE_PYTHON)})")
    parser.add_argument("--upgrade", action="store_true", help="re-resolve unpinned requirements to their newest")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.images) - set(IMAGE_PYTHON))
    if unknown:
        parser.error(f"unknown image(s) {', '.join(unknown)}; the images are {', '.join(IMAGE_PYTHON)}")
    for image in args.images or list(IMAGE_PYTHON):
        command = compile_command(image, args.upgrade)
        print(f"locking {image} (Python {IMAGE_PYTHON[image]}) ...", file=sys.stderr)
        done = subprocess.run(command, cwd=REPO)
        if done.returncode != 0:
            print(f"could not resolve the {image} image: see uv's message above", file=sys.stderr)
            return done.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
