import json
import math

import pytest
import torch
from conftest import _VIT, IMAGE_SIZE, IMAGE_TOKEN_ID, TEXT_CONFIGS, image_prompt, tiny_config, tiny_model
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import (
    AutoModelForImageTextToText,
    Dinov2WithRegistersConfig,
    LlamaConfig,
)

from hf_vlm import PROJECTORS, VLMConfig, VLMForConditionalGeneration
from hf_vlm.modeling.projectors import ResamplerProjector


def pixels(n: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("projector", list(PROJECTORS))
@pytest.mark.parametrize("vision", ["siglip", "clip", "timm"])
@pytest.mark.parametrize("text", ["llama", "qwen2"])
def test_every_projector_and_backbone_gives_finite_loss(projector, vision, text):
    """Every projector on SigLIP, CLIP and timm towers with Llama and Qwen2 LMs: finite loss, image_seq_length tokens
    per image."""
    model = tiny_model(vision, text, projector_type=projector)
    config = model.config
    images = pixels(2)
    features = model.get_image_features(images).pooler_output
    assert [f.shape for f in features] == [(config.image_seq_length, 32)] * 2

    ids = torch.tensor([image_prompt(config, num_images=2)])
    loss = model(input_ids=ids, pixel_values=images, labels=ids).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (dict(projector_type="mlp"), 16),  # 16 px / 4 px patches -> 4x4 grid
        (dict(projector_type="pixel_shuffle", pixel_shuffle_factor=2), 4),
        (dict(projector_type="pixel_shuffle", pixel_shuffle_factor=4), 1),
        (dict(projector_type="resampler", projector_num_tokens=9), 9),
        (dict(projector_type="c_abstractor", projector_num_tokens=9), 9),
        (dict(projector_type="mlp", vision_feature_layer=[-1, -2]), 16),
    ],
)
def test_image_seq_length_is_derived(overrides, expected):
    """image_seq_length follows from the vision geometry and the projector."""
    assert tiny_config(**overrides).image_seq_length == expected


def test_clip_cls_token_is_dropped_by_default_and_kept_on_request():
    """CLIP's CLS token is dropped by default; keeping it adds one token for per-patch projectors."""
    assert tiny_config("clip").image_seq_length == 16
    assert tiny_config("clip", drop_cls_token=False).image_seq_length == 17
    with pytest.raises(ValueError, match="square grid"):
        tiny_config("clip", drop_cls_token=False, projector_type="pixel_shuffle")


def register_tower(**overrides) -> Dinov2WithRegistersConfig:
    """A tiny DINOv2 with 2 register tokens: CLS, 2 registers, then the 4x4 patch grid."""
    return Dinov2WithRegistersConfig(**(_VIT | dict(num_register_tokens=2) | overrides))


@pytest.mark.parametrize("projector", ["mlp", "pixel_shuffle", "resampler"])
def test_register_token_tower_drops_cls_and_registers(projector):
    """A DINOv2-with-registers tower: its CLS and 2 register tokens are dropped, the 16 patches reach the projector."""
    model = tiny_model(vision_config=register_tower(), projector_type=projector)
    config = model.config
    assert (config.vision_num_prefix_tokens, config.drop_cls_token, config.vision_num_patches) == (3, True, 16)
    assert config.image_seq_length == {"mlp": 16, "pixel_shuffle": 4, "resampler": 4}[projector]
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        tower = model.model.vision_tower(images).last_hidden_state  # (2, 1 + 2 + 16, 32)
        assert torch.equal(model.get_vision_features(images), tower[:, 3:])
    ids = torch.tensor([image_prompt(config, num_images=2)])
    assert torch.isfinite(model(input_ids=ids, pixel_values=images, labels=ids).loss)


def test_prefix_tokens_are_a_config_field():
    """vision_num_prefix_tokens is derived (CLS + registers) or given; kept prefix tokens add to per-patch tokens."""
    assert tiny_config(vision_config=register_tower(num_register_tokens=4)).vision_num_prefix_tokens == 5
    assert tiny_config("siglip").vision_num_prefix_tokens == 0
    assert tiny_config(vision_config=register_tower(), drop_cls_token=False).image_seq_length == 16 + 3
    # A tower that the default does not know: its prefix tokens are declared, then dropped by default.
    declared = tiny_config("siglip", vision_num_prefix_tokens=2)
    assert (declared.drop_cls_token, declared.vision_num_patches) == (True, 16)
    assert tiny_config("siglip", vision_num_prefix_tokens=2, drop_cls_token=False).image_seq_length == 18
    with pytest.raises(StrictDataclassClassValidationError, match="emits no CLS or register tokens"):
        tiny_config("siglip", drop_cls_token=True)
    with pytest.raises(StrictDataclassClassValidationError, match="vision_num_prefix_tokens=-1"):
        tiny_config("clip", vision_num_prefix_tokens=-1)


