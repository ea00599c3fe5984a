"""Image inputs that cannot be right raise a ValueError naming what came and what is expected, in forward and
generate."""

import pytest
import torch
from conftest import IMAGE_SIZE, image_prompt
from PIL import Image


def pixels(n: int) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(n))


def call(model, how: str, num_images: int, **images):
    """Run the model on a prompt with `num_images` images through forward or generate."""
    ids = torch.tensor([image_prompt(model.config, num_images=max(num_images, 1))])
    if how == "forward":
        return model(input_ids=ids, **images)
    return model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, **images)


@pytest.mark.parametrize("how", ["forward", "generate"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.int64], ids=str)
def test_non_float_pixel_values_are_rejected(model, how, dtype):
    """Raw (uint8, bool, int) pixel_values raise a ValueError naming the dtype and the processor, not a silent cast."""
    raw = torch.randint(0, 256, (1, 3, IMAGE_SIZE, IMAGE_SIZE)).to(dtype)
    with pytest.raises(
        ValueError,
        match=rf"pixel_values are {dtype}; the model takes the image processor's normalised float.*VLMProcessor",
    ):
        call(model, how, 1, pixel_values=raw)


@pytest.mark.parametrize("how", ["forward", "generate"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_pixel_values_are_rejected(model, how, bad):
    """NaN or inf in pixel_values raise a ValueError naming the count and the image, not NaN logits."""
    images = pixels(2)
    images[1, 0, 3, 5] = bad
    with pytest.raises(ValueError, match=r"pixel_values holds 1 NaN or infinite values, in images \[1\] of 2"):
        call(model, how, 2, pixel_values=images)


@pytest.mark.parametrize("how", ["forward", "generate"])
def test_non_finite_vision_features_are_rejected(model, how):
    """NaN or inf in vision_features raise a ValueError naming the count and the images."""
    features = model.get_vision_features(pixels(2)).detach()
    features[0, 2] = float("nan")  # one patch: 32 channels
    features[1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"vision_features holds 33 NaN or infinite values, in images \[0, 1\] of 2"):
        call(model, how, 2, vision_features=features)


@pytest.mark.parametrize("how", ["forward", "generate"])
@pytest.mark.parametrize(
    ("name", "make", "kind"),
    [
        ("pixel_values", lambda model: pixels(1).numpy(), "numpy.ndarray"),
        ("pixel_values", lambda model: list(pixels(1)), "list"),
        ("pixel_values", lambda model: Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE)), "PIL.Image.Image"),
        ("vision_features", lambda model: model.get_vision_features(pixels(1)).detach().numpy(), "numpy.ndarray"),
        ("vision_features", lambda model: model.get_vision_features(pixels(1)).tolist(), "list"),
    ],
)
def test_image_inputs_that_are_not_tensors_are_rejected(model, how, name, make, kind):
    """Numpy arrays, lists and PIL images as image inputs raise a ValueError naming the type and the expected shape."""
    shape = r"\(num_images, 3, 16, 16\)" if name == "pixel_values" else r"\(num_images, 16, 32\)"
    with pytest.raises(ValueError, match=rf"{name} must be a torch.Tensor of shape {shape}, got a {kind}; "):
        call(model, how, 1, **{name: make(model)})


@pytest.mark.parametrize("how", ["forward", "generate"])
@pytest.mark.parametrize("name", ["pixel_values", "vision_features"])
def test_empty_image_batch_is_rejected(model, how, name):
    """An image input with 0 images raises a ValueError saying so, not a token-count mismatch or a tower error."""
    empty = pixels(0) if name == "pixel_values" else torch.zeros(0, 16, 32)
    with pytest.raises(ValueError, match=rf"{name} holds 0 images \(shape \({empty.shape[0]}, {empty.shape[1]}, "):
        call(model, how, 0, **{name: empty})


@pytest.mark.parametrize("name", ["pixel_values", "vision_features"])
def test_generate_checks_the_images_once(model, name, monkeypatch):
    """generate checks the image input once per call, before prefill, not at every decoding step."""
    images = pixels(1) if name == "pixel_values" else model.get_vision_features(pixels(1)).detach()
    check = "_check_pixel_values" if name == "pixel_values" else "_check_vision_features"
    calls, original = [], getattr(model.model, check)
    monkeypatch.setattr(model.model, check, lambda value: calls.append(1) or original(value))
    ids = torch.tensor([image_prompt(model.config)])
    generated = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, **{name: images})
    assert generated.shape == (1, ids.shape[1] + 5)
    assert len(calls) == 1
