"""Whole runs through the real CLI: sources given by the user are never written, finished folders never change
after their manifest, a second identical run is all cache hits, and a damaged output is recomputed, not served.

Run as: python -m pytest tests/test_sources_read_only.py -q   (5 pipeline runs: 9 minutes on 2 cores shared with
other test runs)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modal_jobs.storage import MANIFEST_NAME, fingerprint_path, read_manifest

pytestmark = pytest.mark.integration

# Short training and evaluation: these tests are about what is written where, not about what is learnt.
QUICK = ["--set", "train.max_steps=4", "--set", "evaluate.num_samples=4", "--set", "evaluate.max_tokens=8"]


def vlmpipe(home: Path, prefect_home: Path, *args: str) -> tuple[dict, str]:
    env = {**os.environ, "VLMPIPE_HOME": str(home), "PREFECT_HOME": str(prefect_home), "HF_HUB_OFFLINE": "1",
           # The machine is shared with other test runs: the ephemeral API's 20 s start-up budget is not always enough.
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    completed = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--json", *args], env=env,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed.stderr


def states(result: dict) -> dict[str, str]:
    return {name: stage["state"] for name, stage in result["stages"].items()}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every path under a folder, folders included, with its bytes: what 'unchanged' means for a source."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else b"<dir>") for p in folder.rglob("*")}


def damaged_outputs(home: Path) -> list[str]:
    """Finished folders whose files, hashed afresh (no memo), differ from what their manifest recorded."""
    return [
        str(manifest.parent.relative_to(home))
        for manifest in sorted(home.rglob(MANIFEST_NAME))
        if fingerprint_path(manifest.parent, memo=False) != read_manifest(manifest.parent)["content_fingerprint"]
    ]


def flip_byte_keeping_mtime(file: Path) -> None:
    stat = file.stat()
    with open(file, "r+b") as handle:
        handle.seek(stat.st_size // 2)
        byte = handle.read(1)
        handle.seek(stat.st_size // 2)
        handle.write(bytes([byte[0] ^ 0x01]))
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.fixture(scope="module", params=["embedded default", "save_to_disk folder and model folder"])
def runs(request, tmp_path_factory, tiny_dataset_dir, tiny_model_dir) -> dict:
    """Two identical runs (one per source kind), with what the sources and outputs looked like around them."""
    root = tmp_path_factory.mktemp("runs")
    home, prefect_home = root / "home", root / "prefect"
    args = list(QUICK)
    sources: list[Path] = []
    if request.param != "embedded default":
        dataset, model = root / "sources" / "dataset", root / "sources" / "model"
        shutil.copytree(tiny_dataset_dir, dataset)
        shutil.copytree(tiny_model_dir, model)
        sources = [dataset, model]
        args += ["--set", f"dataset.source={dataset}", "--set", f"model.source={model}"]
    before = {source: snapshot(source) for source in sources}
    first, _ = vlmpipe(home, prefect_home, *args)
    after_first = {source: snapshot(source) for source in sources}
    damaged_after_first = damaged_outputs(home)
    second, _ = vlmpipe(home, prefect_home, *args)
    return {
        "kind": request.param, "home": home, "prefect_home": prefect_home, "args": args, "first": first,
        "second": second, "sources": sources, "before": before, "after_first": after_first,
        "after_second": {source: snapshot(source) for source in sources},
        "damaged_after_first": damaged_after_first, "damaged_after_second": damaged_outputs(home),
    }


def test_first_run_completes(runs):
    assert all(state == "Completed" for state in states(runs["first"]).values()), states(runs["first"])


def test_sources_are_never_written(runs):
    for source in runs["sources"]:
        assert runs["after_first"][source] == runs["before"][source], source
        assert runs["after_second"][source] == runs["before"][source], source


def test_finished_folders_never_change_after_their_manifest(runs):
    # Before the fix: the train stage's `datasets` map left a cache-*.arrow in datasets/<key>/train/.
    assert len(list(runs["home"].rglob(MANIFEST_NAME))) >= 5
    assert runs["damaged_after_first"] == []
    assert runs["damaged_after_second"] == []
    assert not list((runs["home"] / "datasets").rglob("cache-*"))


def test_a_second_identical_run_is_all_cache_hits(runs):
    second = states(runs["second"])
    assert {name for name, state in second.items() if state not in ("Cached", "Skipped")} == set(), second
    assert runs["second"]["metrics"] == runs["first"]["metrics"]


def test_a_damaged_merged_model_is_recomputed_and_the_run_says_so(runs):
    """One flipped byte in the merged model.safetensors, its mtime put back: served as Cached before the fix."""
    if runs["kind"] != "embedded default":
        pytest.skip("one source kind is enough to show it")
    merged = Path(runs["first"]["merged_dir"])
    written = read_manifest(merged)["content_fingerprint"]
    flip_byte_keeping_mtime(next(merged.glob("*.safetensors")))
    third, log = vlmpipe(runs["home"], runs["prefect_home"], *runs["args"])
    assert states(third)["export"] == "Completed", states(third)
    assert states(third)["train"] == states(third)["prepare_model"] == "Cached"
    assert f"{merged} no longer matches its manifest (content fingerprint {written} when written" in log
    assert fingerprint_path(merged, memo=False) == written
