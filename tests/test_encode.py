"""encode_images and the cached-features train path on the real tiny model: same batches, same loss, same
adapter; a cache made from other vision weights, another processor config or other data is never used."""

from __future__ import annotations

import functools
import json
import shutil

import pytest

from modal_jobs.config import PipelineConfig, TrainConfig
from modal_jobs.encode import EncodeRequest
from modal_jobs.schemas import TrainRequest
from modal_jobs.storage import read_manifest, resolve


@pytest.fixture(autouse=True)
def no_telemetry_thread(monkeypatch):
    # TRL's trainer sends usage telemetry through huggingface_hub, whose worker thread outlives the test; a
    # thread left behind makes later tests that fork (the synthetic set's renderer) render serially instead.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, tiny_model_dir, tiny_dataset_dir):
    """The tiny dataset's train split encoded once for this module (its own storage root)."""
    from modal_jobs.encode import encode_images

    home = tmp_path_factory.mktemp("encode-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLMPIPE_HOME", str(home))
        result = encode_images(_encode_request(tiny_model_dir, tiny_dataset_dir, home))
    return result


def _encode_request(model_dir, dataset_dir, home, **overrides) -> EncodeRequest:
    config = PipelineConfig.embedded()
    return EncodeRequest(model=config.model, dataset_dir=str(dataset_dir), model_dir=str(model_dir),
                         features_root=str(home / "features"), batch_size=5, shard_size=12, num_workers=0,
                         **overrides)


def _train_request(model_dir, dataset_dir, features_dir=None, output_dir="runs/test", **train_overrides):
    config = PipelineConfig.embedded()
    train = config.train.model_copy(update={"max_steps": 8, "save_steps": 100, "logging_steps": 2, **train_overrides})
    return TrainRequest(
        train=TrainConfig.model_validate(train.model_dump()), model=config.model, dataset_dir=str(dataset_dir),
        model_dir=str(model_dir), output_dir=output_dir, instruction=config.instruction, features_dir=features_dir,
    )


def _rows(dataset_dir, count: int):
    from datasets import load_from_disk

    from modal_jobs.prompts import training_row

    split = load_from_disk(str(dataset_dir))["train"]
    instruction = PipelineConfig.embedded().instruction
    pixel_rows, feature_rows = [], []
    for index in range(count):
        row = training_row(split[index]["image"], split[index]["text"], instruction)
        pixel_rows.append(row)
        feature_rows.append({"prompt": row["prompt"], "completion": row["completion"], "feature_index": index})
    return pixel_rows, feature_rows


def _trl_batch(processor, pixel_rows, max_length=None):
    import copy

    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    collator = DataCollatorForVisionLanguageModeling(processor=processor, max_length=max_length,
                                                     completion_only_loss=True)
    return collator(copy.deepcopy(pixel_rows))


def test_encode_writes_a_keyed_cache_and_reuses_it(vlmpipe_home, encoded, tiny_model_dir, tiny_dataset_dir):
    from safetensors.torch import load_file

    from modal_jobs.encode import FeatureStore, encode_images

    features_dir = resolve(encoded.features_dir)
    assert features_dir.name == encoded.key and not encoded.cached
    assert encoded.num_images == 32 and (encoded.mm_tokens, encoded.hidden_size) == (16, 64)
    assert encoded.dtype == "float32"  # a CPU trains in float32, so the cache is in float32 too
    manifest = read_manifest(features_dir)
    assert set(manifest["components"]) >= {"dataset_fingerprint", "vision_fingerprint", "processor_signature", "dtype"}
    index = json.loads((features_dir / "index.json").read_text())
    assert index["shards"] == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    last = load_file(features_dir / "shard-00002.safetensors")
    assert last["features"].shape == (8, 16, 64) and last["rows"].tolist() == list(range(24, 32))
    assert FeatureStore(features_dir).get([31, 0, 13]).shape == (3, 16, 64)
    # Same inputs: the same folder, not recomputed.
    again = encode_images(_encode_request(tiny_model_dir, tiny_dataset_dir, features_dir.parent.parent))
    assert again.cached and again.features_dir == encoded.features_dir


def test_feature_collator_builds_the_same_batch_as_trls(tiny_model_dir, tiny_dataset_dir, encoded):
    from transformers import AutoProcessor

    from modal_jobs.encode import FeatureStore
    from modal_jobs.train import FeatureCollator

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    pixel_rows, feature_rows = _rows(tiny_dataset_dir, 6)
    prompt_length = int(_trl_batch(processor, pixel_rows[:1])["attention_mask"].sum()) - 3
    for max_length in (None, prompt_length + 4):  # the second cuts the longer answers short
        pixels = _trl_batch(processor, pixel_rows, max_length)
        cached = FeatureCollator(processor, FeatureStore(encoded.features_dir), max_length=max_length)(feature_rows)
        assert set(pixels) - {"pixel_values"} == set(cached) - {"image_features"}
        for name in ("input_ids", "attention_mask", "labels", "token_type_ids"):
            assert pixels[name].tolist() == cached[name].tolist(), name
        assert cached["image_features"].shape == (6, 16, 64)


