"""Content-addressed storage: atomic outputs with manifests, fast memoised fingerprints."""

from __future__ import annotations

import os

import pytest

from modal_jobs import storage


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMPIPE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_atomic_output_appears_only_when_finished(home):
    manifest = {"stage": "demo"}
    with storage.atomic_output("things/abc", manifest) as tmp:
        (tmp / "weights.bin").write_bytes(b"123")
        assert not (home / "things" / "abc").exists()
    assert storage.is_complete("things/abc")
    written = storage.read_manifest("things/abc")
    assert written["stage"] == "demo" and written["content_fingerprint"]


def test_failed_output_leaves_nothing_that_looks_finished(home):
    with pytest.raises(RuntimeError):
        with storage.atomic_output("things/bad", {}) as tmp:
            (tmp / "half.bin").write_bytes(b"1")
            raise RuntimeError("killed")
    assert not (home / "things" / "bad").exists()
    assert not [p for p in (home / "things").iterdir() if p.name.startswith(".tmp-")]


def test_leftover_without_manifest_is_replaced(home):
    leftover = home / "things" / "old"
    leftover.mkdir(parents=True)
    (leftover / "junk").write_text("x")
    assert not storage.is_complete(leftover)
    with storage.atomic_output("things/old", {}) as tmp:
        (tmp / "good").write_text("y")
    assert storage.is_complete(leftover)
    assert not (leftover / "junk").exists()


def test_fingerprint_follows_content_and_names(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(os.urandom(1000))
    (folder / "config.json").write_text("{}")
    first = storage.fingerprint_path(folder)
    assert storage.fingerprint_path(folder) == first
    data = bytearray((folder / "a.safetensors").read_bytes())
    data[500] ^= 1
    (folder / "a.safetensors").write_bytes(bytes(data))
    changed = storage.fingerprint_path(folder)
    assert changed != first
    (folder / "config.json").rename(folder / "other.json")
    assert storage.fingerprint_path(folder) != changed


def test_memo_skips_unchanged_files_but_sees_edits(tmp_path, home):
    file = tmp_path / "big.bin"
    file.write_bytes(b"a" * 10_000)
    first = storage.fingerprint_path(file)
    memo = (home / ".hash-memo.json").read_text()
    assert str(file.resolve()) in memo
    file.write_bytes(b"b" * 10_000)  # same size; a new mtime tells the memo it changed
    os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 1_000_000))
    assert storage.fingerprint_path(file) != first


def test_large_file_chunks_hash_the_same_as_serial(tmp_path, monkeypatch):
    file = tmp_path / "weights.safetensors"
    file.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    monkeypatch.setattr(storage, "_CHUNK_BYTES", 1024 * 1024)
    parallel = storage.fingerprint_path(file, memo=False, workers=4)
    serial = storage.fingerprint_path(file, memo=False, workers=1)
    assert parallel == serial


def test_unwritable_root_fails_with_its_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match=str(blocker)):
        storage.check_writable(blocker / "root")


def test_compiled_kernels_are_kept_on_the_storage_root_unless_the_user_chose_a_folder(home, monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    kept = str(home.resolve() / "cache" / "torch-compile")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert storage.keep_compiled_kernels() == kept
    assert cache_dir() == kept  # where inductor (and Triton under it) will write

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what torch sets once asked for its folder
    assert storage.keep_compiled_kernels() == kept

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert storage.keep_compiled_kernels() == str(tmp_path / "mine")
