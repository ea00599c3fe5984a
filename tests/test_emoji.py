"""emoji_captions crops the right sheet cell for each emoji, captions it, and fetches only once.

The download step of `hf_vlm.offline.assets` is replaced by one that builds a tiny npm tarball: an
`emoji.json` of three entries and a 2x2-cell sprite sheet laid out like the real one (66 px cells,
a 64x64 image inside 1 px of transparent padding), each cell one colour, so a crop's colour says
which cell it came from.
"""

import io
import json
import subprocess
import tarfile

import numpy as np
import pytest
from PIL import Image

from hf_vlm.data import CAPTION_FEATURES
from hf_vlm.offline import assets
from hf_vlm.offline.assets import AssetFetchError
from hf_vlm.offline.emoji import CAPTION_TEMPLATES, PACKAGE, VERSION, display_name, emoji_captions

# Listed out of `sort_order`, so the test sees rows sorted; GHOST has no Google image.
ENTRIES = [
    {"name": "Germany Flag", "unified": "1F1E9-1F1EA", "category": "Flags", "sheet_x": 1, "sheet_y": 0,
     "sort_order": 2, "has_img_google": True},
    {"name": "GHOST", "unified": "1F47B", "category": "Smileys & Emotion", "sheet_x": 1, "sheet_y": 1,
     "sort_order": 3, "has_img_google": False},
    {"name": "GRINNING FACE", "unified": "1F600", "category": "Smileys & Emotion", "sheet_x": 0, "sheet_y": 1,
     "sort_order": 1, "has_img_google": True},
]  # fmt: skip
COLORS = {(1, 0): (200, 30, 30), (0, 1): (240, 200, 0), (0, 0): (30, 60, 220)}  # (sheet_x, sheet_y) -> RGB
HOLE = 8  # each image's top-left HOLE x HOLE pixels are transparent: they must come out white


def _sheet_png(cells=2):
    sheet = Image.new("RGBA", (66 * cells, 66 * cells), (0, 0, 0, 0))
    for (x, y), color in COLORS.items():
        cell = Image.new("RGBA", (64, 64), (*color, 255))
        cell.paste((0, 0, 0, 0), (0, 0, HOLE, HOLE))
        sheet.paste(cell, (66 * x + 1, 66 * y + 1))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def _members(sheet=None):
    return {
        "package/package.json": b"{}",
        "package/emoji.json": json.dumps(ENTRIES).encode(),
        "package/img/google/sheets-clean/64.png": sheet or _sheet_png(),
        "package/img/google/sheets-clean/32.png": b"not this one",
    }


