"""Content-addressed storage: one root, outputs named by their cache key, made visible atomically.

Root: `$VLMPIPE_HOME`, else `~/.cache/vlmpipe` (on Modal the image sets VLMPIPE_HOME=/data, the Volume).
A stage writes into a hidden temporary folder beside its final place and renames it into place with its
manifest as the last act, so a folder without a manifest is never mistaken for a finished output.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

MANIFEST_NAME = "vlmpipe_manifest.json"
_CHUNK_BYTES = 64 * 1024 * 1024  # hashed independently, so one large safetensors file still uses every core
_READ_BYTES = 8 * 1024 * 1024


_DURABILITY_HOOKS: list[Callable[[], None]] = []


def add_durability_hook(hook: Callable[[], None]) -> None:
    """Run `hook` whenever a job reaches a state that must outlive this machine (a finished checkpoint).
    On Modal it is `volume.commit` (registered by modal_jobs.app); a local disk already is durable."""
    if hook not in _DURABILITY_HOOKS:
        _DURABILITY_HOOKS.append(hook)


def make_durable() -> None:
    for hook in list(_DURABILITY_HOOKS):
        hook()


def storage_root() -> Path:
    root = Path(os.environ.get("VLMPIPE_HOME") or Path.home() / ".cache" / "vlmpipe").expanduser()
    return root


def resolve(path: str | Path) -> Path:
    """Relative paths in requests and results are relative to the storage root, so they mean the same
    thing on this machine and inside a Modal container."""
    path = Path(path)
    return path if path.is_absolute() else storage_root() / path


def relative(path: Path) -> str:
    """The storage-relative form of a path under the root (absolute paths elsewhere stay absolute)."""
    try:
        return path.resolve().relative_to(storage_root().resolve()).as_posix()
    except ValueError:
        return str(path)


def check_writable(root: Path | None = None) -> Path:
    """Fail early, with the path in the message, when the storage root cannot take our outputs."""
    root = root or storage_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise PermissionError(
            f"storage root {root} is not writable ({error.strerror or error}); set VLMPIPE_HOME to a writable folder"
        ) from error
    return root


def keep_compiled_kernels() -> str:
    """Point torch.compile's on-disk caches (inductor's graphs and autograd's, Triton's kernels) at the storage
    root, so the next process on the same software and GPU (a retrain, a retried task, the next point of a sweep)
    loads its kernels instead of spending minutes compiling them again. The caches key their entries by graph,
    torch version and device, so nothing stale is loaded. A TORCHINDUCTOR_CACHE_DIR chosen by the user wins
    (torch itself sets the variable to its /tmp default once anything has asked for the folder)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(resolve("cache/torch-compile"))
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def dataset_cache_dir(dataset_dir: str | Path) -> Path:
    """Where `datasets` cache files made from a prepared dataset go (a formatted copy of its rows): beside the
    outputs, never inside one, because a finished output must keep matching its manifest."""
    return storage_root() / "cache" / "datasets" / Path(dataset_dir).name


