"""Training speed on one GPU: the original recipe (plain HF+PEFT, Unsloth) against our train job and encode stage.

Run as: python -m bench.train_speed --out bench/results          (a CUDA machine: ~15 minutes on one H100)
        python -m bench.train_speed --tiny --out /tmp/bench      (CPU smoke test: tiny model, no Unsloth, ~40 s)

On a GPU it builds a Gemma-3-4B-shaped model with random weights (the real 4B config; weights cannot be
downloaded here, and throughput does not depend on their values), renders LaTeX images whose answers have
LaTeX_OCR-like, varied lengths, and measures, each in its own process on the same card:

    (a) hf_pixels      plain HF + PEFT (TRL SFTTrainer), the original recipe: micro-batch 4 x 4, checkpointing
    (b) unsloth_pixels Unsloth as the original script uses it: FastVisionModel, UnslothVisionDataCollator, 4 x 4,
                       its torch.compile on (Unsloth's default)
    (b') unsloth_tuned Unsloth tuned for the card: the largest micro-batch that fits (16 x 1, else 8 x 2), the same
                       effective batch of 16, compile on
    (c) ours           our train job as shipped (modal_jobs.train.train) on the cached features of (d)
    (d) encode         our encode stage (modal_jobs.encode.encode_images) over the whole bench set
    ours_again         (c) in a second process: its compiled kernels now cached on the storage root (time to the
                       first step); with --profile-trainer, after the timed steps two steps count host syncs and
                       three are profiled (GPU idle gaps and the host operations that ended them)
    ours_cpp_wrapper   (c) with a compiler setting changed, each in a process of its own (VARIANTS below)
    ours_cuda_graphs
    levers             our job with one lever changed at a time (recomputation full or selective, inside or around
                       the compiled layers, length grouping, PEFT's LoRA forwards, compilation)

Samples/s and tokens/s are sustained rates (the first steps, which warm up kernels and the allocator, are left
out); peak GiB is torch.cuda.max_memory_allocated; MFU is counted model FLOPs (forward + backward of the frozen
language model with LoRA, logits only where a label is, the vision forward where the path runs it; no
recomputation) over the card's dense bf16 peak. Results: <out>/train_speed.json and <out>/train_speed.md.

Order: as --only lists them (default: set-up, (d), (b), (b'), (c)) while the --budget-s lasts; every child has a
time cap, and the JSON is rewritten after each, so a cut-short run still reports what it measured. The fair
comparison is that default in one command, on a fresh machine: every child starts from empty kernel caches
((b) and (b') each get their own Inductor, Triton and Unsloth cache folders; (c) compiles into its own storage
root), and each result says whether its caches were empty when it started. Warm-up is left out of every rate:
the first WARMUP_STEPS steps of our job, the first UNSLOTH_WARMUP_STEPS of Unsloth's (it compiles, and
recompiles as answer lengths vary, over its first steps), and each path times >= 30 steps after that.
(b) and (b') run in processes of their own, since Unsloth patches transformers for the whole process it is
imported in. --unsloth-no-compile turns Unsloth's compilation off (UNSLOTH_COMPILE_DISABLE), for reference.
It takes ~15 minutes on an H200, more than one 10-minute device command: start it detached and collect it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LATEX_OCR_TRAIN_ROWS = 68_686  # unsloth/LaTeX_OCR's train split: what "one epoch" means below
H100_BF16_DENSE_TFLOPS = 989.4  # datasheet, SXM; FINDINGS.md measured ~798 for a large matmul on the lent card
# Answer lengths in LaTeX tokens: log-normal, median 45, p95 ~120, clipped to [5, 300]. LaTeX_OCR itself cannot
# be downloaded here; this is an assumption stated in the results, and the realised lengths are reported.
ANSWER_MEDIAN_TOKENS = 45
ANSWER_SIGMA = 0.6
ANSWER_RANGE = (5, 300)
BENCH_TOKENIZER_VOCAB = 4000
WARMUP_STEPS = 3
# Unsloth compiles each decoder block and recompiles while answer lengths vary: its first steps are compilation.
UNSLOTH_WARMUP_STEPS = 6
TIMED_STEPS = 30  # at least this many step intervals after warm-up for every path the headline compares

# The real Gemma 3 4B configuration (unsloth/gemma-3-4b-it), minus the token ids, which come from our tokenizer.
GEMMA3_4B_TEXT = {
    "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34, "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 262208, "query_pre_attn_scalar": 256,
    "sliding_window": 1024, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "max_position_embeddings": 131072,
    "layer_types": [("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(34)],
    "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
}
GEMMA3_4B_VISION = {
    "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
    "image_size": 896, "patch_size": 14, "vision_use_head": False, "layer_norm_eps": 1e-6,
}
GEMMA3_4B_MM_TOKENS = 256


# --- FLOPs --------------------------------------------------------------------------------------------


def flops_per_sample(text: dict, vision: dict, mm_tokens: int, seq_lens: list[int], label_lens: list[int],
                     lora_r: int, with_vision: bool) -> dict[str, float]:
    """Mean model FLOPs of one training sample (forward + backward, no recomputation).

    Frozen linear layers: 2 FLOPs a weight a token forward, 2 backward (input gradients only). LoRA: 2 forward,
    4 backward (input and weight gradients). Causal attention: 2*T^2*heads*head_dim a layer forward, twice that
    backward. LM head: only at labelled positions (TRL's fused head), 2*H*V forward and backward. The vision
    tower (bidirectional, frozen, nothing upstream needs gradients): forward only.
    """
    H, I, L = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    q, kv, V = text["num_attention_heads"] * text["head_dim"], text["num_key_value_heads"] * text["head_dim"], text["vocab_size"]
    linear = L * (H * q + 2 * H * kv + q * H + 3 * H * I)
    lora = L * lora_r * ((H + q) + 2 * (H + kv) + (q + H) + 3 * (H + I))
    mean_t = statistics.fmean(seq_lens)
    mean_t2 = statistics.fmean(t * t for t in seq_lens)
    mean_labels = statistics.fmean(label_lens)
    attention_fwd = L * 2 * mean_t2 * q
    head_fwd = 2 * H * V * mean_labels
    lm = mean_t * (2 * linear + 2 * lora) + mean_t * (2 * linear + 4 * lora) + 3 * attention_fwd + 2 * head_fwd
    vis = 0.0
    if with_vision:
        vh, vi, vl = vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"]
        patches = (vision["image_size"] // vision["patch_size"]) ** 2
        vis = (patches * 2 * vl * (4 * vh * vh + 2 * vh * vi) + vl * 4 * patches * patches * vh
               + 2 * 3 * vision["patch_size"] ** 2 * vh * patches + 2 * vh * H * mm_tokens)
    return {"language_model": lm, "vision": vis, "total": lm + vis}


def vision_flops_per_image(vision: dict, text: dict, mm_tokens: int) -> float:
    return flops_per_sample(text, vision, mm_tokens, [1], [0], 0, True)["vision"]


# --- set-up: model and data ----------------------------------------------------------------------------


def build_gemma3_4b_shaped(output_dir: Path) -> dict[str, Any]:
    """The real 4B architecture with random weights, our offline tokenizer, the real processor settings."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
    )

    from modal_jobs.tiny_model import (
        _chat_template,
        _generation_config,
        build_tokenizer,
    )

    template = _chat_template()
    tokenizer = build_tokenizer(BENCH_TOKENIZER_VOCAB, template)
    settings = dict(size={"height": 896, "width": 896}, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2,
                    do_pan_and_scan=False)
    try:  # the torchvision-backed processor, which is what a GPU machine loads for the real model
        from transformers import Gemma3ImageProcessor

        image_processor = Gemma3ImageProcessor(**settings)
    except Exception:
        image_processor = Gemma3ImageProcessorPil(**settings)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
                                image_seq_length=GEMMA3_4B_MM_TOKENS)
    vocab = tokenizer.get_vocab()
    text = {**GEMMA3_4B_TEXT, "pad_token_id": vocab["<pad>"], "bos_token_id": vocab["<bos>"],
            "eos_token_id": [vocab["<eos>"], vocab["<end_of_turn>"]]}
    config = Gemma3Config(text_config=text, vision_config=GEMMA3_4B_VISION, mm_tokens_per_image=GEMMA3_4B_MM_TOKENS,
                          boi_token_index=vocab["<start_of_image>"], eoi_token_index=vocab["<end_of_image>"],
                          image_token_index=vocab["<image_soft_token>"], architectures=["Gemma3ForConditionalGeneration"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma3ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        projector = model.model.multi_modal_projector.mm_input_projection_weight
        projector.normal_(0.0, 0.02)  # zero-initialised otherwise: every image embedding would be 0
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    return {"parameters": parameters, "image_processor": type(image_processor).__name__,
            "text_config": GEMMA3_4B_TEXT, "vision_config": GEMMA3_4B_VISION, "mm_tokens": GEMMA3_4B_MM_TOKENS}


def _render(source: str) -> bytes | None:
    from modal_jobs import synthetic

    try:
        return synthetic.render_latex(source)
    except Exception:
        return None


def _render_plain(label: str) -> bytes:
    """Fallback renderer (no matplotlib): the LaTeX source as wrapped text. The processor resizes every image
    to the same square, so the throughput does not depend on which renderer drew it."""
    import io
    import textwrap

    from PIL import Image, ImageDraw

    lines = textwrap.wrap(label, 90) or [label]
    image = Image.new("RGB", (8 * 90 + 12, 14 * len(lines) + 12), "white")
    draw = ImageDraw.Draw(image)
    for index, line in enumerate(lines):
        draw.text((6, 6 + 14 * index), line, fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def make_dataset(output_dir: Path, rows: int, seed: int = 0, test_rows: int = 8) -> dict[str, Any]:
    """Rendered formulas with LaTeX_OCR-like, varied answer lengths, in the prepared layout (train/test)."""
    import datasets

    from modal_jobs import synthetic

    rng = random.Random(seed)
    grammar = synthetic._Grammar(rng)
    drawn = []
    low, high = ANSWER_RANGE
    while len(drawn) < rows + test_rows:
        budget = min(high, max(low, round(rng.lognormvariate(math.log(ANSWER_MEDIAN_TOKENS), ANSWER_SIGMA))))
        tokens = grammar.expression(budget, 0)
        drawn.append((synthetic.label_of(tokens), " ".join(tokens)))
    renderer = "matplotlib mathtext"
    try:
        import matplotlib

        synthetic.render_latex("x")
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
            pngs = list(pool.map(_render, [source for _, source in drawn], chunksize=8))
        pngs = [png if png is not None else _render_plain(label) for (label, _), png in zip(drawn, pngs)]
    except ImportError:
        renderer = "PIL text (matplotlib missing)"
        pngs = [_render_plain(label) for label, _ in drawn]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})

    def split(items):
        return datasets.Dataset.from_dict(
            {"image": [{"bytes": png, "path": None} for _, png in items], "text": [label for (label, _), _ in items]},
            features=features)

    pairs = list(zip(drawn, pngs))
    datasets.DatasetDict({"train": split(pairs[:rows]), "test": split(pairs[rows:])}).save_to_disk(str(output_dir))
    latex_tokens = [len(label.split()) for label, _ in drawn[:rows]]
    return {"rows": rows, "renderer": renderer, "answer_latex_tokens": _stats(latex_tokens)}


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {"mean": round(statistics.fmean(ordered), 1), "p5": pick(0.05), "p50": pick(0.5), "p95": pick(0.95),
            "max": ordered[-1]}


def sequence_lengths(model_dir: Path, dataset_dir: Path, instruction: str) -> dict[str, Any]:
    """Tokens of each training sequence (prompt with its image placeholders + answer) and of each answer's
    labelled part, made by the train job's own collator."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoConfig, AutoProcessor

    from modal_jobs.prompts import assistant_turn, user_turn
    from modal_jobs.train import FeatureCollator

    mm_tokens = AutoConfig.from_pretrained(model_dir).mm_tokens_per_image

    class _NoFeatures:  # features of the right count and no width: only the token layout is wanted here
        def get(self, rows):
            return torch.empty(len(rows), mm_tokens, 0)

    processor = AutoProcessor.from_pretrained(model_dir)
    collator = FeatureCollator(processor, _NoFeatures())
    texts = load_from_disk(str(dataset_dir))["train"]["text"]
    seq, labels = [], []
    for start in range(0, len(texts), 64):
        batch = collator([{"prompt": [user_turn(instruction)], "completion": [assistant_turn(t)], "feature_index": 0}
                          for t in texts[start : start + 64]])
        seq += batch["attention_mask"].sum(1).tolist()
        labels += (batch["labels"] != -100).sum(1).tolist()
    return {"seq_lens": seq, "label_lens": labels, "sequence_tokens": _stats(seq), "answer_tokens": _stats(labels)}


# --- children: one measurement each, in its own process --------------------------------------------------


def _cuda_peak_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def _cuda_peak_reserved_gib() -> float | None:
    """What the allocator held at its peak (allocated plus its cache): closer to what the card must have."""
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_reserved() / 2**30, 2)


def _reset_peak() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sustained(times: list[tuple[int, float]], samples_per_step: int, warmup: int = WARMUP_STEPS) -> dict[str, Any]:
    """Samples/s from the first logged step after `warmup` to the last step."""
    times = sorted(times)
    times_used = [entry for entry in times if entry[0] > warmup]
    if len(times_used) < 2:
        times_used = times
    if len(times_used) < 2:
        return {"samples_per_s": None, "steps_timed": len(times_used)}
    (s0, t0), (s1, t1) = times_used[0], times_used[-1]
    step_s = [round((b - a) / (sb - sa), 3) for (sa, a), (sb, b) in zip(times, times[1:]) if sb > sa]
    timed = step_s[max(0, len(step_s) - (s1 - s0)):]
    return {"samples_per_s": round(samples_per_step * (s1 - s0) / (t1 - t0), 3), "steps_timed": s1 - s0,
            "seconds_timed": round(t1 - t0, 2),
            "samples_per_s_median_step": round(samples_per_step / statistics.median(timed), 3) if timed else None,
            "warmup_steps_excluded": warmup, "step_seconds": step_s}


def _train_request(spec: dict, name: str, features_dir: str | None, backend: str, max_steps: int):
    from modal_jobs.config import ModelConfig, TrainConfig
    from modal_jobs.prompts import DEFAULT_INSTRUCTION
    from modal_jobs.schemas import TrainRequest

    # The cached path logs as shipped (every 10 steps: each log waits for the GPU, which a step of ~0.3 s feels);
    # the pixel paths' steps are seconds long, so logging each one costs them nothing.
    logging = min(TrainConfig.model_fields["logging_steps"].default, max(1, max_steps // 4)) if features_dir else 1
    train = TrainConfig(backend=backend, max_steps=max_steps, logging_steps=logging, save_steps=10**6,
                        **spec.get("train_overrides", {}))
    model = ModelConfig(source=spec["model_dir"], **spec.get("model_overrides", {}))
    return TrainRequest(train=train, model=model, dataset_dir=spec["dataset_dir"], model_dir=spec["model_dir"],
                        output_dir=f"runs/{name}-{time.time_ns()}", instruction=DEFAULT_INSTRUCTION,
                        features_dir=features_dir)


def _kernel_seconds(averages: Any) -> float:
    """GPU kernel time in a profile's key averages. Only the kernels' own rows: an operator's row (aten::mm)
    repeats the time of the kernels it launched, so summing every row counts it twice."""
    from torch.autograd import DeviceType

    return sum(event.self_device_time_total for event in averages if event.device_type == DeviceType.CUDA) / 1e6


def _profile_trainer_steps(out: Path, first: int, count: int = 3, sync_steps: int = 2):
    """Wrap build_trainer (where modal_jobs.train.job's train calls it) so the trainer it builds records, from step
    `first`: `sync_steps` steps with every host-synchronising CUDA operation counted by its stack
    (OUT/trainer_syncs.txt), then `count` profiled steps: a kernel table, how busy the GPU was, and its idle gaps
    charged to the host operations that ended them (OUT/trainer_profile.txt, OUT/trainer_idle.json)."""
    from bench.gpu_idle import SyncRecorder, idle_report
    from modal_jobs.train import job  # where train() looks build_trainer up

    build = job.build_trainer
    profiled_from = first + sync_steps

    def build_and_profile(request):
        import tempfile

        import torch
        from torch.profiler import ProfilerActivity, profile
        from transformers import TrainerCallback

        setup = build(request)
        state: dict[str, Any] = {}
        on_gpu = torch.cuda.is_available()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        sort_key = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"

        def _sync():
            if on_gpu:
                torch.cuda.synchronize()

        class Profiler(TrainerCallback):
            def on_step_begin(self, args, trainer_state, control, **kwargs):
                if trainer_state.global_step == first and on_gpu and sync_steps:
                    state["syncs"] = SyncRecorder().__enter__()
                if trainer_state.global_step == profiled_from:
                    if "syncs" in state:
                        recorder = state.pop("syncs")
                        recorder.__exit__(None, None, None)
                        (out / "trainer_syncs.txt").write_text(
                            f"steps {first}-{profiled_from - 1}: " + recorder.report() + "\n")
                    _sync()
                    state["profile"] = profile(activities=activities)
                    state["profile"].__enter__()
                    state["t0"] = time.time()

            def on_step_end(self, args, trainer_state, control, **kwargs):
                if trainer_state.global_step == profiled_from + count and "profile" in state:
                    _sync()
                    wall = time.time() - state["t0"]
                    prof = state.pop("profile")
                    prof.__exit__(None, None, None)
                    averages = prof.key_averages()
                    gpu_s = _kernel_seconds(averages)
                    table = averages.table(sort_by=sort_key, row_limit=40, max_name_column_width=70)
                    (out / "trainer_profile.txt").write_text(
                        f"steps {profiled_from}-{profiled_from + count - 1}: wall {wall:.3f} s, GPU kernels "
                        f"{gpu_s:.3f} s (busy {gpu_s / wall:.0%})\n{table}")
                    with tempfile.TemporaryDirectory() as tmp:
                        trace = Path(tmp) / "trace.json"
                        prof.export_chrome_trace(str(trace))
                        (out / "trainer_idle.json").write_text(json.dumps(idle_report(trace), indent=1))

        setup.trainer.add_callback(Profiler())
        return setup

    job.build_trainer = build_and_profile


def _run_train_job(spec: dict, name: str, features_dir: str | None, backend: str, max_steps: int,
                   timed_until: int | None = None) -> dict:
    from modal_jobs.storage import read_manifest, resolve
    from modal_jobs.train import train

    request = _train_request(spec, name, features_dir, backend, max_steps)
    # The job compiles into the storage root's cache unless TORCHINDUCTOR_CACHE_DIR is set (modal_jobs.storage).
    kernel_cache = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or resolve("cache/torch-compile"))
    caches_empty = not (kernel_cache.exists() and any(kernel_cache.iterdir()))
    _reset_peak()
    started = time.time()
    with _GarbageCollections() as collections:
        result = train(request)
    wall = time.time() - started
    manifest = read_manifest(request.adapter_dir)
    history = json.loads((resolve(request.output_dir) / "progress.json").read_text())["history"]
    inputs = manifest["image_inputs"]
    # Rows per optimizer step over every process (train.gpus > 1: the accumulation is per process).
    step_samples = inputs.get("global_batch_size") or inputs["micro_batch"] * inputs["gradient_accumulation_steps"]
    return {
        "backend": result.backend, "image_inputs": inputs, "steps": result.global_step,
        "kernel_caches_empty_at_start": caches_empty,
        "samples_per_step": step_samples,
        **_sustained([(h["step"], h["time"]) for h in history if h["step"] <= (timed_until or max_steps)],
                     step_samples),
        "peak_gib": _cuda_peak_gib(), "peak_reserved_gib": _cuda_peak_reserved_gib(),
        "train_runtime_s": result.runtime_s, "job_wall_s": round(wall, 1),
        "first_loss": result.first_logged_loss, "last_loss": result.last_logged_loss,
        "first_step_after_s": round(history[0]["time"] - started, 1) if history else None,
        # The job's own account of its start: imports, build_trainer, first step, and what torch.compile did.
        "startup_s": result.startup_s, "compilation": result.compilation,
        # From the first logged step on: what training itself triggers, not loading and compiling.
        "garbage_collections": collections.summary(since=history[0]["time"] if history else None),
    }


class _GarbageCollections:
    """Python's garbage collections during the block, by generation: how many, and how long they held the host."""

    def __init__(self):
        self.collections: list[tuple[float, int, float]] = []  # (wall time at start, generation, seconds)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = (time.time(), time.perf_counter())
        elif hasattr(self, "_started"):
            self.collections.append((self._started[0], info["generation"], time.perf_counter() - self._started[1]))

    def __enter__(self):
        import gc

        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        import gc

        gc.callbacks.remove(self._callback)

    def summary(self, since: float | None = None) -> dict[str, Any]:
        """Collections from `since` (wall time) on, by generation."""
        by_generation: dict[int, list[float]] = {}
        for started, generation, seconds in self.collections:
            if since is None or started >= since:
                by_generation.setdefault(generation, []).append(seconds)
        return {f"generation_{generation}": {"count": len(times), "total_ms": round(1e3 * sum(times), 1),
                                             "max_ms": round(1e3 * max(times), 1)}
                for generation, times in sorted(by_generation.items())}


def child_setup(spec: dict) -> dict:
    from modal_jobs.prompts import DEFAULT_INSTRUCTION

    started = time.time()
    model_dir, dataset_dir = Path(spec["model_dir"]), Path(spec["dataset_dir"])
    if spec["tiny"]:
        from modal_jobs.config import TinyModelConfig
        from modal_jobs.tiny_model import (
            IMAGE_SIZE,
            MM_TOKENS_PER_IMAGE,
            PATCH_SIZE,
            build_tiny_gemma3,
        )

        cfg = TinyModelConfig()
        build_tiny_gemma3(model_dir, cfg)
        heads = max(1, cfg.hidden_size // 16)
        model_info = {
            "parameters": None, "mm_tokens": MM_TOKENS_PER_IMAGE,
            "text_config": {"hidden_size": cfg.hidden_size, "intermediate_size": 2 * cfg.hidden_size,
                            "num_hidden_layers": cfg.num_layers, "num_attention_heads": heads,
                            "num_key_value_heads": max(1, heads // 2), "head_dim": cfg.hidden_size // heads,
                            "vocab_size": 1000},
            "vision_config": {"hidden_size": cfg.hidden_size, "intermediate_size": 2 * cfg.hidden_size,
                              "num_hidden_layers": cfg.num_layers, "num_attention_heads": heads,
                              "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE},
        }
    else:
        model_info = build_gemma3_4b_shaped(model_dir)
    model_s = time.time() - started
    data = make_dataset(dataset_dir, spec["images"])
    lengths = sequence_lengths(model_dir, dataset_dir, DEFAULT_INSTRUCTION)
    return {"model": model_info, "dataset": {**data, **lengths}, "model_build_s": round(model_s, 1),
            "setup_s": round(time.time() - started, 1)}


def _matmul_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.time()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return round(20 * 2 * 8192**3 / (time.time() - started) / 1e12, 1)


def _vision_probe(spec: dict) -> dict[str, float]:
    """Images/s of the vision tower + projector alone on random pixels (no decoding, no preprocessing), as the
    encode stage runs it: tells whether the stage waits on the GPU or on its data loader."""
    import torch
    from transformers import AutoModelForImageTextToText

    from modal_jobs.encode import _image_features

    model = AutoModelForImageTextToText.from_pretrained(spec["model_dir"], dtype=torch.bfloat16,
                                                        attn_implementation="sdpa")
    backbone = model.model
    backbone.vision_tower.cuda()
    backbone.multi_modal_projector.cuda()
    out = {}
    for batch in (32, 64):
        pixels = torch.randn(batch, 3, 896, 896, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            _image_features(backbone, pixels)
            torch.cuda.synchronize()
            started = time.time()
            for _ in range(3):
                _image_features(backbone, pixels)
            torch.cuda.synchronize()
        out[f"batch_{batch}"] = round(3 * batch / (time.time() - started), 1)
    if spec.get("probe_compile"):
        compiled = torch.compile(backbone.get_image_features)
        pixels = torch.randn(32, 3, 896, 896, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            started = time.time()
            compiled(pixel_values=pixels)
            torch.cuda.synchronize()
            out["compile_s"] = round(time.time() - started, 1)
            started = time.time()
            for _ in range(3):
                compiled(pixel_values=pixels)
            torch.cuda.synchronize()
        out["batch_32_compiled"] = round(3 * 32 / (time.time() - started), 1)
    del model, backbone
    return out


def child_encode(spec: dict) -> dict:
    import torch

    from modal_jobs.config import ModelConfig
    from modal_jobs.encode import EncodeRequest, encode_images

    matmul = _matmul_tflops()
    probe = _vision_probe(spec) if torch.cuda.is_available() else None
    _reset_peak()
    request = EncodeRequest(model=ModelConfig(source=spec["model_dir"]), dataset_dir=spec["dataset_dir"],
                            model_dir=spec["model_dir"], features_root=str(Path(spec["workdir"]) / "features"),
                            batch_size=spec["encode_batch"])
    result = encode_images(request)
    return {"features_dir": result.features_dir, "images": result.num_images, "images_per_s": result.images_per_s,
            "first_batch_s": result.first_batch_s, "compiled_tower": result.compiled_tower,
            "runtime_s": result.runtime_s, "size_gb": round(result.size_bytes / 1e9, 2), "dtype": result.dtype,
            "peak_gib": _cuda_peak_gib(), "matmul_tflops": matmul, "vision_only_images_per_s": probe,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def _unsloth_environment(spec: dict) -> None:
    """Unsloth compiles parts of the model (and, by default, each decoder layer) on first use and again as
    shapes change. On (its default, as the original script runs it) unless --unsloth-no-compile."""
    if not spec.get("unsloth_compile", True):
        os.environ["UNSLOTH_COMPILE_DISABLE"] = "1"
        os.environ["UNSLOTH_BLOCK_COMPILE"] = "0"


def child_ours(spec: dict) -> dict:
    return _run_train_job(spec, "ours", spec["features_dir"], "auto", spec["steps_ours"])


def _sample_startup(out: Path, interval_s: float = 0.25) -> None:
    """Wrap build_trainer (where modal_jobs.train.job's train calls it) so that a thread samples the main thread's
    Python stack every `interval_s` from there to the end of the first optimizer step, where a warm start spends its
    time loading the cached compiled layers: OUT/startup_samples.txt. A sampler, not a profiler, because under
    Python's profiler the Inductor cache missed (sixth session); but with this sampler on it missed too (seventh
    session: 0 hits, 3 misses; BENCHMARKS.md). So what it samples is code generation, not a warm load, and the
    sampled process's time to its first step is not a warm start's."""
    import threading
    import traceback
    from collections import Counter

    from transformers import TrainerCallback

    from modal_jobs.train import job

    build = job.build_trainer

    def report(samples: list) -> str:
        on_stack, innermost = Counter(), Counter()
        for stack in samples:
            places = [f"{Path(entry.filename).name}:{entry.lineno} {entry.name}" for entry in stack]
            on_stack.update(set(places))
            if places:
                innermost[places[-1]] += 1
        seconds = lambda count: f"{count * interval_s:7.1f} s"
        lines = [f"{len(samples)} samples every {interval_s} s of the main thread, from build_trainer to the end of "
                 "the first step", "", "on the stack (inclusive):"]
        lines += [f"{seconds(n)}  {place}" for place, n in on_stack.most_common(60)]
        lines += ["", "innermost (where the thread was):"]
        lines += [f"{seconds(n)}  {place}" for place, n in innermost.most_common(30)]
        return "\n".join(lines) + "\n"

    def build_and_sample(request):
        main = threading.main_thread().ident
        stop = threading.Event()
        samples: list = []

        def sample() -> None:
            while not stop.wait(interval_s):
                frame = sys._current_frames().get(main)
                if frame is not None:
                    samples.append(traceback.extract_stack(frame))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        setup = build(request)

        class StopAfterFirstStep(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 1 and not stop.is_set():
                    stop.set()
                    sampler.join()
                    (out / "startup_samples.txt").write_text(report(samples))

        setup.trainer.add_callback(StopAfterFirstStep())
        return setup

    job.build_trainer = build_and_sample


def child_ours_again(spec: dict) -> dict:
    """(c) once more, in a new process: what a retrain pays when the compiled kernels are on the storage root.
    With --profile-trainer, after the timed steps, two count host syncs and three are profiled inside the trainer;
    with --sample-startup, its main thread's stack is sampled from building the trainer to the end of the first
    step."""
    steps = spec["steps_ours"]
    if spec.get("sample_startup"):
        _sample_startup(Path(spec["out"]))
    if spec.get("profile_trainer"):
        _profile_trainer_steps(Path(spec["out"]), first=steps + 1)
        return _run_train_job(spec, "ours-again", spec["features_dir"], "auto", steps + 6, timed_until=steps)
    return _run_train_job(spec, "ours-again", spec["features_dir"], "auto", steps)


def child_levers(spec: dict) -> dict:
    """Our job with one lever changed at a time (cached features), while time is left. One process: the layers
    compiled for the first variant serve the later ones (dynamo's cache), so each pays only its own recompiles."""
    from modal_jobs.train import levers

    deadline = spec["deadline"]
    variants = [
        ("full recomputation", {"FEATURES_GRADIENT_CHECKPOINTING": True}),
        ("rows padded to 64, not packed", {"FEATURES_PACK_SEQUENCES": False}),
        ("PEFT's own LoRA forwards", {"FEATURES_FUSED_LORA": False}),
        ("recomputation around the compiled layers", {"FEATURES_RECOMPUTE_IN_COMPILED": False,
                                                      "FEATURES_GRADIENT_CHECKPOINTING": True}),
        ("not compiled", {"FEATURES_COMPILE": False}),
    ]
    defaults = {name: getattr(levers, name) for name in
                ("FEATURES_MAX_MICRO_BATCH", "FEATURES_GRADIENT_CHECKPOINTING", "FEATURES_GROUP_BY_LENGTH",
                 "FEATURES_COMPILE", "FEATURES_FUSED_LORA", "FEATURES_RECOMPUTE_IN_COMPILED",
                 "FEATURES_PAD_TO_MULTIPLE", "FEATURES_PACK_SEQUENCES")}
    out = {}
    for label, overrides in variants:
        if time.time() > deadline - spec["lever_budget_s"]:
            out[label] = {"skipped": "not enough time left in this run"}
            continue
        for name, value in {**defaults, **overrides}.items():
            setattr(levers, name, value)
        try:
            out[label] = _run_train_job(spec, "lever", spec["features_dir"], "auto", spec["steps_lever"])
        except Exception as error:  # one failed variant (e.g. out of memory) must not lose the others
            out[label] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        _reset_peak()
    return out


# Variants of (c) that each need a process of their own (compiler settings apply to a whole process's
# compiled layers): name -> modal_jobs.train.levers attributes.
VARIANTS = {
    # Inductor's C++ wrapper launches each compiled layer's kernels from C++, not Python (H100, 2026-11-26: 58.4
    # samples/s against 60.3 for (c) on the same machine; not kept).
    "ours_cpp_wrapper": {"FEATURES_COMPILE_OPTIONS": {"cpp_wrapper": True}},
    # CUDA graphs of the compiled layers (one per distinct length: packed rows padded to 256, fewer lengths). On the
    # H100 (2026-11-26) the process crashed (SIGSEGV) after cudagraph trees warned of pending backwards.
    "ours_cuda_graphs": {"FEATURES_COMPILE_OPTIONS": {"triton.cudagraphs": True}, "FEATURES_PAD_TO_MULTIPLE": 256},
    # The MLP's gate/up outputs kept for the backward (levers.FEATURES_RECOMPUTE_WIDE_MATMULS False), or recomputed
    # (True), whatever the card's memory would choose (H200, 2026-12-02, sixth session: kept 74.6 samples/s at 21.7
    # GiB allocated, 40.2 reserved; recomputed 58.4 at 14.5, 15.2 reserved).
    "ours_keep_mlp": {"FEATURES_RECOMPUTE_WIDE_MATMULS": False},
    "ours_recompute_mlp": {"FEATURES_RECOMPUTE_WIDE_MATMULS": True},
    # FlexAttention's backward with the settings max-autotune chose for one packed row alone (H200: 67.8 samples/s
    # against 74.6 with Inductor's defaults; not used).
    "ours_tuned_flex": {"FEATURES_FLEX_KERNEL_OPTIONS": "FLEX_BACKWARD_AUTOTUNED_H200"},
    # The CUDA allocator's expandable segments (levers.FEATURES_EXPANDABLE_SEGMENTS): peak memory reserved.
    "ours_expandable_segments": {"FEATURES_EXPANDABLE_SEGMENTS": True},
    # Inductor's max-autotune for the compiled layers, matmuls left to cuBLAS: FlexAttention's kernels (and the
    # element-wise ones) tuned where they run, fused with what is around them (alone, the probe's choice for the
    # backward lost inside the layers: ours_tuned_flex).
    "ours_autotuned_kernels": {"FEATURES_COMPILE_OPTIONS": {"max_autotune": True,
                                                            "max_autotune_gemm_backends": "ATEN"}},
    # The loss's LM-head chunks as before the sixth session (levers.FEATURES_LOSS_CHUNK_TOKENS): peak memory.
    "ours_loss_chunk_2048": {"FEATURES_LOSS_CHUNK_TOKENS": 2048},
}


def _child_variant(name: str):
    def run(spec: dict) -> dict:
        from modal_jobs.train import levers

        for attribute, value in VARIANTS[name].items():
            # A string names another setting of the module (a measured configuration kept there).
            setattr(levers, attribute, getattr(levers, value) if isinstance(value, str) else value)
        return {"overrides": VARIANTS[name],
                **_run_train_job(spec, name, spec["features_dir"], "auto", spec["steps_variant"])}

    return run


def child_hf(spec: dict) -> dict:
    """(a) plain HF + PEFT on pixels, the original recipe."""
    return {"pixels": _run_train_job(spec, "hf", None, "trl", spec["steps_hf"])}


def _unsloth_pixels(spec: dict, micro: int, accumulation: int, steps: int) -> dict:
    """The original script: FastVisionModel + UnslothVisionDataCollator + SFTTrainer, on pixels."""
    # isort: off
    from unsloth import FastVisionModel  # first: Unsloth patches transformers and trl as they are imported
    from unsloth.trainer import UnslothVisionDataCollator
    # isort: on
    import torch
    from datasets import load_from_disk
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from modal_jobs.prompts import DEFAULT_INSTRUCTION

    _reset_peak()
    started = time.time()
    model, processor = FastVisionModel.from_pretrained(spec["model_dir"], load_in_4bit=False,
                                                       use_gradient_checkpointing="unsloth")
    model = FastVisionModel.get_peft_model(
        model, finetune_vision_layers=False, finetune_language_layers=True, finetune_attention_modules=True,
        finetune_mlp_modules=True, r=32, lora_alpha=64, lora_dropout=0, bias="none", random_state=3407)
    FastVisionModel.for_training(model)
    split = load_from_disk(spec["dataset_dir"])["train"]
    wanted = (steps + 1) * micro * accumulation
    converted = [
        {"messages": [
            {"role": "user", "content": [{"type": "text", "text": DEFAULT_INSTRUCTION},
                                         {"type": "image", "image": split[i % len(split)]["image"].convert("RGB")}]},
            {"role": "assistant", "content": [{"type": "text", "text": split[i % len(split)]["text"]}]},
        ]}
        for i in range(wanted)  # past the bench set's end it wraps around: the rate, not the data, is measured
    ]
    times: list[tuple[int, float]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            times.append((state.global_step, time.time()))

    trainer = SFTTrainer(
        model=model, processing_class=processor, data_collator=UnslothVisionDataCollator(model, processor),
        train_dataset=converted, callbacks=[Clock()],
        args=SFTConfig(
            per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation, max_steps=steps,
            learning_rate=3e-4, warmup_steps=0.2, lr_scheduler_type="linear", optim="adamw_torch_fused",
            weight_decay=0.01, max_grad_norm=0.3, seed=3407, bf16=True, logging_steps=1, save_strategy="no",
            report_to="none", output_dir=str(Path(spec["workdir"]) / "unsloth-out"), remove_unused_columns=False,
            dataset_text_field="", dataset_kwargs={"skip_prepare_dataset": True}, max_length=2048,
        ),
    )
    try:
        trainer.train()
    finally:
        del trainer, model
    return {"micro_batch": micro, "gradient_accumulation_steps": accumulation, "steps": steps,
            "compile": spec.get("unsloth_compile", True),
            "first_step_after_s": round(times[0][1] - started, 1) if times else None,
            **_sustained(times, micro * accumulation, warmup=UNSLOTH_WARMUP_STEPS), "peak_gib": _cuda_peak_gib()}


def child_unsloth(spec: dict) -> dict:
    """(b) The original script as it runs: micro-batch 4 x 4, Unsloth's compilation on."""
    _unsloth_environment(spec)
    return {"pixels": {"backend": "unsloth (original script)", "kernel_caches_empty_at_start": spec["caches_empty"],
                       **_unsloth_pixels(spec, 4, 4, spec["steps_unsloth"])}}


def child_unsloth_tuned(spec: dict) -> dict:
    """(b') The original script tuned for the card: the largest micro-batch that fits, with the same effective
    batch of 16 (16 x 1, else 8 x 2), compile on. An out-of-memory try is recorded and the next size tried."""
    import torch

    _unsloth_environment(spec)
    tried = []
    for micro in (16, 8):
        try:
            result = _unsloth_pixels(spec, micro, 16 // micro, spec["steps_unsloth"])
        except torch.OutOfMemoryError as error:
            tried.append({"micro_batch": micro, "error": f"out of memory: {str(error)[:120]}"})
            _reset_peak()
            continue
        return {"pixels": {"backend": "unsloth (tuned: largest micro-batch)",
                           "kernel_caches_empty_at_start": spec["caches_empty"], "tried": tried, **result}}
    return {"pixels": {"error": "no micro-batch of 16 or 8 fits", "tried": tried}}


CHILDREN = {"setup": child_setup, "encode": child_encode, "ours": child_ours, "ours_again": child_ours_again,
            "unsloth": child_unsloth, "unsloth_tuned": child_unsloth_tuned, "hf": child_hf, "levers": child_levers,
            **{name: _child_variant(name) for name in VARIANTS}}


# --- the orchestrator -----------------------------------------------------------------------------------


def _device() -> dict[str, Any]:
    try:
        line = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        name, memory, driver = (part.strip() for part in line.split(","))
        return {"gpu": name, "memory": memory, "driver": driver}
    except Exception:
        return {"gpu": None}


def _own_kernel_caches(name: str, workdir: Path) -> tuple[dict[str, str], Path, bool]:
    """Environment and working folder giving an Unsloth child kernel caches of its own (Inductor's, Triton's and
    Unsloth's generated modules, which it writes under the working folder), so that (b') does not start from
    what (b) compiled. Our job's children keep the storage root's cache, as the pipeline does (ours_again is
    meant to find what ours compiled). Returns (environment, working folder, whether the caches were empty)."""
    folder = workdir / f"child-{name}"
    caches = {"TORCHINDUCTOR_CACHE_DIR": folder / "inductor", "TRITON_CACHE_DIR": folder / "triton",
              "UNSLOTH_COMPILE_LOCATION": folder / "unsloth_compiled_cache"}
    empty = not any(path.exists() and any(path.iterdir()) for path in caches.values())
    folder.mkdir(parents=True, exist_ok=True)
    return {key: str(path) for key, path in caches.items()}, folder, empty


def _run_child(name: str, spec: dict, workdir: Path, timeout: float) -> dict:
    spec_path = workdir / f"spec-{name}.json"
    result_path = workdir / f"result-{name}.json"
    log_path = workdir / f"log-{name}.txt"
    environment, cwd = dict(os.environ), workdir
    if name.startswith("unsloth"):
        caches, cwd, empty = _own_kernel_caches(name, workdir)
        environment.update(caches)
        spec = {**spec, "caches_empty": empty}
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    started = time.time()
    with open(log_path, "w") as log:
        try:
            code = subprocess.run([sys.executable, "-m", "bench.train_speed", "--child", name, str(spec_path),
                                   str(result_path)], stdout=log, stderr=subprocess.STDOUT, timeout=max(5, timeout),
                                  cwd=cwd, env=environment).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = round(time.time() - started, 1)
    print(f"[bench] {name}: exit {code} after {wall} s", file=sys.stderr, flush=True)
    logs = Path(spec["out"]) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / log_path.name).write_text(log_path.read_text(errors="replace"))
    if result_path.exists():
        return {**json.loads(result_path.read_text()), "wall_s": wall}
    tail = log_path.read_text(errors="replace").splitlines()[-25:]
    return {"error": f"exit {code}", "log_tail": tail, "wall_s": wall}


def _row(name: str, what: str, result: dict, flops: float | None, peak: float | None, seq_tokens: float) -> dict:
    sps = result.get("samples_per_s")
    mfu = round(flops * sps / (peak * 1e12), 3) if (sps and flops and peak) else None
    return {"name": name, "what": what, "samples_per_s": sps,
            "tokens_per_s": round(sps * seq_tokens) if sps else None, "peak_gib": result.get("peak_gib"),
            "mfu": mfu, "error": result.get("error") or result.get("skipped"), "skipped": bool(result.get("skipped"))}


def summarise(results: dict, peak_tflops: float | None) -> dict:
    setup = results.get("setup", {})
    model, data = setup.get("model", {}), setup.get("dataset", {})
    if not model or "seq_lens" not in data:
        return {"rows": [], "note": "set-up failed"}
    text, vision, mm = model["text_config"], model["vision_config"], model["mm_tokens"]
    pixel = flops_per_sample(text, vision, mm, data["seq_lens"], data["label_lens"], 32, True)["total"]
    cached = flops_per_sample(text, vision, mm, data["seq_lens"], data["label_lens"], 32, False)["total"]
    per_image = vision_flops_per_image(vision, text, mm)
    seq_tokens = statistics.fmean(data["seq_lens"])
    rows = []
    hf = results.get("hf")
    if hf:
        rows.append(_row("(a) hf_pixels", "plain HF+PEFT (TRL), pixels, 4 x 4, checkpointing", hf.get("pixels", hf),
                         pixel, peak_tflops, seq_tokens))
    unsloth = results.get("unsloth", {}).get("pixels", results.get("unsloth", {}))
    tuned = results.get("unsloth_tuned", {}).get("pixels", results.get("unsloth_tuned", {}))
    for name, label, measured in (("(b) unsloth_pixels", "Unsloth, original script", unsloth),
                                  ("(b') unsloth_tuned", "Unsloth tuned for the card", tuned)):
        if measured and "micro_batch" not in measured:  # skipped or failed: the row says why
            rows.append(_row(name, label, measured, pixel, peak_tflops, seq_tokens))
        elif measured:
            rows.append(_row(name, f"{label}, pixels, {measured.get('micro_batch')} x "
                             f"{measured.get('gradient_accumulation_steps')}, compile "
                             f"{'on' if measured.get('compile', True) else 'off'}, "
                             f"{measured.get('steps_timed')} timed steps after {measured.get('warmup_steps_excluded')}"
                             f" (first step after {measured.get('first_step_after_s')} s; kernel caches "
                             f"{'empty' if measured.get('kernel_caches_empty_at_start') else 'NOT empty'} at start)",
                             measured, pixel, peak_tflops, seq_tokens))
    ours = results.get("ours", {})
    inputs = ours.get("image_inputs", {})
    rows.append(_row("(c) ours", f"our train job as shipped ({ours.get('backend')}, {inputs.get('path')}, "
                     f"{inputs.get('micro_batch')} x {inputs.get('gradient_accumulation_steps')}, "
                     f"{ours.get('steps_timed')} timed steps after {ours.get('warmup_steps_excluded')}; first step "
                     f"after {ours.get('first_step_after_s')} s, kernel caches "
                     f"{'empty' if ours.get('kernel_caches_empty_at_start') else 'NOT empty'} at start)",
                     ours, cached, peak_tflops, seq_tokens))
    again = results.get("ours_again")
    if again:
        rows.append(_row("(c) again", "the same job in a new process, its compiled kernels cached on the storage "
                         f"root (first step after {again.get('first_step_after_s')} s, vs "
                         f"{ours.get('first_step_after_s')} s cold)", again, cached, peak_tflops, seq_tokens))
    encode = results.get("encode", {})
    ips = encode.get("images_per_s")
    rows.append({"name": "(d) encode", "what": "our encode stage (vision tower + projector, once per image)",
                 "samples_per_s": ips, "tokens_per_s": None, "peak_gib": encode.get("peak_gib"),
                 "mfu": round(per_image * ips / (peak_tflops * 1e12), 3) if (ips and peak_tflops) else None,
                 "error": encode.get("error")})
    for name, overrides in VARIANTS.items():
        if isinstance(results.get(name), dict):
            rows.append(_row("variant", f"ours, {name}: {overrides}", results[name], cached, peak_tflops,
                             seq_tokens))
    for label, lever in (results.get("levers") or {}).items():
        if isinstance(lever, dict):
            rows.append(_row("lever", f"ours, {label}", lever, cached, peak_tflops, seq_tokens))
    summary: dict[str, Any] = {
        "rows": rows,
        "flops_per_sample_tflop": {"pixel_path": round(pixel / 1e12, 2), "cached_path": round(cached / 1e12, 2),
                                   "vision_per_image": round(per_image / 1e12, 2)},
        "mean_sequence_tokens": round(seq_tokens, 1),
        "mfu_peak_tflops": peak_tflops,
    }
    sps_b, sps_b_tuned, sps_c = unsloth.get("samples_per_s"), tuned.get("samples_per_s"), ours.get("samples_per_s")
    if sps_b and sps_c:
        summary["speedup_ours_vs_unsloth_pixels"] = round(sps_c / sps_b, 2)
    if sps_b_tuned and sps_c:
        summary["speedup_ours_vs_unsloth_tuned"] = round(sps_c / sps_b_tuned, 2)
    epoch = {}
    if sps_b:
        epoch["unsloth_pixels_min"] = round(LATEX_OCR_TRAIN_ROWS / sps_b / 60, 1)
    if sps_c and ips:
        epoch["ours_encode_min"] = round(LATEX_OCR_TRAIN_ROWS / ips / 60, 1)
        epoch["ours_train_min"] = round(LATEX_OCR_TRAIN_ROWS / sps_c / 60, 1)
        epoch["ours_total_min"] = round(epoch["ours_encode_min"] + epoch["ours_train_min"], 1)
    if epoch:
        summary["projected_epoch"] = {**epoch, "rows": LATEX_OCR_TRAIN_ROWS,
                                      "note": "sustained rates times the LaTeX_OCR train split; model loads "
                                              "(~tens of seconds each) not included"}
    return summary


def markdown(report: dict) -> str:
    summary = report["summary"]
    device = report["device"]
    lines = [
        f"Card: {device.get('gpu')} ({device.get('memory')}, driver {device.get('driver')}). "
        f"Date: {report['date']}. Command: `{report['command']}`.",
        f"Model: {'the tiny Gemma 3 (CPU smoke test)' if report['config']['tiny'] else 'Gemma-3-4B-shaped, bf16'}, "
        f"random weights ({report['results'].get('setup', {}).get('model', {}).get('parameters')} "
        f"parameters), LoRA r=32 on the language layers. Data: {report['config']['images']} rendered images "
        f"({report['results'].get('setup', {}).get('dataset', {}).get('renderer')}), "
        f"{summary.get('mean_sequence_tokens')} tokens a sequence on average "
        f"(answers: {report['results'].get('setup', {}).get('dataset', {}).get('answer_tokens')}).",
        "",
        "| path | what | samples/s | tokens/s | peak GiB | MFU |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary.get("rows", []):
        cells = [row["name"], row["what"], row["samples_per_s"] if row["samples_per_s"] is not None else "—",
                 row["tokens_per_s"] or "—", row["peak_gib"] if row["peak_gib"] is not None else "—",
                 f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "—"]
        if row.get("error"):
            cells[2] = f"{'skipped' if row.get('skipped') else 'failed'}: {str(row['error'])[:60]}"
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    lines.append(f"(d) encode counts images/s. MFU: counted model FLOPs over {summary.get('mfu_peak_tflops')} TFLOP/s "
                 f"(FLOPs a sample: {summary.get('flops_per_sample_tflop')}).")
    if "speedup_ours_vs_unsloth_pixels" in summary:
        lines.append(f"(c) vs (b), Unsloth as the original script runs it, same run: "
                     f"{summary['speedup_ours_vs_unsloth_pixels']}x.")
    if "speedup_ours_vs_unsloth_tuned" in summary:
        lines.append(f"(c) vs (b'), Unsloth tuned for the card, same run: {summary['speedup_ours_vs_unsloth_tuned']}x.")
    if "projected_epoch" in summary:
        lines.append(f"Projected LaTeX_OCR epoch (minutes): {summary['projected_epoch']}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tiny", action="store_true", help="the tiny model on whatever device there is")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vlmpipe-train-speed"))
    parser.add_argument("--images", type=int, default=None, help="bench set size (default 1024; tiny 48)")
    parser.add_argument("--budget-s", type=float, default=1200.0, help="stop starting measurements after this")
    parser.add_argument("--only", default="setup,encode,unsloth,unsloth_tuned,ours",
                        help="measurements to run, in this order (also: hf, ours_again, levers, "
                             + ", ".join(VARIANTS) + ")")
    parser.add_argument("--reuse", action="store_true",
                        help="take set-up and encode from an earlier run in the same --workdir")
    parser.add_argument("--unsloth-no-compile", action="store_true",
                        help="turn Unsloth's torch.compile off (on is its default and the fair comparison)")
    parser.add_argument("--probe-compile", action="store_true",
                        help="also time a torch.compile'd vision tower on random pixels (~1 minute of compiling)")
    parser.add_argument("--profile-trainer", action="store_true",
                        help="(c) again, after its timed steps, counts host syncs over two (OUT/trainer_syncs.txt) "
                             "and profiles three (OUT/trainer_profile.txt, trainer_idle.json)")
    parser.add_argument("--sample-startup", action="store_true",
                        help="(c) again samples its main thread's stack from building its trainer to the end of its "
                             "first step (OUT/startup_samples.txt)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="scale every path's step count")
    parser.add_argument("--gpus", type=int, default=1,
                        help="our job on this many GPUs (train.gpus), each doing one GPU's default work: the "
                             "accumulation is multiplied by it, so the global batch is 16 x gpus (weak scaling: "
                             "compare samples/s with gpus x the 1-GPU rate)")
    parser.add_argument("--child", nargs=3, metavar=("NAME", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        name, spec_path, result_path = args.child
        spec = json.loads(Path(spec_path).read_text())
        result = CHILDREN[name](spec)
        Path(result_path).write_text(json.dumps(result, indent=2, default=str))
        return

    started = time.time()
    deadline = started + args.budget_s
    workdir = args.workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["VLMPIPE_HOME"] = str(workdir / "home")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TORCH_LOGS", "recompiles")  # in each child's log (OUT/logs): when and why
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")]))
    device = _device()
    on_gpu = device.get("gpu") is not None and not args.tiny
    images = args.images or (48 if args.tiny else 768)
    spec: dict[str, Any] = {
        "tiny": args.tiny or not on_gpu, "workdir": str(workdir), "images": images,
        "model_dir": str(workdir / "model"), "dataset_dir": str(workdir / "dataset"), "deadline": deadline,
        "encode_batch": 32 if on_gpu else 8,
        # Enough steps for a sustained rate: ~15-20 s of timed training per path on an H100.
        # Ours logs every 10 steps: 40 steps time 30 after warm-up (it is measured from a logged step).
        "steps_ours": WARMUP_STEPS + TIMED_STEPS + 7 if on_gpu else 6, "steps_lever": 24 if on_gpu else 4,
        "steps_variant": 60 if on_gpu else 6, "steps_hf": 8 if on_gpu else 4,
        "steps_unsloth": UNSLOTH_WARMUP_STEPS + TIMED_STEPS + 1, "lever_budget_s": 60 if on_gpu else 10,
        "unsloth_compile": not args.unsloth_no_compile, "probe_compile": args.probe_compile,
        "profile_trainer": args.profile_trainer, "sample_startup": args.sample_startup, "out": str(out),
        "model_overrides": {} if on_gpu else {"max_seq_length": 512},
    }
    if args.gpus > 1:
        from modal_jobs.config import TrainConfig

        accumulation = TrainConfig.model_fields["gradient_accumulation_steps"].default
        spec["train_overrides"] = {"gpus": args.gpus, "gradient_accumulation_steps": accumulation * args.gpus}
    for key in ("steps_ours", "steps_lever", "steps_variant", "steps_hf", "steps_unsloth"):
        spec[key] = max(WARMUP_STEPS + 2, round(spec[key] * args.steps_scale))
    wanted = args.only.split(",")
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "device": device,
        "command": "python -m bench.train_speed " + " ".join(sys.argv[1:]),
        "config": {k: v for k, v in spec.items() if k not in ("deadline",)}, "results": {},
        "assumptions": {
            "answers": f"LaTeX tokens log-normal, median {ANSWER_MEDIAN_TOKENS}, sigma {ANSWER_SIGMA}, "
                       f"clipped to {ANSWER_RANGE} (LaTeX_OCR itself cannot be downloaded here)",
            "unsloth_baseline": "the original script's settings without its full lm_head/embed_tokens copies (an "
                                "opt-in here, train.train_embeddings); with them it would only be slower",
        },
    }
    # (c) compiles its layers first (~2 minutes on an H100), then trains; Unsloth's import alone takes ~40 s.
    caps = {"setup": 120, "encode": 150, "hf": 170, "ours": 330, "ours_again": 330, "unsloth": 450,
            "unsloth_tuned": 420, "levers": 400,
            **{name: 360 for name in VARIANTS}, "ours_autotuned_kernels": 600}  # its cold compile benchmarks
    for name in wanted:  # in the order given
        if name not in CHILDREN:
            raise SystemExit(f"unknown measurement {name!r}: choose from {', '.join(CHILDREN)}")
        if name.startswith("unsloth") and spec["tiny"]:
            report["results"][name] = {"skipped": "Unsloth needs CUDA"}
            continue
        previous = workdir / f"result-{name}.json"
        if args.reuse and name in ("setup", "encode") and previous.exists():
            report["results"][name] = {**json.loads(previous.read_text()), "reused": True}
            if name == "encode":
                spec["features_dir"] = report["results"][name].get("features_dir")
            continue
        remaining = deadline - time.time()
        if remaining < 20:
            report["results"][name] = {"skipped": "out of time"}
            continue
        if name != "setup" and "error" in report["results"].get("setup", {}):
            break
        if (name in ("ours", "ours_again") or name in VARIANTS) and not spec.get("features_dir"):
            report["results"][name] = {"skipped": "no feature cache (encode failed)"}
            continue
        result = _run_child(name, spec, workdir, min(caps[name], remaining))
        report["results"][name] = result
        if name == "encode" and result.get("features_dir"):
            spec["features_dir"] = result["features_dir"]
        peak = H100_BF16_DENSE_TFLOPS if on_gpu else None
        report["summary"] = summarise(report["results"], peak)
        report["total_s"] = round(time.time() - started, 1)
        (out / "train_speed.json").write_text(json.dumps(report, indent=2, default=str))
        (out / "train_speed.md").write_text(markdown(report))
    report["summary"] = summarise(report["results"], H100_BF16_DENSE_TFLOPS if on_gpu else None)
    report["total_s"] = round(time.time() - started, 1)
    (out / "train_speed.md").write_text(markdown(report))
    setup = report["results"].get("setup", {})
    for key in ("seq_lens", "label_lens"):
        setup.get("dataset", {}).pop(key, None)  # summarised already; the lists are long
    (out / "train_speed.json").write_text(json.dumps(report, indent=2, default=str))
    print(markdown(report))


if __name__ == "__main__":
    main()
