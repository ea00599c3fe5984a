import json

import pytest
import torch
from PIL import Image

from hf_vlm.data import (
    CaptionCollator,
    ConversationCollator,
    easy_vqa_captions,
    easy_vqa_conversations,
    load_llava_instruct,
    load_llava_pretrain,
    synthetic_captions,
)


def finite_loss(model, batch) -> bool:
    with torch.no_grad():
        return bool(torch.isfinite(model(**batch).loss))


def write_llava(tmp_path, records):
    Image.new("RGB", (24, 24), "orange").save(tmp_path / "a.png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("source", ["easy_vqa", "synthetic", "llava_pretrain"])
def test_stage1_batch_from_each_source_gives_finite_loss(built, source, tmp_path):
    """A caption batch from each caption source runs through the model with a finite loss on the caption only."""
    model, processor = built
    if source == "easy_vqa":
        rows = list(easy_vqa_captions("test").select(range(3)))
    elif source == "synthetic":
        rows = list(synthetic_captions(3, seed=1))
    else:
        record = {
            "id": "p1",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nCaption?"},
                {"from": "gpt", "value": "An orange square."},
            ],
        }
        rows = list(load_llava_pretrain(write_llava(tmp_path, [record]), tmp_path))
    batch = CaptionCollator(processor)(rows)
    assert batch["pixel_values"].shape[0] == len(rows)
    assert finite_loss(model, batch)
    kept = batch["labels"][0][batch["labels"][0] != -100]
    assert processor.tokenizer.decode(kept) == rows[0]["caption"] + "<|im_end|>"


@pytest.mark.parametrize("source", ["easy_vqa", "llava_instruct"])
def test_stage2_batch_from_each_source_gives_finite_loss(built, source, tmp_path):
    """A conversation batch from each source runs through the model with a finite loss."""
    model, processor = built
    if source == "easy_vqa":
        rows = list(easy_vqa_conversations("test", limit=3))
    else:
        records = [
            {
                "id": "i1",
                "image": "a.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour?"},
                    {"from": "gpt", "value": "Orange."},
                    {"from": "human", "value": "Is it round?"},
                    {"from": "gpt", "value": "No."},
                ],
            },
            {"id": "i2", "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi."}]},
        ]
        rows = list(load_llava_instruct(write_llava(tmp_path, records), tmp_path))
    batch = ConversationCollator(processor)(rows)
    assert finite_loss(model, batch)
    assert not ((batch["labels"] == processor.image_token_id).any())


def test_labels_match_hand_worked_masks(built):
    """Labels equal the answer's ids after a fully masked prompt, and -100 on the newline and the padding."""
    _, processor = built
    tokenizer = processor.tokenizer
    image = Image.new("RGB", (8, 8), "red")
    rows = [
        {
            "images": [image],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
            ],
        },
        {
            "images": [],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "no"}]},
            ],
        },
    ]
    batch = ConversationCollator(processor)(rows)

    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False)

    # Row 0 by hand: the prompt (16 image tokens included) is masked, the answer and <|im_end|> are kept,
    # the template's closing newline is masked; special tokens split the text, so pieces tokenize alone.
    prompt = (
        ids("<|im_start|>user\n")
        + [processor.image_token_id] * 16
        + ids("What is this?<|im_end|>\n<|im_start|>assistant\n")
    )
    answer = ids("A red circle.<|im_end|>")
    row0 = [-100] * len(prompt) + answer + [-100]
    # Row 1 is shorter: right padding, masked.
    row1_ids = ids("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    row1 = [-100] * len(row1_ids) + ids("no<|im_end|>") + [-100]
    row1 += [-100] * (len(row0) - len(row1))
    assert batch["labels"].tolist() == [row0, row1]
    assert batch["attention_mask"][1].tolist() == [1] * (len(row1_ids) + 3) + [0] * (len(row0) - len(row1_ids) - 3)


def test_truncation_into_image_tokens_is_a_clear_error(built):
    """A max_length that would cut an image's tokens raises and names the length needed."""
    _, processor = built
    rows = list(easy_vqa_conversations("test", limit=1))
    with pytest.raises(ValueError, match=r"needs max_length >= \d+"):
        ConversationCollator(processor, max_length=10)(rows)