# What save_pretrained wrote (to_diff_dict) for tiny_config("clip", drop_cls_token=False) before
# vision_num_prefix_tokens existed: the field is absent and the CLS token is kept (17 tokens).
SAVED_BEFORE_PREFIX_TOKENS = """{"drop_cls_token": false, "image_seq_length": 17, "image_size": 16,
"image_token_id": 127,
"model_type": "hf_vlm", "pixel_shuffle_factor": 2, "projector_num_tokens": 4, "projector_type": "mlp", "text_config":
{"attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "head_dim": 8, "hidden_act":
"silu", "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64, "max_position_embeddings": 2048,
"mlp_bias": false, "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
"pad_token_id": null, "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_parameters": {"rope_theta": 10000.0,
"rope_type": "default"}, "tie_word_embeddings": false, "use_cache": true, "vocab_size": 128}, "tie_word_embeddings":
false, "transformers_version": "5.24.0", "vision_config": {"attention_dropout": 0.0, "hidden_act": "quick_gelu",
"hidden_size": 32, "image_size": 16, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64,
"layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
"num_hidden_layers": 2, "patch_size": 4, "projection_dim": 512}, "vision_feature_layer": null, "vision_grid_size": 4,
"vision_hidden_size": 32}"""


@pytest.mark.parametrize(("drop_cls_token", "expected"), [(False, 17), (True, 16), (None, 16)])
def test_configs_saved_before_prefix_tokens_load_the_same(tmp_path, drop_cls_token, expected):
    """A config.json from before vision_num_prefix_tokens loads with its drop_cls_token meaning what it meant."""
    saved = json.loads(SAVED_BEFORE_PREFIX_TOKENS)
    if drop_cls_token is None:
        del saved["drop_cls_token"], saved["image_seq_length"]
    else:
        saved["drop_cls_token"], saved["image_seq_length"] = drop_cls_token, expected
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = VLMConfig.from_pretrained(tmp_path)
    assert (config.vision_num_prefix_tokens, config.drop_cls_token, config.image_seq_length) == (
        1,
        drop_cls_token is not False,
        expected,
    )


# The largest divisor of the width not above width // 64: where width // 64 divides the width (576, 2048), the old
# `max(1, width // 64)` heads, so those models compute what they did.
RESAMPLER_HEADS = {200: 2, 480: 6, 720: 10, 576: 9, 2048: 32, 32: 1}


@pytest.mark.parametrize("width", list(RESAMPLER_HEADS))
def test_resampler_heads_divide_any_lm_width(width):
    """The resampler builds and runs for any LM width: 200, 480 and 720, which width // 64 heads do not divide, too."""
    text_config = LlamaConfig(
        hidden_size=width, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=128
    )
    config = tiny_config(text_config=text_config, projector_type="resampler", projector_num_tokens=9)
    resampler = ResamplerProjector(config)
    assert resampler.attn.num_heads == RESAMPLER_HEADS[width]
    tokens = resampler(torch.randn(2, config.vision_num_patches, config.vision_feature_size))
    assert tokens.shape == (2, 9, width) and torch.isfinite(tokens).all()


def test_bad_config_options_are_rejected():
    """An unknown projector lists the valid names; impossible geometry says what is wrong."""
    with pytest.raises(StrictDataclassFieldValidationError) as error:
        tiny_config(projector_type="qformer")
    assert all(name in str(error.value) for name in PROJECTORS)
    with pytest.raises(ValueError, match="must divide"):
        tiny_config(projector_type="pixel_shuffle", pixel_shuffle_factor=3)
    with pytest.raises(ValueError, match="image_seq_length=5 disagrees"):
        tiny_config(image_seq_length=5)
    with pytest.raises(ValueError, match="vision_grid_size"):
        tiny_config("timm", vision_grid_size=None, image_size=None)