def test_loss_through_cached_features_equals_loss_through_pixels(tiny_model_dir, tiny_dataset_dir, encoded):
    """The exactness test: the same batch through the pixels and through the cache gives the same loss, in
    float32 (what a CPU trains in) to float32 rounding, and in bfloat16 (what a GPU trains in) to bf16's."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from modal_jobs.encode import FeatureStore, _image_features
    from modal_jobs.train import FeatureCollator, merge_image_features

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pixel_rows, feature_rows = _rows(tiny_dataset_dir, 8)
    pixels = _trl_batch(processor, pixel_rows)
    cached = FeatureCollator(processor, FeatureStore(encoded.features_dir))(feature_rows)
    with torch.no_grad():
        loss_pixels = model(**pixels).loss.item()
        loss_features = model(**merge_image_features(model, cached)).loss.item()
    print(f"float32: loss through pixels {loss_pixels:.7f}, through cached features {loss_features:.7f}")
    assert loss_features == pytest.approx(loss_pixels, rel=1e-5)

    # bfloat16: features made by the encode stage's function, one image at a time (other batching than the
    # pixel forward's), stored in bf16, against the bf16 pixel forward.
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        stored = torch.cat([_image_features(model.model, pixels["pixel_values"][i : i + 1].to(torch.bfloat16))
                            for i in range(8)]).to(torch.bfloat16)
        loss_pixels_bf16 = model(**{**pixels, "pixel_values": pixels["pixel_values"].to(torch.bfloat16)}).loss.item()
        loss_features_bf16 = model(**merge_image_features(model, {**cached, "image_features": stored})).loss.item()
    print(f"bfloat16: loss through pixels {loss_pixels_bf16:.5f}, through cached features {loss_features_bf16:.5f}")
    assert loss_features_bf16 == pytest.approx(loss_pixels_bf16, rel=1e-2)


def test_labelled_token_loss_is_the_models_own_loss_in_any_chunking(tiny_model_dir, tiny_dataset_dir, encoded):
    """The train job's loss on cached features (backbone, then cross-entropy over labelled positions in chunks)
    equals the model's full-logits loss on the same batch, whatever the chunk size, gradients included."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from modal_jobs.encode import FeatureStore
    from modal_jobs.train import (
        FeatureCollator,
        labelled_token_loss,
        merge_image_features,
    )

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    _, feature_rows = _rows(tiny_dataset_dir, 8)
    cached = FeatureCollator(processor, FeatureStore(encoded.features_dir))(feature_rows)
    reference = model(**merge_image_features(model, cached)).loss
    reference.backward()
    reference_grad = model.lm_head.weight.grad.clone()
    labelled = int((cached["labels"][:, 1:] != -100).sum())
    for chunk in (7, 64, 10_000):
        model.zero_grad()
        total, count = labelled_token_loss(model, dict(cached), chunk_tokens=chunk)
        (total / count).backward()
        assert int(count) == labelled
        assert float(total / count) == pytest.approx(float(reference), rel=1e-5), chunk
        torch.testing.assert_close(model.lm_head.weight.grad, reference_grad, rtol=1e-4, atol=1e-6)


