"""The whole pipeline on one GPU, in one command: a table of each stage's state, seconds and peak GPU memory.

Run as: python -m bench.gpu_smoke --workdir /big/disk/smoke --out bench/results       (a CUDA machine, 7-12 min)
        python -m bench.gpu_smoke --tiny --workdir /tmp/smoke --out /tmp/smoke-out     (CPU: the tiny model, ~2 min)

It builds a Gemma-3-4B-shaped model folder with random weights (bench.train_speed.build_gemma3_4b_shaped: the
real 4B config; the real weights cannot be downloaded on the lent GPU, and neither speed nor memory depends on
their values) and a rendered `save_to_disk` dataset (--rows train rows, --test-rows test rows), both reused
when already in the workdir, then runs the pipeline as a user would:

    python -m flows.cli run --json --config configs/latex_ocr.yaml --set model.source=<folder>
        --set dataset.source=<folder> --set train.max_steps=20 --set evaluate.num_samples=8
        --set evaluate.max_tokens=48 [--set ... from --set]

with its storage root and Prefect home in the workdir (a second run on the same workdir reuses the cache and the
compiled kernels: that is the warm run). Every Python process the run starts (stage jobs, servers) loads a
`sitecustomize` written here that records, at exit, its command line, start and end, its CUDA allocator's
peaks and the time of each optimizer step; a thread samples the whole card (`nvidia-smi memory.used`) every
0.5 s. Per stage: seconds (its job process's life), the process's own peak (torch's allocator, reserved:
the CUDA context's ~0.5 GiB is not in it) and the card's peak while it ran (servers that were up included).
Train also reports time to its first optimizer step (from the job's start) and the rate after it.

Results: <out>/gpu_smoke.json and <out>/gpu_smoke.md (the table, printed last). On one H200 (2026-12-02, fifth
session) a cold run (fresh machine and storage root: every kernel compiled) took 430 s, 475 s with its inputs
built: it fits one 10-minute command of the lent GPU. bench/device_smoke.sh still starts it detached and collects it
in a later call, so that one call can also run the GPU tests or a second smoke. A warm run (same workdir,
train.seed changed so train, export, consistency and the fine-tuned evaluation rerun with the kernels on the
storage root) took 272 s (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11 only

REPO = Path(__file__).resolve().parent.parent
# Small enough that a cold run (every kernel compiled) with its inputs built fits one 10-minute command of the lent
# GPU: the 30-step, 16-sample version took 694 s + 50 s on an H200; these settings 475 s in all (2026-12-02).
SMOKE_SETTINGS = ["train.max_steps=20", "evaluate.num_samples=8", "evaluate.max_tokens=48"]
TINY_SETTINGS = ["train.max_steps=8", "evaluate.num_samples=8", "evaluate.max_tokens=16"]
# Table order: the flow's stages as it runs them.
STAGE_ORDER = ["prepare_dataset", "prepare_model", "encode_images", "train", "export", "serve_base", "evaluate_base",
               "serve_finetuned", "consistency", "evaluate_finetuned"]

# Loaded by every Python process started with the probe folder first on PYTHONPATH. Written out by the bench
# (not imported by it) so that nothing of the project runs inside the probe.
PROBE = r'''
"""Written by bench/gpu_smoke.py: at exit, this process's command line, life, CUDA peaks and optimizer-step times
go to $VLMPIPE_SMOKE_PROBE/<pid>.json."""
import atexit
import importlib.machinery
import importlib.util
import json
import os
import sys
import threading
import time

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _spec is not None and _spec.loader is not None:  # the environment's own sitecustomize still runs
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)

_probe_dir = os.environ.get("VLMPIPE_SMOKE_PROBE")
if _probe_dir:
    _started = time.time()
    _steps = []

    def _watch_optimizers():
        # The global step hook can be registered only once torch.optim is imported, which this process may never do.
        while True:
            optimizer = sys.modules.get("torch.optim.optimizer")
            register = getattr(optimizer, "register_optimizer_step_post_hook", None)
            if register is not None:
                register(lambda *args, **kwargs: _steps.append(time.time()))
                return
            time.sleep(0.1)

    threading.Thread(target=_watch_optimizers, daemon=True).start()

    def _record():
        try:
            with open("/proc/self/cmdline", "rb") as handle:
                argv = [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
        except OSError:
            argv = list(sys.argv)
        record = {"pid": os.getpid(), "argv": argv, "start": _started, "end": time.time(), "steps": _steps}
        if "modal_jobs.runner" in argv:
            at = argv.index("modal_jobs.runner")
            record["stage"] = argv[at + 1] if len(argv) > at + 1 else None
            try:
                with open(argv[at + 2]) as handle:
                    request = json.load(handle)
                record["label"] = request.get("label")
                record["model_dir"] = request.get("model_dir")
            except Exception:
                pass
        torch = sys.modules.get("torch")
        try:
            if torch is not None and torch.cuda.is_initialized():
                record["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
                record["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        except Exception:
            pass
        if os.environ.get("VLMPIPE_SMOKE_MODULES"):
            record["modules"] = {
                name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())
                if "." not in name and module is not None and getattr(module, "__file__", None)}
        with open(os.path.join(_probe_dir, f"{os.getpid()}.json"), "w") as handle:
            json.dump(record, handle)

    atexit.register(_record)
'''


class CardSampler:
    """The whole card's used memory every `interval_s`, from one long-running `nvidia-smi` (none without it)."""

    def __init__(self, interval_s: float = 0.5):
        self.samples: list[tuple[float, float]] = []  # (time, GiB)
        self.interval_ms = int(interval_s * 1000)
        self.process: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        if shutil.which("nvidia-smi") is None:
            return self
        self.process = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", f"-lms={self.interval_ms}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            try:
                mib = float(line.strip().split(",")[0])  # the first GPU: the one the jobs use
            except ValueError:
                continue
            self.samples.append((time.time(), mib / 1024))

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def peak(self, start: float, end: float) -> float | None:
        inside = [gib for at, gib in self.samples if start <= at <= end]
        return round(max(inside), 2) if inside else None


