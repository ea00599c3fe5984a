"""hf_vlm.data: easy-VQA, synthetic captions, LLaVA loaders and image validation. Offline and fast."""

import collections
import io
import json
import re
import warnings

import numpy as np
import pytest
from datasets import concatenate_datasets
from PIL import Image

from hf_vlm.data import (
    CAPTION_FEATURES,
    CONVERSATION_FEATURES,
    EASY_VQA_FEATURES,
    BadSampleError,
    SkippedSamplesWarning,
    easy_vqa_captions,
    easy_vqa_conversations,
    load_conversations,
    load_image,
    load_llava_instruct,
    load_llava_pretrain,
    synthetic,
    synthetic_captions,
    to_rgb,
)
from hf_vlm.data.easy_vqa import labels_from_pixels, labels_from_questions
from hf_vlm.data.synthetic import COLORS as SYNTHETIC_COLORS

# ---------------------------------------------------------------------------------------------
# easy-VQA


@pytest.fixture
def easy_vqa():
    """The easy-VQA package (PyPI `easy-vqa`, in the `data` extra), which the easy-VQA loaders read."""
    import easy_vqa

    return easy_vqa


@pytest.mark.parametrize(
    "split, rows, types",
    [
        # Counts from easy-VQA's data/README.md (28,407 / 7,136 yes/no); shape/colour split measured.
        ("train", 38_575, {"yes/no": 28_407, "color": 5_166, "shape": 5_002}),
        ("test", 9_673, {"yes/no": 7_136, "color": 1_280, "shape": 1_257}),
    ],
)
def test_easy_vqa_conversations_have_every_question_with_its_type(split, rows, types, easy_vqa):
    """All easy-VQA questions load, one per row, with the question type and a decodable 64x64 RGB image."""
    dataset = easy_vqa_conversations(split)
    assert dataset.features == EASY_VQA_FEATURES
    assert len(dataset) == rows
    assert collections.Counter(dataset["question_type"]) == types
    assert set(dataset["answer"]) == set(easy_vqa.get_answers())
    row = dataset[rows - 1]
    (image,) = row["images"]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (64, 64)
    user, assistant = row["messages"]
    assert user["role"] == "user" and user["content"][0] == {"type": "image", "text": None}
    assert user["content"][1]["text"].endswith("?")
    assert assistant == {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}


def test_easy_vqa_limit_keeps_the_first_questions(easy_vqa):
    """`limit` keeps the first questions in the package's order."""
    texts, answers, _ = easy_vqa.get_test_questions()
    dataset = easy_vqa_conversations("test", limit=5)
    assert dataset["id"] == [f"easy_vqa-test-{i:05d}" for i in range(5)]
    assert [row["messages"][0]["content"][1]["text"] for row in dataset] == texts[:5]
    assert dataset["answer"] == answers[:5]


def test_conversation_rows_work_with_trl_prepare_multimodal_messages(easy_vqa):
    """TRL 1.16 fills our image blocks with our images, in order, without complaint."""
    from trl.data_utils import prepare_multimodal_messages

    row = easy_vqa_conversations("test", limit=1)[0]
    messages = prepare_multimodal_messages(row["messages"], images=row["images"])
    assert messages[0]["content"][0]["image"] is row["images"][0]
    assert messages[0]["content"][1] == row["messages"][0]["content"][1]


def test_easy_vqa_pixel_labels_agree_with_every_label_the_questions_give(easy_vqa):
    """The pixel reader used for images the questions leave open agrees with all question-given labels (test split)."""
    paths = easy_vqa.get_test_image_paths()
    from_questions = labels_from_questions(*easy_vqa.get_test_questions())
    checked = 0
    for image_id, (shape, color) in from_questions.items():
        pixel_shape, pixel_color = labels_from_pixels(paths[image_id])
        assert shape in (None, pixel_shape), image_id
        assert color in (None, pixel_color), image_id
        checked += (shape is not None) + (color is not None)
    assert checked == 1_876  # 2,000 labels minus the 46 shapes and 78 colours the questions leave open


