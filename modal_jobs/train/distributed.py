"""Training on several GPUs (train.gpus > 1): one process per GPU in DDP, launched by the train job itself.

The job (`launch`) checks that the machine shows enough GPUs, starts
`python -m torch.distributed.run --standalone --nproc_per_node N -m modal_jobs.train REQUEST RESULT`,
commits each new checkpoint (on Modal: the Volume) while the processes train, and returns the result rank 0 wrote.
Each process (`main`) joins the process group (NCCL on CUDA; gloo without CUDA, the CPU rehearsal the tests run)
and runs the same job code as a one-process run, with `train.gradient_accumulation_steps / gpus` micro-batches
per step, so the global batch is the config's; rank 0 alone writes checkpoints, progress and the adapter.

With train.gpus = 1 none of this runs: the job trains in its own process, as it always did.

Each process runs `main` (modal_jobs/train/__main__.py is its entry point).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from modal_jobs.errors import INPUT_ERROR_TYPES, InputError, StorageFullError, disk_full
from modal_jobs.processes import parent_death_signal
from modal_jobs.schemas import TrainRequest, TrainResult
from modal_jobs.storage import atomic_write_json, make_durable, resolve

# How often the job looks for a new complete checkpoint to commit while the processes train.
CHECKPOINT_POLL_S = 2.0
# How long torchrun gets to stop its processes when the job is interrupted, before it is killed.
STOP_GRACE_S = 30.0


def world_size() -> int:
    """Processes training together (torchrun's WORLD_SIZE); 1 outside a launch."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_rank_zero() -> bool:
    return rank() == 0


def require_visible_gpus(requested: int) -> str:
    """The process group's backend for `requested` processes: "nccl" when this machine shows that many GPUs,
    "gloo" on a machine without CUDA (CPU processes: a rehearsal of the layout). An InputError when CUDA shows
    fewer GPUs than asked for, raised before anything is loaded."""
    import torch

    if not torch.cuda.is_available():
        return "gloo"
    visible = torch.cuda.device_count()
    if visible < requested:
        raise InputError(
            f"train.gpus={requested} but this machine shows {visible} GPU{'s' if visible != 1 else ''} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): set train.gpus to at most "
            f"{visible}, or run on a machine with {requested} (on Modal the train call asks for them itself)"
        )
    return "nccl"


# --- the job's side -----------------------------------------------------------------------------------------


def launch(request: TrainRequest) -> TrainResult:
    """Train with request.train.gpus processes and return rank 0's result (see the module docstring)."""
    from modal_jobs.train.job import latest_complete_checkpoint

    processes = request.train.gpus
    backend = require_visible_gpus(processes)
    device = "GPUs" if backend == "nccl" else "CPU processes over gloo (no CUDA on this machine)"
    print(f"training with {processes} {device}, launched with torchrun", file=sys.stderr)
    checkpoints_dir = resolve(request.checkpoints_dir)
    with tempfile.TemporaryDirectory(prefix="vlmpipe-train-") as scratch:
        request_path, result_path = Path(scratch) / "request.json", Path(scratch) / "result.json"
        request_path.write_text(request.model_dump_json())
        process = subprocess.Popen(_torchrun_command(processes, request_path, result_path),
                                   env=_rank_environment(processes),
                                   preexec_fn=parent_death_signal(signal.SIGTERM))  # noqa: PLW1509 (prctl only)
        try:
            committed = latest_complete_checkpoint(checkpoints_dir)
            while True:
                try:
                    code = process.wait(timeout=CHECKPOINT_POLL_S)
                except subprocess.TimeoutExpired:
                    code = None
                latest = latest_complete_checkpoint(checkpoints_dir)
                if latest is not None and latest != committed:
                    make_durable()  # what rank 0's on_save does in a one-process run (it has no hooks of its own)
                    committed = latest
                if code is not None:
                    break
        finally:
            if process.poll() is None:  # interrupted: the processes must not train on unwatched
                process.terminate()  # torchrun passes it on to the processes and waits for them
                try:
                    process.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    process.kill()  # the processes then die with it (PR_SET_PDEATHSIG)
                    process.wait()
        return _outcome(result_path, processes, code)


def _torchrun_command(processes: int, request_path: Path, result_path: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "modal_jobs.train", str(request_path), str(result_path)]


def _rank_environment(processes: int) -> dict[str, str]:
    import modal_jobs

    env = dict(os.environ)
    # The processes import this package as the job did, wherever it lives (a Modal image adds it as source).
    package_root = str(Path(modal_jobs.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    # torchrun would set 1 thread each; the collators and the CPU rehearsal use the cores they are given.
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // processes)))
    return env


def _outcome(result_path: Path, processes: int, code: int) -> TrainResult:
    """Rank 0's result; else the first rank's error, re-raised as bad input or as a (retryable) failure."""
    if result_path.exists():
        payload = json.loads(result_path.read_text())
        return TrainResult.model_validate(payload["result"])
    for rank_index in range(processes):
        error_path = Path(f"{result_path}.rank{rank_index}")
        if error_path.exists():
            error = json.loads(error_path.read_text())
            text = f"training process {rank_index} of {processes}: {error['message']}"
            if error["error_type"] == "StorageFullError":
                raise StorageFullError(text)
            if error["error_type"] in INPUT_ERROR_TYPES:
                raise InputError(text)
            raise RuntimeError(f"{error['error_type']} in {text}")
    raise RuntimeError(f"the {processes} training processes exited with code {code} and no result (killed, or lost "
                       "their process group?); their output is above. A retry resumes from the latest checkpoint")


# --- each process's side ------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    request_path, result_path = argv
    die_with_parent = parent_death_signal(signal.SIGKILL)
    if die_with_parent is not None:
        die_with_parent()  # torchrun's agent gone: no process trains on alone
    try:
        _join_process_group()
        from modal_jobs.train.job import train_in_this_process

        result = train_in_this_process(TrainRequest.model_validate_json(Path(request_path).read_text()))
    except Exception as error:  # reported to the job, which re-raises it as bad input or a failure
        traceback.print_exc()
        error_type = "StorageFullError" if disk_full(error) else type(error).__name__
        atomic_write_json(Path(f"{result_path}.rank{rank()}").absolute(),
                          {"ok": False, "error_type": error_type, "message": str(error)})
        return 1
    finally:
        _leave_process_group()
    if is_rank_zero():
        atomic_write_json(Path(result_path).absolute(), {"ok": True, "result": result.model_dump(mode="json")})
    return 0


def _join_process_group() -> None:
    """Join before anything else, so that the processes can wait for one another while preparing (rank 0 first
    where they would write the same file) and the trainer finds the group made (accelerate reuses it)."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank()))
    else:
        dist.init_process_group("gloo")


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block, then the others (which can read what it wrote); a no-op in one process."""
    import torch.distributed as dist

    together = world_size() > 1 and dist.is_available() and dist.is_initialized()
    if together and not is_rank_zero():
        dist.barrier()
    yield
    if together and is_rank_zero():
        dist.barrier()


# --- what the trainer needs under DDP -----------------------------------------------------------------------


def through_ddp(model: Any, compute: Callable[..., Any], *args: Any) -> Any:
    """`compute(unwrapped_model, *args)`, run as the forward of `model` where it is DDP-wrapped. DDP all-reduces
    gradients only after a forward through its own `forward` (that arms its gradient hooks); a loss computed on
    the module inside (as the cached-feature path's, which calls the backbone and the LM head apart) would leave
    every process stepping on its own gradients."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return compute(model, *args)
    inner = model.module
    # accelerate may already have put its autocast wrapper on the instance (mixed precision): put it back after.
    own_forward = inner.__dict__.get("forward")
    inner.forward = lambda *inputs: compute(inner, *inputs)  # an instance attribute: DDP's call finds it first
    try:
        return model(*args)
    finally:
        if own_forward is None:
            del inner.forward
        else:
            inner.forward = own_forward


def rank_trainer_class(trainer_class: type) -> type:
    """The trainer class for one of several processes: on CPU processes, the optimizer state resumed onto "cpu"
    (transformers maps it to the process's device under DDP, "cpu:0" for gloo, which torch.load does not know)."""

    class RankTrainer(trainer_class):
        def _load_optimizer_and_scheduler(self, checkpoint):
            if checkpoint is None or self.args.device.type != "cpu":
                return super()._load_optimizer_and_scheduler(checkpoint)
            import torch

            self.optimizer.load_state_dict(torch.load(Path(checkpoint) / "optimizer.pt", map_location="cpu",
                                                      weights_only=True))
            self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / "scheduler.pt", weights_only=True))
            return None

    RankTrainer.__name__ = f"Rank{trainer_class.__name__}"
    return RankTrainer