def build_inputs(workdir: Path, rows: int, test_rows: int, tiny: bool) -> dict[str, Any]:
    """The model and dataset folders, built once per workdir (a finished one has its marker file)."""
    from bench.train_speed import make_dataset

    info: dict[str, Any] = {}
    model_dir, dataset_dir = workdir / "model", workdir / "dataset"
    for folder, build in ((model_dir, "model"), (dataset_dir, "dataset")):
        marker = _marker(folder)
        if marker.is_file():
            info[build] = {**json.loads(marker.read_text()), "reused": True}
            continue
        shutil.rmtree(folder, ignore_errors=True)
        started = time.time()
        if build == "model" and tiny:
            from modal_jobs.config import TinyModelConfig
            from modal_jobs.tiny_model import build_tiny_gemma3

            build_tiny_gemma3(folder, TinyModelConfig())
            built: dict[str, Any] = {"kind": "tiny Gemma 3"}
        elif build == "model":
            # In a process of its own: the CUDA memory this one would keep cached (~10 GiB) would count in every
            # stage's card peak.
            done = subprocess.run([sys.executable, "-m", "bench.gpu_smoke", "--build-model", str(folder)], cwd=REPO,
                                  stdout=subprocess.PIPE, text=True, check=True)
            built = {"kind": "Gemma-3-4B-shaped, random weights", **json.loads(done.stdout.strip().splitlines()[-1])}
        else:
            built = make_dataset(folder, rows, test_rows=test_rows)
            built["test_rows"] = test_rows
        built["build_s"] = round(time.time() - started, 1)
        # Beside the folder, not inside: a file inside would be part of the source's fingerprint.
        marker.write_text(json.dumps(built))
        info[build] = built
    return info


def _marker(folder: Path) -> Path:
    return folder.parent / f".{folder.name}_built.json"


