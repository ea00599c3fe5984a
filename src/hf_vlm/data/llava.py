"""Loaders for LLaVA-style JSON and TRL-style conversations, into hf_vlm's two dataset shapes.

- `load_llava_pretrain`: LLaVA-Pretrain records (`blip_laion_cc_sbu_558k.json`) -> caption shape.
- `load_llava_instruct`: LLaVA-Instruct records (`llava_v1_5_mix665k.json`, multi-turn, text-only
  samples allowed) -> conversation shape.
- `load_conversations`: rows already in TRL's `images` + `messages` shape, or the_cauldron's
  `images` + `texts` shape -> validated conversation shape.
- `load_captions`: rows already in the caption shape (`image`, `caption`) -> validated caption shape.

A LLaVA record is::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

`"image"` may also be a list of paths (one per `<image>`), or absent for a text-only sample.
Files are a JSON list or JSON Lines (one record per line), whatever their extension. Relative image paths are
resolved against `image_folder`, which defaults to the JSON file's folder.

Every sample is validated while the dataset is built (structure, text, and each image opened and,
with `decode_images=True`, fully decoded), so a bad sample is reported by id before training
starts. With `on_error="raise"` (default) the first bad sample raises `BadSampleError`; with
`on_error="skip"` bad samples are dropped and one `SkippedSamplesWarning` counts them by reason.
Validation shows a progress bar and is cached (`hf_vlm.data.cache`): a second load of the same file with the
same options reads the stored result.
"""

import json
import os
import re
from pathlib import Path

from datasets import Dataset, Image, List
from tqdm.auto import tqdm

from .cache import cached_validation, file_key
from .images import image_entry
from .schema import CAPTION_FEATURES, CONVERSATION_FEATURES, ROLES, BadSampleError, SampleErrors

# The placeholder with the whitespace around it: "<image>\nDescribe." -> ["", "Describe."].
_PLACEHOLDER = re.compile(r"\s*<image>\s*")
_LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def load_llava_pretrain(
    path, image_folder=None, *, on_error: str = "raise", decode_images: bool = True, cache: bool = True
) -> Dataset:
    """LLaVA-Pretrain records -> Dataset with `CAPTION_FEATURES`.

    Each record must have one image and two turns: a human prompt holding one `<image>` (the
    prompt text itself is dropped) and a gpt turn, which becomes the caption (stripped, non-empty).
    With `cache=True` the validated rows are kept (`hf_vlm.data.cache`) and a second call with the same
    file and options reads them instead of validating again.
    """

    def row(record, index, folder):
        sample_id, messages, image_paths = _llava_record(record, index, folder)
        if len(messages) != 2:
            raise BadSampleError(sample_id, "bad_format", f"expected 2 turns (human, gpt), got {len(messages)}")
        _check_conversation(messages, len(image_paths), sample_id)
        if len(image_paths) != 1:
            raise BadSampleError(sample_id, "image_count_mismatch", f"expected 1 image, got {len(image_paths)}")
        entry = image_entry(image_paths[0], sample_id, decode=decode_images)
        return {"id": sample_id, "image": entry, "caption": messages[1]["content"][0]["text"].strip()}

    return _load_rows("llava_pretrain", path, image_folder, CAPTION_FEATURES, row, on_error, decode_images, cache)


def load_llava_instruct(
    path, image_folder=None, *, on_error: str = "raise", decode_images: bool = True, cache: bool = True
) -> Dataset:
    """LLaVA-Instruct records -> Dataset with `CONVERSATION_FEATURES`.

    Turns map human -> user, gpt -> assistant, system -> system. Each `<image>` becomes an image
    block at its place in the text, and the placeholder and the whitespace around it are removed
    ("<image>\\nWhat is this?" -> [image, "What is this?"]). The number of placeholders must equal
    the number of images; records without "image" are text-only rows with `images == []`.
    `cache` as in `load_llava_pretrain`.
    """

    def row(record, index, folder):
        sample_id, messages, image_paths = _llava_record(record, index, folder)
        _check_conversation(messages, len(image_paths), sample_id)
        return {
            "id": sample_id,
            "images": [image_entry(p, sample_id, decode=decode_images) for p in image_paths],
            "messages": messages,
        }

    return _load_rows("llava_instruct", path, image_folder, CONVERSATION_FEATURES, row, on_error, decode_images, cache)


