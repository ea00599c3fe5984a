"""Procedurally rendered image-caption pairs whose captions are true by construction.

Two kinds of scene on a white background, chosen per sample:

- 1 to 4 shapes (circle, square, triangle) in named colours, each inside its own cell of a 3x3
  grid, captioned by colour, kind, count and, where it holds for every shape of a group, position:
  "Two blue squares on the left and a red circle in the center."
- one short uppercase word in a named colour: "The word CAT in green."

Positions are grid thirds: a shape "on the left" lies wholly inside the left third of the image,
"at the top" inside the top third, "in the top left corner" inside that corner cell. A group of
same-coloured shapes of one kind gets a position only when all of them share it.

Sample `i` of seed `s` is drawn from a generator seeded with `f"{s}/{i}"`, so it is the same
whatever `n` is, and `synthetic_captions(10, s)` is a prefix of `synthetic_captions(100, s)`.
Words are drawn in DejaVu Sans Bold from matplotlib's wheel when matplotlib is installed, else in
Pillow's built-in font: captions are identical either way, pixels of word scenes are not.
"""

import functools
import io
import os
import random

from datasets import Dataset
from PIL import Image, ImageDraw, ImageFont

from .schema import CAPTION_FEATURES

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
    "orange": (245, 130, 20),
    "purple": (140, 50, 180),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# No colour words, so that "The word RED in blue" never has to be untangled.
WORDS = (
    "CAT", "DOG", "SUN", "TREE", "BOOK", "STAR", "MOON", "FISH", "HAT", "CAR", "BUS", "BIRD",
    "CAKE", "SHIP", "KEY", "LAMP", "FROG", "DUCK", "BOX", "PEN", "CUP", "EGG", "ANT", "BEE",
    "OWL", "MAP", "BELL", "DOOR", "RAIN", "SNOW", "WIND", "ROSE", "LEAF", "KING", "HOME", "BALL",
)  # fmt: skip
WORD_TEMPLATES = ("The word {word} in {color}.", "The word {word} written in {color}.")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}

# Where a single shape sits, by (row, column) of the 3x3 grid.
CELL_PHRASES = {
    (0, 0): "in the top left corner",
    (0, 1): "at the top",
    (0, 2): "in the top right corner",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "in the bottom left corner",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right corner",
}
# Shapes are drawn this many times larger, then downsampled, for smooth edges.
_SUPERSAMPLE = 4
_WORD_PROBABILITY = 0.25


def synthetic_captions(n: int, seed: int = 0, image_size: int = 64) -> Dataset:
    """`n` rendered scenes with true captions, as a Dataset with `CAPTION_FEATURES`.

    Ids are "synthetic-{seed}-{i:06d}"; images are `image_size` x `image_size` RGB (at least 32).
    Deterministic for a given `seed` (and Pillow version and font).
    """
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 for legible scenes, got {image_size}")
    font_path = _font_path()
    rows = {"id": [], "image": [], "caption": []}
    for index in range(n):
        rng = random.Random(f"{seed}/{index}")
        if rng.random() < _WORD_PROBABILITY:
            image, caption = _word_scene(rng, image_size, font_path)
        else:
            image, caption = _shape_scene(rng, image_size)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rows["id"].append(f"synthetic-{seed}-{index:06d}")
        rows["image"].append({"bytes": buffer.getvalue(), "path": None})
        rows["caption"].append(caption)
    return Dataset.from_dict(rows, features=CAPTION_FEATURES)


def _shape_scene(rng: random.Random, image_size: int) -> tuple[Image.Image, str]:
    """1-4 shapes in distinct grid cells; about half repeat an earlier shape's colour and kind."""
    count = rng.randint(1, 4)
    kinds = []
    for _ in range(count):
        if kinds and rng.random() < 0.5:
            kinds.append(rng.choice(kinds))
        else:
            kinds.append((rng.choice(list(COLORS)), rng.choice(SHAPES)))
    cells = rng.sample(range(9), count)

    big = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), "white")
    draw = ImageDraw.Draw(image)
    cell = big / 3
    for (color, shape), cell_index in zip(kinds, cells):
        row, col = divmod(cell_index, 3)
        size = cell * rng.uniform(0.55, 0.85)
        # Jitter within the cell, never crossing its border, so the position words stay true.
        left = col * cell + rng.uniform(0, cell - size)
        top = row * cell + rng.uniform(0, cell - size)
        box = (left, top, left + size, top + size)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(left + size / 2, top), (left + size, top + size), (left, top + size)], fill=COLORS[color])
    image = image.resize((image_size, image_size), Image.Resampling.BOX)  # area average

    groups = {}  # (color, shape) -> cells, in order of first appearance
    for kind, cell_index in zip(kinds, cells):
        groups.setdefault(kind, []).append(divmod(cell_index, 3))
    phrases = [_group_phrase(color, shape, group_cells) for (color, shape), group_cells in groups.items()]
    caption = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return image, caption[0].upper() + caption[1:] + "."


def _group_phrase(color: str, shape: str, cells: list[tuple[int, int]]) -> str:
    """E.g. "a red circle in the center", "two blue squares on the left", "three green triangles"."""
    if len(cells) == 1:
        article = "an" if color[0] in "aeiou" else "a"
        return f"{article} {color} {shape} {CELL_PHRASES[cells[0]]}"
    rows = {row for row, _ in cells}
    cols = {col for _, col in cells}
    phrase = f"{COUNT_WORDS[len(cells)]} {color} {shape}s"
    if cols == {0}:
        phrase += " on the left"
    elif cols == {2}:
        phrase += " on the right"
    elif rows == {0}:
        phrase += " at the top"
    elif rows == {2}:
        phrase += " at the bottom"
    return phrase


def _word_scene(rng: random.Random, image_size: int, font_path: str | None) -> tuple[Image.Image, str]:
    """One word, centred, as large as fits in 85% of the width."""
    word = rng.choice(WORDS)
    color = rng.choice(list(COLORS))
    image = Image.new("RGB", (image_size, image_size), "white")
    draw = ImageDraw.Draw(image)
    # Pillow's built-in font is regular weight; a 1-pixel outline in the same colour makes it about
    # as heavy as DejaVu Sans Bold, so small words still have pixels of the exact colour.
    stroke = 0 if font_path else 1
    # Text width grows about linearly with font size: estimate once, then step down until it fits.
    probe = draw.textbbox((0, 0), word, font=_font(font_path, 100))
    size = min(image_size // 2, int(100 * 0.85 * image_size / (probe[2] - probe[0])) + 1)
    while True:
        font = _font(font_path, size)
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font, stroke_width=stroke)
        if right - left <= 0.85 * image_size or size <= 8:
            break
        size -= 1
    position = ((image_size - (right - left)) / 2 - left, (image_size - (bottom - top)) / 2 - top)
    draw.text(position, word, font=font, fill=COLORS[color], stroke_width=stroke, stroke_fill=COLORS[color])
    return image, rng.choice(WORD_TEMPLATES).format(word=word, color=color)


@functools.lru_cache(maxsize=64)
def _font(font_path: str | None, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_path, size) if font_path else ImageFont.load_default(size=size)


def _font_path() -> str | None:
    """DejaVu Sans Bold from matplotlib's wheel, or None for Pillow's built-in font."""
    try:
        import matplotlib
    except ImportError:
        return None
    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans-Bold.ttf")
    return path if os.path.isfile(path) else None
