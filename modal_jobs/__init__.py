"""The work itself: one plain job function per stage, typed configs, and the Modal app that wraps them.

Nothing here imports Prefect, and heavy libraries (torch, transformers, unsloth, vllm) are imported inside
the functions that need them, so `import modal_jobs` is fast and works without a GPU stack.
"""
