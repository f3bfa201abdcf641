"""Speed levers of the cached-features path: settings, and what applies them to a model.

Measured by bench/train_speed.py and bench/step_breakdown.py; numbers in BENCHMARKS.md. The settings are read
when a trainer is built (modal_jobs.train.setup), so a benchmark turns a lever by setting it here, on this
module (`modal_jobs.train.levers.FEATURES_COMPILE = False`), not on the package that re-exports it.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

from modal_jobs.train.loss import _head_and_backbone

# Without the vision tower, a step of a 4B model is short enough that Python and kernel-launch overhead and
# unfused element-wise kernels (norms, casts, LoRA scaling) took most of it on an H100 (bench/step_breakdown.py).
# Fusing gradient accumulation into a larger micro-batch keeps the optimizer's batch (and, with the loss
# normalised by the accumulated label count, the update) the same while each step does more work.
FEATURES_MAX_MICRO_BATCH = 16
# Recompute activations in the backward pass: True, False, or "selective" (`selective_checkpoint_kwargs`: keep
# the outputs of the narrow matmuls and of attention, recompute the MLP's wide gate/up and the element-wise work).
# Measured in bench/step_breakdown.py's loop (fused LoRA, padded to 64, 16 a micro-batch, compiled, H100):
# selective inside the compiled layers 51.6 samples/s at 18.1 GiB, full recomputation inside 42.4 at 12.3,
# around them 39.6 at 12.3; none at all kept ~3 GiB a sample (16 x 1 peaked at 53 GiB under the trainer).
FEATURES_GRADIENT_CHECKPOINTING: bool | str = "selective"
# Under "selective", what to do with the matmul outputs wider than the hidden size (the MLP's gate and up
# projections): recompute them in the backward (True), keep them (False), or None: keep them where the card has at
# least KEEP_WIDE_MATMULS_MIN_GIB of memory. Recomputing them is about a fifth of a Gemma 3 4B layer's matmul work in
# a LoRA step (20 of ~92 units: forward 36, input gradients 36); keeping them costs 2 x 10,240 bf16 values a token a
# layer. Fair bench, H200, 2026-12-02 (sixth session): kept 74.6 samples/s at 21.7 GiB allocated, but the allocator
# reserved 34.8-40.2 GiB (packed batches of varying length fragment its cache); recomputed 58.4-64.5 at 14.5-16.5
# GiB (15.2 reserved). So only a card with room for that cache keeps them: 80 GB cards do, 24-48 GB cards recompute.
FEATURES_RECOMPUTE_WIDE_MATMULS: bool | None = None
KEEP_WIDE_MATMULS_MIN_GIB = 64
# Labelled tokens whose LM-head logits are made at once in the loss (labelled_token_loss), forward and again in the
# backward: each chunk holds ~16 bytes a token a vocabulary entry at its peak (bf16 and float32 logits, their
# log-softmax and its gradient): ~1.1 GB for 256 tokens of Gemma 3's 262k vocabulary, where a step of 16 LaTeX_OCR
# rows has ~800 (3.3 GB in one chunk). The head's matmuls are the same work in any chunks. Fair bench, H200: 2048
# -> 256 took the peak from 24.2 to 21.7 GiB (MLP outputs kept) and from 16.5 to 14.5 GiB (recomputed).
FEATURES_LOSS_CHUNK_TOKENS = 256
# FlexAttention kernel settings for the packed rows' attention (its `kernel_options`; empty: Inductor's defaults).
# FLEX_BACKWARD_AUTOTUNED_H200 is what max-autotune chose for the backward of one packed row alone
# (bench.attention_probe, H200, 2026-12-02: 0.78 ms a layer against 1.14 with the defaults), but inside the
# compiled layers, where the kernel is fused with the norms around it, training ran slower with it: 67.8 samples/s
# against 74.6 with the defaults, same command (bench.train_speed's ours_tuned_flex). Not used.
FEATURES_FLEX_KERNEL_OPTIONS: dict[str, int] = {}
FLEX_BACKWARD_AUTOTUNED_H200: dict[str, int] = {
    "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 32, "bwd_BLOCK_M2": 32, "bwd_BLOCK_N2": 32,
    "bwd_num_warps": 4, "bwd_num_stages": 3,
}
# After the first optimizer step (the start: model, trainer, compiled or cache-loaded kernels), gc.freeze() what is
# alive, so that Python's full collections during training walk only what training makes. In a process that loaded
# its compiled layers from the kernel cache (fair bench, H200, 2026-12-02, sixth session), four full collections
# held the host 2.6 s (up to 0.76 s each) inside a 9 s window of 30 steps: 53.3 samples/s against 64.5 for the
# process that compiled them. (Frozen at the first step's start, before compiling, it did not help: run 13.)
FEATURES_GC_FREEZE_AFTER_FIRST_STEP = True
# The CUDA allocator grows segments in place (PYTORCH_CUDA_ALLOC_CONF's expandable_segments) instead of caching
# blocks of each size it has seen: packed batches vary in length, and with the MLP's outputs kept the allocator
# reserved 34.8-40.2 GiB for a 21.7 GiB peak (fair bench, H200, sixth session). Applied where the process's own
# PYTORCH_CUDA_ALLOC_CONF says nothing (Unsloth, once imported, may set one). Not measured yet: off;
# bench.train_speed's ours_expandable_segments measures it.
FEATURES_EXPANDABLE_SEGMENTS = False
# torch.compile each decoder layer (CUDA only; dynamic shapes): fuses element-wise work and cuts launches.
# Compiling costs ~1-2 minutes once per process; a couple of early batches recompile (duck-sized mask shapes).
# With every kernel cached (storage.keep_compiled_kernels) the first step still comes ~75 s after the job starts, ~40 s
# of it loading the cached layer module (PyCodeCache.load_by_key_path). Starting Inductor's compile workers when the
# layers are set up (async_compile.maybe_warm_pool) did not shorten that: 75.2 s against 77.8 (fair bench, H200,
# seventh session). Not kept.
FEATURES_COMPILE = True
# Inductor options for the compiled layers (torch.compile's `options`; empty: its defaults).
FEATURES_COMPILE_OPTIONS: dict[str, Any] = {}
# Where compiled, recompute inside each compiled layer (the compiler sees both passes, the selective policy sees
# the matmuls) rather than around it with transformers' checkpointing.
FEATURES_RECOMPUTE_IN_COMPILED = True
# Batches of similar length pad less (length-sorted: 48.6 vs 42.4 samples/s in the loop, full recomputation; packed
# rows, below, have no padding to save), but
# they change which samples share a batch and in what order (transformers' sampler sweeps each group from long to
# short), and that changed what is learned: the embedded default's fine-tuned CER went from 0.837 to 0.904 and a
# 100-step retrain no longer beat a 2-step one. Off; a lever for those who accept that.
FEATURES_GROUP_BY_LENGTH = False
# Processes collating batches (chat template, tokenizer, feature reads) while the GPU trains (CUDA only).
FEATURES_LOADER_WORKERS = 2
# LoRA layers computed as one matmul-with-add (`fuse_lora_forwards`) instead of PEFT's cast-to-float32, two
# matmuls, scale and add: the same arithmetic under autocast, without the element-wise passes over activations.
# Inductor keeps its addmm as cuBLAS's out-of-place addmm, which first copies the whole base output into its result
# (H200 profile, sixth session: 8.6 ms of a ~0.23 s step). Adding the product in place inside a custom op, opaque to
# the compiler, removed the copy but cost far more than it saved: 57.9 samples/s against 71.2, same command (fair
# bench, H200, seventh session; BENCHMARKS.md). Not kept.
FEATURES_FUSED_LORA = True
# Where compiled, pad each batch's length (packed: its one row's) up to a multiple of this (None: not at all).
# Fewer distinct shapes for the compiled layers to specialise on; the padding is masked and unlabelled, so the
# loss is unchanged.
FEATURES_PAD_TO_MULTIPLE: int | None = 64
# Where compiled, a batch's rows go end to end in one row of their real tokens (`FeatureCollator(pack=True)`)
# instead of each padded to the batch's longest: with LaTeX_OCR-like lengths about a fifth of a padded batch of 16
# was padding, which every matmul paid for. The same rows make up the same batch, each attending only to itself
# (FlexAttention over a block mask built from the rows' positions, skipping the blocks between rows), so the loss
# and gradients are those of the padded batch (tests/test_encode.py). Loop on an H200 (fwd+bwd, 16, selective,
# compiled): padded to 64, 54.6 samples/s at 18.1 GiB; packed, 66.0 at 15.9 GiB.
FEATURES_PACK_SEQUENCES = True


def selective_checkpoint_kwargs(max_saved_width: int | None = None) -> dict[str, Any]:
    """gradient_checkpointing_kwargs for selective recomputation: the backward keeps what the matmuls and the
    attention kernels produced and recomputes only the cheap element-wise work between them (norms, activations,
    casts, rotary embeddings). For a Gemma 3 4B layer that keeps ~1/3 of the activations for ~2% more work,
    where full recomputation costs a whole extra forward. `max_saved_width`: recompute matmul outputs wider than
    this too (the MLP's gate and up projections: most of the memory, under half of the matmul work)."""
    import functools

    import torch
    from torch.utils.checkpoint import (
        CheckpointPolicy,
        create_selective_checkpoint_contexts,
    )

    aten = torch.ops.aten
    keep = {aten.mm.default, aten.addmm.default, aten.bmm.default}
    if hasattr(torch.ops.higher_order, "flex_attention"):  # packed batches' attention
        keep.add(torch.ops.higher_order.flex_attention)
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward"):
        if hasattr(aten, name):
            keep.add(getattr(aten, name).default)

    matmuls = {aten.mm.default, aten.addmm.default}

    def policy(ctx, op, *args, **kwargs):
        if op not in keep:
            return CheckpointPolicy.PREFER_RECOMPUTE
        if max_saved_width is not None and op in matmuls and args[-1].shape[-1] > max_saved_width:
            return CheckpointPolicy.PREFER_RECOMPUTE  # a wide output (the MLP's gate/up): cheaper to recompute
        return CheckpointPolicy.MUST_SAVE

    return {"use_reentrant": False,
            "context_fn": functools.partial(create_selective_checkpoint_contexts, policy)}


def _fused_lora_forward(self, x, *args, **kwargs):
    """A PEFT LoRA Linear's forward as base(x) + scaling * (x A^T) B^T, the add done by the second matmul (addmm),
    in the base layer's output dtype: what PEFT computes under autocast, without its float32 copy of the input
    and the separate scale and add passes. Anything but one plain active adapter takes PEFT's own forward."""
    import torch
    import torch.nn.functional as F

    active = self.active_adapters
    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or len(active) != 1:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    name = active[0]
    if name not in self.lora_A:
        return result
    dtype = result.dtype
    low_rank = F.linear(x.to(dtype), self.lora_A[name].weight.to(dtype))
    fused = torch.addmm(result.reshape(-1, result.shape[-1]), low_rank.reshape(-1, low_rank.shape[-1]),
                        self.lora_B[name].weight.to(dtype).t(), alpha=self.scaling[name])
    return fused.view(result.shape)


def fuse_lora_forwards(model: Any) -> int:
    """Give every plain LoRA Linear of `model` (one adapter, no dropout, no DoRA or other variant, no bias on
    lora_B, an nn.Linear base) `_fused_lora_forward`; returns how many. Others keep PEFT's forward."""
    import types

    import torch
    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear) or not isinstance(module.base_layer, torch.nn.Linear):
            continue
        names = list(module.lora_A.keys())
        if len(names) != 1 or getattr(module, "lora_variant", {}).get(names[0]) is not None:
            continue
        if not isinstance(module.lora_dropout[names[0]], torch.nn.Identity) or module.lora_B[names[0]].bias is not None:
            continue
        module.forward = types.MethodType(_fused_lora_forward, module)
        count += 1
    return count


