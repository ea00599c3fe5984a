"""easy-VQA as hf_vlm datasets: question-answer conversations (stage 2) and captions (stage 1).

easy-VQA (PyPI `easy-vqa`, MIT, https://github.com/vzhou842/easy-VQA) ships 4,000 train and
1,000 test 64x64 RGB PNGs, each one shape (circle, rectangle, triangle) in one of 8 colours on a
light background, with 38,575 / 9,673 questions. A question is `(text, answer, image_id)`; there
is no stored question type, so it follows from the answer, whose 13 values split cleanly:
yes/no -> "yes/no", a shape name -> "shape", a colour name -> "color".

Images are stored by path into the installed package and decoded lazily by `datasets.Image`, so
building all 38,575 rows decodes no pixels.
"""

import random
import re

import numpy as np
from datasets import Dataset
from PIL import Image

from .schema import CAPTION_FEATURES, CONVERSATION_FEATURES, EASY_VQA_FEATURES

SHAPES = ("circle", "rectangle", "triangle")
# The exact RGB values easy-VQA paints each colour with (measured on every image whose colour a
# question states; the shape's interior pixels are exactly these, only its edges are blended).
COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}

# All true of every easy-VQA image (every background is light: each channel >= 230).
CAPTION_TEMPLATES = (
    "A {color} {shape}.",
    "A {color} {shape} on a light background.",
    "The image shows a {color} {shape}.",
    "There is a {color} {shape} in the image.",
    "A picture of one {color} {shape}.",
    "A single {color} {shape}.",
)


def question_type(answer: str) -> str:
    """The type of an easy-VQA question, from its answer: "yes/no", "shape" or "color"."""
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in SHAPES:
        return "shape"
    if answer in COLORS:
        return "color"
    raise ValueError(f"not an easy-VQA answer: {answer!r}")


def _load_split(split: str):
    """Return `(texts, answers, image_ids)` and `{image_id: path}` for one split."""
    import easy_vqa  # optional dependency; imported here so hf_vlm.data imports without it

    if split == "train":
        questions, paths = easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()
    elif split == "test":
        questions, paths = easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    missing = set(questions[2]) - set(paths)
    if missing:
        raise ValueError(f"easy-VQA {split}: questions refer to {len(missing)} missing images, e.g. {min(missing)}")
    return questions, paths


