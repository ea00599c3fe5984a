import pytest
import torch
from PIL import Image

from hf_vlm import VLMProcessor
from hf_vlm.processing import make_labels


def red(size=(20, 30)):
    return Image.new("RGB", size, "red")


def count_image_tokens(processor, ids):
    return (torch.as_tensor(ids) == processor.image_token_id).sum(-1).tolist()


def test_placeholder_expands_to_image_seq_length(built):
    """One <image> becomes image_seq_length image tokens, with one image's pixel_values."""
    _, processor = built
    inputs = processor(images=[red()], text="<image>\nWhat is this?", return_tensors="pt")
    assert count_image_tokens(processor, inputs["input_ids"]) == [processor.image_seq_length] == [16]
    assert inputs["pixel_values"].shape == (1, 3, 16, 16)


def test_two_images_and_uneven_batches(built):
    """Two images in one prompt, and a batch with 2, 1 and 0 images, expand per placeholder and run in the model."""
    model, processor = built
    texts = ["<image> and <image>: same?", "<image> What is this?", "No image here."]
    inputs = processor(images=[red(), red((5, 5)), red((64, 8))], text=texts, padding=True, return_tensors="pt")
    assert count_image_tokens(processor, inputs["input_ids"]) == [32, 16, 0]
    assert inputs["pixel_values"].shape == (3, 3, 16, 16)
    assert processor.tokenizer.padding_side == "left" and inputs["attention_mask"][2, 0] == 0
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_image_placeholder_mismatch_raises(built):
    """More or fewer images than placeholders raise a ValueError with both counts."""
    _, processor = built
    message = r"Got 2 images for 1 <image> placeholders \(per sample: \[1\] placeholders\)"
    with pytest.raises(ValueError, match=message):
        processor(images=[red(), red()], text="<image> What?")
    with pytest.raises(ValueError, match=r"Got 0 images for 1 <image> placeholders"):
        processor(text="<image> What?")


def test_nested_images_are_counted_per_image(built):
    """Images nested per sample count one by one: they expand as flat ones do, and a mismatch names both lists."""
    _, processor = built
    texts = ["<image> and <image>: same?", "<image> What is this?"]
    nested = processor(images=[[red(), red((5, 5))], [red((64, 8))]], text=texts, padding=True, return_tensors="pt")
    flat = processor(images=[red(), red((5, 5)), red((64, 8))], text=texts, padding=True, return_tensors="pt")
    assert count_image_tokens(processor, nested["input_ids"]) == [32, 16]
    assert all(torch.equal(nested[k], flat[k]) for k in flat)
    message = r"Got 3 images for 2 <image> placeholders \(per sample: \[1, 1\] placeholders, \[2, 1\] images\)"
    with pytest.raises(ValueError, match=message):
        processor(images=[[red(), red()], [red()]], text=["<image> a", "<image> b"])


@pytest.mark.parametrize("image_seq_length", [None, 0, True, 2.0])
def test_image_seq_length_is_required(built, image_seq_length):
    """A processor built without a positive int image_seq_length raises instead of giving one token per image."""
    _, processor = built
    with pytest.raises(ValueError, match=rf"image_seq_length must be a positive int.*got {image_seq_length!r}"):
        VLMProcessor(processor.image_processor, processor.tokenizer, image_seq_length=image_seq_length)
    with pytest.raises(ValueError, match="image_seq_length must be a positive int"):
        VLMProcessor(processor.image_processor, processor.tokenizer)


def test_num_multimodal_tokens_match_what_the_processor_makes(built):
    """_get_num_multimodal_tokens (vLLM reads it) gives the image tokens and pixel_values rows made, for any size."""
    _, processor = built
    images = [red(), red((5, 5)), red((64, 8))]
    data = processor._get_num_multimodal_tokens(image_sizes=[(image.height, image.width) for image in images])
    inputs = processor(images=images, text=["<image>", "<image>", "<image>"], return_tensors="pt")
    assert data.num_image_tokens == count_image_tokens(processor, inputs["input_ids"]) == [16, 16, 16]
    assert data.num_image_patches == [1, 1, 1] and sum(data.num_image_patches) == len(inputs["pixel_values"])
    assert "num_image_tokens" not in processor._get_num_multimodal_tokens()


