"""Where a GPU waits on its host: idle gaps in a torch.profiler trace, and the operations that synchronise.

`idle_report(trace_json)` reads a Chrome trace (torch.profiler's export_chrome_trace) and finds the gaps between
kernels (memory copies and sets count as busy). Each gap is charged to what the host was running when it
launched the kernel that ended the gap: the stack of CPU operations around that launch. A gap is the host's
fault only to the extent the queue ran dry, which is exactly what a gap is.

`SyncRecorder` counts the CUDA operations that make the host wait for the GPU (torch.cuda.set_sync_debug_mode),
by the Python stack that called them: each such wait empties the GPU's queue, and the host must then run ahead
again before the GPU is busy.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import json
import traceback
import warnings
from pathlib import Path
from typing import Any

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
MIN_GAP_US = 5.0


def idle_report(trace_path: Path, top: int = 25) -> dict[str, Any]:
    """Idle time of the GPU over the trace's kernels, charged to the host operations that ended each gap."""
    events = json.loads(Path(trace_path).read_text())
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    gpu = sorted((e for e in complete if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    if not gpu:
        return {"kernels": 0}
    # Triton's kernels go through the driver API (cuLaunchKernel), cuBLAS's and ATen's through the runtime.
    launches = {e["args"]["correlation"]: e for e in complete
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ops_by_thread: dict[Any, list[dict]] = collections.defaultdict(list)
    for e in complete:
        if e.get("cat") in ("cpu_op", "user_annotation", "python_function"):
            ops_by_thread[e["tid"]].append(e)
    starts_by_thread = {}
    for tid, ops in ops_by_thread.items():
        ops.sort(key=lambda e: e["ts"])
        starts_by_thread[tid] = [e["ts"] for e in ops]

    def host_stack(launch: dict | None) -> list[str]:
        if launch is None:
            return ["(no launch found)"]
        ops, starts = ops_by_thread.get(launch["tid"], []), starts_by_thread.get(launch["tid"], [])
        t = launch["ts"]
        enclosing = [e for e in ops[:bisect.bisect_right(starts, t)] if e["ts"] + e["dur"] >= t]
        return [e["name"] for e in enclosing] + [launch["name"]]

    busy_until = gpu[0]["ts"] + gpu[0]["dur"]
    gaps = []
    for previous, kernel in itertools.pairwise(gpu):
        gap = kernel["ts"] - busy_until
        if gap >= MIN_GAP_US:
            gaps.append((gap, previous, kernel))
        busy_until = max(busy_until, kernel["ts"] + kernel["dur"])
    window = busy_until - gpu[0]["ts"]
    idle = sum(gap for gap, _, _ in gaps)

    by_outer: collections.Counter = collections.Counter()
    by_inner: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    largest = []
    for gap, previous, kernel in gaps:
        stack = host_stack(launches.get(kernel.get("args", {}).get("correlation")))
        outer = " > ".join(stack[:3])
        inner = " > ".join(stack[-3:])
        by_outer[outer] += gap
        by_inner[inner] += gap
        counts[inner] += 1
        largest.append({"gap_us": round(gap, 1), "after": previous["name"][:80], "before": kernel["name"][:80],
                        "host": stack[-6:]})
    largest.sort(key=lambda g: -g["gap_us"])
    syncs = [{"name": e["name"], "dur_us": round(e["dur"], 1)} for e in complete
             if e.get("cat") == "cuda_runtime" and "Synchronize" in e["name"]]
    return {
        "kernels": len(gpu),
        "window_ms": round(window / 1e3, 2),
        "idle_ms": round(idle / 1e3, 2),
        "idle_share": round(idle / window, 3) if window else None,
        "gaps": len(gaps),
        "idle_ms_by_outer_host_ops": [(k, round(v / 1e3, 2)) for k, v in by_outer.most_common(top)],
        "idle_ms_by_inner_host_ops": [(k, round(v / 1e3, 2), counts[k]) for k, v in by_inner.most_common(top)],
        "largest_gaps": largest[:top],
        "synchronize_calls": len(syncs),
        "synchronize_ms": round(sum(s["dur_us"] for s in syncs) / 1e3, 2),
    }


class SyncRecorder:
    """Within the block, every CUDA operation that synchronises with the host is counted by its calling stack
    (the innermost `frames` frames)."""

    def __init__(self, frames: int = 8):
        self.frames = frames
        self.stacks: collections.Counter = collections.Counter()

    def __enter__(self):
        import torch

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        self._show = warnings.showwarning
        warnings.showwarning = self._record
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def _record(self, message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return self._show(message, category, filename, lineno, file, line)
        stack = traceback.format_stack()[:-2][-self.frames:]
        self.stacks["".join(stack)] += 1

    def __exit__(self, *exc) -> None:
        import torch

        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = self._show
        self._catch.__exit__(*exc)

    def report(self) -> str:
        lines = [f"{sum(self.stacks.values())} synchronising CUDA operations"]
        for stack, count in self.stacks.most_common():
            lines += [f"\n--- {count}x", stack.rstrip()]
        return "\n".join(lines)