def _tiny_lora_model(tiny_model_dir, layer_types=None):
    """(the tiny model in float32 with random, non-zero LoRA adapters on its language layers, its processor).
    With `layer_types`, a randomly initialised model of that many layers of those kinds instead of its two."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from modal_jobs.train import LANGUAGE_TARGETS

    torch.manual_seed(0)
    if layer_types is None:
        base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    else:
        config = AutoConfig.from_pretrained(tiny_model_dir)
        config.text_config.num_hidden_layers = len(layer_types)
        config.text_config.layer_types = list(layer_types)
        base = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=LANGUAGE_TARGETS,
                                            init_lora_weights=False))
    return model, AutoProcessor.from_pretrained(tiny_model_dir)


def _loss_and_lora_gradients(model, batch):
    """(the train job's loss on a batch of cached features, each adapter weight's gradient from it)."""
    from modal_jobs.train import labelled_token_loss

    model.zero_grad()
    total, count = labelled_token_loss(model, dict(batch))
    loss = total / count
    loss.backward()
    return float(loss), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_selective_recomputation_gives_the_same_gradients(tiny_model_dir, tiny_dataset_dir, encoded):
    """The "selective" recomputation lever changes what the backward keeps, never what it computes."""
    import torch

    from modal_jobs.encode import FeatureStore
    from modal_jobs.train import FeatureCollator, selective_checkpoint_kwargs

    model, processor = _tiny_lora_model(tiny_model_dir)
    _, feature_rows = _rows(tiny_dataset_dir, 4)
    cached = FeatureCollator(processor, FeatureStore(encoded.features_dir))(feature_rows)

    model.train()
    _, plain = _loss_and_lora_gradients(model, cached)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=selective_checkpoint_kwargs())
    assert model.base_model.model.model.language_model.gradient_checkpointing
    _, selective = _loss_and_lora_gradients(model, cached)
    assert plain.keys() == selective.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(selective[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_fused_lora_forwards_give_the_same_loss_and_gradients(tiny_model_dir, tiny_dataset_dir, encoded):
    """The fused LoRA forward (one matmul-with-add) computes what PEFT's does: same loss, same adapter gradients;
    and padding a batch to a multiple of 64 changes neither."""
    import torch

    from modal_jobs.encode import FeatureStore
    from modal_jobs.train import (
        FeatureCollator,
        fuse_lora_forwards,
        labelled_token_loss,
    )

    model, processor = _tiny_lora_model(tiny_model_dir)
    _, feature_rows = _rows(tiny_dataset_dir, 4)
    store = FeatureStore(encoded.features_dir)
    cached = FeatureCollator(processor, store)(feature_rows)
    padded = FeatureCollator(processor, store, pad_to_multiple_of=64)(feature_rows)
    assert padded["input_ids"].shape[1] % 64 == 0 and padded["input_ids"].shape[1] > cached["input_ids"].shape[1]
    assert padded["attention_mask"][:, cached["input_ids"].shape[1]:].sum() == 0
    loss_and_gradients = functools.partial(_loss_and_lora_gradients, model)

    def base_loss():  # adapters switched off: PEFT's own forward, the base model's loss
        with model.disable_adapter(), torch.no_grad():
            total, count = labelled_token_loss(model, dict(cached))
        return float(total / count)

    model.train()
    peft_loss, peft_grads = loss_and_gradients(cached)
    peft_base_loss = base_loss()
    lora_layers = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
    assert fuse_lora_forwards(model) == lora_layers > 0
    fused_loss, fused_grads = loss_and_gradients(cached)
    padded_loss, padded_grads = loss_and_gradients(padded)
    assert fused_loss == pytest.approx(peft_loss, rel=1e-5)
    assert padded_loss == pytest.approx(peft_loss, rel=1e-5)
    assert peft_grads.keys() == fused_grads.keys() and len(peft_grads) == 2 * lora_layers
    for name in peft_grads:
        torch.testing.assert_close(fused_grads[name], peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(padded_grads[name], peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert base_loss() == pytest.approx(peft_base_loss, rel=1e-6)
    assert peft_base_loss != pytest.approx(peft_loss, rel=1e-4)  # so the adapters were really in the loss above

    # Under bf16 autocast (how the GPU trains): the same loss as PEFT's forward within bf16 rounding.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_bf16, _ = loss_and_gradients(cached)
        for module in model.modules():
            module.__dict__.pop("forward", None)  # back to PEFT's own forwards
        peft_bf16, _ = loss_and_gradients(cached)
    assert fused_bf16 == pytest.approx(peft_bf16, rel=2e-2) and fused_bf16 == pytest.approx(peft_loss, rel=5e-2)


def _padded_and_packed(tiny_model_dir, tiny_dataset_dir, encoded):
    """(the tiny LoRA model, five rows collated padded, the same rows packed into one row padded to 64)."""
    from modal_jobs.encode import FeatureStore
    from modal_jobs.train import FeatureCollator

    model, processor = _tiny_lora_model(tiny_model_dir)
    _, feature_rows = _rows(tiny_dataset_dir, 5)
    store = FeatureStore(encoded.features_dir)
    padded = FeatureCollator(processor, store)(feature_rows)
    packed = FeatureCollator(processor, store, pack=True, pad_to_multiple_of=64)(feature_rows)
    return model, padded, packed


def test_packed_rows_give_the_padded_batchs_loss_and_gradients(tiny_model_dir, tiny_dataset_dir, encoded):
    """A batch's rows packed end to end (each with its own positions, so transformers masks them apart) give the
    padded batch's loss and adapter gradients; FlexAttention, which the GPU uses on packed rows, the same loss."""
    import torch

    from modal_jobs.train import labelled_token_loss

    model, padded, packed = _padded_and_packed(tiny_model_dir, tiny_dataset_dir, encoded)
    lengths = padded["attention_mask"].sum(dim=1)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    assert packed["labels"][0, packed["labelled_positions"] + 1].ne(-100).all()
    assert packed["input_ids"].shape[1] % 64 == 0 and packed["input_ids"].shape[1] - 64 < int(lengths.sum())
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts[: len(lengths)] == [0, *lengths.cumsum(0)[:-1].tolist()]  # each row restarts at position 0
    assert int((packed["labels"] != -100).sum()) == int((padded["labels"] != -100).sum()) > 0
    assert torch.equal(packed["input_ids"][0, : int(lengths.sum())], padded["input_ids"][padded["attention_mask"].bool()])

    model.train()
    padded_loss, padded_grads = _loss_and_lora_gradients(model, padded)
    packed_loss, packed_grads = _loss_and_lora_gradients(model, packed)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # Rows that could see each other would change the loss: the same tokens as one sequence do.
    as_one = {name: value for name, value in packed.items() if name != "position_ids"}
    joined_loss, _ = _loss_and_lora_gradients(model, as_one)
    assert joined_loss != pytest.approx(padded_loss, rel=1e-3)

    if shutil.which("cc") is None:  # FlexAttention on a CPU compiles a C++ kernel (its backward needs a GPU)
        pytest.skip("no C compiler for FlexAttention's CPU kernel")
    model.set_attn_implementation("flex_attention")
    with torch.no_grad():
        total, count = labelled_token_loss(model, dict(packed))
    assert float(total / count) == pytest.approx(padded_loss, rel=1e-5)


