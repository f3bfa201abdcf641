"""serve + evaluate against a real `transformers serve` of the tiny Gemma 3 vision model, on rendered formulas.

Run as: python -m pytest tests/test_serve_evaluate.py -q   (~30 s on 2 CPU cores; each server start is ~5 s)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from modal_jobs.config import EvaluateConfig, ServeConfig, SyntheticDatasetConfig, TinyModelConfig
from modal_jobs.errors import InputError
from modal_jobs.evaluate import evaluate, report_markdown
from modal_jobs.metrics import aggregate, score
from modal_jobs.prompts import DEFAULT_INSTRUCTION, openai_messages
from modal_jobs.schemas import EvaluateRequest, ServeRequest, ServeResult
from modal_jobs.serve import _free_port, running_server, serve, stop_server

pytestmark = pytest.mark.integration

TEST_ROWS = 30
REPO = Path(__file__).resolve().parents[1]
# Explicit, so a machine with vLLM and a GPU still runs these tests on the server they are about.
SERVE = ServeConfig(backend="transformers", startup_timeout_s=60)


@pytest.fixture(scope="module")
def home(module_home: Path) -> Path:
    return module_home


@pytest.fixture(scope="module")
def model_dir(home: Path) -> str:
    from modal_jobs.tiny_model import build_tiny_gemma3

    build_tiny_gemma3(home / "models" / "tiny", TinyModelConfig())
    return "models/tiny"  # storage-relative, as the pipeline passes it


@pytest.fixture(scope="module")
def dataset_dir(home: Path) -> str:
    from modal_jobs.synthetic import synthetic_latex_ocr

    synthetic_latex_ocr(SyntheticDatasetConfig(train_size=1, test_size=TEST_ROWS)).save_to_disk(
        str(home / "datasets" / "synthetic")
    )
    return "datasets/synthetic"


@pytest.fixture(scope="module")
def server(model_dir: str) -> Iterator[ServeResult]:
    with running_server(ServeRequest(serve=SERVE, model_dir=model_dir)) as served:
        yield served


def _eval_request(base_url: str, model_name: str, dataset_dir: str, output: str, **cfg: object) -> EvaluateRequest:
    return EvaluateRequest(
        evaluate=EvaluateConfig(**{"max_tokens": 8, "request_timeout_s": 10, **cfg}),
        base_url=base_url,
        model_name=model_name,
        dataset_dir=dataset_dir,
        instruction=DEFAULT_INSTRUCTION,
        output_path=output,
        label="tiny",
    )


def _children() -> set[int]:
    """Live child processes of this test process (servers are started as children, in their own session)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A server started by the job subprocess is not our child: once dead it may linger as a zombie until
    # its new parent reaps it.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _tiny_image():
    from PIL import Image

    return Image.new("RGB", (96, 32), "white")


# --- serve -------------------------------------------------------------------------------------------


def test_serve_job_returns_a_ready_server_that_outlives_it_and_stop_server_ends_it(model_dir: str, home: Path):
    """The pipeline's path: the job runs in a short-lived subprocess; the server must outlive it."""
    from openai import OpenAI

    request = ServeRequest(serve=SERVE, model_dir=model_dir)
    (home / "serve-request.json").write_text(request.model_dump_json())
    job = subprocess.run(
        [sys.executable, "-m", "modal_jobs.runner", "serve", str(home / "serve-request.json"),
         str(home / "serve-result.json")],
        cwd=REPO, capture_output=True, text=True, timeout=90,
    )
    outcome = json.loads((home / "serve-result.json").read_text())
    assert job.returncode == 0 and outcome["ok"], job.stderr[-2000:]
    served = ServeResult.model_validate(outcome["result"])
    try:
        # No waiting of our own: the job has returned, so the very first requests must succeed.
        with urllib.request.urlopen(served.base_url.removesuffix("/v1") + "/health", timeout=5) as response:
            assert response.status == 200
        client = OpenAI(base_url=served.base_url, api_key="EMPTY", max_retries=0, timeout=10)
        reply = client.chat.completions.create(
            model=served.model_name, messages=openai_messages(_tiny_image(), DEFAULT_INSTRUCTION), max_tokens=4
        )
        assert isinstance(reply.choices[0].message.content, str)
        assert served.backend == "transformers"
        assert served.model_name == str(home / model_dir)
        port = served.base_url.rsplit(":", 1)[1].split("/")[0]
        assert "Uvicorn running" in (home / "logs" / f"serve-{port}.log").read_text()
    finally:
        stop_server(served.pid)
    assert not _alive(served.pid)
    stop_server(served.pid)  # already gone: no error


def test_missing_model_dir_is_an_input_error_and_starts_nothing(home: Path):
    before = _children()
    with pytest.raises(InputError, match="not a folder"):
        serve(ServeRequest(serve=ServeConfig(), model_dir="models/does-not-exist"))
    (home / "models" / "no-config").mkdir(parents=True)
    with pytest.raises(InputError, match="config.json"):
        serve(ServeRequest(serve=ServeConfig(), model_dir="models/no-config"))
    assert _children() == before


def test_server_that_dies_while_starting_raises_with_its_log(home: Path):
    broken = home / "models" / "broken"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(RuntimeError, match="exited with code") as raised:
        serve(ServeRequest(serve=SERVE, model_dir="models/broken"))
    # The error carries the log's last lines, so the cause is readable without opening the log.
    message = str(raised.value)
    log_path = Path(message.split("last lines of ", 1)[1].split(":\n", 1)[0])
    assert log_path.read_text().strip().splitlines()[-1] in message


def test_startup_timeout_kills_the_server(model_dir: str):
    before = _children()
    with pytest.raises(TimeoutError, match="startup_timeout_s"):
        serve(ServeRequest(serve=ServeConfig(backend="transformers", startup_timeout_s=0.5), model_dir=model_dir))
    assert _children() == before


