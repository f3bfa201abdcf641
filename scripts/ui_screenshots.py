"""See the Prefect UI as a user would: a real server, three real retrains, headless Chromium screenshots.

Run as: python scripts/ui_screenshots.py [--out screenshots] [--keep]

Needs Chromium (Debian: `apt-get install -y chromium`; this script installs nothing). It:
1. starts `prefect server start` on loopback, on a free port, with its own PREFECT_HOME and SQLite file in a
   temporary folder, and a temporary VLMPIPE_HOME;
2. runs `vlmpipe retrain` against it three times with a tiny config: the first computes every stage and
   promotes the model (no champion yet), the second finds every stage in the cache and keeps the champion,
   the third trains a worse model (2 steps instead of 8) and is refused;
3. finds the flow runs through the Prefect client and saves, for each page below, a screenshot (PNG) and the
   rendered DOM (HTML) under --out, then prints which of the expected words each page shows;
4. stops the server by its pid (its process group), unless --keep, which leaves it up until Ctrl-C so you
   can open the printed URL yourself.

Pages: the runs list; the first retrain run (graph: its pipeline subflow and the `promotion` artifact) and
its Artifacts tab; the first pipeline run's graph (the stages), Task Runs and Artifacts tabs; the second
pipeline run's Task Runs tab (every stage Cached); the artifacts list; the first run's `promotion` artifact;
the second run's `cache-train` artifact (why train hit the cache); the third run's `promotion` (refused).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from modal_jobs.serve import stop_server

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The smallest run that still trains, serves and evaluates: about a minute on 2 CPU cores.
TINY = ["--set", "dataset.synthetic.train_size=32", "--set", "dataset.synthetic.test_size=8",
        "--set", "train.max_steps=8", "--set", "train.logging_steps=2", "--set", "train.save_steps=4",
        "--set", "evaluate.num_samples=8", "--set", "evaluate.max_tokens=16", "--set", "promote.registry_name=ui-demo"]
STAGES = ("prepare_dataset", "prepare_model", "train", "export", "serve", "evaluate")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    sys.exit("error: no Chromium found; install it (Debian: apt-get install -y chromium) and run this again")


def wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"error: prefect server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"error: prefect server not healthy after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def capture(chromium: str, url: str, png: Path, profile: Path, budget_ms: int) -> str:
    """A screenshot and the rendered DOM of one page (the single-page app needs its virtual time to load)."""
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--hide-scrollbars", f"--user-data-dir={profile}", "--window-size=1600,1200",
              f"--virtual-time-budget={budget_ms}"]
    subprocess.run([*common, f"--screenshot={png}", url], capture_output=True, timeout=120, check=False)
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False)
    png.with_suffix(".html").write_text(dom.stdout)
    return dom.stdout


def visible_text(html: str) -> str:
    html = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def find_runs(api_url: str) -> tuple[dict[str, list], dict[tuple[str, str], str]]:
    """Flow runs by flow name (oldest first), and artifact ids by (flow run id, artifact key)."""
    from prefect import get_client
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        flows = {flow.id: flow.name for flow in client.read_flows()}
        runs: dict[str, list] = {}
        for run in client.read_flow_runs(sort=FlowRunSort.START_TIME_ASC):
            runs.setdefault(flows[run.flow_id], []).append(run)
        artifacts = {(str(a.flow_run_id), a.key): str(a.id) for a in client.read_artifacts() if a.key}
        return runs, artifacts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "screenshots", help="Where PNGs and DOMs go.")
    parser.add_argument("--keep", action="store_true", help="Leave the server up until Ctrl-C.")
    parser.add_argument("--budget-ms", type=int, default=15000, help="Chromium's virtual time budget per page.")
    args = parser.parse_args(argv)
    chromium = find_chromium()
    args.out.mkdir(parents=True, exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix="vlmpipe-ui-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PREFECT_HOME": str(work / "prefect-home"),
        "PREFECT_PROFILES_PATH": str(work / "prefect-home" / "profiles.toml"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{work / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"{base}/api",
        "VLMPIPE_HOME": str(work / "vlmpipe-home"),
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    server_log = work / "server.log"
    print(f"prefect server on {base} (PREFECT_HOME {work / 'prefect-home'}; log {server_log})")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, cwd=REPO, stdout=server_log.open("wb"), stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(base, server, server_log)
        attempts = {"first (computes)": [], "second (cache hits)": [],
                    "third (a worse model: 2 steps instead of 8)": ["--set", "train.max_steps=2"]}
        for attempt, extra in attempts.items():
            started = time.monotonic()
            ran = subprocess.run([sys.executable, "-m", "flows.cli", "retrain", *TINY, *extra], env=env, cwd=REPO,
                                 capture_output=True, text=True, timeout=900)
            print(f"vlmpipe retrain, {attempt}: exit {ran.returncode} in {time.monotonic() - started:.0f}s")
            if ran.returncode != 0:
                print(ran.stderr[-4000:], file=sys.stderr)
                return 1
            print("  " + "\n  ".join(ran.stdout.strip().splitlines()[-3:]))

        runs, artifacts = find_runs(env["PREFECT_API_URL"])
        (first, _, worse), (pipeline_first, pipeline_second, _) = runs["retrain"], runs["finetune-pipeline"]
        # The default (V1) UI resets a `?tab=` in the URL to Logs while the run loads; the V2 UI (/v2, one click
        # away in the sidebar) keeps it, so tab pages are taken there.
        v1, v2 = f"{base}/runs/flow-run", f"{base}/v2/runs/flow-run"
        promotion = artifacts[(str(first.id), "promotion")]
        rejection = artifacts[(str(worse.id), "promotion")]
        cache_hit = artifacts[(str(pipeline_second.id), "cache-train")]
        pages = {
            "01-runs": (f"{base}/runs", ["retrain", "finetune-pipeline"]),
            # The graph is drawn on a canvas: only the log lines under it are text.
            "02-retrain-run": (f"{v1}/{first.id}", ["promoted: there was no champion"]),
            "03-retrain-artifacts": (f"{v2}/{first.id}?tab=Artifacts", ["promotion"]),
            "04-pipeline-graph": (f"{v1}/{pipeline_first.id}", list(STAGES)),
            "05-pipeline-task-runs": (f"{v2}/{pipeline_first.id}?tab=TaskRuns", [*STAGES, "Completed"]),
            "06-pipeline-artifacts": (f"{v2}/{pipeline_first.id}?tab=Artifacts",
                                      ["metrics", "eval-report", "merged-model", "cache-train", "training-progress"]),
            "07-second-run-cached": (f"{v2}/{pipeline_second.id}?tab=TaskRuns", ["Cached"]),
            "08-artifacts": (f"{base}/artifacts", ["promotion", "metrics", "cache-train"]),
            "09-promotion": (f"{base}/artifacts/artifact/{promotion}", ["PROMOTED", "no champion", "cer"]),
            "10-cache-hit": (f"{base}/artifacts/artifact/{cache_hit}", ["Cached", "hit"]),
            "11-rejection": (f"{base}/artifacts/artifact/{rejection}", ["REJECTED", "worse by", "champion"]),
        }
        profile = work / "chromium-profile"
        missing_any = False
        for name, (url, expected) in pages.items():
            png = args.out / f"{name}.png"
            text = visible_text(capture(chromium, url, png, profile, args.budget_ms))
            missing = [word for word in expected if word not in text]
            missing_any |= bool(missing)
            print(f"{png.relative_to(REPO) if png.is_relative_to(REPO) else png}: {url}\n"
                  f"  shows {', '.join(w for w in expected if w not in missing) or 'none of'}"
                  + (f"; MISSING {', '.join(missing)}" if missing else ""))
        if args.keep:
            print(f"\nthe server stays up: open {base} (Ctrl-C stops it)")
            try:
                server.wait()
            except KeyboardInterrupt:
                pass
        return 1 if missing_any else 0
    finally:
        stop_server(server.pid, timeout_s=15)  # the group it leads: the server and what it started
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