def read_manifest(output_dir: str | Path) -> dict[str, Any] | None:
    path = resolve(output_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def is_complete(output_dir: str | Path) -> bool:
    """A manifest is there (cheap; says nothing about the files: `verify_output` checks those)."""
    return read_manifest(output_dir) is not None


@dataclass(frozen=True)
class OutputCheck:
    """What `verify_output` found at a stage's output location."""

    path: Path
    state: Literal["intact", "file", "missing", "unfinished", "mismatch"]
    expected: str | None = None  # the manifest's content fingerprint
    actual: str | None = None  # the files' fingerprint now

    @property
    def usable(self) -> bool:
        """A cache hit may hand this output back."""
        return self.state in ("intact", "file")

    def describe(self) -> str:
        if self.state == "mismatch":
            return (
                f"{self.path} no longer matches its manifest (content fingerprint {self.expected} when written, "
                f"{self.actual} now): its files were changed or corrupted after it was finished"
            )
        if self.state == "unfinished":
            return f"{self.path} has no {MANIFEST_NAME}: not a finished output"
        return f"{self.path}: {self.state}"


def verify_output(location: str | Path, full: bool | None = None) -> OutputCheck:
    """Whether a stage's output may be served from the cache: a file (evals/<key>.json: no manifest, so
    nothing to check beyond its being there), or a folder whose files still hash to its manifest's
    `content_fingerprint` (a folder without a manifest is not an output at all).

    Cost: each file is looked up in the fingerprint memo by (path, size, mtime, ctime, inode) and read again
    only when one of those changed, so checking an unchanged multi-GB folder costs a stat call per file.
    That catches every change made through the filesystem: a rewrite, a truncation, a file added or removed,
    a file replaced by a copy, and an in-place edit even when its mtime is put back with `os.utime` (which
    sets ctime to now; nothing but the kernel sets ctime). It cannot catch a change below the filesystem
    (a bit flipped on the medium, a block device written directly) or one on a filesystem that keeps no
    honest ctime. `full=True` (or VLMPIPE_VERIFY=full in the environment) re-reads every byte instead.
    """
    path = resolve(location)
    if path.is_file():
        return OutputCheck(path, "file")
    if not path.exists():
        return OutputCheck(path, "missing")
    manifest = read_manifest(path)
    if manifest is None:
        return OutputCheck(path, "unfinished")
    expected = manifest.get("content_fingerprint")
    if not expected:  # written before manifests carried one: nothing to compare with
        return OutputCheck(path, "intact")
    if full is None:
        full = os.environ.get("VLMPIPE_VERIFY", "").lower() == "full"
    actual = fingerprint_path(path, memo=not full)
    return OutputCheck(path, "intact" if actual == expected else "mismatch", expected, actual)


def discard_output(location: str | Path) -> None:
    """Take a finished output out of the cache. Renamed aside first, so no reader ever sees a half-deleted
    folder that still has its manifest."""
    path = resolve(location)
    if not path.exists():
        return
    aside = path.parent / f".tmp-discarded-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another process took it away first
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def atomic_output(final_dir: str | Path, manifest: dict[str, Any]) -> Iterator[Path]:
    """Yield a temporary folder; on success add the manifest (with a content fingerprint) and rename it
    into place. On error the temporary folder is removed and nothing appears at `final_dir`.

    `manifest` may be updated by the caller inside the block (e.g. with results); it is written last.
    """
    final_dir = resolve(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = final_dir.parent / f".tmp-{final_dir.name}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    try:
        yield tmp_dir
        manifest.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        files = _files_under(tmp_dir)
        digests = _file_digests(files, memo_table=None)
        manifest["content_fingerprint"] = _combine(tmp_dir, files, digests)
        (tmp_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        if final_dir.exists() and not is_complete(final_dir):
            # A leftover without a manifest is not an output: replace it.
            shutil.rmtree(final_dir)
        try:
            os.rename(tmp_dir, final_dir)
        except OSError:
            if is_complete(final_dir):
                # Another run with the same key finished first; the outputs are equivalent, keep theirs.
                shutil.rmtree(tmp_dir, ignore_errors=True)
                return
            raise
        # The files were just hashed: remember them under their final names, so the first cache hit's
        # verification (verify_output) costs stat calls, not another read of a multi-GB folder.
        _remember(final_dir, {final_dir / f.relative_to(tmp_dir): d for f, d in digests.items()})
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    """Write a JSON file so that readers see the old content or the new, never half of it."""
    path = resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


# --- fingerprints -------------------------------------------------------------------------------------


def hash_range_into(digest: Any, path: Path, offset: int, length: int) -> None:
    """Feed bytes [offset, offset + length) of a file into a running digest, a bounded read at a time."""
    with open(path, "rb", buffering=0) as handle:
        handle.seek(offset)
        remaining = length
        while remaining > 0:
            block = handle.read(min(_READ_BYTES, remaining))
            if not block:
                break
            digest.update(block)
            remaining -= len(block)


def _hash_chunk(path: Path, offset: int, length: int) -> bytes:
    import xxhash

    digest = xxhash.xxh3_128()
    hash_range_into(digest, path, offset, length)
    return digest.digest()


def _memo_path() -> Path:
    return storage_root() / ".hash-memo.json"


def _load_memo() -> dict[str, list[Any]]:
    try:
        return json.loads(_memo_path().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _save_memo(memo_table: dict[str, list[Any]]) -> None:
    try:
        atomic_write_json(_memo_path(), memo_table)
    except OSError:
        pass  # the memo is an optimisation; a read-only root only costs a re-hash


def _stat_key(stat: os.stat_result) -> list[int]:
    # ctime and inode as well as size and mtime: an edit whose mtime was put back (os.utime) still moves ctime,
    # and a file replaced by another (a copy renamed over it) has another inode.
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(".tmp-")
    )


def _file_digests(
    files: list[Path], memo_table: dict[str, list[Any]] | None, workers: int | None = None
) -> dict[Path, str]:
    """file -> xxh3-128 of its bytes. With a memo table, files whose stat key it holds are not read, and the
    files that were read are added to it (and the table saved)."""
    import xxhash

    digests: dict[Path, str] = {}
    jobs: list[tuple[Path, int, int]] = []
    keys: dict[Path, list[int]] = {}
    for file in files:
        stat = file.stat()
        keys[file] = _stat_key(stat)
        cached = (memo_table or {}).get(str(file))
        if cached and cached[:-1] == keys[file]:
            digests[file] = cached[-1]
            continue
        jobs.extend((file, offset, _CHUNK_BYTES) for offset in range(0, max(stat.st_size, 1), _CHUNK_BYTES))
    if jobs:
        with ThreadPoolExecutor(max_workers=workers or min(32, (os.cpu_count() or 1) * 2)) as pool:
            chunk_digests = list(pool.map(lambda job: _hash_chunk(*job), jobs))
        per_file: dict[Path, list[bytes]] = {}
        for (file, _, _), digest in zip(jobs, chunk_digests):
            per_file.setdefault(file, []).append(digest)
        for file, parts in per_file.items():
            digests[file] = xxhash.xxh3_128_hexdigest(b"".join(parts))
            if memo_table is not None:
                memo_table[str(file)] = [*keys[file], digests[file]]
        if memo_table:
            _save_memo(memo_table)
    return digests


def _combine(path: Path, files: list[Path], digests: dict[Path, str]) -> str:
    import xxhash

    total = xxhash.xxh3_128()
    base = path if path.is_dir() else path.parent
    for file in files:
        total.update(file.relative_to(base).as_posix().encode() + b"\0" + digests[file].encode() + b"\n")
    return total.hexdigest()


def _remember(folder: Path, digests: dict[Path, str]) -> None:
    """Record digests computed elsewhere (files hashed before a rename) in the memo, under `folder`'s resolved
    path as fingerprint_path names them."""
    memo_table = _load_memo()
    base = folder.resolve()
    for file, digest in digests.items():
        named = base / file.relative_to(folder)
        try:
            memo_table[str(named)] = [*_stat_key(named.stat()), digest]
        except FileNotFoundError:
            return  # the folder went away (another run replaced it): nothing worth remembering
    _save_memo(memo_table)


def fingerprint_path(path: str | Path, memo: bool = True, workers: int | None = None) -> str:
    """xxh3-128 content hash of a file or folder (relative names + bytes), chunks hashed in parallel.

    With `memo`, a file whose (path, size, mtime, ctime, inode) is unchanged since it was last hashed is not
    read again, so re-fingerprinting an unchanged multi-GB model folder costs a few stat calls (what that
    can and cannot notice: see verify_output).
    """
    path = Path(path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"cannot fingerprint {path}: it does not exist")
    files = _files_under(path)
    digests = _file_digests(files, _load_memo() if memo else None, workers)
    return _combine(path, files, digests)


def short_hash(payload: Any, length: int = 16) -> str:
    """A stable key for any JSON-able value (sorted keys)."""
    import xxhash

    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return xxhash.xxh3_128_hexdigest(text.encode())[:length]