def test_packed_rows_masks_are_the_ones_transformers_builds(tiny_model_dir, tiny_dataset_dir, encoded):
    """packed_attention_masks, which reads nothing back from the device, allows exactly the (query, key) pairs
    that transformers' own Gemma 3 masks allow for the same packed row: rows apart, each image bidirectional,
    the sliding layers' window (made shorter than a row here, so that it bites)."""
    import torch
    from torch.nn.attention.flex_attention import create_mask
    from transformers.models.gemma3.modeling_gemma3 import (
        create_masks_for_vision_model,
        get_block_sequence_ids_for_mask,
    )

    from modal_jobs.train import (
        _head_and_backbone,
        merge_image_features,
        packed_attention_masks,
    )

    if shutil.which("cc") is None:  # a BlockMask on a CPU is made by compiled code
        pytest.skip("no C compiler for FlexAttention's CPU kernel")
    model, _, packed = _padded_and_packed(tiny_model_dir, tiny_dataset_dir, encoded)
    backbone, _ = _head_and_backbone(model)
    text_config = backbone.config.get_text_config()
    text_config.sliding_window = 16
    inputs = merge_image_features(model, {k: v for k, v in packed.items() if k not in ("labels", "labelled_positions")})
    assert packed_attention_masks(backbone.config, inputs) is None  # SDPA: the model builds its own
    model.set_attn_implementation("flex_attention")
    ours = packed_attention_masks(backbone.config, inputs)
    model.set_attn_implementation("sdpa")  # transformers' masks, dense
    theirs = create_masks_for_vision_model(
        config=text_config, inputs_embeds=inputs["inputs_embeds"], attention_mask=None, past_key_values=None,
        position_ids=inputs["position_ids"],
        block_sequence_ids=get_block_sequence_ids_for_mask(inputs["token_type_ids"]))
    length = inputs["inputs_embeds"].shape[1]
    assert ours.keys() == theirs.keys() == {"full_attention", "sliding_attention"}
    for kind, block_mask in ours.items():
        dense = create_mask(block_mask.mask_mod, 1, 1, length, length, device="cpu")
        assert torch.equal(dense, theirs[kind].expand_as(dense)), kind
    assert not torch.equal(theirs["full_attention"], theirs["sliding_attention"])
    rows = int((packed["position_ids"][0] == 0).sum())
    assert theirs["full_attention"].sum() < theirs["full_attention"].numel() // rows  # rows kept apart

    # The blocks too: ours come from a create_block_mask compiled with dynamic shapes (one compile for both mask
    # kinds and every length), transformers' from its own builder; equal at this length and at a shorter one.
    from torch._dynamo.utils import clear_compilation_metrics, get_compilation_metrics
    from torch.nn.attention.flex_attention import create_block_mask

    model.set_attn_implementation("flex_attention")
    torch._dynamo.reset()
    clear_compilation_metrics()
    for cut in (length, length - 40):
        shorter = {name: value[:, :cut] if value.dim() > 1 and value.shape[1] == length else value
                   for name, value in inputs.items()}
        for kind, block_mask in packed_attention_masks(backbone.config, shorter).items():
            reference = create_block_mask(block_mask.mask_mod, 1, None, cut, cut, device="cpu")  # eager
            assert block_mask.shape[-2:] == (cut, cut)
            assert torch.equal(block_mask.to_dense(), reference.to_dense()), (kind, cut)
            assert torch.equal(block_mask.kv_num_blocks, reference.kv_num_blocks), (kind, cut)
            assert torch.equal(block_mask.full_kv_num_blocks, reference.full_kv_num_blocks), (kind, cut)
    builds = [frame for frame in get_compilation_metrics() if frame.co_name == "create_block_mask"]
    assert len(builds) == 1, [frame.recompile_reason for frame in builds]  # both kinds, whatever the length


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda_available(), reason="FlexAttention's backward needs a GPU")
def test_packed_rows_under_flex_attention_give_the_padded_batchs_gradients_on_a_gpu(tiny_model_dir, tiny_dataset_dir,
                                                                                   encoded):
    """The GPU's path: packed rows under FlexAttention, in layers compiled with selective recomputation inside,
    give the gradients of the padded batch under SDPA, eager."""
    import torch

    from modal_jobs.train import _compile_layers, fuse_lora_forwards

    model, padded, packed = _padded_and_packed(tiny_model_dir, tiny_dataset_dir, encoded)
    model.cuda()

    def on_gpu(batch):
        return {name: value.cuda() for name, value in batch.items()}

    model.train()
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # float32 as float32: TF32 would round both sides apart
    try:
        padded_loss, padded_grads = _loss_and_lora_gradients(model, on_gpu(padded))
        fuse_lora_forwards(model)
        model.set_attn_implementation("flex_attention")
        torch._dynamo.reset()
        assert _compile_layers(model, recompute="selective")
        packed_loss, packed_grads = _loss_and_lora_gradients(model, on_gpu(packed))
    finally:
        torch._dynamo.reset()
        torch.set_float32_matmul_precision(precision)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-4)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("recompute", [True, "selective"])
