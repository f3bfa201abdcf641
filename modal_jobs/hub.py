"""Is the Hugging Face Hub reachable? Asked once per process, with a short timeout."""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(f"{endpoint}/api/models?limit=1", timeout=timeout_s).close()
    except Exception:
        return False
    return True


def hub_token() -> str | None:
    """From the environment only (a Modal Secret or a Prefect Secret block sets it there); never logged."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def unreachable_message(kind: str, source: str) -> str:
    return (
        f"{kind} {source!r} is not a local path and the Hugging Face Hub cannot be reached from here; "
        f"give a local path, or use the built-in one for an offline run"
    )


@functools.lru_cache(maxsize=32)
def revision_sha(kind: str, repo_id: str, revision: str | None) -> str:
    """The commit sha a hub dataset or model repo's revision points at (kind: "dataset" or "model"), with the
    errors a person can act on turned into InputErrors that say how."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    from modal_jobs.errors import InputError

    api = HfApi(token=hub_token())
    lookup = api.dataset_info if kind == "dataset" else api.model_info
    at = f" at revision {revision!r}" if revision else ""
    try:
        info = lookup(repo_id, revision=revision, timeout=60)
    except RevisionNotFoundError as error:
        raise InputError(f"{kind} {repo_id!r} has no revision {revision!r} on the Hub ({kind}.revision)") from error
    except GatedRepoError as error:
        raise InputError(
            f"{kind} {repo_id!r} is gated on the Hub: accept its terms on its page and set HF_TOKEN to a token "
            "that may read it"
        ) from error
    except RepositoryNotFoundError as error:
        raise InputError(
            f"{kind} {repo_id!r}{at}: no such local path, and not found on the Hub (or private: set HF_TOKEN)"
        ) from error
    if not info.sha:
        raise InputError(f"the Hub gave no commit sha for {kind} {repo_id!r}{at}")
    return info.sha