@pytest.mark.parametrize("image_token_id", [-1, 128, 32000])
def test_image_token_id_outside_the_vocabulary_is_rejected(image_token_id):
    """An image_token_id outside [0, vocab_size) raises, naming id and vocabulary size; None and the last id pass."""
    with pytest.raises(
        StrictDataclassClassValidationError,
        match=rf"image_token_id={image_token_id} is outside the text model's vocabulary of 128 tokens",
    ) as error:
        tiny_config(image_token_id=image_token_id)
    assert isinstance(error.value.__cause__, ValueError)
    assert tiny_config(image_token_id=None).image_token_id is None
    assert tiny_config(image_token_id=127).image_token_id == 127


def test_token_count_mismatch_names_both_counts(model):
    """Too few image tokens for the images raise a ValueError naming both counts."""
    ids = torch.tensor([image_prompt(model.config)[:-5]])  # cuts 2 image tokens
    with pytest.raises(
        ValueError,
        match=r"Image features and image tokens do not match: the text has 14 image tokens, the images give 16",
    ):
        model(input_ids=ids, pixel_values=pixels(1))
    ids = torch.tensor([image_prompt(model.config)])
    with pytest.raises(ValueError, match=r"has 16 image tokens, the images give 32"):
        model(input_ids=ids, pixel_values=pixels(2))


def test_bad_pixel_values_name_expected_and_actual(model):
    """Wrong channels or size in pixel_values raise a ValueError naming both."""
    ids = torch.tensor([image_prompt(model.config)])
    with pytest.raises(ValueError, match=r"\(num_images, 3, height, width\), got \(1, 1, 16, 16\)"):
        model(input_ids=ids, pixel_values=torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="32x32 pixels, this model expects 16x16"):
        model(input_ids=ids, pixel_values=pixels(1, size=32))


@pytest.mark.parametrize("vision", ["siglip", "timm"])
def test_save_and_load_give_identical_logits(tmp_path, vision):
    """save_pretrained -> from_pretrained keeps logits and image_seq_length; weights are safetensors."""
    model = tiny_model(vision, projector_type="resampler")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = VLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.image_seq_length == model.config.image_seq_length
    ids, images = torch.tensor([image_prompt(model.config)]), pixels(1)
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, pixel_values=images).logits, loaded(input_ids=ids, pixel_values=images).logits
        )


def test_greedy_generate_with_cache_equals_without(model):
    """Greedy generation gives the same tokens with and without the KV cache; the vision tower runs once with it."""
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    inputs = dict(input_ids=torch.tensor([image_prompt(model.config)]), pixel_values=pixels(1))
    cached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True)
    assert len(calls) == 1
    uncached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape[1] == inputs["input_ids"].shape[1] + 8
    assert torch.equal(cached, uncached)


def test_left_padded_batch_generates_as_each_prompt_alone(model):
    """A left-padded batch of prompts of different lengths gives each prompt's own greedy tokens."""
    prompts = [image_prompt(model.config, text=[5, 6, 7, 8, 9]), image_prompt(model.config, text=[10])]
    images = pixels(2)
    alone = [
        model.generate(input_ids=torch.tensor([p]), pixel_values=images[i : i + 1], max_new_tokens=6, do_sample=False)[
            0, len(p) :
        ]
        for i, p in enumerate(prompts)
    ]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=images, max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    assert torch.equal(batched[0, width:], alone[0]) and torch.equal(batched[1, width:], alone[1])


def test_sampling_beams_and_eos_run(model):
    """Sampling and beam search run through GenerationMixin, and generation stops at EOS."""
    ids = torch.tensor([image_prompt(model.config)] * 2)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels(2))
    sampled = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=10)
    beams = model.generate(**inputs, max_new_tokens=5, do_sample=False, num_beams=3)
    assert sampled.shape == beams.shape == (2, inputs["input_ids"].shape[1] + 5)
    one = dict(input_ids=inputs["input_ids"][:1], pixel_values=inputs["pixel_values"][:1])
    first = model.generate(**one, max_new_tokens=5, do_sample=False)[0, -5].item()
    stopped = model.generate(**one, max_new_tokens=5, do_sample=False, eos_token_id=first)
    assert stopped.shape[1] == one["input_ids"].shape[1] + 1