def test_recomputing_inside_compiled_layers_gives_the_same_gradients(tiny_model_dir, tiny_dataset_dir, encoded,
                                                                     recompute):
    """Layers compiled with their recomputation inside (here with the aot_eager backend, which traces and
    partitions as inductor does but needs no C compiler) give the gradients of the plain eager model, with one
    compiled graph per attention kind: layer 0, fed the frozen embeddings, shares its kind's (on a 4B model each
    graph more is a minute of cold compilation; BENCHMARKS, third-session smoke). Three layers here: sliding,
    sliding, full."""
    import torch
    from torch._dynamo.utils import counters

    from modal_jobs.encode import FeatureStore
    from modal_jobs.train import FeatureCollator, _compile_layers, fuse_lora_forwards

    model, processor = _tiny_lora_model(tiny_model_dir, layer_types=["sliding_attention", "sliding_attention",
                                                                     "full_attention"])
    fuse_lora_forwards(model)
    _, feature_rows = _rows(tiny_dataset_dir, 4)
    cached = FeatureCollator(processor, FeatureStore(encoded.features_dir), pad_to_multiple_of=64)(feature_rows)

    model.train()
    eager_loss, eager = _loss_and_lora_gradients(model, cached)
    torch._dynamo.reset()
    counters.clear()
    try:
        assert _compile_layers(model, recompute=recompute, backend="aot_eager")
        compiled_loss, compiled = _loss_and_lora_gradients(model, cached)
        assert not counters["graph_break"]  # compiled, in one piece
        assert counters["stats"]["unique_graphs"] == 2, counters["stats"]
    finally:
        torch._dynamo.reset()
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert eager.keys() == compiled.keys() and len(eager) > 0
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-6, msg=name)


def test_both_layer_kinds_share_one_compiled_layer_on_packed_rows(tiny_model_dir, tiny_dataset_dir, encoded):
    """Packed rows under FlexAttention, in compiled layers: the sliding and the full layers' masks differ only in
    tensors, so one compiled graph serves both kinds (with transformers' masks, two different mask functions, the
    full layer compiled again: each graph more is about a minute of cold compilation on a 4B model), and the loss
    is still the padded batch's. Forward only, with the aot_eager backend: FlexAttention's backward needs a GPU."""
    import torch

    from modal_jobs.encode import FeatureStore
    from modal_jobs.train import FeatureCollator, labelled_token_loss

    if shutil.which("cc") is None:  # a BlockMask on a CPU is made by compiled code
        pytest.skip("no C compiler for FlexAttention's CPU kernel")
    model, processor = _tiny_lora_model(tiny_model_dir, layer_types=["sliding_attention", "sliding_attention",
                                                                     "full_attention"])
    model.config.get_text_config().sliding_window = 16  # shorter than a row, so that the window bites
    _, feature_rows = _rows(tiny_dataset_dir, 5)
    store = FeatureStore(encoded.features_dir)
    padded = FeatureCollator(processor, store)(feature_rows)
    packed = FeatureCollator(processor, store, pack=True, pad_to_multiple_of=64)(feature_rows)
    model.eval()
    with torch.no_grad():
        total, count = labelled_token_loss(model, dict(padded))
        padded_loss = float(total / count)
        model.set_attn_implementation("flex_attention")
        packed_loss, layer_graphs = _compiled_layers_loss(model, packed, "aot_eager", "forward")
    assert len(layer_graphs) == 1, [frame.recompile_reason for frame in layer_graphs]
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)


def _compiled_layers_loss(model, inputs, backend, frame_name):
    """Compile the model's decoder layers with `backend` (torch.compile's state reset before and after) and compute
    the loss of `inputs`: (the loss, the compiled frames of the code named `frame_name`). No graph break allowed."""
    import torch
    from torch._dynamo.utils import (
        clear_compilation_metrics,
        counters,
        get_compilation_metrics,
    )

    from modal_jobs.train import _compile_layers, labelled_token_loss

    torch._dynamo.reset()
    counters.clear()
    clear_compilation_metrics()
    try:
        assert _compile_layers(model, backend=backend)
        total, count = labelled_token_loss(model, dict(inputs))
        frames = [frame for frame in get_compilation_metrics() if frame.co_name == frame_name]
        assert not counters["graph_break"]
    finally:
        torch._dynamo.reset()
    return float(total / count), frames


