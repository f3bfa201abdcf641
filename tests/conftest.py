"""Shared fixtures: an isolated storage root per test, no hub lookups, and real tiny things built once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from modal_jobs import hub
from tests import whole_runs
from tests.whole_runs import whole_run

# Every Prefect API server that a test starts (in-process flows, subprocesses that inherit this) gets 120 s to come
# up: Prefect's 20 s default timed out on a loaded 2-core CI machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    # There is no hub here; saying so up front spares every "is this a hub id?" check its network timeout,
    # and the answer is cached per process, so it must not leak between tests.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.hub_reachable.cache_clear()
    yield
    hub.hub_reachable.cache_clear()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with a test that reads a whole run go last, each in its own order: the background thread then has the
    rest of the session to finish the runs, instead of the first such module waiting for them."""
    reading = {getattr(item, "module", None) for item in items if whole_runs.reads_a_whole_run(item)}
    items[:] = [item for item in items if getattr(item, "module", None) not in reading] + [
        item for item in items if getattr(item, "module", None) in reading]


@pytest.fixture(scope="session", autouse=True)
def whole_runs_in_background(request, tmp_path_factory) -> Iterator[None]:
    """Starts the selected tests' `@whole_run` fixtures in a background thread (tests/whole_runs.py says why)."""
    whole_runs.BACKGROUND.start(request, tmp_path_factory)
    yield
    whole_runs.BACKGROUND.stop()


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


# --- whole runs shared by several test modules ---------------------------------------------------------------------
# Each is a first run and an identical second one on a storage root of its own. The tests read them; a test may
# damage an output and run again only where the run puts back what it damaged (the cache tests do).

# Short training and evaluation: what is written where, and what comes from the cache, not what is learnt.
QUICK = ["--set", "train.max_steps=4", "--set", "evaluate.num_samples=4", "--set", "evaluate.max_tokens=8"]


@whole_run
def embedded_default_runs(root: Path) -> dict:
    """`vlmpipe run` with nothing set, twice: the embedded default, with tokens in the first run's environment."""
    canary = whole_runs.CANARY
    return whole_runs.identical_runs(root, [], [], first_env={"HF_TOKEN": canary, "WANDB_API_KEY": canary})


@pytest.fixture(scope="session")
def tiny_dataset_with_one_label_edited(tmp_path_factory, tiny_dataset_dir) -> Path:
    """tiny_dataset_dir with " x" added to the first train row's text: a user's edit of one label."""
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(tiny_dataset_dir))
    edited = dataset["train"].map(lambda row, i: {"text": row["text"] + " x" if i == 0 else row["text"]},
                                  with_indices=True, keep_in_memory=True)
    path = tmp_path_factory.mktemp("tiny-dataset-edited") / "dataset"
    DatasetDict({"train": edited, "test": dataset["test"]}).save_to_disk(str(path))
    return path


@whole_run
def folder_sources_runs(root: Path, tiny_dataset_dir: Path, tiny_model_dir: Path,
                        tiny_dataset_with_one_label_edited: Path) -> dict:
    """`vlmpipe run` twice on a `save_to_disk` dataset folder and a model folder of the user's (copies of the tiny
    ones; `sources` lists them, dataset first), QUICK; then the user edits one label of the dataset folder in place
    and runs again (`after_one_changed_label`)."""
    import shutil

    dataset, model = root / "sources" / "dataset", root / "sources" / "model"
    shutil.copytree(tiny_dataset_dir, dataset)
    shutil.copytree(tiny_model_dir, model)
    args = [*QUICK, "--set", f"dataset.source={dataset}", "--set", f"model.source={model}"]
    runs = whole_runs.identical_runs(root, args, [dataset, model])

    shutil.rmtree(dataset)
    shutil.copytree(tiny_dataset_with_one_label_edited, dataset)
    runs["after_one_changed_label"], _ = whole_runs.vlmpipe_run(runs["home"], runs["prefect_home"], *args)
    return runs