def load_conversations(
    source, image_folder=None, *, on_error: str = "raise", decode_images: bool = True, cache: bool = True
) -> Dataset:
    """Rows in TRL's or the_cauldron's shape -> validated Dataset with `CONVERSATION_FEATURES`.

    `source` is a `datasets.Dataset`, a list of dicts, or a path to a JSON list / JSONL file. Each
    row has `images` (PIL images, file paths, or `{"bytes", "path"}` dicts; may be empty) and
    either `messages` (TRL) or `texts` (the_cauldron: `[{"user": ..., "assistant": ...}, ...]`),
    and optionally `id` (default: the row index). TRL's rules apply: content may be a string, and
    the first user message with string content gets one image block per image in front of its
    text; otherwise image blocks stand where they are. the_cauldron's images go before the first
    user text. Other columns and block keys are dropped; non-RGB images are converted. Text is kept
    as written, special tokens included: training encodes them as plain text, as inference does.
    With `cache=True` a file or a `Dataset` (by its fingerprint) is validated once (`hf_vlm.data.cache`).
    """
    if isinstance(source, Dataset) and "images" in source.column_names:
        # Read the stored bytes/paths; decoding every image just to re-encode it is wasted work.
        source = source.cast_column("images", List(Image(decode=False)))

    def row(record, index, folder):
        sample_id = _sample_id(record, index)
        messages, images = _trl_record(record, sample_id)
        _check_conversation(messages, len(images), sample_id)
        entries = [image_entry(_resolve(image, folder), sample_id, decode=decode_images) for image in images]
        return {"id": sample_id, "images": entries, "messages": messages}

    return _load_rows(
        "conversations", source, image_folder, CONVERSATION_FEATURES, row, on_error, decode_images, cache
    )


def load_captions(
    source, image_folder=None, *, on_error: str = "raise", decode_images: bool = True, cache: bool = True
) -> Dataset:
    """Rows already in the caption shape (`image`, `caption`, optional `id`) -> validated `CAPTION_FEATURES`.

    `source` is a `datasets.Dataset` (e.g. `load_from_disk` of a saved caption set, or `load_dataset` of one
    pushed with `Dataset.push_to_hub`), a list of dicts, or a JSON / JSON Lines file of such rows. Images are
    checked as everywhere (`hf_vlm.data.images`); captions must be non-blank strings and are stripped.
    """
    if isinstance(source, Dataset):
        if not {"image", "caption"} <= set(source.column_names):
            raise ValueError(
                f"Caption rows need 'image' and 'caption' columns; this dataset has {source.column_names}."
            )
        source = source.cast_column("image", Image(decode=False))

    def row(record, index, folder):
        sample_id = _sample_id(record, index)
        if not isinstance(record, dict) or "image" not in record or "caption" not in record:
            raise BadSampleError(sample_id, "bad_format", "expected a dict with 'image' and 'caption'")
        caption = record["caption"]
        if not isinstance(caption, str) or not caption.strip():
            raise BadSampleError(sample_id, "empty_text", f"the caption must be a non-blank string, got {caption!r}")
        entry = image_entry(_resolve(record["image"], folder), sample_id, decode=decode_images)
        return {"id": sample_id, "image": entry, "caption": caption.strip()}

    return _load_rows("captions", source, image_folder, CAPTION_FEATURES, row, on_error, decode_images, cache)


def first_record(path, prefix_bytes: int = 1 << 20):
    """The first record of a JSON list or JSON Lines data file (None if unreadable), read from its first MiB when
    the record fits there, so that telling formats apart does not read a large file twice.

    Tells the formats apart before choosing a loader; the loader reports what is wrong with an unreadable file.
    """
    with open(path, "rb") as file:
        head = file.read(prefix_bytes)
    record = _parse_first_record(head)
    if record is None and len(head) == prefix_bytes:  # the first record may run past the prefix
        record = _parse_first_record(Path(path).read_bytes())
    return record


def _parse_first_record(data: bytes):
    """The first record in the start of a data file, or None when it does not parse (a cut record included)."""
    try:
        text = data.decode("utf-8-sig").lstrip()
        if text.startswith("["):
            start = len(text) - len(text[1:].lstrip())
            return json.JSONDecoder().raw_decode(text, start)[0]
        return json.loads(text.splitlines()[0])
    except (UnicodeDecodeError, ValueError, IndexError):
        return None


def _sample_id(record, index: int) -> str:
    """A record's `id` as a string, else its index in the file."""
    return str(record.get("id", index)) if isinstance(record, dict) else str(index)


