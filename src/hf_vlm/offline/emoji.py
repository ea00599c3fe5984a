"""Google's emoji as image-caption pairs, from the npm package `emoji-datasource-google`.

The package (https://github.com/iamcal/emoji-data; Google's Noto emoji images, Apache-2.0) holds
`emoji.json`, one entry per emoji with its Unicode `name` ("GRINNING FACE", "Germany Flag"), its
`category` ("Smileys & Emotion") and its cell in a sprite sheet (`sheet_x`, `sheet_y`), and the
sheet `img/google/sheets-clean/64.png`: 62 x 62 cells of 66 px, each a 64x64 RGBA image with 1 px
of transparent padding on every side (4,092 px square). Only these two files are fetched, through
the asset cache (`hf_vlm.offline.assets.npm_file`), so later calls read them from disk.

One row per base emoji with a Google image (1,911 in version 16.0.0); skin-tone variants are left
out, as their entries carry no name of their own. Rows follow the package's `sort_order`, which
groups emoji by category.
"""

import io
import json
import os
import random

from datasets import Dataset
from PIL import Image

from ..data.schema import CAPTION_FEATURES
from .assets import npm_file

PACKAGE = "emoji-datasource-google"
VERSION = "16.0.0"
METADATA = "package/emoji.json"
SHEET = "package/img/google/sheets-clean/64.png"
IMAGE_SIZE = 64
CELL = IMAGE_SIZE + 2  # 1 px transparent padding on each side, measured on the real sheet

# No article before the name: "a"/"an" cannot be chosen reliably for names like "PEOPLE HOLDING
# HANDS", "CHAINS" or "UNICORN FACE".
CAPTION_TEMPLATES = (
    "The {name} emoji, from the {category} category.",
    "{Name}, an emoji from the {category} category.",
    'An emoji named "{name}", in the {category} category.',
    "Emoji: {name} ({category}).",
)


def emoji_captions(limit: int | None = None, seed: int = 0, cache: str | os.PathLike | None = None) -> Dataset:
    """Each Google emoji as a 64x64 RGB image on white with a caption naming it and its category.

    Returns a Dataset with `CAPTION_FEATURES`; ids are "emoji-" plus the code points ("emoji-1F600",
    "emoji-0023-FE0F-20E3"). `limit` keeps the first `limit` rows. Each caption's template is drawn
    from `CAPTION_TEMPLATES` by a generator seeded with `(seed, id)`. `cache` is the asset cache
    root (see `hf_vlm.paths.cache_root`); the first call fetches the package from npm.
    """
    metadata = npm_file(PACKAGE, VERSION, METADATA, cache=cache)
    sheet_path = npm_file(PACKAGE, VERSION, SHEET, cache=cache)
    entries = [e for e in json.loads(metadata.read_text(encoding="utf-8")) if e["has_img_google"]]
    entries.sort(key=lambda e: e["sort_order"])
    if limit is not None:
        entries = entries[:limit]

    with Image.open(sheet_path) as sheet:
        sheet = sheet.convert("RGBA")
    _check_sheet(sheet.size, entries)
    white = Image.new("RGBA", (IMAGE_SIZE, IMAGE_SIZE), "white")
    rows = {"id": [], "image": [], "caption": []}
    for entry in entries:
        left, top = entry["sheet_x"] * CELL + 1, entry["sheet_y"] * CELL + 1
        emoji = sheet.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
        buffer = io.BytesIO()
        Image.alpha_composite(white, emoji).convert("RGB").save(buffer, format="PNG")
        sample_id = f"emoji-{entry['unified']}"
        name = display_name(entry["name"])
        template = random.Random(f"{seed}/{sample_id}").choice(CAPTION_TEMPLATES)
        rows["id"].append(sample_id)
        rows["image"].append({"bytes": buffer.getvalue(), "path": None})
        rows["caption"].append(template.format(name=name, Name=name[0].upper() + name[1:], category=entry["category"]))
    return Dataset.from_dict(rows, features=CAPTION_FEATURES)


def display_name(name: str) -> str:
    """The name as a caption writes it: "GRINNING FACE" -> "grinning face", "Germany Flag" -> "Germany flag".

    Unicode names are all capitals and lose them; country flags are named in title case ("Côte
    d’Ivoire Flag") and keep their capitals but for the final word.
    """
    if name.isupper():
        return name.lower()
    return name[: -len(" Flag")] + " flag" if name.endswith(" Flag") else name


def _check_sheet(size: tuple[int, int], entries: list[dict]) -> None:
    """Raise if the sheet is not a grid of `CELL`-px cells holding every entry's cell."""
    width, height = size
    columns = 1 + max((e["sheet_x"] for e in entries), default=0)
    rows = 1 + max((e["sheet_y"] for e in entries), default=0)
    if width % CELL or height % CELL or width < columns * CELL or height < rows * CELL:
        raise ValueError(
            f"{PACKAGE}@{VERSION} {SHEET} is {width}x{height} px; expected a grid of {CELL} px cells "
            f"at least {columns} wide and {rows} high"
        )
