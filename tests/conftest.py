"""Shared fixtures: an isolated storage root per test, no hub lookups, and real tiny things built once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from modal_jobs import hub


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    # There is no hub here; saying so up front spares every "is this a hub id?" check its network timeout,
    # and the answer is cached per process, so it must not leak between tests.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.hub_reachable.cache_clear()
    yield
    hub.hub_reachable.cache_clear()


@pytest.fixture
def vlmpipe_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "vlmpipe-home"
    monkeypatch.setenv("VLMPIPE_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def module_home(tmp_path_factory) -> Iterator[Path]:
    """A storage root shared by one test module's tests (for modules that build something once and reuse it)."""
    root = tmp_path_factory.mktemp("vlmpipe-module-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLMPIPE_HOME", str(root))
        yield root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The built-in tiny Gemma 3 vision model, built once per session."""
    from modal_jobs.config import TinyModelConfig
    from modal_jobs.tiny_model import build_tiny_gemma3

    path = tmp_path_factory.mktemp("tiny-model") / "model"
    build_tiny_gemma3(path, TinyModelConfig())
    return path


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory) -> Path:
    """A small rendered LaTeX OCR set in the prepared layout (splits train/test, columns image/text)."""
    from modal_jobs.config import SyntheticDatasetConfig
    from modal_jobs.synthetic import synthetic_latex_ocr

    path = tmp_path_factory.mktemp("tiny-dataset") / "dataset"
    synthetic_latex_ocr(SyntheticDatasetConfig(train_size=32, test_size=8, seed=1)).save_to_disk(str(path))
    return path