def test_flex_kernel_options_reach_every_compiled_layers_attention(tiny_model_dir, tiny_dataset_dir, encoded,
                                                                   monkeypatch):
    """Where levers.flex_kernel_options gives settings (FEATURES_FLEX_KERNEL_OPTIONS on a CUDA card: forced here,
    as bench.train_speed's ours_tuned_flex sets them), every compiled layer's FlexAttention call carries them, the
    layers still share one graph, and the loss is unchanged."""
    import torch

    from modal_jobs.encode import FeatureStore
    from modal_jobs.train import FeatureCollator, labelled_token_loss, levers

    if shutil.which("cc") is None:  # a BlockMask on a CPU is made by compiled code
        pytest.skip("no C compiler for FlexAttention's CPU kernel")
    model, processor = _tiny_lora_model(tiny_model_dir)
    _, feature_rows = _rows(tiny_dataset_dir, 5)
    packed = FeatureCollator(processor, FeatureStore(encoded.features_dir), pack=True, pad_to_multiple_of=64)(
        feature_rows)
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module.code)
        return graph_module.forward

    model.eval()
    with torch.no_grad():
        model.set_attn_implementation("flex_attention")
        total, count = labelled_token_loss(model, dict(packed))
        eager_loss = float(total / count)
        assert levers.flex_kernel_options(model.config.get_text_config()) is None  # no CUDA card here
        monkeypatch.setattr(levers, "flex_kernel_options", lambda text_config: dict(levers.FLEX_BACKWARD_AUTOTUNED_H200))
        # The layers' calls go through levers._layer_call, which adds the options.
        packed_loss, layer_frames = _compiled_layers_loss(model, packed, recording_backend, "call")
    assert len(layer_frames) == 1, [frame.recompile_reason for frame in layer_frames]
    attention_graphs = [code for code in graphs if "flex_attention" in code]
    # Constants in the graph, not graph inputs: the kernel's settings must not turn symbolic under dynamic shapes.
    assert attention_graphs and all("'bwd_num_stages': 3" in code for code in attention_graphs), attention_graphs[:1]
    assert packed_loss == pytest.approx(eager_loss, rel=1e-5)


def test_the_wide_matmuls_are_kept_only_on_a_card_with_the_memory(monkeypatch):
    """levers.FEATURES_RECOMPUTE_WIDE_MATMULS None: recompute them without a CUDA card or on one under
    KEEP_WIDE_MATMULS_MIN_GIB, keep them on a larger one; True or False is obeyed as set."""
    import types

    import torch

    from modal_jobs.train import levers

    monkeypatch.setattr(levers, "FEATURES_RECOMPUTE_WIDE_MATMULS", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert levers.recompute_wide_matmuls() is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for gib, recompute in ((24, True), (levers.KEEP_WIDE_MATMULS_MIN_GIB - 1, True), (80, False), (141, False)):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device, gib=gib: types.SimpleNamespace(total_memory=gib * 2**30))
        assert levers.recompute_wide_matmuls() is recompute, gib
    for setting in (True, False):
        monkeypatch.setattr(levers, "FEATURES_RECOMPUTE_WIDE_MATMULS", setting)
        assert levers.recompute_wide_matmuls() is setting


def test_the_trainers_loss_is_the_same_on_both_paths(vlmpipe_home, tiny_model_dir, tiny_dataset_dir, encoded):
    """Through the train job's own trainers (TRL's fused LM head, its normalisation): same batch, same loss."""
    import torch

    from modal_jobs.encode import FeatureStore
    from modal_jobs.train import FeatureCollator, build_trainer

    by_pixels = build_trainer(_train_request(tiny_model_dir, tiny_dataset_dir))
    by_features = build_trainer(_train_request(tiny_model_dir, tiny_dataset_dir, encoded.features_dir))
    assert by_pixels.image_inputs["path"] == "pixels" and by_features.image_inputs["path"] == "features"
    pixel_rows, feature_rows = _rows(tiny_dataset_dir, 8)
    pixels = _trl_batch(by_pixels.processor, pixel_rows)
    cached = FeatureCollator(by_features.processor, FeatureStore(encoded.features_dir))(feature_rows)
    with torch.no_grad():
        loss_pixels = by_pixels.trainer.compute_loss(by_pixels.trainer.model, dict(pixels)).item()
        loss_features = by_features.trainer.compute_loss(by_features.trainer.model, dict(cached)).item()
    assert loss_features == pytest.approx(loss_pixels, rel=1e-5)