def test_inputs_embeds_path_equals_input_ids_path(model):
    """Passing inputs_embeds gives the same logits as passing input_ids."""
    ids, images = torch.tensor([image_prompt(model.config)]), pixels(1)
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, pixel_values=images).logits, model(inputs_embeds=embeds, pixel_values=images).logits
        )


def test_batch_with_two_one_and_no_images_trains(model):
    """Samples with two images, one image and none share a batch; forward and backward work."""
    config = model.config
    rows = [image_prompt(config, 2), image_prompt(config, 1), [1, 5, 6, 7]]
    width = max(map(len, rows))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    mask = (torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]).long()
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE_TOKEN_ID), -100)
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(3), labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.multi_modal_projector.parameters())


def test_tied_embeddings_follow_the_text_config():
    """lm_head shares the embedding matrix exactly when the text config ties them."""
    text_config = TEXT_CONFIGS["llama"]()
    text_config.tie_word_embeddings = True
    tied = tiny_model(text_config=text_config)
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    untied = tiny_model()
    assert untied.lm_head.weight is not untied.get_input_embeddings().weight


def test_activation_checkpointing_recomputes_the_layers_with_the_same_gradients(model):
    """With activation checkpointing on, a training step runs each tower and LM layer twice (forward, then again in
    backward) and gives the gradients of a step without it."""
    ids, images = torch.tensor([image_prompt(model.config)]), pixels(1)
    model.train()

    def gradients():
        model.zero_grad()
        model(input_ids=ids, pixel_values=images, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    # Checkpointing wraps a layer's `forward`, so the hooks of its submodules see the recompute.
    calls = {"vision": 0, "language": 0}
    for part, layer in [
        ("vision", model.model.vision_tower.encoder.layers[0]),
        ("language", model.model.language_model.layers[0]),
    ]:
        layer.self_attn.register_forward_hook(lambda *args, part=part: calls.__setitem__(part, calls[part] + 1))
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    checkpointed = gradients()
    assert calls == {"vision": 2, "language": 2}
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_transformers_model_features_work(tmp_path, model):
    """bf16 loading, device_map and resize_token_embeddings behave as for any model."""
    ids = torch.tensor([image_prompt(model.config)])
    model.save_pretrained(tmp_path)
    bf16 = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cpu")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert torch.isfinite(bf16(input_ids=ids, pixel_values=pixels(1)).logits.float()).all()

    model.resize_token_embeddings(140)
    assert model.lm_head.weight.shape[0] == model.get_input_embeddings().weight.shape[0] == 140
    assert model.config.text_config.vocab_size == 140
    assert model(input_ids=ids, pixel_values=pixels(1), labels=ids).logits.shape[-1] == 140


def test_frozen_vision_tower_builds_no_graph(model):
    """With the vision tower frozen, its outputs carry no autograd history, even after enable_input_require_grads()
    (PEFT and activation checkpointing call it), whose hook makes the tower's patch embeddings require grad."""
    model.enable_input_require_grads()
    model.model.vision_tower.requires_grad_(False)
    assert model.model.vision_tower.embeddings.patch_embedding(pixels(1)).requires_grad  # the hook is there
    features = model.get_image_features(pixels(1))
    assert features.last_hidden_state.grad_fn is None
    assert features.pooler_output[0].requires_grad
    assert math.isfinite(features.pooler_output[0].sum().item())


def test_pixel_shuffle_without_its_layernorm():
    """pixel_shuffle_layernorm=False leaves InternVL's LayerNorm out (no norm weights, other outputs); the default
    keeps it, so configs saved before the field load the same."""
    from hf_vlm import VLMConfig

    with_norm = tiny_model(projector_type="pixel_shuffle")
    without = tiny_model(projector_type="pixel_shuffle", pixel_shuffle_layernorm=False)
    assert any(".norm." in k for k in with_norm.state_dict())
    assert not any(".norm." in k for k in without.state_dict() if "multi_modal_projector" in k)
    features = torch.randn(2, with_norm.config.vision_num_patches, with_norm.config.vision_feature_size) * 50
    with torch.no_grad():
        without.model.multi_modal_projector.linear.weight.copy_(with_norm.model.multi_modal_projector.linear.weight)
        assert not torch.allclose(
            with_norm.model.multi_modal_projector(features), without.model.multi_modal_projector(features)
        )
    saved = with_norm.config.to_dict()
    del saved["pixel_shuffle_layernorm"]
    assert VLMConfig(**saved).pixel_shuffle_layernorm is True
