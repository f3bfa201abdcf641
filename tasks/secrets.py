"""Tokens for the Hub and W&B: from the environment, else from a Prefect Secret block.

They reach jobs through the environment only (a local job inherits it; on Modal a Modal Secret supplies
it), never through task parameters, logs, artifacts, manifests or saved configs.
"""

from __future__ import annotations

import os

# environment variable -> Prefect Secret block consulted when the variable is unset
SECRET_BLOCKS = {"HF_TOKEN": "hf-token", "WANDB_API_KEY": "wandb-api-key"}


def load_secret_blocks() -> list[str]:
    """Fill unset token variables from Secret blocks; returns the variable names it set (never values)."""
    from prefect.blocks.system import Secret

    loaded = []
    for variable, block in SECRET_BLOCKS.items():
        if os.environ.get(variable):
            continue
        try:
            value = Secret.load(block).get()
        except ValueError:  # no such block: this token is simply not configured
            continue
        if value:
            os.environ[variable] = str(value)
            loaded.append(variable)
    return loaded
