"""The `consistency` stage: is the model being served the model that was trained, seeing the prompt it was trained on?

Run as: python -m modal_jobs.runner consistency REQUEST.json RESULT.json   (after export and serve, before
evaluation and promotion; a few seconds for the tiny model: a handful of images, ~16 new tokens each)

On the first `num_images` test images it compares:

  files          the merged folder has the processor files training saved beside the adapter (tokenizer,
                 processor config, chat template) and the base model's generation_config.json
  architecture   merged config.json `architectures` and `model_type` equal the base model's, and name a
                 transformers class (a server picks the class from them)
  processor      the merged folder's processor loads, with an image processor and a chat template
  prompt         token ids of the prompt as training built it (TRL's vision collator on a prompt/completion
                 row from modal_jobs.prompts, with the processor saved beside the adapter: the part with
                 labels -100) equal those the server builds (the OpenAI messages the evaluate stage sends,
                 converted as `transformers serve` converts them, through the merged folder's processor and
                 chat template); the image placeholder count equals the model's mm_tokens_per_image; the
                 pixel values are equal. The template text itself is not compared: TRL may swap in its
                 training variant, which renders the same prompt.
  merged         the merged model (as saved: 16-bit, the dtype it is served in) against the adapter model
                 (the base model + the LoRA adapter, unmerged), teacher-forced on the adapter's greedy
                 answer. The adapter model runs in `reference_dtype`: auto is bfloat16 on a GPU (the dtype the
                 adapter was trained on, and one 16-bit 4B model fits beside the running server: float32 base
                 + bf16 merged held together peaked at 36.2 GiB on an H200) and float32 on a CPU (the tiny
                 model's tests calibrate the tolerances below against a float32 reference). The two models are
                 never loaded together: the adapter model's logits are kept on the CPU and the model is freed
                 before the merged one loads. "Differing" means either of:
                   - top-1 agreement (merged argmax = adapter's greedy token, over all positions) below
                     `min_agreement` (default 0.9): it would write different tokens;
                   - relative logit error (RMS of merged - adapter logits over the RMS of the adapter's
                     centred logits, mean over positions) above `max_logit_error` (default 0.2): it is a
                     different function. Rounding the merged weights to bf16 costs ~0.01 on the tiny model
                     against a float32 reference, and stays well under 0.05 against a bf16 one (both sides
                     rounded); a merge that lost the adapter costs ~1 (the base model's error is reported
                     beside it).
                 Greedy texts of both are reported; they are not required to be equal, since a bf16 near-tie
                 may flip one token and everything after it.
  endpoint       (with base_url) the endpoint's greedy answer equals the merged model's local greedy answer
                 (transformers serve runs the same code in the same dtype: equal on CPU), or, for a server
                 with other kernels (vLLM), every token it chose is the merged model's greedy choice up to a
                 near-tie, teacher-forced: within `tie_tolerance` (0.1) logit spreads of the top logit, at the
                 first token that differs and at >= min_agreement of all of them (stopping early counts as
                 choosing EOS there). And the endpoint's reported prompt_tokens equals the prompt length built
                 here, so a server-side template that drifted shows even where its processor cannot be loaded.

Any failed check fails the stage's verdict (`passed`); the job itself returns normally with the report
written, so the caller publishes it before failing the run (`ConsistencyResult.raise_for_mismatch`). A request
to the endpoint that fails outright (refused, timed out) is not a verdict on the model: the job raises a
RuntimeError after writing the report, so the task retries and no failed verdict is cached.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from modal_jobs.errors import InputError
from modal_jobs.storage import atomic_write_json, resolve

# Files a model folder's processor is made of; those present beside the adapter must reach the merged folder.
PROCESSOR_FILES = (
    "processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


class ConsistencyError(RuntimeError):
    """The served model or its prompt is not what was trained; the report says which check failed."""


class ConsistencyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: str = Field(description="The base model folder training started from.")
    adapter_dir: str = Field(description="The train stage's adapter folder (with the processor training used).")
    merged_dir: str = Field(description="The export stage's merged folder: what is served.")
    dataset_dir: str
    split: str = "test"
    instruction: str
    output_path: str = Field(description="Report JSON.")
    base_url: str | None = Field(None, description="The endpoint serving merged_dir; None skips the endpoint check.")
    model_name: str | None = Field(None, description="The `model` value the endpoint's requests carry.")
    api_key_env: str | None = Field(None, description="Environment variable with the endpoint's API key.")
    num_images: PositiveInt = Field(4, description="Test images compared (the first ones of the split).")
    max_new_tokens: PositiveInt = Field(16, description="Greedy tokens generated per image.")
    min_agreement: float = Field(0.9, ge=0.0, le=1.0, description="Least teacher-forced top-1 agreement that passes.")
    max_logit_error: PositiveFloat = Field(0.2, description="Largest relative logit error (merged vs adapter) that passes.")
    tie_tolerance: PositiveFloat = Field(
        0.1, description="An endpoint token this close to the merged model's top logit (in logit spreads) is a near-tie."
    )
    request_timeout_s: PositiveFloat = 120.0
    reference_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="The adapter model's dtype. auto: bfloat16 on a GPU (what training used; one 16-bit "
        "model at a time fits beside the server), float32 on a CPU.",
    )


class Check(BaseModel):
    name: str
    passed: bool
    detail: str


class ConsistencyResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    passed: bool
    report_path: str
    checks: list[Check]
    runtime_s: float

    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]

    def raise_for_mismatch(self) -> None:
        if not self.passed:
            lines = "; ".join(f"{c.name}: {c.detail}" for c in self.failures())
            raise ConsistencyError(f"train/serve consistency check failed ({lines}); report: {self.report_path}")


# --- prompts -------------------------------------------------------------------------------------------


def training_prompt(processor: Any, image: Any, reference: str, instruction: str) -> dict[str, Any]:
    """The prompt part of a training batch exactly as the train stage builds it (TRL's vision collator on the
    row modal_jobs.train makes): input_ids, token_type_ids and pixel_values of the label -100 prefix."""
    from modal_jobs.prompts import training_row

    row = training_row(image, reference, instruction)
    # As modal_jobs.train: prompt/completion columns beside the dataset's own (unconverted) `image` column.
    example = {"image": image, "prompt": row["prompt"], "completion": row["completion"]}
    try:
        from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling
    except ImportError:  # no TRL where this runs: the processor's template with TRL's settings
        from modal_jobs.prompts import user_turn

        text = processor.apply_chat_template([user_turn(instruction)], add_generation_prompt=True, tokenize=False)
        batch = processor(images=[[image]], text=[text], return_tensors="pt", add_special_tokens=False)
        return {key: batch[key] for key in ("input_ids", "token_type_ids", "pixel_values") if key in batch}
    batch = DataCollatorForVisionLanguageModeling(processor=processor, completion_only_loss=True)([example])
    length = int((batch["labels"][0] != -100).nonzero()[0])
    out = {"input_ids": batch["input_ids"][:, :length], "pixel_values": batch["pixel_values"]}
    if "token_type_ids" in batch:
        out["token_type_ids"] = batch["token_type_ids"][:, :length]
    return out


def server_prompt(processor: Any, image: Any, instruction: str) -> dict[str, Any]:
    """The inputs `transformers serve` builds from the OpenAI messages the evaluate stage sends."""
    from modal_jobs.prompts import openai_messages

    messages = openai_messages(image, instruction)
    try:
        from transformers.cli.serving.utils import BaseHandler, Modality

        converted = BaseHandler.get_processor_inputs_from_messages(messages, Modality.VLM)
    except ImportError:  # transformers without its serving extras: the same conversion, spelled out
        converted = [
            {"role": m["role"], "content": [
                {"type": "text", "text": part["text"]} if part["type"] == "text"
                else {"type": "image", "url": part["image_url"]["url"]}
                for part in m["content"]
            ]}
            for m in messages
        ]
    inputs = processor.apply_chat_template(
        converted, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return dict(inputs)


# --- what the checks share -----------------------------------------------------------------------------


@dataclass
class _Run:
    """One consistency run: the request, its folders and test rows, the report being written, and what each check
    leaves for the next (the processors, both sides' prompts, the merged model), so nothing is loaded twice."""

    request: ConsistencyRequest
    model_dir: Path
    adapter_dir: Path
    merged_dir: Path
    images: list[Any]
    base_config: dict[str, Any]
    merged_config: dict[str, Any]
    samples: list[dict[str, Any]]
    report: dict[str, Any]
    started: float
    clock: float
    train_processor: Any = None
    served_processor: Any = None
    train_inputs: list[dict[str, Any]] = field(default_factory=list)
    served_inputs: list[dict[str, Any]] = field(default_factory=list)
    device: Any = None
    merged: Any = None
    unreachable: list[str] = field(default_factory=list)
    stopped: bool = False  # a check left the ones after it nothing to compare

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.report["timing_s"][name] = round(now - self.clock, 3)
        self.clock = now


def _open_inputs(request: ConsistencyRequest) -> _Run:
    """The folders (checked for what makes them a model and an adapter), the first test rows and both configs."""
    started = time.perf_counter()
    model_dir, adapter_dir = resolve(request.model_dir), resolve(request.adapter_dir)
    merged_dir = resolve(request.merged_dir)
    for folder, what in ((model_dir, "base model"), (merged_dir, "merged model")):
        if not (folder / "config.json").is_file():
            raise InputError(f"{what} folder {folder} has no config.json")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise InputError(f"{adapter_dir} is not a LoRA adapter folder (no adapter_config.json)")
    from modal_jobs.dataset import open_prepared

    splits = open_prepared(request.dataset_dir)
    if request.split not in splits:
        raise InputError(f"split {request.split!r} is not in {request.dataset_dir}")
    rows = splits[request.split].select(range(min(request.num_images, len(splits[request.split]))))
    samples: list[dict[str, Any]] = [{"index": i, "reference": ref} for i, ref in enumerate(rows["text"])]
    run = _Run(
        request=request, model_dir=model_dir, adapter_dir=adapter_dir, merged_dir=merged_dir,
        images=list(rows["image"]), base_config=_read_config(model_dir), merged_config=_read_config(merged_dir),
        samples=samples, report={"request": request.model_dump(mode="json"), "samples": samples, "timing_s": {}},
        started=started, clock=started,
    )
    run.lap("inputs")
    return run


def _read_config(folder: Any) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{folder} has no readable config.json ({error}): is it a model folder?") from error


# --- the checks, in the order they run -------------------------------------------------------------------


def _files_check(run: _Run) -> Check:
    adapter_dir, model_dir, merged_dir = run.adapter_dir, run.model_dir, run.merged_dir
    expected = {name for name in PROCESSOR_FILES if (adapter_dir / name).exists()}
    if not expected:  # an adapter saved without its processor: the base model's files are the reference
        expected = {name for name in PROCESSOR_FILES if (model_dir / name).exists()}
    if (model_dir / "generation_config.json").exists():
        expected.add("generation_config.json")
    missing = sorted(name for name in expected if not (merged_dir / name).exists())
    weights = list(merged_dir.glob("*.safetensors"))
    if not weights:
        missing.append("*.safetensors")
    if missing:
        return Check(name="files", passed=False, detail=f"missing from the merged folder: {', '.join(missing)}")
    return Check(name="files", passed=True, detail=f"{len(expected)} processor/generation files and weights present")


def _architecture_check(run: _Run) -> Check:
    import transformers

    base_config, merged_config = run.base_config, run.merged_config
    base_arch, merged_arch = base_config.get("architectures"), merged_config.get("architectures")
    problems = []
    if merged_arch != base_arch:
        problems.append(f"architectures {merged_arch} != base model's {base_arch}")
    unknown = [name for name in merged_arch or [] if not hasattr(transformers, name)]
    if unknown:
        problems.append(f"{unknown} are not transformers classes")
    if not merged_arch:
        problems.append("config.json has no `architectures`")
    if merged_config.get("model_type") != base_config.get("model_type"):
        problems.append(f"model_type {merged_config.get('model_type')!r} != {base_config.get('model_type')!r}")
    if problems:
        return Check(name="architecture", passed=False, detail="; ".join(problems))
    return Check(name="architecture", passed=True, detail=f"{merged_arch}, model_type {merged_config.get('model_type')}")


def _processor_check(run: _Run) -> Check:
    """Loads the processor training used (kept for the prompt check) and the merged folder's, which must load
    with an image processor and a chat template."""
    from transformers import AutoProcessor

    processor_source = run.adapter_dir if (run.adapter_dir / "tokenizer_config.json").exists() else run.model_dir
    run.train_processor = AutoProcessor.from_pretrained(processor_source)
    try:
        served_processor = AutoProcessor.from_pretrained(run.merged_dir)
        problems = [what for what, ok in (
            ("has no image processor", hasattr(served_processor, "image_processor")),
            ("has no chat template", bool(getattr(served_processor, "chat_template", None))),
        ) if not ok]
    except Exception as error:  # a missing or broken processor file: this is what the check is for
        served_processor, problems = None, [f"does not load ({type(error).__name__}: {str(error)[:300]})"]
    if problems:
        return Check(name="processor", passed=False, detail=f"the merged folder's processor {', '.join(problems)}")
    run.served_processor = served_processor
    run.lap("processors")
    return Check(name="processor", passed=True, detail=f"{type(served_processor).__name__} with chat template")


def _prompt_check(run: _Run) -> Check:
    """Builds each image's prompt both ways (kept for the model checks) and compares them."""
    if run.served_processor is None:
        run.stopped = True
        return Check(name="prompt", passed=False, detail="not compared: the served processor is unusable")
    problems = []
    for sample, image in zip(run.samples, run.images):
        trained = training_prompt(run.train_processor, image, sample["reference"], run.request.instruction)
        served = server_prompt(run.served_processor, image, run.request.instruction)
        problem = _prompt_problem(run, sample, trained, served)
        if problem is not None:
            problems.append(problem)
        run.train_inputs.append(trained)
        run.served_inputs.append(served)
    samples = run.samples
    check = Check(
        name="prompt", passed=not problems,
        detail="; ".join(problems) if problems else
        f"{len(samples)} prompts equal token for token ({samples[0]['server_prompt_tokens']} tokens, "
        f"{samples[0].get('image_tokens', {}).get('server')} image placeholders) with equal pixel values",
    )
    run.lap("prompt")
    return check


def _prompt_problem(run: _Run, sample: dict[str, Any], trained: dict[str, Any], served: dict[str, Any]) -> str | None:
    """What differs between one image's training and server prompts (None: nothing); records both in `sample`."""
    image_token_id = run.merged_config.get("image_token_id", run.merged_config.get("image_token_index"))
    per_image = run.merged_config.get("mm_tokens_per_image")
    train_ids, served_ids = trained["input_ids"][0].tolist(), served["input_ids"][0].tolist()
    sample.update(train_prompt_tokens=len(train_ids), server_prompt_tokens=len(served_ids))
    if image_token_id is not None:
        sample["image_tokens"] = {"train": train_ids.count(image_token_id), "server": served_ids.count(image_token_id)}
    if train_ids != served_ids:
        first = next((i for i, (a, b) in enumerate(zip(train_ids, served_ids)) if a != b),
                     min(len(train_ids), len(served_ids)))
        sample["prompt_diff"] = {
            "first_difference_at": first,
            "train": run.train_processor.decode(train_ids[max(0, first - 8): first + 24]),
            "server": run.served_processor.decode(served_ids[max(0, first - 8): first + 24]),
        }
        return (f"image {sample['index']}: token ids differ from position {first} "
                f"({len(train_ids)} trained vs {len(served_ids)} served)")
    if per_image is not None and image_token_id is not None and served_ids.count(image_token_id) != per_image:
        return f"image {sample['index']}: {served_ids.count(image_token_id)} image placeholders, the model expects {per_image}"
    if not _same_tensor(trained.get("pixel_values"), served.get("pixel_values")):
        return f"image {sample['index']}: pixel values differ (image preprocessing changed)"
    return None


def _merged_check(run: _Run) -> Check:
    """The merged model against the adapter model, teacher-forced on the adapter's greedy answers; the merged
    model stays loaded for the endpoint check."""
    import torch
    from transformers import AutoModelForImageTextToText

    run.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    reference = run.request.reference_dtype
    if reference == "auto":
        reference = "bfloat16" if run.device.type == "cuda" else "float32"
    adapter_outputs = _adapter_outputs(run, getattr(torch, reference))
    try:
        # "auto": the dtype it was saved in, which is the dtype a server loads it in.
        merged = AutoModelForImageTextToText.from_pretrained(run.merged_dir, dtype="auto", use_safetensors=True)
    except Exception as error:  # missing or unreadable weights: the files check says which
        run.stopped = True
        return Check(name="merged", passed=False, detail=f"does not load: {type(error).__name__}: {error}"[:500])
    run.merged = merged.to(run.device).eval()
    run.lap("load_merged")
    run.report["merged"] = _compare_merged(run, adapter_outputs, reference)
    check = _merged_verdict(run.request, run.report["merged"])
    run.lap("merged")
    return check


def _adapter_outputs(run: _Run, dtype: Any) -> list[tuple[Any, Any, Any, Any]]:
    """Per image, on the CPU: the adapter model's greedy answer and its teacher-forced logits, and the base
    model's (the adapter disabled) logits on that answer and its own greedy answer.

    The adapter model is freed before this returns, as the merged model loads next: one 16-bit model on the
    device at a time (BENCHMARKS.md: Gemma 3 4B's check peaked at 8.7 GiB, against 36.2 GiB with two held)."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(run.model_dir, dtype=dtype, use_safetensors=True)
    adapter_model = PeftModel.from_pretrained(base, run.adapter_dir).to(run.device).eval()
    run.lap("load_adapter_model")
    outputs = []
    for trained in run.train_inputs:
        inputs = _to(trained, run.device, dtype)
        answer = _generate(adapter_model, inputs, run.request.max_new_tokens)
        adapter_logits = _teacher_forced(adapter_model, inputs, answer)
        with adapter_model.disable_adapter():
            base_logits = _teacher_forced(adapter_model, inputs, answer)
            base_answer = _generate(adapter_model, inputs, run.request.max_new_tokens)
        outputs.append((answer.cpu(), adapter_logits.cpu(), base_logits.cpu(), base_answer.cpu()))
    del adapter_model, base
    _free_memory(run.device)
    run.lap("adapter_model")
    return outputs


def _compare_merged(run: _Run, adapter_outputs: list[tuple[Any, Any, Any, Any]], reference_dtype: str) -> dict[str, Any]:
    """Top-1 agreement and relative logit error of the merged model (and of the base model) against the adapter
    model (run in `reference_dtype`), over every answer position; each sample gets its three answers and its own
    numbers."""
    merged, device, decode = run.merged, run.device, run.served_processor.decode
    agree = total = 0
    errors, base_errors, base_agree = [], [], 0
    for sample, trained, served, (answer, adapter_logits, base_logits, base_answer) in zip(
        run.samples, run.train_inputs, run.served_inputs, adapter_outputs
    ):
        # The adapter saw the training prompt; the merged model generates from the served prompt (as the
        # server does) but is scored on the training prompt, so this check isolates the weights.
        merged_answer = _generate(merged, _to(served, device, merged.dtype), run.request.max_new_tokens).cpu()
        merged_logits = _teacher_forced(merged, _to(trained, device, merged.dtype), answer.to(device)).cpu()
        hits = int((merged_logits.argmax(-1) == answer).sum())
        agree, total = agree + hits, total + len(answer)
        base_agree += int((base_logits.argmax(-1) == answer).sum())
        errors.append(_relative_error(merged_logits, adapter_logits))
        base_errors.append(_relative_error(base_logits, adapter_logits))
        sample.update(
            adapter_text=decode(answer, skip_special_tokens=True),
            merged_text=decode(merged_answer, skip_special_tokens=True),
            base_text=decode(base_answer, skip_special_tokens=True),
            adapter_tokens=answer.tolist(), merged_tokens=merged_answer.tolist(), base_tokens=base_answer.tolist(),
            merged_agreement=round(hits / max(len(answer), 1), 4), merged_logit_error=round(errors[-1], 5),
            base_logit_error=round(base_errors[-1], 5),
        )
    return {"agreement": agree / max(total, 1), "logit_error": sum(errors) / len(errors),
            "base_agreement": base_agree / max(total, 1), "base_logit_error": sum(base_errors) / len(base_errors),
            "dtype": str(merged.dtype), "reference_dtype": reference_dtype, "positions": total}


def _merged_verdict(request: ConsistencyRequest, measured: dict[str, Any]) -> Check:
    agreement, logit_error, base_error = measured["agreement"], measured["logit_error"], measured["base_logit_error"]
    problems = []
    if agreement < request.min_agreement:
        problems.append(f"top-1 agreement {agreement:.3f} < {request.min_agreement}")
    if logit_error > request.max_logit_error:
        problems.append(f"relative logit error {logit_error:.3f} > {request.max_logit_error}")
    note = (f"agreement {agreement:.3f} over {measured['positions']} positions, logit error {logit_error:.4f} "
            f"({measured['dtype']} against a {measured['reference_dtype']} adapter model); "
            f"base model without the adapter: agreement {measured['base_agreement']:.3f}, error {base_error:.3f}")
    if base_error <= request.max_logit_error:
        note += " (the adapter barely changes the model, so a merge that lost it would pass too)"
    return Check(name="merged", passed=not problems, detail=("; ".join(problems) + ": " if problems else "") + note)


def _endpoint_check(run: _Run) -> Check | None:
    """The endpoint's answers against the merged model's (None without an endpoint). Requests that failed
    outright are kept in run.unreachable: they say nothing about the model."""
    if not run.request.base_url:
        return None
    answers = _ask_endpoint(run.request, run.images)
    problems, equal = [], 0
    tokenizer = getattr(run.served_processor, "tokenizer", run.served_processor)
    eos = run.merged.generation_config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id])
    for sample, served, answer in zip(run.samples, run.served_inputs, answers):
        sample.update(endpoint_text=answer["text"], endpoint_error=answer["error"],
                      endpoint_prompt_tokens=answer["prompt_tokens"])
        if answer["error"] is not None:
            run.unreachable.append(f"image {sample['index']}: {answer['error'][:200]}")
            continue
        if answer["prompt_tokens"] is not None and answer["prompt_tokens"] != sample["server_prompt_tokens"]:
            problems.append(f"image {sample['index']}: the endpoint counted {answer['prompt_tokens']} "
                            f"prompt tokens, the served processor builds {sample['server_prompt_tokens']}")
        if answer["text"] == sample["merged_text"]:
            equal += 1
            continue
        problem = _beyond_near_tie(run, sample, served, answer["text"], tokenizer, eos_ids)
        if problem is not None:
            problems.append(problem)
    check = Check(
        name="endpoint", passed=not problems,
        detail="; ".join(problems) if problems else
        f"{equal} of {len(answers)} answers equal to the merged model's, the rest its greedy choices up to "
        "near-ties; prompt token counts match",
    )
    run.lap("endpoint")
    return check


def _beyond_near_tie(run: _Run, sample: dict[str, Any], served: dict[str, Any], text: str, tokenizer: Any,
                     eos_ids: list[int]) -> str | None:
    """An endpoint answer unequal to the merged model's is acceptable only if every token the endpoint chose is a
    greedy choice of the merged model up to a near-tie (another server's kernels round differently), including
    the first one that differs: None if so, else the problem. Records the agreement in `sample`."""
    import torch

    request = run.request
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    local = tokenizer(sample["merged_text"], add_special_tokens=False)["input_ids"]
    first = next((i for i, (a, b) in enumerate(zip(ids, local)) if a != b), min(len(ids), len(local)))
    chosen = [[token] for token in ids]
    if len(ids) < request.max_new_tokens:
        chosen.append(eos_ids)  # the endpoint stopped here
    logits = _teacher_forced(run.merged, _to(served, run.device, run.merged.dtype), torch.tensor(ids, dtype=torch.long),
                             with_next=True)
    gaps = _choice_gaps(logits[: len(chosen)], chosen)
    near = [gap <= request.tie_tolerance for gap in gaps]
    rate = sum(near) / len(near)
    sample.update(endpoint_agreement=round(rate, 4), endpoint_first_difference=first,
                  endpoint_gap_at_first_difference=round(gaps[first], 4) if first < len(gaps) else None)
    if rate < request.min_agreement or (first < len(near) and not near[first]):
        return (f"image {sample['index']}: endpoint wrote {text[:60]!r}, the merged model "
                f"{sample['merged_text'][:60]!r}; from token {first} on they differ by more than a near-tie "
                f"({rate:.2f} of the endpoint's tokens are greedy choices of the merged model)")
    return None


def _endpoint_reachable_check(run: _Run) -> Check | None:
    """A failed verdict listing the requests that failed outright; None when all were answered (or none sent)."""
    if not run.unreachable:
        return None
    return Check(name="endpoint reachable", passed=False, detail="; ".join(run.unreachable))


# --- model and endpoint helpers --------------------------------------------------------------------------


def _same_tensor(a: Any, b: Any) -> bool:
    import torch

    return a is not None and b is not None and a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-5)


def _teacher_forced(model: Any, inputs: dict[str, Any], answer: Any, with_next: bool = False) -> Any:
    """Logits at the positions that predict each token of `answer` (float32, positions x vocab), and with
    `with_next` the one after its last token too."""
    import torch

    prompt_length = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], answer[None].to(inputs["input_ids"])], dim=1)
    forward = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": inputs["pixel_values"]}
    if "token_type_ids" in inputs:
        forward["token_type_ids"] = torch.cat(
            [inputs["token_type_ids"], torch.zeros_like(answer)[None].to(inputs["token_type_ids"])], dim=1
        )
    with torch.no_grad():
        logits = model(**forward).logits[0, prompt_length - 1: ids.shape[1] - (0 if with_next else 1)]
    return logits.float()


def _choice_gaps(logits: Any, chosen: list[list[int]]) -> list[float]:
    """Per position, how far below the top logit the chosen token is (the best of several, e.g. EOS ids), in
    units of that position's logit spread (RMS of the centred logits): 0 is the greedy choice."""
    gaps = []
    for row, options in zip(logits, chosen):
        spread = float((row - row.mean()).pow(2).mean().sqrt().clamp_min(1e-6))
        gaps.append(min(float(row.max() - row[token]) for token in options) / spread)
    return gaps


def _relative_error(logits: Any, reference: Any) -> float:
    centred = reference - reference.mean(dim=-1, keepdim=True)
    scale = centred.pow(2).mean(dim=-1).sqrt().clamp_min(1e-6)
    return float(((logits - reference).pow(2).mean(dim=-1).sqrt() / scale).mean())


def _generate(model: Any, inputs: dict[str, Any], max_new_tokens: int) -> Any:
    import torch

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:]


def _to(inputs: dict[str, Any], device: Any, dtype: Any) -> dict[str, Any]:
    return {key: (value.to(device, dtype) if key == "pixel_values" else value.to(device)) for key, value in inputs.items()}


def _free_memory(device: Any) -> None:
    import gc

    import torch

    gc.collect()  # PEFT's wrappers hold reference cycles: the weights go only with a collection
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _memory_report() -> dict[str, Any]:
    """This process's peak on the GPU (the server's memory is its own process's, not counted here)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return {"device": "cpu"}
    device = torch.cuda.current_device()
    return {"device": torch.cuda.get_device_name(device),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2)}


def _ask_endpoint(request: ConsistencyRequest, images: list[Any]) -> list[dict[str, Any]]:
    from openai import OpenAI

    from modal_jobs.prompts import openai_messages

    key = os.environ.get(request.api_key_env, "") if request.api_key_env else "EMPTY"
    client = OpenAI(base_url=request.base_url, api_key=key or "EMPTY", timeout=request.request_timeout_s, max_retries=2)
    answers = []
    for image in images:
        try:
            response = client.chat.completions.create(
                model=request.model_name or "", messages=openai_messages(image, request.instruction),
                temperature=0.0, max_tokens=request.max_new_tokens,
            )
            usage = response.usage
            answers.append({"text": response.choices[0].message.content or "", "error": None,
                            "prompt_tokens": usage.prompt_tokens if usage else None})
        except Exception as error:  # the client has retried already: the rest would fail the same way
            failure = {"text": None, "error": f"{type(error).__name__}: {error}", "prompt_tokens": None}
            return answers + [failure] * (len(images) - len(answers))
    return answers


# --- the job -------------------------------------------------------------------------------------------


def consistency(request: ConsistencyRequest) -> ConsistencyResult:
    """Run every check; write the report JSON at request.output_path. Raises InputError only for missing
    inputs (no dataset, no adapter); a mismatch is a failed check in the result, not an exception."""
    run = _open_inputs(request)
    # In the order they run: each uses what the ones before it loaded, and the models load one at a time (the
    # adapter model, freed, then the merged one). A local tuple, not a module constant: a name listed at module
    # level counts as imported with the module in tests/test_modal_images.py's static view, and every importer of
    # this module's request type would then seem to need peft and openai.
    checks_in_order = (_files_check, _architecture_check, _processor_check, _prompt_check, _merged_check,
                       _endpoint_check, _endpoint_reachable_check)
    checks: list[Check] = []
    for check in checks_in_order:
        verdict = check(run)
        if verdict is not None:
            checks.append(verdict)
        if run.stopped:
            break
    if run.merged is not None:
        run.merged = None
        _free_memory(run.device)
    result = _write_report(run, checks)
    if run.unreachable:
        # A dead or flaky endpoint says nothing about the model: fail this attempt (retried, never cached as a
        # verdict) with the report written for the record.
        raise RuntimeError(f"consistency: requests to {request.base_url} failed: {run.unreachable[0]}")
    return result


def _write_report(run: _Run, checks: list[Check]) -> ConsistencyResult:
    result = ConsistencyResult(
        passed=all(c.passed for c in checks), report_path=run.request.output_path, checks=checks,
        runtime_s=round(time.perf_counter() - run.started, 2),
    )
    run.report["memory"] = _memory_report()
    atomic_write_json(run.request.output_path, {**run.report, **result.model_dump(mode="json")})
    print(f"consistency: {'passed' if result.passed else 'FAILED'} in {result.runtime_s} s: "
          + "; ".join(f"{c.name} {'ok' if c.passed else 'FAILED: ' + c.detail}" for c in checks), file=sys.stderr)
    return result


def report_markdown(report: dict[str, Any]) -> str:
    """The consistency report (the JSON the job writes) as markdown for an artifact."""
    lines = [f"# Train/serve consistency: {'passed' if report.get('passed') else 'FAILED'}", "",
             "| check | result | detail |", "|---|---|---|"]
    for check in report.get("checks", []):
        detail = str(check["detail"]).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {check['name']} | {'ok' if check['passed'] else '**FAILED**'} | {detail} |")
    lines += ["", "| # | prompt tokens (train / server / endpoint) | adapter | merged | endpoint |",
              "|---|---|---|---|---|"]

    def cell(text: Any) -> str:
        if text is None:
            return "—"
        return "`" + str(text)[:60].replace("|", "\\|").replace("`", "'").replace("\n", " ") + "`"

    for sample in report.get("samples", []):
        tokens = " / ".join(str(sample.get(key)) for key in
                            ("train_prompt_tokens", "server_prompt_tokens", "endpoint_prompt_tokens"))
        endpoint = sample.get("endpoint_text") or sample.get("endpoint_error")
        lines.append(f"| {sample['index']} | {tokens} | {cell(sample.get('adapter_text'))} | "
                     f"{cell(sample.get('merged_text'))} | {cell(endpoint)} |")
    for sample in report.get("samples", []):
        if "prompt_diff" in sample:
            diff = sample["prompt_diff"]
            lines += ["", f"Prompt of image {sample['index']} differs at token {diff['first_difference_at']}:",
                      "", "```", "train:  " + diff["train"], "server: " + diff["server"], "```"]
            break
    return "\n".join(lines)