def test_truncation_that_cuts_image_tokens_names_max_length(built):
    """Truncating into an image's tokens raises and says which max_length is needed."""
    _, processor = built
    with pytest.raises(ValueError, match=r"needs max_length >= \d+"):
        processor(images=[red()], text="Look: <image>", truncation=True, max_length=8)


def conversation():
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        {"role": "user", "content": [{"type": "text", "text": "Is it blue?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "no"}]},
    ]


def test_chat_template_gives_model_ready_inputs_and_exact_assistant_mask(built):
    """apply_chat_template with image blocks tokenizes for the model; the assistant mask covers the answers only."""
    model, processor = built
    inputs = processor.apply_chat_template(
        conversation(),
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        return_assistant_tokens_mask=True,
        processor_kwargs={"images": [red()]},
    )
    assert count_image_tokens(processor, inputs["input_ids"]) == [16]
    mask = inputs.pop("assistant_masks")[0].bool()
    tokenizer = processor.tokenizer
    # Exactly the two answers, each with its end token, and nothing else.
    assert tokenizer.decode(inputs["input_ids"][0][mask]) == "A red circle.<|im_end|>no<|im_end|>"
    ids = inputs["input_ids"][0].tolist()
    answer = tokenizer.encode("A red circle.<|im_end|>")
    start = next(i for i in range(len(ids)) if ids[i : i + len(answer)] == answer)
    assert mask[start : start + len(answer)].all() and not mask[:start].any()
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] == len(ids)


def test_chat_prompt_renders_chatml(built):
    """The ChatML template renders image blocks as the placeholder and adds the generation prompt."""
    _, processor = built
    text = processor.apply_chat_template(conversation()[:1], add_generation_prompt=True)
    assert text == "<|im_start|>user\n<image>What is this?<|im_end|>\n<|im_start|>assistant\n"


def test_typed_placeholder_never_becomes_an_image_slot(built):
    """A literal <image> in message text is encoded as text when sanitizing, and raises otherwise."""
    _, processor = built
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What does <image> mean?"}]}]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, processor_kwargs={"images": [red()]}
    )
    assert count_image_tokens(processor, inputs["input_ids"]) == [16]
    with pytest.raises(ValueError, match="message 0 has the image placeholder '<image>' typed"):
        processor.apply_chat_template(
            messages, tokenize=True, return_assistant_tokens_mask=True, processor_kwargs={"images": [red()]}
        )
    with pytest.raises(ValueError, match="typed in its text"):
        processor.apply_chat_template(messages)


def test_make_labels_masks_padding_images_and_prompt():
    """Labels keep exactly the unpadded, non-image, assistant tokens (worked by hand)."""
    ids = torch.tensor([[0, 0, 5, 9, 9, 6, 7, 8], [5, 9, 9, 6, 7, 8, 4, 3]])  # 9 = image token, pad on the left
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    assistant = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1, 0, 1]])
    assert make_labels(ids, attention, 9).tolist() == [
        [-100, -100, 5, -100, -100, 6, 7, 8],
        [5, -100, -100, 6, 7, 8, 4, 3],
    ]
    assert make_labels(ids, attention, 9, assistant).tolist() == [
        [-100, -100, -100, -100, -100, -100, 7, 8],
        [-100, -100, -100, -100, 7, 8, -100, 3],
    ]


def test_processor_round_trip(built, tmp_path):
    """Processor save_pretrained -> AutoProcessor.from_pretrained gives the same outputs."""
    from transformers import AutoProcessor

    _, processor = built
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, VLMProcessor) and loaded.image_seq_length == processor.image_seq_length
    args = dict(images=[red(), red((7, 70))], text=["<image> a", "b <image> c"], padding=True, return_tensors="pt")
    expected, actual = processor(**args), loaded(**args)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert loaded.chat_template == processor.chat_template
