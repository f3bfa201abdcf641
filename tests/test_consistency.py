"""The train/serve consistency check on the real tiny model: a real adapter, the real export, a real server.

Each breakage the check exists for is made by hand on a copy of a good export: a drifted chat template, a
missing processor file, a wrong `architectures` entry, a merge that lost the adapter.

Run as: python -m pytest tests/test_consistency.py -q   (~45 s on 2 CPU cores: 8 training steps, one server)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from modal_jobs.config import ExportConfig, ServeConfig
from modal_jobs.consistency import ConsistencyError, ConsistencyRequest, ConsistencyResult, consistency, report_markdown
from modal_jobs.prompts import DEFAULT_INSTRUCTION
from modal_jobs.schemas import ExportRequest, ServeRequest, ServeResult

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def home(module_home: Path) -> Path:
    return module_home


@pytest.fixture(scope="module")
def adapter_dir(home: Path, tiny_model_dir: Path, tiny_dataset_dir: Path) -> Path:
    """A real adapter from the train stage, 8 steps: enough to change what the tiny model writes (a random
    adapter does not: the random tiny model writes one token whatever it is shown)."""
    from modal_jobs.config import PipelineConfig, TrainConfig
    from modal_jobs.schemas import TrainRequest
    from modal_jobs.train import train

    config = PipelineConfig.embedded()
    settings = config.train.model_dump() | {"max_steps": 8, "save_steps": 100, "logging_steps": 4}
    result = train(TrainRequest(
        train=TrainConfig.model_validate(settings), model=config.model, dataset_dir=str(tiny_dataset_dir),
        model_dir=str(tiny_model_dir), output_dir="runs/r", instruction=DEFAULT_INSTRUCTION,
    ))
    return home / result.adapter_dir


@pytest.fixture(scope="module")
def merged_dir(home: Path, tiny_model_dir: Path, adapter_dir: Path) -> Path:
    from modal_jobs.export import export

    result = export(ExportRequest(export=ExportConfig(), model_dir=str(tiny_model_dir), adapter_dir=str(adapter_dir),
                                  output_dir="runs/r/merged"))
    return home / result.merged_dir


@pytest.fixture(scope="module")
def server(merged_dir: Path) -> Iterator[ServeResult]:
    from modal_jobs.serve import running_server

    with running_server(ServeRequest(serve=ServeConfig(backend="transformers", startup_timeout_s=60),
                                     model_dir=str(merged_dir))) as served:
        yield served


def _variant(merged_dir: Path, name: str) -> Path:
    copy = merged_dir.parent / name
    shutil.copytree(merged_dir, copy)
    return copy


def _check(tiny_model_dir: Path, adapter_dir: Path, merged: Path, dataset: Path, name: str,
           server: ServeResult | None = None) -> tuple[ConsistencyResult, dict]:
    request = ConsistencyRequest(
        model_dir=str(tiny_model_dir), adapter_dir=str(adapter_dir), merged_dir=str(merged), dataset_dir=str(dataset),
        instruction=DEFAULT_INSTRUCTION, output_path=f"consistency/{name}.json", num_images=3, max_new_tokens=12,
        base_url=server.base_url if server else None, model_name=server.model_name if server else None,
    )
    result = consistency(request)
    return result, json.loads((Path(request.output_path) if Path(request.output_path).is_absolute()
                               else _home() / request.output_path).read_text())


def _home() -> Path:
    import os

    return Path(os.environ["VLMPIPE_HOME"])


def _verdicts(result: ConsistencyResult) -> dict[str, bool]:
    return {check.name: check.passed for check in result.checks}


def test_a_faithful_export_passes_every_check(tiny_model_dir, adapter_dir, merged_dir, tiny_dataset_dir, server):
    result, report = _check(tiny_model_dir, adapter_dir, merged_dir, tiny_dataset_dir, "good", server)

    assert _verdicts(result) == dict.fromkeys(["files", "architecture", "processor", "prompt", "merged", "endpoint"], True)
    assert result.passed
    result.raise_for_mismatch()  # no error
    samples = report["samples"]
    assert len(samples) == 3
    for sample in samples:
        # Training's prompt, the server's prompt and the endpoint's count of it are the same 68 tokens,
        # 16 of them image placeholders.
        assert sample["train_prompt_tokens"] == sample["server_prompt_tokens"] == sample["endpoint_prompt_tokens"]
        assert sample["image_tokens"] == {"train": 16, "server": 16}
        # transformers serve runs the merged model in its saved dtype with the same code: the same answer.
        assert sample["endpoint_text"] == sample["merged_text"]
    merged = report["merged"]
    assert merged["agreement"] >= 0.9 and merged["logit_error"] < 0.05
    # The adapter changes the model a lot, so a merge that lost it could not pass unseen.
    assert merged["base_logit_error"] > 0.5
    assert any(s["adapter_tokens"] != s.get("base_tokens") for s in samples)
    assert "passed" in report_markdown(report)


def test_a_drifted_chat_template_fails_the_prompt_check(tiny_model_dir, adapter_dir, merged_dir, tiny_dataset_dir):
    drifted = _variant(merged_dir, "merged-drifted-template")
    template = drifted / "chat_template.jinja"
    text = template.read_text()
    assert "<start_of_turn>" in text
    template.write_text(text.replace("<start_of_turn>", "<start_of_turn> "))  # one space more per turn

    result, report = _check(tiny_model_dir, adapter_dir, drifted, tiny_dataset_dir, "drifted")

    assert not result.passed
    verdicts = _verdicts(result)
    assert verdicts["prompt"] is False
    assert verdicts["files"] and verdicts["architecture"] and verdicts["merged"]  # the weights are fine
    assert "token ids differ" in next(c.detail for c in result.checks if c.name == "prompt")
    assert "prompt_diff" in report["samples"][0]
    assert "differs at token" in report_markdown(report)
    with pytest.raises(ConsistencyError, match="prompt"):
        result.raise_for_mismatch()


def test_a_missing_processor_file_fails(tiny_model_dir, adapter_dir, merged_dir, tiny_dataset_dir):
    broken = _variant(merged_dir, "merged-no-processor-config")
    (broken / "processor_config.json").unlink()

    result, _ = _check(tiny_model_dir, adapter_dir, broken, tiny_dataset_dir, "no-processor")

    verdicts = _verdicts(result)
    assert not result.passed and verdicts["files"] is False
    assert "processor_config.json" in next(c.detail for c in result.checks if c.name == "files")


def test_a_wrong_architectures_entry_fails(tiny_model_dir, adapter_dir, merged_dir, tiny_dataset_dir):
    wrong = _variant(merged_dir, "merged-wrong-architecture")
    config = json.loads((wrong / "config.json").read_text())
    config["architectures"] = ["Gemma3ForCausalLM"]  # a text-only class: a server would drop the vision tower
    (wrong / "config.json").write_text(json.dumps(config))

    result, _ = _check(tiny_model_dir, adapter_dir, wrong, tiny_dataset_dir, "wrong-architecture")

    verdicts = _verdicts(result)
    assert not result.passed and verdicts["architecture"] is False
    assert "Gemma3ForCausalLM" in next(c.detail for c in result.checks if c.name == "architecture")


def test_a_merge_that_lost_the_adapter_fails_against_adapter_and_endpoint(
    tiny_model_dir, adapter_dir, merged_dir, tiny_dataset_dir, server
):
    import torch
    from transformers import AutoModelForImageTextToText

    lost = _variant(merged_dir, "merged-without-adapter")
    # The base weights where the merged ones should be, in the export's dtype: every file else is right.
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).to(torch.bfloat16)
    base.save_pretrained(lost, safe_serialization=True)

    # The endpoint still serves the good merge: it no longer matches the merged folder checked here.
    result, report = _check(tiny_model_dir, adapter_dir, lost, tiny_dataset_dir, "lost-adapter", server)

    verdicts = _verdicts(result)
    assert verdicts["prompt"] and verdicts["files"]
    assert verdicts["merged"] is False
    assert report["merged"]["logit_error"] > 0.2
    assert verdicts["endpoint"] is False


def test_an_unreachable_endpoint_is_an_error_to_retry_not_a_verdict(tiny_model_dir, adapter_dir, merged_dir,
                                                                     tiny_dataset_dir):
    from modal_jobs.serve import _free_port

    down = ServeResult(base_url=f"http://127.0.0.1:{_free_port('127.0.0.1')}/v1", model_name="any", backend="none")
    with pytest.raises(RuntimeError, match="requests to .* failed"):
        _check(tiny_model_dir, adapter_dir, merged_dir, tiny_dataset_dir, "down", down)
    report = json.loads((_home() / "consistency" / "down.json").read_text())
    assert not report["passed"] and report["checks"][-1]["name"] == "endpoint reachable"


def test_the_models_are_loaded_one_at_a_time(tiny_model_dir, adapter_dir, merged_dir, tiny_dataset_dir, monkeypatch):
    """The adapter model is freed before the merged model loads: on a GPU, float32 base + bf16 merged held together
    beside the server peaked at 36.2 GiB for Gemma 3 4B; one 16-bit model at a time is what the docs promise."""
    import gc
    import weakref

    from transformers import AutoModelForImageTextToText

    load = AutoModelForImageTextToText.from_pretrained.__func__
    loaded: list[weakref.ref] = []
    alive_at_load: list[int] = []

    def counting_load(cls, *args, **kwargs):
        alive_at_load.append(sum(ref() is not None for ref in loaded))
        model = load(cls, *args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", classmethod(counting_load))
    gc.collect()  # nothing of an earlier test's models left to count

    result, _ = _check(tiny_model_dir, adapter_dir, merged_dir, tiny_dataset_dir, "one-at-a-time")

    assert result.passed
    assert alive_at_load == [0, 0]  # base (for the adapter model), then merged with nothing else alive


def test_a_bfloat16_reference_keeps_the_merged_check_honest(tiny_model_dir, adapter_dir, merged_dir, tiny_dataset_dir):
    """The GPU's reference (the adapter model in bf16, as trained) on the CPU: a faithful merge is within the
    stated tolerance with room to spare, and a merge that lost the adapter still fails."""
    import torch
    from transformers import AutoModelForImageTextToText

    def check(merged: Path, name: str) -> tuple[ConsistencyResult, dict]:
        request = ConsistencyRequest(
            model_dir=str(tiny_model_dir), adapter_dir=str(adapter_dir), merged_dir=str(merged),
            dataset_dir=str(tiny_dataset_dir), instruction=DEFAULT_INSTRUCTION, output_path=f"consistency/{name}.json",
            num_images=3, max_new_tokens=12, reference_dtype="bfloat16",
        )
        result = consistency(request)
        return result, json.loads((_home() / request.output_path).read_text())

    result, report = check(merged_dir, "bf16-good")
    assert result.passed, result.checks
    assert report["merged"]["reference_dtype"] == "bfloat16"
    assert report["merged"]["agreement"] >= 0.9 and report["merged"]["logit_error"] < 0.05

    lost = _variant(merged_dir, "merged-without-adapter-bf16")
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).to(torch.bfloat16)
    base.save_pretrained(lost, safe_serialization=True)
    result, report = check(lost, "bf16-lost-adapter")
    assert _verdicts(result)["merged"] is False
    assert report["merged"]["logit_error"] > 0.2