def test_easy_vqa_negated_yes_no_questions_determine_labels():
    """'is there not a blue shape?' -> 'no' states blue; ruling out all other shapes determines the shape."""
    texts = ["is there not a blue shape?", "is there a circle?", "does the image contain a triangle?"]
    labels = labels_from_questions(texts, ["no", "no", "no"], [7, 7, 7])
    assert labels == {7: ("rectangle", "blue")}


def test_easy_vqa_captions_are_true_to_the_image(easy_vqa):
    """One caption per image, each naming the shape and colour the pixels show (all 1,000 test images)."""
    dataset = easy_vqa_captions("test")
    assert dataset.features == CAPTION_FEATURES
    assert len(dataset) == 1_000 and len(easy_vqa_captions("train")) == 4_000
    paths = easy_vqa.get_test_image_paths()
    for row in dataset:
        image_id = int(row["id"].removeprefix("easy_vqa-test-img"))
        shape, color = labels_from_pixels(paths[image_id])
        words = re.findall(r"[a-z]+", row["caption"].lower())
        assert shape in words and color in words, (row["id"], row["caption"])
        assert row["image"].mode == "RGB"


def test_easy_vqa_caption_templates_depend_on_the_seed_only(easy_vqa):
    """The same seed gives the same captions; another seed changes wording, never the facts."""
    first, again, other = (easy_vqa_captions("test", seed=s)["caption"] for s in (0, 0, 1))
    assert first == again
    assert first != other
    assert [facts(c) for c in first] == [facts(c) for c in other]


def facts(caption: str) -> list[str]:
    """The easy-VQA shape and colour words of a caption, in order."""
    vocabulary = {
        "circle",
        "rectangle",
        "triangle",
        "red",
        "green",
        "blue",
        "yellow",
        "teal",
        "brown",
        "gray",
        "black",
    }
    return [word for word in re.findall(r"[a-z]+", caption.lower()) if word in vocabulary]


# ---------------------------------------------------------------------------------------------
# Synthetic captions


def test_synthetic_captions_are_deterministic_per_seed():
    """Same seed: same captions and pixels; another seed: different ones; a shorter run is a prefix."""
    a, b, c = synthetic_captions(30, seed=3), synthetic_captions(30, seed=3), synthetic_captions(30, seed=4)
    assert a.features == CAPTION_FEATURES
    assert a["caption"] == b["caption"]
    assert [np.asarray(x).tobytes() for x in a["image"]] == [np.asarray(x).tobytes() for x in b["image"]]
    assert a["caption"] != c["caption"]
    assert synthetic_captions(10, seed=3)["caption"] == a["caption"][:10]


CELLS = {
    "top left corner": (0, 0),
    "top": (0, 1),
    "top right corner": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left corner": (2, 0),
    "bottom": (2, 1),
    "bottom right corner": (2, 2),
}


