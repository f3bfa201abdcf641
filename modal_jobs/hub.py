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
