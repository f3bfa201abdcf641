"""Where a training step's time goes on the cached-features path, one lever at a time, in one process.

Run after `python -m bench.train_speed --only setup,encode --workdir W` (which builds the Gemma-3-4B-shaped model,
the rendered data and the feature cache under W):

    python -m bench.step_breakdown --workdir W --out OUT          (a CUDA machine; --tiny on a CPU for a smoke test)

Each variant runs forward + backward on real collated batches (our FeatureCollator over the bench set, so real
answer lengths and padding) under bf16 autocast, WARMUP steps then TIMED steps, and records samples/s, tokens/s
and peak GiB. `--set v1`: TRL SFTTrainer's loss (its fused LM head) vs the train job's labelled-token loss, full,
selective or no recomputation, length-sorted batches, Gemma 3's bidirectional image mask vs plain causal, compiled
layers. `--set v2`: PEFT's LoRA forwards vs the fused ones, lengths padded to 64, compiled, micro-batch sizes.
`--set v3`: recomputation around vs inside the compiled layers, full or selective. `--set v4` (default): padded vs
packed rows under FlexAttention, and what the optimizer step adds. Profiled steps give a
torch.profiler kernel table and the GPU's kernel time; then the vision tower under each attention backend.
Results: OUT/step_breakdown.json (rewritten after each variant, so a cut-short run still reports).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import traceback
from pathlib import Path
from typing import Any

from bench.train_speed import (
    _cuda_peak_gib,
    _kernel_seconds,
    _reset_peak,
    _train_request,
)

WARMUP, TIMED = 2, 6


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vlmpipe-train-speed"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=400)
    parser.add_argument("--skip", default="", help="comma-separated variant names to skip")
    parser.add_argument("--set", choices=("v1", "v2", "v3", "v4", "vision"), default="v4",
                        help="v1: the first session's levers (loss, recomputation, sorting, mask); "
                             "v2: fused LoRA forwards, bucketed lengths, compiled micro-batch sizes; "
                             "v3: recomputation around or inside the compiled layers, full or selective; "
                             "v4: padded vs packed rows (FlexAttention), and the optimizer's share of a step; "
                             "vision: only the vision tower under each attention backend, and compiled")
    args = parser.parse_args()
    started = time.time()
    deadline = started + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    import os

    os.environ.setdefault("VLMPIPE_HOME", str(args.workdir.absolute() / "home"))
    import torch

    on_gpu = torch.cuda.is_available()
    spec = json.loads((args.workdir / "spec-encode.json").read_text())
    encode = json.loads((args.workdir / "result-encode.json").read_text())
    skip = set(filter(None, args.skip.split(",")))
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
                              "torch": torch.__version__, "variants": {}, "notes": []}

    def save():
        report["total_s"] = round(time.time() - started, 1)
        (args.out / "step_breakdown.json").write_text(json.dumps(report, indent=2, default=str))

    # The trainer exactly as the job builds it (TRL backend, cached features), to borrow its model and collator.
    from modal_jobs.train import build_trainer, levers

    levers.FEATURES_MAX_MICRO_BATCH = 64
    levers.FEATURES_COMPILE = False  # the variants below compile when they mean to
    spec = {**spec, "features_dir": encode["features_dir"]}
    request = _train_request(spec, "breakdown", encode["features_dir"], "trl", 1000)
    setup = build_trainer(request)
    trainer = setup.trainer
    model = trainer.model
    collator = trainer.data_collator
    rows = setup.rows
    report["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    report["model_dtype"] = str(next(model.parameters()).dtype)
    device = next(model.parameters()).device
    texts_len = [len(setup.processor.tokenizer(r["completion"][0]["content"][0]["text"] if isinstance(
        r["completion"][0]["content"], list) else r["completion"][0]["content"])["input_ids"]) for r in rows]
    order_random = list(range(len(rows)))
    order_sorted = sorted(order_random, key=lambda i: texts_len[i])

    def batches(micro: int, order: list[int], count: int):
        out, t0 = [], time.time()
        for k in range(count):
            idx = order[(k * micro) % len(order):][:micro]
            if len(idx) < micro:
                idx = order[:micro]
            out.append(collator([rows[i] for i in idx]))
        return out, (time.time() - t0) / count

    def to_device(batch):
        return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)

    def set_checkpointing(on: bool | str):
        if on == "selective":
            from modal_jobs.train import selective_checkpoint_kwargs

            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=selective_checkpoint_kwargs())
        elif on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()

    def trl_loss(batch):
        return trainer.compute_loss(model, dict(batch))

    def run(name: str, loss_fn, micro: int, order: list[int], checkpointing: bool, count=WARMUP + TIMED,
            after_backward=None):
        if name in skip:
            return
        if time.time() > deadline - 30:
            report["variants"][name] = {"skipped": "out of time"}
            save()
            return
        try:
            model.train()
            set_checkpointing(checkpointing)
            data, collate_s = batches(micro, order, count)
            _reset_peak()
            times, losses, tokens = [], [], 0
            for step, batch in enumerate(data):
                batch = to_device(batch)
                _sync()
                t0 = time.time()
                with autocast:
                    loss = loss_fn(batch)
                loss.backward()
                if after_backward is not None:
                    after_backward()
                _sync()
                times.append(time.time() - t0)
                losses.append(float(loss))
                if step >= WARMUP:
                    tokens += int(batch["input_ids"].numel())
                model.zero_grad(set_to_none=True)
            timed = times[WARMUP:]
            report["variants"][name] = {
                "micro_batch": micro, "checkpointing": checkpointing,
                "samples_per_s": round(micro * len(timed) / sum(timed), 2),
                "padded_tokens_per_s": round(tokens / sum(timed)),
                "step_s": [round(t, 3) for t in times], "peak_gib": _cuda_peak_gib(),
                "collate_s_per_batch": round(collate_s, 4), "losses": [round(x, 4) for x in losses[:3]],
            }
        except Exception as error:
            report["variants"][name] = {"error": f"{type(error).__name__}: {str(error)[:400]}",
                                        "trace": traceback.format_exc()[-1500:]}
            model.zero_grad(set_to_none=True)
        print(name, report["variants"][name].get("samples_per_s"), report["variants"][name].get("peak_gib"),
              report["variants"][name].get("error", ""), flush=True)
        save()

    def profile_step(label: str, loss_fn, micro: int, order: list[int], checkpointing):
        """A kernel table of one step (after one unprofiled step) and how busy the GPU was during it."""
        if "profile" in skip or time.time() > deadline - 60:
            return
        try:
            from torch.profiler import ProfilerActivity, profile

            set_checkpointing(checkpointing)
            data, _ = batches(micro, order, 2)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
            for index, batch in enumerate(data):
                batch = to_device(batch)
                _sync()
                t0 = time.time()
                with profile(activities=activities) if index == 1 else contextlib.nullcontext() as prof:
                    with autocast:
                        loss = loss_fn(batch)
                    loss.backward()
                    _sync()
                wall = time.time() - t0
                model.zero_grad(set_to_none=True)
            key = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
            averages = prof.key_averages()
            table = averages.table(sort_by=key, row_limit=30, max_name_column_width=70)
            name = "step_profile-" + "".join(c if c.isalnum() else "_" for c in label) + ".txt"
            (args.out / name).write_text(table)
            gpu_s = _kernel_seconds(averages)
            report.setdefault("profiles", {})[label] = {
                "file": name, "wall_s": round(wall, 3), "gpu_kernel_s": round(gpu_s, 3),
                "gpu_busy": round(gpu_s / wall, 3) if wall else None, "micro_batch": micro}
        except Exception as error:
            report.setdefault("profiles", {})[label] = {"error": f"{type(error).__name__}: {error}"}
        save()

    def compile_layers():
        for layer in model.get_base_model().model.language_model.layers:
            layer.compile(dynamic=True)

    from modal_jobs.train import labelled_token_loss

    def ours(batch):
        total, count = labelled_token_loss(model, batch)
        return total / count

    def ours_causal(batch):  # without token_type_ids, Gemma 3 attends causally over the image too
        return ours({name: value for name, value in batch.items() if name != "token_type_ids"})

    def timed_with_compile(name, loss_fn, micro, order, checkpointing, after_backward=None):
        """A variant whose first steps compile: two more steps than usual, and the wall time with compiling."""
        t0 = time.time()
        run(name, loss_fn, micro, order, checkpointing, count=WARMUP + 2 + TIMED, after_backward=after_backward)
        report["variants"].get(name, {})["wall_incl_compile_s"] = round(time.time() - t0, 1)

    big = 16 if on_gpu else 4
    small = 4 if on_gpu else 2
    if args.set == "v1":
        _first_levers(run, trl_loss, ours, ours_causal, big, small, order_random, order_sorted, on_gpu)
        profile_step("no recompute, 4, sorted", ours, small, order_sorted, False)
        if "compile" not in skip and on_gpu and time.time() < deadline - 150:
            compile_layers()
            timed_with_compile("ours_nockpt_mb4_sorted_compiled", ours, small, order_sorted, False)
            run("ours_nockpt_mb6_sorted_compiled", ours, 6, order_sorted, False)
            run("ours_selective_mb16_sorted_compiled", ours, big, order_sorted, "selective")
    elif args.set == "v4":
        # v4: the job as shipped before packing (fused, padded to 64, selective inside compiled layers, 16) vs
        # packed rows under FlexAttention; then what the trainer adds to a step (fused AdamW, clipping).
        from modal_jobs.train import levers

        layers = model.get_base_model().model.language_model.layers

        def compiled(pack: bool):
            torch._dynamo.reset()
            for layer in layers:
                layer.__dict__.pop("forward", None)
            collator.pad_to_multiple_of, collator.pack = 64, pack
            model.set_attn_implementation("flex_attention" if pack else "sdpa")
            levers._compile_layers(model, recompute="selective")

        lora = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(lora, lr=2e-4, fused=on_gpu)

        def optimizer_step():
            torch.nn.utils.clip_grad_norm_(lora, 0.3)
            optimizer.step()

        if on_gpu and "compile" not in skip:
            compiled(False)
            timed_with_compile("padded64_selective_mb16", ours, big, order_random, False)
            run("padded64_selective_mb16_sorted", ours, big, order_sorted, False)
            compiled(True)
            timed_with_compile("packed_flex_selective_mb16", ours, big, order_random, False)
            run("packed_flex_selective_mb16_optimizer", ours, big, order_random, False, after_backward=optimizer_step)
            profile_step("packed, flex, selective, 16", ours, big, order_random, False)
        save()
    elif args.set == "vision":
        pass  # only the vision tower's measurements below
    elif args.set == "v3":
        # v3: where recomputation happens with compiled layers (fused LoRA forwards, lengths padded to 64, 16).
        import functools

        from modal_jobs.train import levers

        layers = model.get_base_model().model.language_model.layers
        selective = levers.selective_checkpoint_kwargs

        def compiled(recompute, max_saved_width=None):
            torch._dynamo.reset()
            for layer in layers:
                layer.__dict__.pop("forward", None)
            levers.selective_checkpoint_kwargs = functools.partial(selective, max_saved_width=max_saved_width)
            levers._compile_layers(model, recompute=recompute)

        if on_gpu and "compile" not in skip:
            compiled(False)
            timed_with_compile("around_ckpt_mb16", ours, big, order_random, True)
            compiled(True)
            timed_with_compile("inside_ckpt_mb16", ours, big, order_random, False)
            run("inside_ckpt_mb16_sorted", ours, big, order_sorted, False)
            run("inside_ckpt_mb32", ours, 32, order_random, False)
            compiled("selective", max_saved_width=2560)
            timed_with_compile("inside_selective_narrow_mb16", ours, big, order_random, False)
            run("inside_selective_narrow_mb16_sorted", ours, big, order_sorted, False)
            profile_step("inside, selective narrow, 16", ours, big, order_random, False)
            compiled("selective")
            timed_with_compile("inside_selective_mb16", ours, big, order_random, False)
            run("inside_selective_mb16_sorted", ours, big, order_sorted, False)
            profile_step("inside, selective, 16", ours, big, order_random, False)
            levers.selective_checkpoint_kwargs = selective
        save()
    else:
        # v2: the fused LoRA forward and bucketed lengths, eager then compiled; the last compiled variant is the
        # job's path before them (PEFT's forward, unpadded), so the comparison is made in one process.
        from modal_jobs.train import fuse_lora_forwards

        def peft_forwards():
            for module in model.modules():
                module.__dict__.pop("forward", None)

        def padding(multiple):
            collator.pad_to_multiple_of = multiple

        huge = 32 if on_gpu else 4
        peft_forwards(), padding(None)
        run("peft_ckpt_mb16", ours, big, order_random, True)
        report["fused_lora_layers"] = fuse_lora_forwards(model)
        run("fused_ckpt_mb16", ours, big, order_random, True)
        padding(64)
        run("fused_pad64_ckpt_mb16", ours, big, order_random, True)
        run("fused_pad64_ckpt_mb32", ours, huge, order_random, True)
        if "compile" not in skip and on_gpu and time.time() < deadline - 150:
            compile_layers()
            timed_with_compile("fused_pad64_ckpt_mb16_compiled", ours, big, order_random, True)
            run("fused_pad64_selective_mb16_compiled", ours, big, order_random, "selective")
            run("fused_pad64_ckpt_mb32_compiled", ours, huge, order_random, True)
            run("fused_pad64_selective_mb32_compiled", ours, huge, order_random, "selective")
            run("fused_pad64_nockpt_mb8_compiled", ours, 8, order_random, False)
            profile_step("fused, pad 64, recompute, 16, compiled", ours, big, order_random, True)
            profile_step("fused, pad 64, selective, 32, compiled", ours, huge, order_random, "selective")
            padding(None)
            run("fused_ckpt_mb16_compiled", ours, big, order_random, True)
            peft_forwards()
            torch._dynamo.reset()  # compile PEFT's forwards afresh, as the job did
            timed_with_compile("peft_ckpt_mb16_compiled", ours, big, order_random, True)
        save()

    trainer = setup = model = None  # free the GPU for the vision measurements
    _reset_peak()
    if "vision" not in skip and on_gpu and time.time() < deadline - 40:
        report["vision"] = vision_backends(spec["model_dir"])
        save()
    print(json.dumps({k: {x: v.get(x) for x in ("samples_per_s", "peak_gib", "error")}
                      for k, v in report["variants"].items()}, indent=1))
    print(json.dumps(report.get("vision"), indent=1))


def _first_levers(run, trl_loss, ours, ours_causal, big, small, order_random, order_sorted, on_gpu) -> None:
    """The first session's variants (BENCHMARKS.md's "where the time goes" table)."""
    run("trl_fused_head_ckpt_mb16", trl_loss, big, order_random, True)
    run("trl_nockpt_mb4", trl_loss, small, order_random, False)
    run("ours_ckpt_mb16", ours, big, order_random, True)
    run("ours_ckpt_mb16_sorted", ours, big, order_sorted, True)
    run("ours_nockpt_mb4", ours, small, order_random, False)
    run("ours_nockpt_mb4_sorted", ours, small, order_sorted, False)
    run("ours_nockpt_mb6_sorted", ours, 6 if on_gpu else 2, order_sorted, False)
    run("ours_nockpt_mb4_sorted_causal", ours_causal, small, order_sorted, False)
    run("ours_ckpt_mb32_sorted", ours, 32 if on_gpu else 4, order_sorted, True)
    run("ours_selective_mb8_sorted", ours, 8 if on_gpu else 2, order_sorted, "selective")
    run("ours_selective_mb16_sorted", ours, big, order_sorted, "selective")
    run("ours_selective_mb16_sorted_causal", ours_causal, big, order_sorted, "selective")


def _timed_features(backbone: Any, pixels: Any, repeats: int = 3) -> tuple[float, Any]:
    """(images/s over `repeats` forwards after one warm-up, the warm-up's features)."""
    import torch

    from modal_jobs.encode import _image_features

    features = _image_features(backbone, pixels)
    torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(repeats):
        _image_features(backbone, pixels)
    torch.cuda.synchronize()
    return round(repeats * pixels.shape[0] / (time.time() - t0), 1), features


def vision_backends(model_dir: str) -> dict:
    """Images/s of the vision tower + projector on random pixels under each SDPA backend, batch 32."""
    import contextlib

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    backbone = model.model
    backbone.vision_tower.cuda()
    backbone.multi_modal_projector.cuda()
    out: dict[str, Any] = {}
    pixels = torch.randn(32, 3, 896, 896, device="cuda", dtype=torch.bfloat16)
    reference = None
    # "no_autocast": bf16 weights throughout (layer norms in bf16 too): what it would gain, and the difference.
    for name, backend, autocast in (("default", None, True), ("flash", SDPBackend.FLASH_ATTENTION, True),
                                    ("cudnn", SDPBackend.CUDNN_ATTENTION, True),
                                    ("efficient", SDPBackend.EFFICIENT_ATTENTION, True), ("no_autocast", None, False),
                                    ("compiled", None, True)):
        try:
            kernel = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
            if name == "compiled":  # as the encode stage compiles it
                from modal_jobs.encode import _compile_tower

                _compile_tower(backbone)
            t0 = time.time()
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast), kernel:
                rate, features = _timed_features(backbone, pixels)
            entry = {"images_per_s": rate, "wall_s": round(time.time() - t0, 1)}
            if reference is None:
                reference = features.float()
            else:
                entry["max_abs_diff_vs_default"] = float((features.float() - reference).abs().max())
            out[name] = entry
        except Exception as error:
            out[name] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
    out["reference_abs_mean"] = float(reference.abs().mean()) if reference is not None else None
    return out


if __name__ == "__main__":
    main()
