"""Images as the tower's stored output (`vision_features`), and the loss on labelled positions only."""

import pytest
import torch
from conftest import IMAGE_SIZE, image_prompt, tiny_model


def batch(model, num_images: int = 2):
    """Two samples with one image each, labels on the last three text tokens only."""
    torch.manual_seed(1)
    ids = torch.tensor([image_prompt(model.config, text=[5, 6, 7, 8, 9])] * num_images)
    labels = ids.masked_fill(torch.arange(ids.shape[1]) < ids.shape[1] - 3, -100)
    return ids, torch.randn(num_images, 3, IMAGE_SIZE, IMAGE_SIZE), labels


@pytest.mark.parametrize("vision", ["siglip", "clip", "timm"])
def test_vision_features_give_the_loss_of_pixel_values(vision):
    """forward(vision_features=get_vision_features(pixels)) gives the loss of forward(pixel_values=pixels), to 1e-5."""
    model = tiny_model(vision)
    ids, images, labels = batch(model)
    from_pixels = model(input_ids=ids, pixel_values=images, labels=labels).loss
    features = model.get_vision_features(images)
    assert features.shape == (2, model.config.vision_num_patches, model.config.vision_feature_size)
    from_features = model(input_ids=ids, vision_features=features, labels=labels).loss
    torch.testing.assert_close(from_features, from_pixels, atol=1e-5, rtol=0)


def test_vision_features_give_the_greedy_generation_of_pixel_values(model):
    """generate(vision_features=...) gives the same tokens as generate(pixel_values=...), greedy and with beams."""
    ids, images, _ = batch(model)
    features = model.get_vision_features(images)
    for options in ({}, {"num_beams": 2}):
        from_pixels = model.generate(input_ids=ids, pixel_values=images, max_new_tokens=6, do_sample=False, **options)
        from_features = model.generate(
            input_ids=ids, vision_features=features, max_new_tokens=6, do_sample=False, **options
        )
        assert torch.equal(from_pixels, from_features)


def test_two_image_inputs_at_once_raise(model):
    """pixel_values with vision_features or with mm_encoder_outputs raises, naming both."""
    ids, images, _ = batch(model)
    features = model.get_vision_features(images)
    encoded = {"image": model.get_image_features(pixel_values=images)}
    with pytest.raises(ValueError, match="pixel_values and vision_features"):
        model(input_ids=ids, pixel_values=images, vision_features=features)
    with pytest.raises(ValueError, match="vision_features and mm_encoder_outputs"):
        model(input_ids=ids, vision_features=features, mm_encoder_outputs=encoded)
    with pytest.raises(ValueError, match="pixel_values and vision_features"):
        model.generate(input_ids=ids, pixel_values=images, vision_features=features, max_new_tokens=2)
    with pytest.raises(ValueError, match="vision_features and mm_encoder_outputs"):
        model.generate(input_ids=ids, mm_encoder_outputs=encoded, vision_features=features, max_new_tokens=2)
    with pytest.raises(ValueError, match="exactly one"):
        model.get_image_features(pixel_values=images, vision_features=features)


def test_vision_features_of_the_wrong_shape_raise(model):
    """vision_features that do not match the tower's (N, C) raise with both shapes."""
    ids, images, _ = batch(model)
    features = model.get_vision_features(images)
    with pytest.raises(ValueError, match=r"\(num_images, 16, 32\).*\(2, 16, 31\)"):
        model(input_ids=ids, vision_features=features[..., :31])


@pytest.mark.parametrize("projector", ["mlp", "pixel_shuffle"])
def test_labelled_positions_loss_equals_full_logits_loss(projector):
    """The loss from labelled positions only equals cross-entropy over the full logits, to 1e-5, with and without
    num_items_in_batch."""
    model = tiny_model(projector_type=projector)
    ids, images, labels = batch(model)
    labels[1, -3:] = -100  # a sample without labels
    full_logits = model(input_ids=ids, pixel_values=images).logits  # (B, T, vocab), no labels given
    reference = torch.nn.functional.cross_entropy(
        full_logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )
    outputs = model(input_ids=ids, pixel_values=images, labels=labels)
    num_labelled = int((labels[:, 1:] != -100).sum())
    assert outputs.logits.shape == (num_labelled, model.config.text_config.vocab_size)
    torch.testing.assert_close(outputs.loss, reference / num_labelled, atol=1e-5, rtol=0)
    summed = model(input_ids=ids, pixel_values=images, labels=labels, num_items_in_batch=torch.tensor(7)).loss
    torch.testing.assert_close(summed, reference / 7, atol=1e-5, rtol=0)
    # The logits that are kept are the full logits at those positions.
    torch.testing.assert_close(outputs.logits, full_logits[:, :-1][labels[:, 1:] != -100], atol=1e-5, rtol=0)


def test_labelled_positions_loss_has_the_full_gradient(model):
    """Gradients from the labelled-positions loss equal those of the full-logits loss."""
    ids, images, labels = batch(model)
    model.train()
    compact = model(input_ids=ids, pixel_values=images, labels=labels).loss
    parameters = [p for name, p in model.named_parameters() if "vision_tower" not in name]  # projector, LM, head
    compact_grads = torch.autograd.grad(compact, parameters)
    logits = model(input_ids=ids, pixel_values=images).logits
    full = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    full_grads = torch.autograd.grad(full, parameters)
    for a, b in zip(compact_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