def test_cached_and_pixel_paths_learn_the_same_adapter(vlmpipe_home, tiny_model_dir, tiny_dataset_dir, encoded,
                                                       monkeypatch):
    from safetensors.torch import load_file

    from modal_jobs.train import train

    # Batch for batch: the cached path's length-grouped sampler would put other rows together than the pixel path's.
    monkeypatch.setattr("modal_jobs.train.levers.FEATURES_GROUP_BY_LENGTH", False)

    by_pixels = train(_train_request(tiny_model_dir, tiny_dataset_dir, output_dir="runs/pixels"))
    by_features = train(_train_request(tiny_model_dir, tiny_dataset_dir, encoded.features_dir, "runs/features"))
    manifests = {name: read_manifest(vlmpipe_home / f"runs/{name}/lora") for name in ("pixels", "features")}
    assert manifests["pixels"]["image_inputs"]["path"] == "pixels"
    assert manifests["features"]["image_inputs"]["path"] == "features"
    for result in (by_pixels, by_features):
        assert result.global_step == 8 and result.last_logged_loss < result.first_logged_loss
    adapters = {name: load_file(vlmpipe_home / f"runs/{name}/lora/adapter_model.safetensors")
                for name in ("pixels", "features")}
    shapes = {name: {key: tuple(t.shape) for key, t in weights.items()} for name, weights in adapters.items()}
    assert shapes["pixels"] == shapes["features"]
    # Same seed, same batches, same loss per batch: the same training run, to float32 rounding.
    losses = {name: [e["loss"] for e in manifests[name]["log_history"] if "loss" in e] for name in manifests}
    print("logged losses, pixels:", losses["pixels"], "cached features:", losses["features"])
    assert losses["features"] == pytest.approx(losses["pixels"], rel=1e-3)


def _copy_model(source, target):
    shutil.copytree(source, target)
    return target


def _perturb(model_dir, part: str) -> None:
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    weights = load_file(path)
    name = next(n for n in sorted(weights) if part in n and weights[n].dim() == 2)
    weights[name] = weights[name] + 0.01
    save_file(weights, path, metadata={"format": "pt"})


def test_a_stale_cache_is_never_used(vlmpipe_home, tmp_path, tiny_model_dir, tiny_dataset_dir, encoded):
    from modal_jobs.encode import encode_images
    from modal_jobs.train import plan_image_inputs

    def plan(model_dir, dataset_dir=tiny_dataset_dir, **overrides):
        return plan_image_inputs(_train_request(model_dir, dataset_dir, encoded.features_dir, **overrides))

    assert plan(tiny_model_dir)["features_dir"] == encoded.features_dir

    other_tower = _copy_model(tiny_model_dir, tmp_path / "other-tower")
    _perturb(other_tower, "vision_tower")
    decision = plan(other_tower)
    assert decision["features_dir"] is None and decision["reasons"] == ["vision_fingerprint differs"]
    # ... and encoding for it makes a cache of its own.
    assert encode_images(_encode_request(other_tower, tiny_dataset_dir, tmp_path)).key != encoded.key

    other_processor = _copy_model(tiny_model_dir, tmp_path / "other-processor")
    config_path = other_processor / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["image_processor"]["image_mean"] = [0.4, 0.4, 0.4]
    config_path.write_text(json.dumps(config))
    decision = plan(other_processor)
    assert decision["features_dir"] is None and decision["reasons"] == ["processor_signature differs"]

    other_data = tmp_path / "other-data"
    shutil.copytree(tiny_dataset_dir, other_data)
    (other_data / "train" / "dataset_info.json").write_text("{}")
    assert plan(tiny_model_dir, other_data)["reasons"] == ["dataset_fingerprint differs"]

    decision = plan(tiny_model_dir, finetune_vision_layers=True)
    assert decision["features_dir"] is None and "finetune_vision_layers" in decision["reasons"][0]

    # Other language-model weights on the same vision tower (another fine-tune of the same base): reused.
    other_language = _copy_model(tiny_model_dir, tmp_path / "other-language")
    _perturb(other_language, "language_model")
    assert plan(other_language)["features_dir"] == encoded.features_dir


def test_training_vision_layers_falls_back_to_pixels(vlmpipe_home, tiny_model_dir, tiny_dataset_dir, encoded):
    from modal_jobs.train import train

    train(_train_request(tiny_model_dir, tiny_dataset_dir, encoded.features_dir, max_steps=2,
                         finetune_vision_layers=True))
    inputs = read_manifest(vlmpipe_home / "runs/test/lora")["image_inputs"]
    assert inputs["path"] == "pixels" and "finetune_vision_layers" in inputs["reasons"][0]


def test_micro_batch_fusion_keeps_the_effective_batch():
    from modal_jobs.train import _micro_batch
    from modal_jobs.train.levers import FEATURES_MAX_MICRO_BATCH

    for per_device, accumulation in ((4, 4), (8, 1), (2, 16), (3, 5), (16, 4)):
        cfg = TrainConfig(per_device_batch_size=per_device, gradient_accumulation_steps=accumulation)
        micro, steps = _micro_batch(cfg, features=True)
        assert micro * steps == per_device * accumulation and micro <= max(FEATURES_MAX_MICRO_BATCH, 1)
        assert _micro_batch(cfg, features=False) == (per_device, accumulation)
    assert _micro_batch(TrainConfig(per_device_batch_size=4, gradient_accumulation_steps=4), True) == (16, 1)


def test_an_orchestrator_named_output_is_used_and_guarded(vlmpipe_home, tmp_path, tiny_model_dir, tiny_dataset_dir):
    from modal_jobs.encode import encode_images
    from modal_jobs.errors import InputError
    from modal_jobs.train import plan_image_inputs

    request = _encode_request(tiny_model_dir, tiny_dataset_dir, tmp_path, output_dir="features/from-the-flow")
    first = encode_images(request)
    assert first.features_dir == "features/from-the-flow" and not first.cached
    assert encode_images(request).cached
    decision = plan_image_inputs(_train_request(tiny_model_dir, tiny_dataset_dir, first.features_dir))
    assert decision["features_dir"] == "features/from-the-flow"
    other = _copy_model(tiny_model_dir, tmp_path / "other")
    _perturb(other, "vision_tower")
    with pytest.raises(InputError, match="other inputs"):
        encode_images(request.model_copy(update={"model_dir": str(other)}))


