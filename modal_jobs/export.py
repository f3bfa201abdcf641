"""The export stage: merge a LoRA adapter into its base model and save 16-bit safetensors.

The merged folder holds the weights, config, processor, tokenizer, chat template and generation config:
what both `vllm serve` and `transformers serve` need. With `export.hub_id` set, the adapter goes to
`<hub_id>-lora` and the merged model to `<hub_id>` on the Hub.

Run as: python -m modal_jobs.runner export REQUEST.json RESULT.json
"""

from __future__ import annotations

import shutil
import sys

from modal_jobs.errors import InputError
from modal_jobs.schemas import ExportRequest, ExportResult
from modal_jobs.storage import atomic_output, is_complete, read_manifest, resolve

# Files from the base model folder that the merged model needs but save_pretrained may not rewrite.
_CARRIED_FILES = ("generation_config.json", "chat_template.jinja", "chat_template.json")


def push_to_hub(folder: str, repo_id: str, private: bool) -> str:
    from huggingface_hub import HfApi

    from modal_jobs.hub import hub_token

    api = HfApi(token=hub_token())
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="vlmpipe export")
    return f"https://huggingface.co/{repo_id}"


def export(request: ExportRequest) -> ExportResult:
    merged_dir = resolve(request.output_dir)
    if is_complete(merged_dir):
        return ExportResult.model_validate({**read_manifest(merged_dir)["result"], "cached": True})
    model_dir = resolve(request.model_dir)
    adapter_dir = resolve(request.adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise InputError(f"{adapter_dir} is not a LoRA adapter folder (no adapter_config.json)")
    if not (model_dir / "config.json").exists():
        raise InputError(f"base model folder {model_dir} has no config.json")
    if request.export.hub_id:
        from modal_jobs.hub import hub_token

        # Checked here, where the push happens (on Modal the token lives in the Secret), before the merge.
        if not hub_token():
            raise InputError(
                "export.hub_id is set but no HF_TOKEN reaches the export job: set it in the environment, a Prefect "
                "Secret block (hf-token) or, on Modal, the vlmpipe-secrets Secret; or unset export.hub_id"
            )

    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    # Merge in float32 and cast once at the end: merging in bf16 rounds the LoRA update twice.
    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged = merged.to(getattr(torch, request.export.dtype))
    processor_source = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else model_dir
    processor = AutoProcessor.from_pretrained(processor_source)

    result_fields = {"merged_dir": request.output_dir, "dtype": request.export.dtype}
    manifest = {"stage": "export", "request": request.model_dump(mode="json")}
    with atomic_output(merged_dir, manifest) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        processor.save_pretrained(str(tmp))
        for name in _CARRIED_FILES:
            if (model_dir / name).exists() and not (tmp / name).exists():
                shutil.copy2(model_dir / name, tmp / name)
        size = sum(p.stat().st_size for p in tmp.rglob("*.safetensors"))
        result = ExportResult(**result_fields, size_bytes=size)
        manifest["result"] = result.model_dump(mode="json")

    if request.export.hub_id:
        hub_urls = [
            push_to_hub(str(adapter_dir), f"{request.export.hub_id}-lora", request.export.hub_private),
            push_to_hub(str(merged_dir), request.export.hub_id, request.export.hub_private),
        ]
        result = result.model_copy(update={"hub_urls": hub_urls})
        print(f"pushed to {', '.join(hub_urls)}", file=sys.stderr)
    return result