# The keyword arguments _compile_layers adds to every decoder layer's call. Read as a global by the compiled code:
# torch.compile specialises on a global's numbers, where from a closure it would take them as graph inputs
# (symbolic under dynamic shapes), which FlexAttention's kernel settings must not be.
_LAYER_KWARGS: dict[str, Any] = {}


def _layer_call(forward: Any, checkpoint_kwargs: dict[str, Any] | None) -> Any:
    """A decoder layer's forward with _LAYER_KWARGS added to every call (FlexAttention's kernel options reach the
    attention function through the layer's keyword arguments) and, with `checkpoint_kwargs`, its activations
    recomputed in the backward pass. One function for every layer: the layers share their compiled graph."""

    def call(*args, **kwargs):
        from torch.utils.checkpoint import checkpoint

        kwargs = {**_LAYER_KWARGS, **kwargs}
        if checkpoint_kwargs is None:
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, **checkpoint_kwargs, **kwargs)

    return call


def _compile_layers(model: Any, recompute: bool | str = False, backend: str = "inductor") -> bool:
    """torch.compile each decoder layer of the language model in place, shapes dynamic: the layers share their
    compiled graph (packed rows: one for both of Gemma 3's layer kinds, whose masks differ only in tensors; padded
    batches: one per kind, whose masks differ in layout). With `recompute` (True, or "selective" for
    `selective_checkpoint_kwargs`' policy) the layer's activations are recomputed in the backward pass by a
    checkpoint *inside* the compiled region, where the compiler sees both passes and the policy sees its matmuls
    (around a compiled layer, it sees one opaque call). Under "selective", the MLP's wide outputs are recomputed
    or kept as `recompute_wide_matmuls` says; FlexAttention gets `flex_kernel_options` where any are set.
    False, with the reason on stderr, where the model has no such layer list."""
    import torch

    backbone, _ = _head_and_backbone(model)
    layers = getattr(getattr(backbone, "language_model", backbone), "layers", None)
    if layers is None:
        print(f"not compiling: {type(backbone).__name__} has no language_model.layers", file=sys.stderr)
        return False
    dynamo = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, limit_name, max(getattr(dynamo, limit_name), 64))  # a guard per layer must not fall back
    # A machine that cannot compile (no C compiler for Triton's launchers, say) trains eagerly, with a warning,
    # rather than failing at its first step.
    dynamo.suppress_errors = True
    text_config = model.config.get_text_config()
    max_saved_width = getattr(text_config, "hidden_size", None) if recompute_wide_matmuls() else None
    checkpoint_kwargs = (selective_checkpoint_kwargs(max_saved_width=max_saved_width) if recompute == "selective"
                         else {"use_reentrant": False})
    kernel_options = flex_kernel_options(text_config)
    _LAYER_KWARGS.clear()
    if kernel_options:
        _LAYER_KWARGS["kernel_options"] = kernel_options
    for layer in layers:
        if recompute or _LAYER_KWARGS:
            layer.forward = _layer_call(layer.forward, checkpoint_kwargs if recompute else None)
        layer.compile(dynamic=True, backend=backend,
                      options=dict(FEATURES_COMPILE_OPTIONS) if backend == "inductor" and FEATURES_COMPILE_OPTIONS
                      else None)
    return True


