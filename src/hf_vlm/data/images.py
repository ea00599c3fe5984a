"""Image loading for the data loaders: every image becomes RGB, every failure a `BadSampleError`.

Decisions, each checked by a test:

- Transparency (`RGBA`, `LA`, `PA`, `P` or `L` or `RGB` with a transparency key) is composited
  onto white. A plain `convert("RGB")` drops alpha and shows whatever colour the transparent
  pixels happen to store, often black.
- 16-bit greyscale (`I;16*`, and `I`, which is how Pillow often opens 16-bit files) is scaled
  0..65535 -> 0..255. `convert("L")` clips instead, so most of a 16-bit image turns white.
  `F` (float) follows Pillow's own convention of a 0..255 range and is clipped to it.
- `CMYK`, `L`, `1`, `YCbCr`, `HSV`, `LAB` go through Pillow's converters.
- EXIF orientation is applied, as `datasets.Image` does when it decodes a file.
- Tiny images (even 1x1) are accepted: they are valid images, and transformers' image processors
  resize them like any other (checked with SigLIP and CLIP processors in transformers 5.24 at
  1x1, 1x5 and 5x3). Whether a 1x1 picture deserves its caption is a question about the data
  source, not something a loader can decide.
- More than `PIL.Image.MAX_IMAGE_PIXELS` pixels is an error (`image_too_large`). Pillow itself
  only warns between 1x and 2x that limit, and a warning does not stop a run.
- A missing file, an unidentifiable file, and a file that fails to decode (e.g. truncated) are
  errors, found while the dataset is built rather than at training step N.
- A converted image is stored as PNG bytes whose `source_mode` text chunk keeps the mode it came in
  (`source_mode(entry bytes)`), so a later audit (`hf_vlm.doctor`) can say which images were converted.
"""

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from .schema import BadSampleError

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """Return `image` as an RGB image of the same size (the input itself if it is plain RGB)."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)  # 65535 / 255 = 257
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "F":
        grey = np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")


def _is_plain_rgb(image: Image.Image) -> bool:
    # A file that decodes to this needs no conversion, so the dataset can keep its path and let
    # `datasets.Image` decode it lazily (it applies the EXIF orientation itself).
    return image.mode == "RGB" and "transparency" not in image.info


def _open(source, sample_id) -> Image.Image:
    """Open a path or bytes with Pillow, mapping every failure to a BadSampleError."""
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise BadSampleError(sample_id, "missing_image", f"no such file: {os.fspath(source)}")
        where = os.fspath(source)
    else:
        where = "image bytes"
        source = io.BytesIO(source)
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; make it an error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(source)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
            raise BadSampleError(sample_id, "image_too_large", f"{where}: {error}") from None
        except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise BadSampleError(sample_id, "corrupt_image", f"{where}: {error}") from None


def _check_pixels(image: Image.Image, sample_id) -> None:
    # Images handed over already decoded never went through Image.open's check.
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise BadSampleError(
            sample_id, "image_too_large", f"{width}x{height} = {width * height} pixels, over the limit of {limit}"
        )


def _decode(image: Image.Image, sample_id, where: str) -> Image.Image:
    """Fully decode an opened image and return it as RGB with EXIF orientation applied."""
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise BadSampleError(sample_id, "corrupt_image", f"{where}: {error}") from None
    try:
        return to_rgb(image)
    except (ValueError, OSError) as error:
        raise BadSampleError(sample_id, "unsupported_image", f"{where}: mode {image.mode}: {error}") from None


def load_image(source, sample_id="?") -> Image.Image:
    """Load one image as a decoded RGB `PIL.Image`.

    `source` is a file path, the bytes of an image file, a `{"bytes": ..., "path": ...}` dict as
    `datasets` stores images, or a `PIL.Image`. Raises `BadSampleError` naming `sample_id` when
    the image is missing, corrupt, too large or in a mode that cannot become RGB.
    """
    if isinstance(source, Image.Image):
        _check_pixels(source, sample_id)
        return _decode(source, sample_id, "image")
    if isinstance(source, dict):
        source = source["bytes"] if source.get("bytes") is not None else source.get("path")
        if source is None:
            raise BadSampleError(sample_id, "missing_image", "image entry has neither bytes nor path")
    with _open(source, sample_id) as image:
        _check_pixels(image, sample_id)
        rgb = _decode(image, sample_id, getattr(image, "filename", "") or "image bytes")
        # Leaving the `with` closes `image`; hand back pixels that do not depend on it.
        return rgb.copy() if rgb is image else rgb


def image_entry(source, sample_id, decode: bool = True) -> dict:
    """Validate one image and return the `{"bytes", "path"}` dict a `datasets.Image` column stores.

    A plain RGB file is kept by reference (its absolute path, or its original bytes), so building a
    dataset copies no pixels; anything else is converted with `to_rgb` and stored as PNG bytes.
    With `decode=True` every image is decoded once here, which is what catches truncated files;
    `decode=False` only reads headers (fast, but a truncated plain RGB file then fails at training).
    """
    if isinstance(source, dict):
        if source.get("bytes") is None and source.get("path") is None:
            raise BadSampleError(sample_id, "missing_image", "image entry has neither bytes nor path")
        if source.get("bytes") is not None:
            source = source["bytes"]
        else:
            source = source["path"]
    if isinstance(source, Image.Image):
        return {"bytes": _png_bytes(load_image(source, sample_id), source.mode), "path": None}
    with _open(source, sample_id) as image:
        _check_pixels(image, sample_id)
        plain = _is_plain_rgb(image)
        if plain and not decode:
            return _reference(source)
        where = getattr(image, "filename", "") or "image bytes"
        mode = image.mode
        rgb = _decode(image, sample_id, where)
    if plain:
        return _reference(source)
    return {"bytes": _png_bytes(rgb, mode), "path": None}


def _reference(source) -> dict:
    if isinstance(source, (str, os.PathLike)):
        return {"bytes": None, "path": os.path.abspath(source)}
    return {"bytes": bytes(source), "path": None}


def source_mode(data: bytes) -> str:
    """The mode an image file arrived in: `image_entry`'s record for a converted one, else the file's own mode."""
    with Image.open(io.BytesIO(data)) as image:  # reads the header and text chunks, not the pixels
        return image.info.get("source_mode", image.mode)


def _png_bytes(image: Image.Image, mode: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("source_mode", mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