def easy_vqa_conversations(split: str = "train", limit: int | None = None) -> Dataset:
    """easy-VQA questions as one-turn conversations, one row per question, in the package's order.

    Returns a Dataset with `EASY_VQA_FEATURES`: `id` ("easy_vqa-train-00012"), `images` (one
    64x64 RGB image), `messages` (user: image block then the question text verbatim, e.g. "what
    color is the shape?"; assistant: the answer, e.g. "blue"), `question_type` ("shape", "color"
    or "yes/no") and `answer`. `limit` keeps the first `limit` questions.
    """
    (texts, answers, image_ids), paths = _load_split(split)
    count = len(texts) if limit is None else min(limit, len(texts))
    rows = {name: [] for name in EASY_VQA_FEATURES}
    for index in range(count):
        rows["id"].append(f"easy_vqa-{split}-{index:05d}")
        rows["images"].append([{"bytes": None, "path": paths[image_ids[index]]}])
        rows["messages"].append(
            [
                {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": texts[index]}]},
                {"role": "assistant", "content": [{"type": "text", "text": answers[index]}]},
            ]
        )
        rows["question_type"].append(question_type(answers[index]))
        rows["answer"].append(answers[index])
    return Dataset.from_dict(rows, features=EASY_VQA_FEATURES)


def question_template(text: str) -> str:
    """A question's wording with its colour and shape words replaced: "is there a red shape?" -> "is there a C shape"."""
    words = re.findall(r"[a-z]+", text.lower())
    return " ".join("C" if word in COLORS else "S" if word in SHAPES else word for word in words)


def easy_vqa_balanced(split: str = "train", seed: int = 0) -> Dataset:
    """easy-VQA conversations whose yes/no answers cannot be guessed from the wording.

    In easy-VQA the wording of a yes/no question gives its answer away: "is there a C shape?" is "no" for 88% of
    questions (one colour of 8 is present), "is there not a C shape?" "yes" for 87%, so a model that ignores the
    image already gets ~80% of yes/no questions. Here each wording template (`question_template`) keeps all
    questions of its rarer answer and as many, drawn with `seed`, of the other, as VQA v2 balanced its questions
    with complementary images (https://arxiv.org/abs/1612.00837); colour and shape questions are all kept. Of
    38,575 train questions about 20,000 remain, half of them yes/no, each answer equally likely per template.
    Rows as `easy_vqa_conversations`, in a seeded order.
    """
    dataset = easy_vqa_conversations(split)
    by_template: dict[tuple[str, str], list[int]] = {}
    keep = []
    for index, (answer, messages) in enumerate(zip(dataset["answer"], dataset["messages"])):
        if answer in ("yes", "no"):
            by_template.setdefault((question_template(messages[0]["content"][-1]["text"]), answer), []).append(index)
        else:
            keep.append(index)
    rng = random.Random(seed)
    for template in sorted({template for template, _ in by_template}):  # a set's order changes per process
        yes, no = by_template.get((template, "yes"), []), by_template.get((template, "no"), [])
        size = min(len(yes), len(no))
        keep += rng.sample(yes, size) + rng.sample(no, size)
    rng.shuffle(keep)
    return dataset.select(keep)


def easy_vqa_dialogues(split: str = "train", seed: int = 0) -> Dataset:
    """easy-VQA as one multi-turn conversation per image: all of an image's questions, in a seeded order.

    The image comes once, in the first user turn; every later turn is a question and its answer. Training on
    these pays for an image's tokens (and its vision-tower pass) once per ~10 answers instead of once per answer.
    Returns a Dataset with `CONVERSATION_FEATURES`; ids are "easy_vqa-train-img0007".
    """
    (texts, answers, image_ids), paths = _load_split(split)
    by_image = {}
    for text, answer, image_id in zip(texts, answers, image_ids):
        by_image.setdefault(image_id, []).append((text, answer))
    rows = {"id": [], "images": [], "messages": []}
    for image_id in sorted(by_image):
        sample_id = f"easy_vqa-{split}-img{image_id:04d}"
        pairs = by_image[image_id]
        random.Random(f"{seed}/{sample_id}").shuffle(pairs)
        messages = []
        for turn, (text, answer) in enumerate(pairs):
            image_block = [{"type": "image", "text": None}] if turn == 0 else []
            messages.append({"role": "user", "content": image_block + [{"type": "text", "text": text}]})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        rows["id"].append(sample_id)
        rows["images"].append([{"bytes": None, "path": paths[image_id]}])
        rows["messages"].append(messages)
    return Dataset.from_dict(rows, features=CONVERSATION_FEATURES)


def easy_vqa_captions(split: str = "train", seed: int = 0) -> Dataset:
    """One caption per easy-VQA image ("A red circle.", ...), in image-id order.

    Returns a Dataset with `CAPTION_FEATURES`; ids are "easy_vqa-train-img0007". The template for
    each image is drawn from `CAPTION_TEMPLATES` by a generator seeded with `(seed, id)`, so a
    caption does not depend on which other images are loaded. Shape and colour come from
    `image_labels` (the split's own answers, falling back to the pixels; see there).
    """
    (texts, answers, image_ids), paths = _load_split(split)
    labels = image_labels(texts, answers, image_ids, paths)
    rows = {"id": [], "image": [], "caption": []}
    for image_id in sorted(paths):
        sample_id = f"easy_vqa-{split}-img{image_id:04d}"
        shape, color = labels[image_id]
        template = random.Random(f"{seed}/{sample_id}").choice(CAPTION_TEMPLATES)
        rows["id"].append(sample_id)
        rows["image"].append({"bytes": None, "path": paths[image_id]})
        rows["caption"].append(template.format(color=color, shape=shape))
    return Dataset.from_dict(rows, features=CAPTION_FEATURES)


def image_labels(texts, answers, image_ids, paths) -> dict:
    """`{image_id: (shape, color)}` for every image in `paths`.

    What `labels_from_questions` leaves open (train: 163 shapes and 288 colours of 4,000 images;
    test: 46 and 78 of 1,000) is read from the pixels by `labels_from_pixels`, which agrees with
    every label the questions determine (checked by a test on the test split).
    """
    from_questions = labels_from_questions(texts, answers, image_ids)
    labels = {}
    for image_id, path in paths.items():
        shape, color = from_questions.get(image_id, (None, None))
        if shape is None or color is None:
            pixel_shape, pixel_color = labels_from_pixels(path)
            shape, color = shape or pixel_shape, color or pixel_color
        labels[image_id] = (shape, color)
    return labels


def labels_from_questions(texts, answers, image_ids) -> dict:
    """`{image_id: (shape or None, color or None)}`: what the questions about each image determine.

    An open question's answer is a shape or a colour, and its text may name the other ("what color
    is the triangle?" -> "red"). A yes/no question containing "not" or "no" is negated, so "is there
    not a blue shape?" -> "no" states the colour is blue, and "is a blue shape present?" -> "no"
    rules blue out; ruling out all but one shape or colour determines it too. None where the
    questions leave an attribute open (or, which never happens in easy-VQA, contradict themselves).
    """
    kinds = {word: "shape" for word in SHAPES} | {word: "color" for word in COLORS}
    vocabulary = {"shape": set(SHAPES), "color": set(COLORS)}
    known, ruled_out = {}, {}
    for text, answer, image_id in zip(texts, answers, image_ids):
        words = re.findall(r"[a-z]+", text.lower())
        named = [word for word in words if word in kinds]
        if answer in ("yes", "no"):
            is_true = (answer == "yes") != bool({"not", "no"} & set(words))
            facts = known if is_true else ruled_out
        else:
            named.append(answer)
            facts = known
        for word in named:
            facts.setdefault((image_id, kinds[word]), set()).add(word)

    labels = {}
    for image_id in set(image_ids):
        label = []
        for kind in ("shape", "color"):
            candidates = (known.get((image_id, kind)) or vocabulary[kind]) - ruled_out.get((image_id, kind), set())
            label.append(next(iter(candidates)) if len(candidates) == 1 else None)
        labels[image_id] = tuple(label)
    return labels


def labels_from_pixels(path) -> tuple[str, str]:
    """`(shape, color)` of an easy-VQA image, read from its pixels.

    Colour: the palette colour with the most exactly matching pixels (the shape's interior).
    Shape: from the mask of those pixels inside its bounding box. A rectangle fills the box
    exactly (fill 1.0); a triangle (always apex up) has much less area in its top half than in its
    bottom half (ratio <= 0.44 on all labelled images), a circle about the same (>= 0.72).
    """
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    codes = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]  # one int per pixel
    names = list(COLORS)
    counts = [np.count_nonzero(codes == (r << 16 | g << 8 | b)) for r, g, b in COLORS.values()]
    best = int(np.argmax(counts))
    r, g, b = COLORS[names[best]]
    mask = codes == (r << 16 | g << 8 | b)
    rows, cols = np.nonzero(mask)
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    if box.mean() > 0.95:
        return "rectangle", names[best]
    half = max(1, box.shape[0] // 2)
    top_to_bottom = box[:half].sum() / box[-half:].sum()
    return ("triangle" if top_to_bottom < 0.58 else "circle"), names[best]