def use_expandable_segments() -> bool:
    """Turn the CUDA allocator's expandable segments on where FEATURES_EXPANDABLE_SEGMENTS asks, a GPU is present
    and PYTORCH_CUDA_ALLOC_CONF is unset; whether they are on. Before the model loads: segments made earlier keep
    their kind."""
    import os

    import torch

    if not (FEATURES_EXPANDABLE_SEGMENTS and torch.cuda.is_available()) or os.environ.get("PYTORCH_CUDA_ALLOC_CONF"):
        return "expandable_segments:true" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower()
    torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    return True


def recompute_wide_matmuls() -> bool:
    """FEATURES_RECOMPUTE_WIDE_MATMULS, None resolved by the memory of the card this process trains on."""
    if FEATURES_RECOMPUTE_WIDE_MATMULS is not None:
        return FEATURES_RECOMPUTE_WIDE_MATMULS
    import torch

    if not torch.cuda.is_available():
        return True
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory < KEEP_WIDE_MATMULS_MIN_GIB * 2**30


def flex_kernel_options(text_config: Any) -> dict[str, int] | None:
    """FEATURES_FLEX_KERNEL_OPTIONS where the layers run FlexAttention on a CUDA card; None otherwise (and where
    they are empty: Inductor's defaults)."""
    import torch

    if (not FEATURES_FLEX_KERNEL_OPTIONS or getattr(text_config, "_attn_implementation", None) != "flex_attention"
            or not torch.cuda.is_available()):
        return None
    return dict(FEATURES_FLEX_KERNEL_OPTIONS)