@pytest.mark.parametrize("font", ["dejavu", "pillow"])
def test_synthetic_captions_name_exactly_the_colours_drawn(font, monkeypatch):
    """Every colour a caption names is drawn, and no other; a lone shape lies in the cell its caption names."""
    if font == "dejavu":
        assert synthetic._font_path() is not None, "matplotlib's DejaVu Sans Bold not found"
    else:
        monkeypatch.setattr(synthetic, "_font_path", lambda: None)
    dataset = synthetic_captions(150, seed=0, image_size=48)
    lone_pattern = re.compile(rf"An? (\w+) (?:circle|square|triangle) (?:in|on|at) the ({'|'.join(CELLS)})\.")
    lone_shapes = 0
    for row in dataset:
        pixels = np.asarray(row["image"], dtype=np.int32)
        assert pixels.shape == (48, 48, 3)
        named = {color for color in SYNTHETIC_COLORS if re.search(rf"\b{color}\b", row["caption"])}
        # A colour is drawn if some pixel is (nearly) exactly it: shape interiors and bold strokes are.
        near = {color: np.abs(pixels - rgb).sum(-1) <= 12 for color, rgb in SYNTHETIC_COLORS.items()}
        assert named == {color for color, mask in near.items() if mask.any()}, (row["id"], row["caption"])
        lone = lone_pattern.fullmatch(row["caption"])
        if lone:
            color, place = lone.groups()
            ys, xs = np.nonzero(near[color])
            assert {(y * 3 // 48, x * 3 // 48) for y, x in zip(ys, xs)} == {CELLS[place]}, row["caption"]
            lone_shapes += 1
    assert lone_shapes >= 10  # the position check above really ran


def test_synthetic_group_positions_hold_for_every_member():
    """A group gets a position only when all its shapes share that column or row."""
    assert synthetic._group_phrase("blue", "square", [(0, 0), (2, 0)]) == "two blue squares on the left"
    assert synthetic._group_phrase("red", "circle", [(2, 0), (2, 1), (2, 2)]) == "three red circles at the bottom"
    assert synthetic._group_phrase("red", "circle", [(0, 0), (2, 2)]) == "two red circles"
    assert synthetic._group_phrase("orange", "triangle", [(1, 1)]) == "an orange triangle in the center"


# ---------------------------------------------------------------------------------------------
# LLaVA loaders


def write_image(path, size=(8, 6), color=(200, 30, 30), mode="RGB"):
    Image.new(mode, size, color).save(path)
    return path.name


def write_json(path, records, jsonl=False):
    with open(path, "w") as file:
        if jsonl:
            file.writelines(json.dumps(record) + "\n" for record in records)
        else:
            json.dump(records, file)
    return path


def llava_record(sample_id, image, *turns):
    """A LLaVA record whose turns alternate human, gpt, human, ..."""
    speakers = ["human", "gpt"] * len(turns)
    conversations = [{"from": who, "value": value} for who, value in zip(speakers, turns)]
    return {"id": sample_id, "image": image, "conversations": conversations}


def pretrain_record(sample_id, image, caption="A red square."):
    return llava_record(sample_id, image, "Give a brief description of the image.\n<image>", caption)


@pytest.mark.parametrize("jsonl", [False, True])
def test_llava_pretrain_loads_captions(tmp_path, jsonl):
    """LLaVA-Pretrain JSON and JSONL give one caption row per record, with the gpt turn as caption."""
    (tmp_path / "images").mkdir()
    names = [write_image(tmp_path / "images" / f"{i}.png", color=(i * 40, 0, 0)) for i in range(3)]
    records = [pretrain_record(f"p{i}", f"images/{name}", f"Caption {i}. ") for i, name in enumerate(names)]
    path = write_json(tmp_path / ("data.jsonl" if jsonl else "data.json"), records, jsonl=jsonl)
    dataset = load_llava_pretrain(path)
    assert dataset.features == CAPTION_FEATURES
    assert dataset["id"] == ["p0", "p1", "p2"]
    assert dataset["caption"] == ["Caption 0.", "Caption 1.", "Caption 2."]
    assert [row["image"].getpixel((0, 0)) for row in dataset] == [(0, 0, 0), (40, 0, 0), (80, 0, 0)]


def test_llava_instruct_loads_turns_images_and_text_only_samples(tmp_path):
    """Multi-turn, multi-image and text-only LLaVA-Instruct records keep their turns and image positions."""
    write_image(tmp_path / "a.jpg", size=(16, 12))
    write_image(tmp_path / "b.png", color=(0, 0, 255))
    text_only = llava_record("text-only", None, "Hi", "Hello!")
    del text_only["image"]
    records = [
        llava_record("multi-turn", "a.jpg", "<image>\nWhat colour is it?", "Red.", "Is it big?", "No."),
        llava_record("two-images", ["a.jpg", "b.png"], "Compare <image> with\n<image>\nplease.", "Red, blue."),
        text_only,
    ]
    dataset = load_llava_instruct(write_json(tmp_path / "instruct.json", records))
    assert dataset.features == CONVERSATION_FEATURES
    assert dataset["id"] == ["multi-turn", "two-images", "text-only"]
    assert [len(row["messages"]) for row in dataset] == [4, 2, 2]
    assert [[image.size for image in row["images"]] for row in dataset] == [[(16, 12)], [(16, 12), (8, 6)], []]
    image, text = {"type": "image", "text": None}, lambda t: {"type": "text", "text": t}
    assert dataset[0]["messages"][0] == {"role": "user", "content": [image, text("What colour is it?")]}
    assert dataset[0]["messages"][3] == {"role": "assistant", "content": [text("No.")]}
    assert dataset[1]["messages"][0]["content"] == [text("Compare"), image, text("with"), image, text("please.")]
    assert dataset[1]["images"][1].getpixel((0, 0)) == (0, 0, 255)


def test_trl_collator_batches_conversation_rows(tmp_path):
    """TRL 1.16's vision collator renders our rows: image blocks where the placeholders were, one pixel map per image."""
    from conftest import tiny_tokenizer
    from transformers import LlavaProcessor, SiglipImageProcessor
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    )
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessor(size={"height": 16, "width": 16}),
        tokenizer=tokenizer,
        chat_template=template,
        patch_size=16,  # one <image> token per image
        num_additional_image_tokens=0,
        vision_feature_select_strategy="full",
    )
    write_image(tmp_path / "a.png")
    records = [
        llava_record("one", "a.png", "<image>\nWhat is it?", "A square."),
        llava_record("two", ["a.png", "a.png"], "Is <image> like\n<image>?", "Yes.", "Sure?", "Yes."),
    ]
    dataset = load_llava_instruct(write_json(tmp_path / "d.json", records))
    batch = DataCollatorForVisionLanguageModeling(processor)([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    text = tokenizer.decode(batch["input_ids"][1], skip_special_tokens=False)
    assert "user\nIs<image>like<image>?<|im_end|>" in text and "assistant\nYes.<|im_end|>" in text


def test_trl_and_cauldron_rows_pass_through_validated(tmp_path):
    """TRL rows (string or block content) and the_cauldron rows become the same conversation rows."""
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    question, answer = "What?", "Red."
    trl_strings = {
        "id": "s",
        "images": [red],
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
    }
    trl_blocks = {
        "id": "b",
        "images": [red],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
    }
    cauldron = {"id": "c", "images": [red], "texts": [{"user": question, "assistant": answer, "source": "x"}]}
    dataset = load_conversations([trl_strings, trl_blocks, cauldron])
    assert dataset.features == CONVERSATION_FEATURES
    assert dataset[0]["messages"] == dataset[1]["messages"] == dataset[2]["messages"]
    assert [row["images"][0].getpixel((3, 3)) for row in dataset] == [(255, 0, 0)] * 3
    # A Dataset already in the shape comes back unchanged, images included.
    again = load_conversations(dataset)
    assert again["messages"] == dataset["messages"] and again["id"] == dataset["id"]
    assert [np.asarray(row["images"][0]).tolist() for row in again] == [np.asarray(red).tolist()] * 3
    assert concatenate_datasets([dataset, again]).features == CONVERSATION_FEATURES


# ---------------------------------------------------------------------------------------------
# Image conversion


def opened(image, **save_args):
    """`image` written to PNG (or TIFF for CMYK) and opened again, as a loader meets it."""
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF" if image.mode == "CMYK" else "PNG", **save_args)
    return Image.open(io.BytesIO(buffer.getvalue()))


def palette_image():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.putpixel((1, 0), 1)
    return image


@pytest.mark.parametrize(
    "make, expected",
    [
        # Transparent pixels become white, whatever colour they store; opaque ones keep theirs.
        (lambda: opened(Image.new("RGBA", (1, 1), (0, 0, 0, 0))), (255, 255, 255)),
        (lambda: opened(Image.new("RGBA", (1, 1), (0, 0, 255, 128))), (127, 127, 255)),
        (lambda: opened(Image.new("LA", (1, 1), (0, 0))), (255, 255, 255)),
        (lambda: opened(palette_image(), transparency=0), (255, 255, 255)),  # index 0 (black) is transparent
        (lambda: opened(Image.new("L", (1, 1), 50), transparency=50), (255, 255, 255)),
        # CMYK: 50% cyan + 50% black -> (255 * 0.5 * 0.5, 255 * 0.5, 255 * 0.5), not a clipped 0.
        (lambda: opened(Image.new("CMYK", (1, 1), (128, 0, 0, 128))), (63, 127, 127)),
        # 16-bit: 32896 = 128 * 257 is mid grey; Pillow's convert("L") would clip it to 255.
        (lambda: opened(Image.fromarray(np.array([[32896]], dtype=np.uint16))), (128, 128, 128)),
        (lambda: opened(Image.new("L", (1, 1), 77)), (77, 77, 77)),
        (lambda: opened(Image.new("1", (1, 1), 1)), (255, 255, 255)),
    ],
    ids=["RGBA-clear", "RGBA-half", "LA", "P-transparency", "L-transparency", "CMYK", "I;16", "L", "1"],
)
def test_to_rgb_converts_every_mode_correctly(make, expected):
    """Each Pillow mode becomes RGB with the right pixel value."""
    image = make()
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    assert rgb.getpixel((0, 0)) == expected


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    """A 16-bit ramp keeps its gradient through a loader (Pillow's own convert would saturate it)."""
    ramp = Image.fromarray((np.arange(16, dtype=np.uint16) * 4369).reshape(4, 4))  # 0 .. 65535
    ramp.save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode == "I;16"
    dataset = load_llava_pretrain(write_json(tmp_path / "d.json", [pretrain_record("r", "ramp.png")]))
    grey = np.asarray(dataset[0]["image"])[..., 0].ravel()
    assert grey.tolist() == [17 * i for i in range(16)]  # 4369 / 257 = 17


def test_transparent_image_is_stored_composited_onto_white(tmp_path):
    """An RGBA file reaches the dataset composited onto white (datasets' own RGB conversion would leave black)."""
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    dataset = load_llava_pretrain(write_json(tmp_path / "d.json", [pretrain_record("t", "clear.png")]))
    assert dataset[0]["image"].mode == "RGB" and dataset[0]["image"].getpixel((1, 1)) == (255, 255, 255)


def test_one_pixel_image_is_accepted(tmp_path):
    """A 1x1 image is a valid image: it loads as 1x1 RGB and is left to the processor to resize."""
    write_image(tmp_path / "dot.png", size=(1, 1))
    dataset = load_llava_pretrain(write_json(tmp_path / "d.json", [pretrain_record("dot", "dot.png")]))
    assert dataset[0]["image"].size == (1, 1) and dataset[0]["image"].mode == "RGB"


# ---------------------------------------------------------------------------------------------
# Bad samples: each raises naming the sample, or is skipped and counted once


def load_one_bad(tmp_path, record, loader=load_llava_pretrain):
    with pytest.raises(BadSampleError) as caught:
        loader(write_json(tmp_path / "bad.json", [record]))
    assert "'bad-1'" in str(caught.value) and caught.value.sample_id == "bad-1"
    return caught.value


def test_decompression_bomb_is_a_clear_error(tmp_path):
    """A 10000x10000 image (over Pillow's MAX_IMAGE_PIXELS, where Pillow only warns) raises naming the sample."""
    Image.new("1", (10_000, 10_000)).save(tmp_path / "bomb.png")  # 12 KB on disk, 100 M pixels
    error = load_one_bad(tmp_path, pretrain_record("bad-1", "bomb.png"))
    assert error.reason == "image_too_large" and "100000000 pixels" in str(error)


def test_missing_image_is_a_clear_error(tmp_path):
    """A path to no file raises naming the sample and the path."""
    error = load_one_bad(tmp_path, pretrain_record("bad-1", "nowhere.jpg"))
    assert error.reason == "missing_image" and "nowhere.jpg" in str(error)


def test_unreadable_image_is_a_clear_error(tmp_path):
    """A file that is not an image raises naming the sample."""
    (tmp_path / "junk.jpg").write_bytes(b"this is not a JPEG")
    assert load_one_bad(tmp_path, pretrain_record("bad-1", "junk.jpg")).reason == "corrupt_image"


def test_truncated_image_is_found_while_building(tmp_path):
    """A PNG cut short opens fine but fails to decode: found while building, not during training."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    Image.open(tmp_path / "cut.png")  # the header is intact
    assert load_one_bad(tmp_path, pretrain_record("bad-1", "cut.png")).reason == "corrupt_image"


def test_empty_answer_is_a_clear_error(tmp_path):
    """A blank gpt turn raises naming the sample."""
    write_image(tmp_path / "ok.png")
    record = llava_record("bad-1", "ok.png", "<image>\nWhat?", "  ")
    assert load_one_bad(tmp_path, record, load_llava_instruct).reason == "empty_text"


def test_placeholder_and_image_counts_must_agree(tmp_path):
    """Two <image> placeholders for one image raises naming the sample and both counts."""
    write_image(tmp_path / "ok.png")
    record = llava_record("bad-1", "ok.png", "<image> and <image>?", "Both.")
    error = load_one_bad(tmp_path, record, load_llava_instruct)
    assert error.reason == "image_count_mismatch" and "2 image placeholder(s) but 1 image(s)" in str(error)


def test_turn_order_is_checked(tmp_path):
    """A conversation that does not alternate user/assistant raises naming the sample."""
    record = llava_record("bad-1", [], "Hi", "Hi")
    record["conversations"].reverse()  # gpt first
    assert load_one_bad(tmp_path, record, load_llava_instruct).reason == "bad_format"


def test_skip_drops_bad_samples_with_one_counting_warning(tmp_path):
    """With on_error='skip' the good samples load and one warning counts the skipped ones by reason."""
    write_image(tmp_path / "ok.png")
    (tmp_path / "junk.png").write_bytes(b"junk")
    records = [
        pretrain_record("good-1", "ok.png"),
        pretrain_record("missing-1", "gone.png"),
        pretrain_record("missing-2", "gone-too.png"),
        pretrain_record("junk", "junk.png"),
        pretrain_record("empty", "ok.png", caption=""),
        pretrain_record("good-2", "ok.png"),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load_llava_pretrain(write_json(tmp_path / "d.json", records), on_error="skip")
    assert dataset["id"] == ["good-1", "good-2"]
    skip_warnings = [w for w in caught if issubclass(w.category, SkippedSamplesWarning)]
    assert len(skip_warnings) == 1
    message = str(skip_warnings[0].message)
    assert message.startswith("skipped 4 of 6 samples, kept 2: 2 missing_image (first: 'missing-1')")
    assert "1 corrupt_image (first: 'junk')" in message and "1 empty_text (first: 'empty')" in message


def test_skipping_every_sample_is_an_error(tmp_path):
    """If nothing survives on_error='skip', the loader raises rather than return an empty dataset."""
    with pytest.raises(ValueError, match="all 1 samples were skipped: 1 missing_image"):
        load_llava_pretrain(write_json(tmp_path / "d.json", [pretrain_record("x", "gone.png")]), on_error="skip")


def test_load_image_names_the_sample():
    """load_image converts to RGB and turns a bad source into a BadSampleError with the given id."""
    assert load_image(Image.new("LA", (2, 2), (0, 255)), "ok").getpixel((0, 0)) == (0, 0, 0)
    with pytest.raises(BadSampleError, match="sample 'img-7': corrupt_image"):
        load_image(b"not an image", "img-7")


def test_easy_vqa_balanced_hides_yes_no_answers_from_the_wording():
    """easy_vqa_balanced: per wording template yes and no are equally many; every colour and shape question is kept."""
    from hf_vlm.data import easy_vqa_balanced, easy_vqa_conversations
    from hf_vlm.data.easy_vqa import question_template

    balanced, full = easy_vqa_balanced("train"), easy_vqa_conversations("train")
    counts = collections.Counter()
    for answer, messages in zip(balanced["answer"], balanced["messages"]):
        if answer in ("yes", "no"):
            counts[question_template(messages[0]["content"][-1]["text"]), answer] += 1
    templates = {template for template, _ in counts}
    assert len(templates) == 16 and all(counts[t, "yes"] == counts[t, "no"] > 0 for t in templates)
    open_types = ("color", "shape")
    assert collections.Counter(t for t in balanced["question_type"] if t in open_types) == collections.Counter(
        t for t in full["question_type"] if t in open_types
    )
    assert len(set(balanced["id"])) == len(balanced) and easy_vqa_balanced("train", seed=1)["id"] != balanced["id"]
    assert question_template("Is there a red shape in the image?") == "is there a C shape in the image"


def test_easy_vqa_balanced_is_the_same_in_every_process():
    """easy_vqa_balanced depends on its seed only, not on the process's string-hash seed (torchrun ranks agree)."""
    import subprocess
    import sys

    script = "from hf_vlm.data import easy_vqa_balanced; print(easy_vqa_balanced('train', seed=0)['id'][:50])"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**__import__("os").environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for hash_seed in ("1", "2")
    }
    assert len(outputs) == 1
