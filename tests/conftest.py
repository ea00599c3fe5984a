"""Tiny random backbones shared by the tests: hidden size 32, 2 layers, 16-pixel images."""

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, Qwen2Config, SiglipVisionConfig, TimmWrapperConfig

from hf_vlm import VLMConfig, VLMForConditionalGeneration

VOCAB_SIZE = 128
IMAGE_TOKEN_ID = 127  # an ordinary id of the tiny vocabulary, reserved for images in the tests
IMAGE_SIZE = 16

_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=4)
_LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB_SIZE)

VISION_CONFIGS = {
    "siglip": lambda: SiglipVisionConfig(**_VIT),
    "clip": lambda: CLIPVisionConfig(**_VIT),
    # timm's test_resnet: stage 1 gives a 32-channel 4x4 map at 16 px; a timm config says none of this.
    "timm": lambda: TimmWrapperConfig(architecture="test_resnet", do_pooling=False, num_labels=0),
}
TIMM_GEOMETRY = dict(vision_feature_layer=1, image_size=IMAGE_SIZE, vision_grid_size=4, vision_hidden_size=32)
TEXT_CONFIGS = {"llama": lambda: LlamaConfig(**_LM), "qwen2": lambda: Qwen2Config(**_LM)}


def tiny_config(vision: str = "siglip", text: str = "llama", **overrides) -> VLMConfig:
    """A VLMConfig over tiny random backbones; `overrides` go to VLMConfig."""
    kwargs = dict(vision_config=VISION_CONFIGS[vision](), text_config=TEXT_CONFIGS[text](), image_token_id=IMAGE_TOKEN_ID)
    if vision == "timm":
        kwargs.update(TIMM_GEOMETRY)
    kwargs.update(projector_num_tokens=4)
    return VLMConfig(**(kwargs | overrides))


def tiny_model(vision: str = "siglip", text: str = "llama", **overrides) -> VLMForConditionalGeneration:
    """A seeded tiny model in eval mode."""
    torch.manual_seed(0)
    return VLMForConditionalGeneration(tiny_config(vision, text, **overrides)).eval()


def image_prompt(config: VLMConfig, num_images: int = 1, text: list[int] = (5, 6, 7)) -> list[int]:
    """Token ids: BOS, then each image's expanded tokens, then some text."""
    return [1] + [config.image_token_id] * (config.image_seq_length * num_images) + list(text)


@pytest.fixture
def model():
    return tiny_model()