def _switch_to_flex_attention(model: Any) -> bool:
    try:
        model.set_attn_implementation("flex_attention")
    except (ValueError, ImportError, AttributeError) as error:
        print(f"batches padded, not packed: no FlexAttention for this model ({error})", file=sys.stderr)
        return False
    return True


def compilation_record() -> dict[str, Any] | None:
    """What torch.compile did in this process so far: frames compiled, their compile seconds, why any frame was
    compiled again, and the Inductor / AOTAutograd cache hits and misses. None where nothing was compiled.
    A cold start on a GPU spends minutes here; this says whether that was compiling or recompiling, and whether
    the kernel caches on the storage root were used."""
    import torch
    from torch._dynamo.utils import compile_times, counters, get_compilation_metrics

    frames = list(get_compilation_metrics())
    if not frames:
        return None
    reasons = Counter(frame.recompile_reason.splitlines()[0][:160] for frame in frames if frame.recompile_reason)
    breaks = Counter({reason[:160]: int(n) for reason, n in counters.get("graph_break", {}).items()})

    def count(group: str, name: str) -> int:
        return int(counters.get(group, {}).get(name, 0))

    return {
        "torch": torch.__version__,
        "frames": len(frames),
        # Which code each compiled frame was and what it cost: a graph break or a recompile shows up as a frame.
        "each_frame": [
            {"id": frame.compile_id, "code": f"{frame.co_name} ({Path(frame.co_filename or '?').name}:"
                                             f"{frame.co_firstlineno})",
             "s": round(frame.entire_frame_compile_time_s or 0.0, 1)}
            for frame in frames[:24]
        ],
        "graph_breaks": dict(breaks.most_common(8)),
        "frame_compile_s": round(sum(f.entire_frame_compile_time_s or 0.0 for f in frames), 1),
        "backend_compile_s": round(sum(f.backend_compile_time_s or 0.0 for f in frames), 1),
        "recompile_reasons": dict(reasons.most_common(8)),
        "fx_graph_cache": {"hit": count("inductor", "fxgraph_cache_hit"),
                           "miss": count("inductor", "fxgraph_cache_miss")},
        "autograd_cache": {"hit": count("aot_autograd", "autograd_cache_hit"),
                           "miss": count("aot_autograd", "autograd_cache_miss")},
        # With every kernel cached the one layer graph still took ~63 s to load on an H200 (BENCHMARKS.md, fifth
        # session): torch's own phase timers say whether that is Dynamo's tracing, the cache lookups or loading
        # the kernels. Nested: a phase's seconds include those of the phases it calls.
        "phases_s": _compile_phases(compile_times(repr="csv", aggregate=True)),
    }


def _compile_phases(timers: tuple[list[str], list[Any]], at_least_s: float = 0.5, most: int = 16) -> dict[str, float]:
    """torch's compile phase timers (`compile_times(repr="csv", aggregate=True)`: names and total seconds), the
    `most` longest of at least `at_least_s`, longest first."""
    names, seconds = timers
    timed = sorted(((float(total), name) for name, total in zip(names, seconds, strict=True)), reverse=True)
    return {name: round(total, 1) for total, name in timed[:most] if total >= at_least_s}
