"""The frozen-tower feature cache: encode once, read back exactly, never serve a stale feature."""

import pytest
import torch
from PIL import Image
from transformers import TrainingArguments

from hf_vlm import build_vlm
from hf_vlm.data import CaptionCollator, ConversationCollator
from hf_vlm.data.collators import caption_to_conversation
from hf_vlm.feature_cache import VisionFeatureCache, dataset_images, prepare_feature_cache


def pictures(count: int, seed: int = 0) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    return [
        Image.fromarray(torch.randint(0, 256, (20, 24, 3), generator=generator, dtype=torch.uint8).numpy())
        for _ in range(count)
    ]


@pytest.fixture
def siglip(backbones):
    torch.manual_seed(0)
    return build_vlm(backbones["siglip"], backbones["llama"], "mlp")


def test_stored_features_equal_the_towers(siglip, tmp_path):
    """lookup returns exactly what get_vision_features computes, in the order asked, duplicates encoded once."""
    model, processor = siglip
    images = pictures(5)
    cache = VisionFeatureCache(model, processor, tmp_path)
    assert cache.encode(images + images[:2], batch_size=2) == 5
    order = [images[3], images[0], images[3]]
    pixels = processor.image_processor(order, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.get_vision_features(pixels)
    assert torch.equal(cache.lookup(order), expected)


def test_a_second_run_encodes_nothing(siglip, tmp_path):
    """A new cache object over the same folder (a second run, or stage 2 after stage 1) encodes no image again."""
    model, processor = siglip
    images = pictures(4)
    assert VisionFeatureCache(model, processor, tmp_path).encode(images) == 4
    again = VisionFeatureCache(model, processor, tmp_path)
    assert len(again) == 4 and again.encode(images) == 0 and again.num_encoded == 0
    assert again.encode(images + pictures(1, seed=9)) == 1  # only the new image


def test_an_image_never_encoded_raises(siglip, tmp_path):
    """Looking up an image that was never encoded raises a KeyError naming its position and the remedy."""
    model, processor = siglip
    cache = VisionFeatureCache(model, processor, tmp_path)
    cache.encode(pictures(2))
    with pytest.raises(KeyError, match=r"1 of 2 images \(positions \[1\]\).*VisionFeatureCache.encode"):
        cache.lookup([pictures(2)[0], pictures(1, seed=5)[0]])


def key_of(model, processor, tmp_path):
    return VisionFeatureCache(model, processor, tmp_path).folder.name


def test_each_part_of_the_key_changed_encodes_afresh(backbones, siglip, tmp_path):
    """Changing the tower's weights or buffers, image_size, vision_feature_layer, CLS handling, the image processor's
    settings or the image itself gives a fresh encode."""
    model, processor = siglip
    images = pictures(2)
    VisionFeatureCache(model, processor, tmp_path).encode(images)
    base = key_of(model, processor, tmp_path)

    def fresh(model, processor, images=images) -> bool:
        return VisionFeatureCache(model, processor, tmp_path).encode(images) == len(images)

    weight = next(model.model.vision_tower.parameters())
    original = weight.detach().clone()
    with torch.no_grad():
        weight.view(-1)[0] += 1e-3
    assert fresh(model, processor)
    with torch.no_grad():
        weight.copy_(original)
    assert key_of(model, processor, tmp_path) == base  # the same weights again: the same folder

    assert fresh(*build_vlm(backbones["siglip"], backbones["llama"], "mlp", vision_feature_layer=-2))
    clip_default = build_vlm(backbones["clip"], backbones["llama"], "mlp")
    clip_cls = build_vlm(backbones["clip"], backbones["llama"], "mlp", drop_cls_token=False)
    assert key_of(*clip_default, tmp_path) != key_of(*clip_cls, tmp_path)
    clip_no_prefix = build_vlm(
        backbones["clip"], backbones["llama"], "mlp", vision_num_prefix_tokens=0, drop_cls_token=False
    )
    assert key_of(*clip_no_prefix, tmp_path) != key_of(*clip_cls, tmp_path)  # the CLS token then stays a patch
    timm_16 = build_vlm(backbones["timm"], backbones["llama"], "mlp", vision_feature_layer=1)
    timm_32 = build_vlm(backbones["timm"], backbones["llama"], "mlp", image_size=32, vision_feature_layer=1)
    assert timm_16[0].config.image_size != timm_32[0].config.image_size
    assert key_of(*timm_16, tmp_path) != key_of(*timm_32, tmp_path)
    timm_key = key_of(*timm_16, tmp_path)
    running_mean = next(
        b for name, b in timm_16[0].model.vision_tower.named_buffers() if name.endswith("running_mean")
    )
    running_mean += 1e-3  # BatchNorm statistics: a buffer, not a weight
    assert key_of(*timm_16, tmp_path) != timm_key

    mean = processor.image_processor.image_mean
    processor.image_processor.image_mean = [0.4, 0.5, 0.5]
    try:
        assert fresh(model, processor)
    finally:
        processor.image_processor.image_mean = mean
    assert key_of(model, processor, tmp_path) == base

    changed = [image.copy() for image in images]
    changed[0].putpixel((0, 0), (1, 2, 3))
    assert VisionFeatureCache(model, processor, tmp_path).encode(changed) == 1


def test_a_killed_write_leaves_no_shard(siglip, tmp_path, monkeypatch):
    """A run killed while writing a shard leaves only a temporary file, which a later cache ignores and re-encodes."""
    import hf_vlm.feature_cache as feature_cache

    model, processor = siglip

    def killed(*args, **kwargs):
        path = args[1]
        path.write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(feature_cache, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        VisionFeatureCache(model, processor, tmp_path).encode(pictures(3))
    monkeypatch.undo()
    cache = VisionFeatureCache(model, processor, tmp_path)
    assert len(cache) == 0 and cache.encode(pictures(3)) == 3


def test_collators_give_vision_features_with_the_loss_of_pixels(siglip, tmp_path):
    """With a cache, the collators give vision_features instead of pixel_values, and the loss is the same to 1e-5."""
    model, processor = siglip
    rows = [{"image": image, "caption": f"A red circle {i}."} for i, image in enumerate(pictures(3))]
    cache = VisionFeatureCache(model, processor, tmp_path)
    cache.encode(row["image"] for row in rows)
    for collator_class, data in [
        (CaptionCollator, rows),
        (ConversationCollator, [caption_to_conversation(row) for row in rows]),
    ]:
        plain, cached = collator_class(processor)(data), collator_class(processor, feature_cache=cache)(data)
        assert "pixel_values" not in cached and cached["vision_features"].shape[0] == 3
        assert torch.equal(plain["input_ids"], cached["input_ids"]) and torch.equal(plain["labels"], cached["labels"])
        torch.testing.assert_close(model(**cached).loss, model(**plain).loss, atol=1e-5, rtol=0)


def test_prepare_feature_cache_encodes_every_dataset_image_once(siglip, tmp_path):
    """prepare_feature_cache stores every image of a caption or conversation dataset; a second call encodes none."""
    from datasets import Dataset

    model, processor = siglip
    images = pictures(3)
    captions = Dataset.from_dict({"image": images, "caption": ["a", "b", "c"]})
    conversations = Dataset.from_dict({"images": [[images[0], images[1]], [images[2]]], "messages": [[], []]})
    assert dataset_images(captions)[1] == 3 and dataset_images(conversations)[1] == 3
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    cache = prepare_feature_cache(model, processor, captions, args, tmp_path)
    assert cache.num_encoded == 3
    assert prepare_feature_cache(model, processor, conversations, args, tmp_path).num_encoded == 0


def test_a_saved_and_reloaded_model_finds_the_same_cache(siglip, tmp_path):
    """Stage 2 loads stage 1's folder: the reloaded model and processor have the built ones' cache key."""
    from transformers import AutoProcessor

    from hf_vlm import VLMForConditionalGeneration

    model, processor = siglip
    model.save_pretrained(tmp_path / "folder")
    processor.save_pretrained(tmp_path / "folder")
    reloaded = (
        VLMForConditionalGeneration.from_pretrained(tmp_path / "folder"),
        AutoProcessor.from_pretrained(tmp_path / "folder"),
    )
    assert key_of(*reloaded, tmp_path) == key_of(model, processor, tmp_path)
