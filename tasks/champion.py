"""What the production endpoint serves: the registry's champion, published by a promotion or a rollback only.

On Modal the endpoint (`vllm_server` in modal_jobs/app.py) reads `serving/<registry>.json` on the Volume and hands
over when it changes. This module is the only writer of that file, and only `vlmpipe retrain` (on a promotion)
and `vlmpipe rollback` call it, so evaluating a candidate or the base model never changes what is served.
Locally there is no production endpoint (`vlmpipe serve PATH` serves a folder until Ctrl-C): nothing is written.
"""

from __future__ import annotations

import json
import time
from typing import Any

from modal_jobs.config import PipelineConfig


def serving_record(config: PipelineConfig, champion: Any) -> dict[str, Any]:
    """The endpoint's instructions: the champion's merged model, served with this config's serve section."""
    return {
        "registry": config.promote.registry_name,
        "model_dir": None if champion is None else champion.merged_dir,
        "serve": config.serve.model_dump(mode="json"),
        "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def publish_champion(config: PipelineConfig, champion: Any) -> str | None:
    """Point the production endpoint at `champion` (None: serve nothing); returns where that was written."""
    if config.executor_for("serve") != "modal":
        return None
    from tasks.modal_executor import ModalExecutor

    path = f"serving/{config.promote.registry_name}.json"
    executor = ModalExecutor(config.modal)
    executor.client.write_file(path, json.dumps(serving_record(config, champion), indent=2).encode())
    return executor.display_path(path)