def test_the_compile_record_counts_frames_recompiles_and_their_reasons():
    """What the train job reports of torch.compile (TrainResult.compilation): here one function compiled for
    float32 and then again for float64, so two frames and one recompile with its reason; nothing compiled, None."""
    import torch
    from torch._dynamo.utils import clear_compilation_metrics, counters

    from modal_jobs.train.levers import _compile_phases, compilation_record

    torch._dynamo.reset()
    clear_compilation_metrics()
    counters.clear()
    try:
        assert compilation_record() is None
        double = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
        double(torch.ones(3))
        double(torch.ones(3, dtype=torch.float64))
        record = compilation_record()

        def broken(x):
            x = x + 1
            torch._dynamo.graph_break()
            return x * 2

        torch.compile(broken, backend="eager")(torch.ones(3))
        with_a_break = compilation_record()
    finally:
        torch._dynamo.reset()
        clear_compilation_metrics()
    assert record["frames"] == 2 and len(record["each_frame"]) == 2
    assert all(frame["code"].startswith("<lambda> (test_encode.py:") for frame in record["each_frame"])
    assert record["graph_breaks"] == {}
    assert with_a_break["graph_breaks"] and with_a_break["frames"] > record["frames"]
    assert sum(record["recompile_reasons"].values()) == 1
    assert "dtype" in next(iter(record["recompile_reasons"]))
    assert record["frame_compile_s"] >= 0 and set(record["fx_graph_cache"]) == {"hit", "miss"}
    # torch's phase timers, longest first; the ones too short to matter left out.
    assert list(record["phases_s"].values()) == sorted(record["phases_s"].values(), reverse=True)
    assert _compile_phases((["trace", "load", "guards"], ["1.26", "3.0", "0.01"])) == {"load": 3.0, "trace": 1.3}


def test_selective_recomputation_keeps_the_wide_matmuls_only_when_told(tiny_model_dir, monkeypatch):
    """The policy recomputes element-wise work, keeps matmul outputs, and recomputes those wider than
    `max_saved_width` (the MLP's gate/up); `levers.FEATURES_RECOMPUTE_WIDE_MATMULS` decides whether the compiled
    layers pass the hidden size as that width or keep every matmul (bench.train_speed's ours_keep_mlp)."""
    import torch
    from torch.utils.checkpoint import CheckpointPolicy

    from modal_jobs.train import levers

    aten = torch.ops.aten
    narrow, wide = torch.empty(8, 16), torch.empty(8, 64)

    def policy(width):
        return levers.selective_checkpoint_kwargs(max_saved_width=width)["context_fn"].args[0]

    assert policy(32)(None, aten.mm.default, narrow, narrow) == CheckpointPolicy.MUST_SAVE
    assert policy(32)(None, aten.mm.default, narrow, wide) == CheckpointPolicy.PREFER_RECOMPUTE
    assert policy(None)(None, aten.mm.default, narrow, wide) == CheckpointPolicy.MUST_SAVE
    assert policy(None)(None, aten.mul.Tensor, wide, wide) == CheckpointPolicy.PREFER_RECOMPUTE

    model, _ = _tiny_lora_model(tiny_model_dir)
    asked = []
    real = levers.selective_checkpoint_kwargs
    monkeypatch.setattr(levers, "selective_checkpoint_kwargs",
                        lambda max_saved_width=None: asked.append(max_saved_width) or real(max_saved_width))
    hidden_size = model.config.get_text_config().hidden_size
    try:
        for recompute_wide in (True, False):
            monkeypatch.setattr(levers, "FEATURES_RECOMPUTE_WIDE_MATMULS", recompute_wide)
            assert levers._compile_layers(model, recompute="selective", backend="eager")
    finally:
        torch._dynamo.reset()
    assert asked == [hidden_size, None]


def test_expandable_segments_only_when_asked_on_a_gpu_and_never_over_the_users_setting(monkeypatch):
    """levers.use_expandable_segments: off unless FEATURES_EXPANDABLE_SEGMENTS asks and a GPU is there; a
    PYTORCH_CUDA_ALLOC_CONF of the process's own (Unsloth may set one) is left alone and reported as it is."""
    import torch

    from modal_jobs.train import levers

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setattr(levers, "FEATURES_EXPANDABLE_SEGMENTS", False)
    assert levers.use_expandable_segments() is False
    monkeypatch.setattr(levers, "FEATURES_EXPANDABLE_SEGMENTS", True)
    assert levers.use_expandable_segments() is torch.cuda.is_available()
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert levers.use_expandable_segments() is True
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert levers.use_expandable_segments() is False