# --- evaluate ----------------------------------------------------------------------------------------


def test_evaluate_scores_every_sample(server: ServeResult, dataset_dir: str, home: Path):
    request = _eval_request(
        server.base_url, server.model_name, dataset_dir, "evals/tiny.json", num_samples=6, concurrency=2,
        examples_in_report=3, render_check=True, worst_in_report=4,
    )
    result = evaluate(request)

    metrics = result.metrics
    assert (metrics.num_samples, metrics.num_scored, metrics.num_failed) == (6, 6, 0)
    assert isinstance(metrics.cer, float) and isinstance(metrics.wer, float)
    report = json.loads((home / result.results_path).read_text())
    samples = report["samples"]
    assert [s["index"] for s in samples] == list(range(6))
    assert all(isinstance(s["prediction"], str) and s["error"] is None for s in samples)
    predictions, references = [s["prediction"] for s in samples], [s["reference"] for s in samples]
    assert report["metrics"]["cer"] == pytest.approx(score(predictions, references)["cer"])
    # Every metric has its interval, and the results carry what is needed to recompute them.
    expected = aggregate([s["counts"] for s in samples], resamples=1000)
    for name in ("exact_match", "cer", "wer", "normalized_exact_match", "normalized_cer", "normalized_wer",
                 "token_edit_rate", "render_match"):
        assert report["metrics"][name] == pytest.approx(expected[name])
        assert report["metrics"]["intervals"][name] == pytest.approx(expected["intervals"][name])
    assert metrics.confidence_level == 0.95 and metrics.bootstrap_resamples == 1000
    # The random tiny model writes garbage; mathtext rejects most of it, and each rejection is counted.
    assert metrics.render_failed == sum(1 - s["counts"]["prediction_renders"] for s in samples)
    assert metrics.render_reference_failed == 0
    assert report["examples"] == samples[:3]
    assert [s["normalized_cer"] for s in report["worst"]] == sorted((s["normalized_cer"] for s in samples),
                                                                    reverse=True)[:4]
    assert sum(row["samples"] for row in report["by_length"]) == 6
    assert report["evaluate"]["num_samples"] == 6 and report["model_name"] == server.model_name
    assert report["sampling"] == {"temperature": 0.0, "greedy": True, "max_tokens": 8, "top_p": None}
    # Per-request timing: the server's round trip and this client's own work, measured apart.
    timing = report["timing"]
    assert all(s["server_s"] > 0 and s["client_s"] >= 0 for s in samples)
    assert timing["answered"] == 6 and 0 <= timing["client_overhead_fraction"] < 0.5

    markdown = report_markdown({"tiny": report})
    for heading in ("| metric |", "CER (normalized)", "### By reference length", "### Worst predictions"):
        assert heading in markdown
    assert "95% percentile bootstrap" in markdown and "Failed requests" not in markdown


def test_endpoint_down_fails_loudly_and_scores_nothing(dataset_dir: str, home: Path):
    down = f"http://127.0.0.1:{_free_port('127.0.0.1')}/v1"
    request = _eval_request(down, "any", dataset_dir, "evals/down.json", num_samples=3, max_retries=0,
                            request_timeout_s=2)
    with pytest.raises(RuntimeError, match=r"all 3 requests to .* failed: APIConnectionError.*refused"):
        evaluate(request)
    report = json.loads((home / "evals" / "down.json").read_text())
    metrics = report["metrics"]
    assert (metrics["num_samples"], metrics["num_scored"], metrics["num_failed"]) == (3, 0, 3)
    assert all(metrics[name] is None for name in ("exact_match", "cer", "wer", "normalized_cer", "token_edit_rate"))
    assert metrics["intervals"] == {}
    assert all(s["prediction"] is None and s["error"] and s["cer"] is None for s in report["samples"])
    assert report["worst"] == [] and len(report["failed"]) == 3
    markdown = report_markdown({"down": report})
    assert "### Failed requests (3, not scored)" in markdown and "refused" in markdown


def test_server_killed_mid_evaluation_counts_failures_not_empty_predictions(
    model_dir: str, dataset_dir: str, home: Path
):
    served = serve(ServeRequest(serve=SERVE, model_dir=model_dir))
    log = home / "logs" / f"serve-{served.base_url.rsplit(':', 1)[1].split('/')[0]}.log"

    def kill_after_three_answers() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if log.read_text().count('"POST /v1/chat/completions HTTP/1.1" 200') >= 3:
                os.killpg(served.pid, signal.SIGKILL)
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_after_three_answers, daemon=True)
    killer.start()
    try:
        request = _eval_request(served.base_url, served.model_name, dataset_dir, "evals/killed.json",
                                num_samples=TEST_ROWS, concurrency=1, max_retries=0)
        result = evaluate(request)
    finally:
        killer.join(timeout=30)
        stop_server(served.pid)

    metrics = result.metrics
    # The server logs a 200 as the response starts, so the third answer's body can be cut off by the kill.
    assert metrics.num_scored >= 2 and metrics.num_failed >= 1
    assert metrics.num_scored + metrics.num_failed == metrics.num_samples == TEST_ROWS
    samples = json.loads((home / result.results_path).read_text())["samples"]
    failed = [s for s in samples if s["error"] is not None]
    scored = [s for s in samples if s["error"] is None]
    assert (len(failed), len(scored)) == (metrics.num_failed, metrics.num_scored)
    # A failure keeps its cause and has no prediction, so nothing downstream can score it as "".
    assert all(s["prediction"] is None and s["cer"] is None and "Connect" in s["error"] for s in failed)
    assert all(isinstance(s["prediction"], str) for s in scored)
    assert not _alive(served.pid)
