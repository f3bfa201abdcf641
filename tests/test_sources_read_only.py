"""Whole runs through the real CLI: sources given by the user are never written, finished folders never change
after their manifest, a second identical run is all cache hits, and a damaged output is recomputed, not served.

Run as: python -m pytest tests/test_sources_read_only.py -q   (5 pipeline runs, the first four shared with
test_pipeline: conftest.py's `embedded_default_runs` and `folder_sources_runs`)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modal_jobs.storage import MANIFEST_NAME, fingerprint_path, read_manifest
from tests.whole_runs import states, vlmpipe_run

pytestmark = pytest.mark.integration


def flip_byte_keeping_mtime(file: Path) -> None:
    stat = file.stat()
    with open(file, "r+b") as handle:
        handle.seek(stat.st_size // 2)
        byte = handle.read(1)
        handle.seek(stat.st_size // 2)
        handle.write(bytes([byte[0] ^ 0x01]))
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.fixture(scope="module", params=["embedded default", "save_to_disk folder and model folder"])
def runs(request, embedded_default_runs, folder_sources_runs) -> dict:
    """Two identical runs (one per source kind), with what the sources and outputs looked like around them:
    conftest.py's whole runs, shared with test_pipeline."""
    shared = embedded_default_runs if request.param == "embedded default" else folder_sources_runs
    return {**shared, "kind": request.param}


def test_first_run_completes(runs):
    assert all(state == "Completed" for state in states(runs["first"]).values()), states(runs["first"])


def test_sources_are_never_written(runs):
    for source in runs["sources"]:
        assert runs["after_first"]["sources"][source] == runs["before"][source], source
        assert runs["after_second"]["sources"][source] == runs["before"][source], source


def test_finished_folders_never_change_after_their_manifest(runs):
    # Before the fix: the train stage's `datasets` map left a cache-*.arrow in datasets/<key>/train/.
    assert len(list(runs["home"].rglob(MANIFEST_NAME))) >= 5
    assert runs["after_first"]["damaged"] == []
    assert runs["after_second"]["damaged"] == []
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
    third, log = vlmpipe_run(runs["home"], runs["prefect_home"], *runs["args"])
    assert states(third)["export"] == "Completed", states(third)
    assert states(third)["train"] == states(third)["prepare_model"] == "Cached"
    assert f"{merged} no longer matches its manifest (content fingerprint {written} when written" in log
    assert fingerprint_path(merged, memo=False) == written