def _load_rows(
    kind: str, source, image_folder, features, make_row, on_error: str, decode_images: bool, cache: bool
) -> Dataset:
    """Validate the records of `source` (a file, a `Dataset` or a list) with `make_row(record, index, folder)`.

    Files and `Dataset`s are validated once: the result is cached under a key of the source and the options.
    """
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise FileNotFoundError(f"No such data file: {os.fspath(source)}")
    key = None
    if cache and isinstance(source, Dataset):
        key = {"fingerprint": source._fingerprint}
    elif cache and isinstance(source, (str, os.PathLike)):
        key = file_key(source)
    if key is not None:
        key |= {
            "image_folder": image_folder and os.path.abspath(image_folder),
            "on_error": on_error,
            "decode_images": decode_images,
        }

    def build():
        records, folder = source, image_folder
        if isinstance(source, (str, os.PathLike)):
            records, folder = _read_records(source, image_folder)
        return _validate(records, lambda record, index: make_row(record, index, folder), on_error, _desc(source))

    return cached_validation(kind, key, features, build)


def _validate(records, make_row, on_error: str, desc: str):
    """Run `make_row(record, index)` over the records with a progress bar: (columns, errors, total)."""
    errors = SampleErrors(on_error)
    columns: dict[str, list] = {}
    total = 0
    for index, record in enumerate(tqdm(records, desc=desc, mininterval=2)):
        total += 1
        try:
            row = make_row(record, index)
        except BadSampleError as error:
            errors.handle(error)
            continue
        for name, value in row.items():
            columns.setdefault(name, []).append(value)
    return columns, errors, total


def _desc(source) -> str:
    name = os.path.basename(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else "rows"
    return f"validating {name}"


def _read_records(path, image_folder):
    """Records from a JSON list or JSON Lines file, and the folder relative image paths start from.

    The content decides the format, whatever the extension: a file starting with `[` is a JSON list, else
    one JSON object per line. A UTF-8 byte order mark is accepted. Every decode error names the file (and the
    line, for JSON Lines).
    """
    path = os.fspath(path)
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{path}, line {line}: not UTF-8 text ({error.reason} at byte {error.start}); save the file as UTF-8."
        ) from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {error.lineno}: not valid JSON: {error.msg}") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"{path}, line {number}: not valid JSON Lines (one JSON object per line): {error.msg}"
                    ) from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a JSON list of records or one record per line, found no records")
    return records, image_folder if image_folder is not None else os.path.dirname(os.path.abspath(path))


def _resolve(image, image_folder):
    if isinstance(image, str) and image_folder is not None and not os.path.isabs(image):
        return os.path.join(image_folder, image)
    if isinstance(image, dict) and image.get("bytes") is None and isinstance(image.get("path"), str):
        return {"bytes": None, "path": _resolve(image["path"], image_folder)}
    return image


def _llava_record(record, index: int, image_folder):
    """Return `(sample_id, messages, image_paths)` for one LLaVA record, checking its structure."""
    sample_id = _sample_id(record, index)
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise BadSampleError(sample_id, "bad_format", "expected a dict with a 'conversations' list")
    images = record.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise BadSampleError(sample_id, "bad_format", f"'image' must be a path or a list of paths, got {images!r}")
    messages = []
    for turn in record["conversations"]:
        if (
            not isinstance(turn, dict)
            or turn.get("from") not in _LLAVA_ROLES
            or not isinstance(turn.get("value"), str)
        ):
            detail = f"each turn needs 'from' in {sorted(_LLAVA_ROLES)} and a string 'value': {turn!r}"
            raise BadSampleError(sample_id, "bad_format", detail)
        messages.append({"role": _LLAVA_ROLES[turn["from"]], "content": _split_placeholders(turn["value"])})
    return sample_id, messages, [_resolve(p, image_folder) for p in images]


def _split_placeholders(text: str) -> list[dict]:
    """ "<image>\\nWhat is it?" -> [{"type": "image", "text": None}, {"type": "text", "text": "What is it?"}]"""
    blocks = []
    for position, part in enumerate(_PLACEHOLDER.split(text)):
        if position > 0:
            blocks.append({"type": "image", "text": None})
        if part:
            blocks.append({"type": "text", "text": part})
    return blocks