def run_pipeline(workdir: Path, settings: list[str], tiny: bool, timeout_s: float, log_path: Path,
                 record_modules: bool = False) -> tuple[dict[str, Any] | None, float, int]:
    """One `flows.cli run --json` with the probe on PYTHONPATH: (its JSON or None, seconds, exit code)."""
    probe = workdir / "probe"
    records = probe / "records"
    shutil.rmtree(records, ignore_errors=True)
    records.mkdir(parents=True)
    (probe / "sitecustomize.py").write_text(PROBE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(probe), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(VLMPIPE_HOME=str(workdir / "home"), PREFECT_HOME=str(workdir / "prefect"),
               VLMPIPE_SMOKE_PROBE=str(records), PYTHONUNBUFFERED="1")
    if record_modules:
        env["VLMPIPE_SMOKE_MODULES"] = "1"
    command = [sys.executable, "-m", "flows.cli", "run", "--json"]
    if not tiny:
        command += ["--config", str(REPO / "configs" / "latex_ocr.yaml")]
    for setting in [f"model.source={workdir / 'model'}", f"dataset.source={workdir / 'dataset'}", *settings]:
        command += ["--set", setting]
    started = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        try:
            done = subprocess.run(command, check=False, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log,
                                  text=True, timeout=timeout_s)
            stdout, code = done.stdout, done.returncode
        except subprocess.TimeoutExpired as expired:
            partial = expired.stdout or ""
            stdout, code = partial.decode(errors="replace") if isinstance(partial, bytes) else partial, 124
        log.write("\n--- stdout ---\n" + stdout)
    seconds = time.time() - started
    result = None
    for line in reversed(stdout.strip().splitlines()):
        try:
            result = json.loads(line)
            break
        except json.JSONDecodeError:
            continue
    return result, seconds, code


def _process_label(record: dict[str, Any], result: dict[str, Any] | None) -> str | None:
    stage = record.get("stage")
    if stage == "evaluate" and record.get("label"):
        return f"evaluate_{record['label']}"
    if stage == "serve":  # the job that starts a server and waits until it is healthy; the server lives on
        served = str(record.get("model_dir") or "")
        for name, key in (("serve_finetuned", "merged_dir"), ("serve_base", "model_dir")):
            if result and result.get(key) and (served == result[key] or result[key].endswith("/" + served)):
                return name
        return "serve"
    return stage


def summarise(records: list[dict[str, Any]], sampler: CardSampler, result: dict[str, Any] | None) -> list[dict]:
    """One row per stage of the flow's result, joined with what its processes recorded."""
    stages = (result or {}).get("stages", {})
    by_label: dict[str, list[dict]] = {}
    for record in records:
        label = _process_label(record, result)
        if label:
            by_label.setdefault(label, []).append(record)
    names = [name for name in STAGE_ORDER if name in stages or name in by_label]
    names += [name for name in list(stages) + list(by_label) if name not in names]
    # In the order they ran (the fine-tuned model's evaluation may come before the base model's); a stage with no
    # process of its own (cached, skipped) stays after the stage before it in the flow's order.
    started, at = {}, 0.0
    for name in names:
        at = min((p["start"] for p in by_label.get(name, [])), default=at)
        started[name] = at
    names.sort(key=lambda name: started[name])
    rows = []
    for name in names:
        processes = by_label.get(name, [])
        row: dict[str, Any] = {"stage": name, "state": stages.get(name, {}).get("state", "?")}
        if processes:
            start, end = min(p["start"] for p in processes), max(p["end"] for p in processes)
            row["seconds"] = round(end - start, 1)
            peaks = [p["peak_reserved_gib"] for p in processes if "peak_reserved_gib" in p]
            row["process_peak_gib"] = round(max(peaks), 2) if peaks else None
            allocated = [p["peak_allocated_gib"] for p in processes if "peak_allocated_gib" in p]
            row["process_allocated_gib"] = round(max(allocated), 2) if allocated else None
            row["card_peak_gib"] = sampler.peak(start, end)
            steps = sorted(t for p in processes for t in p.get("steps", []))
            if steps:
                row["optimizer_steps"] = len(steps)
                row["first_step_s"] = round(steps[0] - start, 1)
                if len(steps) > 1:
                    row["steps_per_s_after_first"] = round((len(steps) - 1) / (steps[-1] - steps[0]), 3)
        rows.append(row)
    return rows


def markdown(report: dict[str, Any]) -> str:
    def cell(value: Any) -> str:
        return "—" if value is None else str(value)

    lines = [f"GPU smoke ({report['device']}, {report['date']}): `{report['command']}`", "",
             f"Whole run: {report['seconds']:.0f} s, exit code {report['exit_code']}; with its inputs built: "
             f"{report.get('command_seconds', 0):.0f} s.", "",
             "| stage | state | seconds | process peak GiB (reserved) | card peak GiB while it ran |",
             "|---|---|---|---|---|"]
    for row in report["stages"]:
        lines.append(f"| {row['stage']} | {row['state']} | {cell(row.get('seconds'))} | "
                     f"{cell(row.get('process_peak_gib'))} | {cell(row.get('card_peak_gib'))} |")
    train = next((row for row in report["stages"] if row["stage"] == "train" and row.get("optimizer_steps")), None)
    if train:
        lines += ["", (f"train: {train['optimizer_steps']} optimizer steps, first at {train['first_step_s']} s after "
                       f"the job started, then {train.get('steps_per_s_after_first')} steps/s.")]
    if report.get("train_startup_s"):
        lines.append(f"train's time before its first step, by its own clock (s): {report['train_startup_s']}.")
    return "\n".join(lines)


def _consistency_summary(workdir: Path, result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The consistency report's verdicts, merged-vs-adapter numbers and GPU peak (the report stays in the storage
    root, which does not come back from the lent GPU)."""
    output = ((result or {}).get("stages", {}).get("consistency") or {}).get("output")
    if not output:
        return None
    try:
        report = json.loads((workdir / "home" / output).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return {"passed": report.get("passed"), "checks": {c["name"]: c["passed"] for c in report.get("checks", [])},
            "merged": report.get("merged"), "memory": report.get("memory"), "timing_s": report.get("timing_s")}


def _train_startup(workdir: Path, result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The train job's own account of its time before the first optimizer step (imports, build_trainer, first
    step), from the adapter's manifest in the storage root."""
    output = ((result or {}).get("stages", {}).get("train") or {}).get("output")
    if not output:
        return None
    try:
        manifest = json.loads((workdir / "home" / output / "vlmpipe_manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    result = manifest.get("result", {})
    return {**(result.get("startup_s") or {}), "compilation": result.get("compilation")}


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return "CPU"


def main() -> None:
    if sys.argv[1:2] == ["--build-model"]:  # the child process of build_inputs
        from bench.train_speed import build_gemma3_4b_shaped

        print(json.dumps({"parameters": build_gemma3_4b_shaped(Path(sys.argv[2]))["parameters"]}))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="Model, dataset, storage root and Prefect home.")
    parser.add_argument("--out", type=Path, required=True, help="Where gpu_smoke.json/.md and the run's log go.")
    parser.add_argument("--rows", type=int, default=256, help="Train rows of the rendered dataset.")
    parser.add_argument("--test-rows", type=int, default=16, help="Test rows (evaluation and consistency read them).")
    parser.add_argument("--tiny", action="store_true", help="The tiny model and the embedded config (CPU check).")
    parser.add_argument("--set", dest="settings", action="append", default=[],
                        help="Another setting for the run, e.g. train.backend=unsloth (repeatable).")
    parser.add_argument("--name", default="gpu_smoke", help="File names of the results (<out>/<name>.json/.md).")
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--record-modules", action="store_true",
                        help="Each process also records the top-level modules it imported (to pack them for a GPU).")
    args = parser.parse_args()
    if args.rows < 16 or args.test_rows < 1:
        parser.error("--rows must be at least 16 and --test-rows at least 1")
    workdir, out = args.workdir.resolve(), args.out.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))

    started = time.time()
    settings = (TINY_SETTINGS if args.tiny else SMOKE_SETTINGS) + args.settings
    inputs = build_inputs(workdir, args.rows, args.test_rows, args.tiny)
    with CardSampler() as sampler:
        result, seconds, code = run_pipeline(workdir, settings, args.tiny, args.timeout_s, out / f"{args.name}.log",
                                             args.record_modules)
    records = [json.loads(path.read_text()) for path in sorted((workdir / "probe" / "records").glob("*.json"))]
    report = {
        "device": _device(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m flows.cli run --json " + ("" if args.tiny else "--config configs/latex_ocr.yaml ")
                   + " ".join(f"--set {s}" for s in ["model.source=<model>", "dataset.source=<dataset>", *settings]),
        "inputs": inputs, "seconds": seconds, "exit_code": code,
        # Inputs built and the run, as one device command would take them (a cold run must stay under 600 s).
        "command_seconds": round(time.time() - started, 1), "stages": summarise(records, sampler, result),
        "card_peak_gib": round(max((gib for _, gib in sampler.samples), default=0.0), 2) or None,
        "metrics": (result or {}).get("metrics"), "consistency": _consistency_summary(workdir, result),
        "train_startup_s": _train_startup(workdir, result),
        "processes": records,
    }
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    # The jobs' own logs (the train job's compile and start-up lines among them) stay in the storage root, which
    # does not come back from the lent GPU: keep a copy beside the table.
    if (workdir / "home" / "logs").is_dir():
        shutil.copytree(workdir / "home" / "logs", out / "logs", dirs_exist_ok=True)
    table = markdown(report)
    (out / f"{args.name}.md").write_text(table + "\n")
    print(table)
    sys.exit(0 if code == 0 else 1)


if __name__ == "__main__":
    main()
