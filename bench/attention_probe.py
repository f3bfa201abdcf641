"""The two attention kernels that bound our GPU stages, alone, at the shapes the stages give them (one GPU).

Run as: python -m bench.attention_probe --out DIR      (a CUDA machine; ~3-4 minutes, most of it compiling)

encode: SigLIP's attention in the vision tower at 896 px: 32 images x 16 heads x 4096 patches, head_dim 72,
        bf16, no gradients. Each SDPA backend at head_dim 72, and with q/k/v zero-padded to a wider head_dim the
        kernels are tuned for (the scale kept at 72^-0.5, the output sliced back: the same result), against
        the tower's share of the encode time (BENCHMARKS.md: attention is ~2.09 of the 5.46 TFLOP an image).
train:  the packed row's FlexAttention forward + backward in one Gemma 3 4B layer: 16 rows of LaTeX_OCR-like
        lengths end to end (~5,100 tokens), 8 query and 4 key/value heads, head_dim 256, the project's own mask
        (modal_jobs.train.rows._packed_row_mask: each row causal, its image's tokens both ways). Inductor's
        default kernel settings against other block sizes, and what max-autotune picks. A layer's time x 34 is
        the step's attention (the trainer profile: backward ~31 ms, forward ~7 ms a step).

Writes OUT/attention_probe.json and prints a table. Rates count the FLOPs of the pairs the mask allows (train)
or of the whole square (encode), 4 * pairs * head_dim * heads forward, 2.5x that backward.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

SIGLIP = {"batch": 32, "heads": 16, "tokens": 4096, "head_dim": 72}
GEMMA = {"query_heads": 8, "kv_heads": 4, "head_dim": 256, "rows": 16, "image_tokens": 256, "prompt_tokens": 12}
# Flex backward block sizes to try beside the defaults (the forward keeps its own unless a key says otherwise).
FLEX_OPTIONS: dict[str, dict[str, int]] = {
    "bwd 32/64 64/32, 4 warps, 2 stages": {"BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32,
                                           "num_warps": 4, "num_stages": 2},
    "bwd 64/64 64/64, 8 warps, 1 stage": {"BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64,
                                          "num_warps": 8, "num_stages": 1},
    "bwd 16/64 64/16, 4 warps, 3 stages": {"BLOCK_M1": 16, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 16,
                                           "num_warps": 4, "num_stages": 3},
    "bwd 32/128 128/32, 8 warps, 1 stage": {"BLOCK_M1": 32, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 32,
                                            "num_warps": 8, "num_stages": 1},
}


def _timed(run, repeats: int = 10) -> float:
    """Median seconds of `run()` over `repeats` calls after two warm-up calls (CUDA events)."""
    import torch

    for _ in range(2):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def encode_attention() -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, s, d = (SIGLIP[k] for k in ("batch", "heads", "tokens", "head_dim"))
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * b * h * s * s * d
    scale = d ** -0.5
    with torch.inference_mode():
        reference = F.scaled_dot_product_attention(q, k, v, scale=scale).float()
    out: dict[str, Any] = {"shape": SIGLIP, "tflop_per_call": round(flops / 1e12, 2)}
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for width in (72, 80, 96, 128):
            name = f"{backend.name.lower()} head_dim {width}"
            pad = (0, width - d)
            qp, kp, vp = (F.pad(t, pad) if width > d else t for t in (q, k, v))
            try:
                with torch.inference_mode(), sdpa_kernel([backend]):
                    def run(qp=qp, kp=kp, vp=vp):
                        return F.scaled_dot_product_attention(qp, kp, vp, scale=scale)

                    seconds = _timed(run)
                    difference = float((run()[..., :d].float() - reference).abs().max())
                out[name] = {"ms": round(1e3 * seconds, 2), "tflops": round(flops / seconds / 1e12, 1),
                             "max_abs_diff": difference}
            except Exception as error:  # a backend that does not take this head_dim
                out[name] = {"error": f"{type(error).__name__}: {str(error)[:160]}"}
            print(f"[encode] {name}: {out[name]}", flush=True)
    return out


def packed_row_lengths(rows: int, seed: int = 0) -> list[int]:
    """LaTeX_OCR-like rows (bench.train_speed's answer lengths): prompt + image + answer, ~320 tokens on average."""
    rng = random.Random(seed)
    fixed = GEMMA["prompt_tokens"] + GEMMA["image_tokens"] + 4
    return [fixed + min(300, max(5, round(rng.lognormvariate(math.log(45), 0.6)))) for _ in range(rows)]


def _packed_ids(lengths: list[int], device: Any) -> tuple[Any, Any]:
    """row_ids and image_ids (-1 outside an image) of one packed row, as packed_attention_masks makes them."""
    import torch

    row_ids, image_ids = [], []
    for row, length in enumerate(lengths):
        row_ids += [row] * length
        start = GEMMA["prompt_tokens"]
        image_ids += [-1] * start + [row] * GEMMA["image_tokens"] + [-1] * (length - start - GEMMA["image_tokens"])
    as_tensor = lambda values: torch.tensor(values, device=device).unsqueeze(0)
    return as_tensor(row_ids), as_tensor(image_ids)


def train_attention(autotune: bool) -> dict[str, Any]:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from modal_jobs.train.rows import _packed_row_mask

    lengths = packed_row_lengths(GEMMA["rows"])
    tokens = sum(lengths)
    row_ids, image_ids = _packed_ids(lengths, "cuda")
    mask_function = _packed_row_mask(row_ids, image_ids, torch.tensor(2 ** 30, device="cuda"),
                                     torch.tensor(False, device="cuda"))
    hq, hkv, d = GEMMA["query_heads"], GEMMA["kv_heads"], GEMMA["head_dim"]
    torch.manual_seed(0)
    q = torch.randn(1, hq, tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, hkv, tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    grad = torch.randn(1, hq, tokens, d, device="cuda", dtype=torch.bfloat16)
    # The pairs the mask allows: each row's causal triangle, plus its image's upper triangle.
    image = GEMMA["image_tokens"]
    pairs = sum(n * (n + 1) // 2 + image * (image - 1) // 2 for n in lengths)
    forward_flops = 4 * pairs * d * hq
    out: dict[str, Any] = {"tokens": tokens, "rows": lengths, "allowed_pairs": pairs,
                           "forward_gflop": round(forward_flops / 1e9, 1)}

    def measure(name: str, block_size: int, options: dict[str, int] | None, mode: str | None = None) -> None:
        started = time.time()
        try:
            block_mask = create_block_mask(mask_function, 1, None, tokens, tokens, device="cuda",
                                           BLOCK_SIZE=block_size)
            compiled = torch.compile(flex_attention, dynamic=False, mode=mode)
            attend = lambda: compiled(q, k, v, block_mask=block_mask, scale=d ** -0.5, enable_gqa=True,
                                      kernel_options=options)
            forward_s = _timed(lambda: attend().detach())

            def both():
                q.grad = k.grad = v.grad = None
                attend().backward(grad)

            both_s = _timed(both)
            backward_s = both_s - forward_s
            out[name] = {"forward_ms": round(1e3 * forward_s, 3), "backward_ms": round(1e3 * backward_s, 3),
                         "forward_tflops": round(forward_flops / forward_s / 1e12, 1),
                         "backward_tflops": round(2.5 * forward_flops / backward_s / 1e12, 1),
                         "step_ms_34_layers": round(34e3 * both_s, 1),
                         "compile_and_time_s": round(time.time() - started, 1),
                         "sparsity_percent": round(float(block_mask.sparsity()), 1)}
        except Exception as error:
            out[name] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
        print(f"[train] {name}: {out[name]}", flush=True)

    measure("default (mask blocks 128)", 128, None)
    measure("default, mask blocks 64", 64, None)
    for name, options in FLEX_OPTIONS.items():
        measure(name, 128, options)
    if autotune:
        measure("max-autotune (mask blocks 128)", 128, None, mode="max-autotune-no-cudagraphs")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-autotune", action="store_true", help="skip max-autotune (a minute or two)")
    args = parser.parse_args()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "torch": torch.__version__,
              "device": torch.cuda.get_device_name(0)}
    report["encode"] = encode_attention()
    report["train"] = train_attention(autotune=not args.no_autotune)
    (args.out / "attention_probe.json").write_text(json.dumps(report, indent=1))
    for part in ("encode", "train"):
        for name, entry in report[part].items():
            if isinstance(entry, dict) and "error" not in entry and name != "shape":
                print(f"{part:6} | {name:40} | {entry}")


if __name__ == "__main__":
    main()