def _trl_record(record, sample_id: str):
    """Return `(messages, images)` in our block form for one TRL or the_cauldron row."""
    if not isinstance(record, dict):
        raise BadSampleError(sample_id, "bad_format", f"expected a dict, got {type(record).__name__}")
    images = record.get("images") or []
    if not isinstance(images, list):
        raise BadSampleError(sample_id, "bad_format", f"'images' must be a list, got {type(images).__name__}")
    if "messages" in record:
        return _trl_messages(record["messages"], len(images), sample_id), images
    if "texts" in record:
        return _cauldron_messages(record["texts"], len(images), sample_id), images
    raise BadSampleError(sample_id, "bad_format", "expected a 'messages' (TRL) or 'texts' (the_cauldron) column")


def _trl_messages(messages, image_count: int, sample_id: str) -> list[dict]:
    if not isinstance(messages, list):
        raise BadSampleError(sample_id, "bad_format", "'messages' must be a list")
    result = []
    images_placed = False
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadSampleError(sample_id, "bad_format", f"each message needs a role in {ROLES}: {message!r}")
        content = message.get("content")
        if isinstance(content, str):
            blocks = [{"type": "text", "text": content}] if content else []
            # As trl.data_utils.prepare_multimodal_messages: images go before the first user string.
            if message["role"] == "user" and not images_placed:
                blocks = [{"type": "image", "text": None}] * image_count + blocks
                images_placed = True
        elif isinstance(content, list):
            blocks = [_block(block, sample_id) for block in content]
        else:
            raise BadSampleError(sample_id, "bad_format", f"content must be a string or a list: {content!r}")
        result.append({"role": message["role"], "content": blocks})
    return result


def _block(block, sample_id: str) -> dict:
    if not isinstance(block, dict) or block.get("type") not in ("image", "text"):
        raise BadSampleError(sample_id, "bad_format", f"content blocks have type 'image' or 'text': {block!r}")
    if block["type"] == "image":
        if block.get("image") is not None:
            raise BadSampleError(
                sample_id, "bad_format", "image blocks must not embed images; use the 'images' column"
            )
        return {"type": "image", "text": None}
    if not isinstance(block.get("text"), str):
        raise BadSampleError(sample_id, "bad_format", f"text block without a string 'text': {block!r}")
    return {"type": "text", "text": block["text"]}


def _cauldron_messages(texts, image_count: int, sample_id: str) -> list[dict]:
    if not isinstance(texts, list) or not all(isinstance(t, dict) for t in texts):
        raise BadSampleError(sample_id, "bad_format", "'texts' must be a list of {'user', 'assistant'} dicts")
    messages = []
    for turn, text in enumerate(texts):
        user, assistant = text.get("user"), text.get("assistant")
        if not isinstance(user, str) or not isinstance(assistant, str):
            raise BadSampleError(sample_id, "bad_format", f"turn {turn} needs string 'user' and 'assistant'")
        images = [{"type": "image", "text": None}] * image_count if turn == 0 else []
        messages.append({"role": "user", "content": images + ([{"type": "text", "text": user}] if user else [])})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": assistant}]})
    return messages


def _check_conversation(messages: list[dict], image_count: int, sample_id: str) -> None:
    """Check the rules every conversation row obeys; raise BadSampleError naming the first broken one.

    Roles: an optional system message, then user and assistant alternating, starting with user and
    ending with assistant. Image blocks only in user messages, as many as there are images.
    Every assistant message has non-blank text; every user message has text or an image.
    """
    roles = [message["role"] for message in messages]
    turns = roles[1:] if roles[:1] == ["system"] else roles
    expected = ["user", "assistant"] * (len(turns) // 2)
    if not turns or turns != expected:
        raise BadSampleError(
            sample_id, "bad_format", f"roles must be [system], user, assistant, user, ..., assistant; got {roles}"
        )
    placeholders = 0
    for turn, message in enumerate(messages):
        blocks = message["content"]
        images = sum(block["type"] == "image" for block in blocks)
        has_text = any(block["type"] == "text" and block["text"].strip() for block in blocks)
        if images and message["role"] != "user":
            raise BadSampleError(sample_id, "bad_format", f"turn {turn} ({message['role']}) holds an image")
        if not has_text and not images:
            raise BadSampleError(sample_id, "empty_text", f"turn {turn} ({message['role']}) has no text")
        placeholders += images
    if placeholders != image_count:
        raise BadSampleError(
            sample_id, "image_count_mismatch", f"{placeholders} image placeholder(s) but {image_count} image(s)"
        )