def _fake_npm(monkeypatch, members):
    """Replace the npm download with one that writes `members` into a tarball; return its call log."""
    calls = []

    def npm_pack(package, version, dest):
        calls.append((package, version))
        dest.mkdir(parents=True)
        archive = dest / f"{package}-{version}.tgz"
        with tarfile.open(archive, "w:gz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return archive

    monkeypatch.setattr(assets, "_npm_pack", npm_pack)
    return calls


@pytest.fixture
def fake_npm(monkeypatch):
    return _fake_npm(monkeypatch, _members())


def _rows(dataset):
    return [(row["id"], row["caption"], row["image"].mode, row["image"].tobytes()) for row in dataset]


def test_second_call_reads_the_cache_without_downloading(fake_npm, tmp_path):
    """The first call downloads once per member (2); the second downloads nothing and gives equal rows."""
    first = emoji_captions(cache=tmp_path)
    assert fake_npm == [(PACKAGE, VERSION)] * 2
    second = emoji_captions(cache=tmp_path)
    assert len(fake_npm) == 2
    assert _rows(second) == _rows(first)


def test_rows_skip_missing_google_images_and_follow_sort_order(fake_npm, tmp_path):
    """GHOST (no Google image) is dropped; rows come in `sort_order` with code-point ids."""
    dataset = emoji_captions(cache=tmp_path)
    assert dataset.features == CAPTION_FEATURES
    assert dataset["id"] == ["emoji-1F600", "emoji-1F1E9-1F1EA"]
    assert emoji_captions(limit=1, cache=tmp_path)["id"] == ["emoji-1F600"]


def test_each_caption_names_the_emoji_in_its_crop(fake_npm, tmp_path):
    """A row's image is exactly its own cell (no padding, no neighbour), transparent parts white."""
    expected = {"emoji-1F600": ("grinning face", "Smileys & Emotion", COLORS[(0, 1)]),
                "emoji-1F1E9-1F1EA": ("Germany flag", "Flags", COLORS[(1, 0)])}  # fmt: skip
    for row in emoji_captions(cache=tmp_path):
        name, category, color = expected[row["id"]]
        assert name.lower() in row["caption"].lower() and category in row["caption"]
        pixels = np.asarray(row["image"])
        assert row["image"].mode == "RGB" and pixels.shape == (64, 64, 3)
        assert (pixels[:HOLE, :HOLE] == 255).all()
        # Every other pixel has the cell's colour: a crop shifted by even one pixel takes in a
        # transparent (so white) padding row or column.
        assert (pixels == color).all(axis=-1).sum() == 64 * 64 - HOLE * HOLE


def test_captions_are_deterministic_for_a_seed(fake_npm, tmp_path):
    """The same seed gives the same captions; over several seeds a row gets more than one template."""
    assert emoji_captions(seed=3, cache=tmp_path)["caption"] == emoji_captions(seed=3, cache=tmp_path)["caption"]
    seen = {emoji_captions(seed=seed, cache=tmp_path)["caption"][0] for seed in range(8)}
    assert len(seen) > 1
    assert seen <= {t.format(name="grinning face", Name="Grinning face", category="Smileys & Emotion")
                    for t in CAPTION_TEMPLATES}  # fmt: skip


def test_display_name_lowercases_unicode_names_and_keeps_country_capitals():
    """Unicode names lose their capitals; country flags keep them except in "flag"."""
    assert display_name("GRINNING FACE") == "grinning face"
    assert display_name("KEYCAP: *") == "keycap: *"
    assert display_name("Côte d’Ivoire Flag") == "Côte d’Ivoire flag"
    assert display_name("WAVING WHITE FLAG") == "waving white flag"


def test_a_sheet_of_the_wrong_layout_is_refused(monkeypatch, tmp_path):
    """A sheet that is not a grid of 66 px cells raises instead of giving shifted crops."""
    buffer = io.BytesIO()
    Image.new("RGBA", (128, 128)).save(buffer, format="PNG")  # 2x2 cells of 64 px, no padding
    _fake_npm(monkeypatch, _members(sheet=buffer.getvalue()))
    with pytest.raises(ValueError, match="66 px cells"):
        emoji_captions(cache=tmp_path)


def test_failed_fetch_names_the_package_and_the_manual_command(monkeypatch, tmp_path):
    """When npm cannot be reached, AssetFetchError says which package and what to run by hand."""

    def offline(package, version, dest):
        raise subprocess.CalledProcessError(1, ["npm", "pack"], stderr="npm error code ENOTFOUND\n")

    monkeypatch.setattr(assets, "_npm_pack", offline)
    with pytest.raises(AssetFetchError) as error:
        emoji_captions(cache=tmp_path)
    message = str(error.value)
    assert f"{PACKAGE}@{VERSION}" in message
    assert f"npm pack {PACKAGE}@{VERSION}" in message
    assert "ENOTFOUND" in message


@pytest.mark.slow
def test_real_sheet_has_the_measured_layout():
    """In the real sheet every emoji's 64 px image sits inside a fully transparent 1 px ring."""
    sheet_path = assets.npm_file(PACKAGE, VERSION, "package/img/google/sheets-clean/64.png")
    entries = json.loads(assets.npm_file(PACKAGE, VERSION, "package/emoji.json").read_text(encoding="utf-8"))
    alpha = np.asarray(Image.open(sheet_path).convert("RGBA"))[..., 3]
    for entry in (e for e in entries if e["has_img_google"]):
        left, top = 66 * entry["sheet_x"], 66 * entry["sheet_y"]
        cell = alpha[top : top + 66, left : left + 66]
        assert cell[1:-1, 1:-1].any(), entry["name"]
        assert not cell[[0, -1]].any() and not cell[:, [0, -1]].any(), entry["name"]

    dataset = emoji_captions()
    assert len(dataset) == sum(e["has_img_google"] for e in entries)  # 1,911 in 16.0.0
    row = dataset[dataset["id"].index("emoji-1F600")]
    assert "grinning face" in row["caption"].lower()
    r, g, b = np.asarray(row["image"], dtype=int)[32, 32]  # the middle of the face is yellow
    assert r > 200 and g > 150 and b < 100


def test_emoji_stage1_batch_gives_finite_loss(fake_npm, tmp_path, built):
    """A stage-1 batch of emoji captions runs through the tiny model with a finite loss on the captions."""
    import torch

    from hf_vlm.data import CaptionCollator

    model, processor = built
    rows = list(emoji_captions(cache=tmp_path))
    batch = CaptionCollator(processor)(rows)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)
    kept = batch["labels"][0][batch["labels"][0] != -100]
    assert processor.tokenizer.decode(kept) == rows[0]["caption"] + "<|im_end|>"
