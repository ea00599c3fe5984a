"""Training data by name or location, as the training scripts' `--dataset` takes it.

A source is one of:

- a built-in name (`CAPTION_SOURCES`, `CONVERSATION_SOURCES`);
- a JSON list or JSON Lines file: LLaVA records (`conversations`), TRL rows (`messages`), the_cauldron rows
  (`texts`), or caption rows (`image` + `caption`), told apart by the first record's keys;
- a folder written by `Dataset.save_to_disk` (a `DatasetDict` gives `split`);
- a Hub dataset id, or a local folder of data files, read with `datasets.load_dataset(source, split=split)`.

Whatever the source, rows are validated (`hf_vlm.data.llava`) and come out in the caption or conversation shape.
Evaluation takes either shape from one location (`any_dataset`) and may read columns the loaders drop
(`source_columns`, e.g. reference `answers`).
"""

import os
from pathlib import Path

from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset, load_from_disk

from ..paths import is_hub_id
from .easy_vqa import easy_vqa_balanced, easy_vqa_captions, easy_vqa_conversations, easy_vqa_dialogues
from .llava import (
    _read_records,
    _sample_id,
    first_record,
    load_captions,
    load_conversations,
    load_llava_instruct,
    load_llava_pretrain,
)
from .synthetic import synthetic_captions

CAPTION_SOURCES = ("easy_vqa", "synthetic", "emoji")
CONVERSATION_SOURCES = ("easy_vqa", "easy_vqa_balanced", "easy_vqa_dialogues")
_CONVERSATION_KEYS = ("conversations", "messages", "texts")


def caption_dataset(
    sources: str,
    split: str = "train",
    max_samples: int | None = None,
    seed: int = 0,
    image_folder: str | None = None,
    on_error: str = "raise",
) -> Dataset:
    """Caption-shape data for stage 1: comma-separated sources (names from `CAPTION_SOURCES`, or any location above).

    Several sources are concatenated and shuffled with `seed`; `max_samples` keeps the first rows after that.
    `synthetic` renders as many scenes as `max_samples` asks for (1,000 without it). `on_error` goes to the loaders.
    """
    parts = []
    for source in sources.split(","):
        if source == "easy_vqa":
            parts.append(easy_vqa_captions(split, seed=seed))
        elif source == "synthetic":
            parts.append(synthetic_captions(max_samples or 1000, seed=seed))
        elif source == "emoji":  # fetched from npm by the offline asset cache, imported only when named
            from ..offline.emoji import emoji_captions

            parts.append(emoji_captions(seed=seed))
        else:
            parts.append(_load(source, split, image_folder, on_error, captions=True))
    return _take(concatenate_datasets(parts), max_samples, seed)


def conversation_dataset(
    source: str,
    split: str = "train",
    max_samples: int | None = None,
    seed: int = 0,
    image_folder: str | None = None,
    on_error: str = "raise",
) -> Dataset:
    """Conversation-shape data for stage 2: a name in `CONVERSATION_SOURCES`, or any location above.

    Adds a `length` column (characters of message text), which `train_sampling_strategy: group_by_length`
    uses to batch conversations of similar length and so pad less. Do not use it on short-answer data such as
    easy-VQA: the length then sorts by the answer ("no" < "yes" < "red" < "yellow"), every batch holds one
    answer, and the model learns to repeat the last batch's answer instead of looking at the image
    (measured: yes/no at or below the blind baseline; `docs/recipe.md`).
    """
    if source == "easy_vqa":
        dataset = easy_vqa_conversations(split)
    elif source == "easy_vqa_balanced":
        dataset = easy_vqa_balanced(split, seed=seed)
    elif source == "easy_vqa_dialogues":
        dataset = easy_vqa_dialogues(split, seed=seed)
    else:
        dataset = _load(source, split, image_folder, on_error, captions=False)
    dataset = _take(dataset, max_samples, seed)
    return dataset.map(lambda messages: {"length": _text_length(messages)}, input_columns=["messages"])


def any_dataset(
    source: str, split: str = "train", image_folder: str | None = None, on_error: str = "raise"
) -> Dataset:
    """Caption- or conversation-shape data, whichever the location `source` (any of the above but a name) holds.

    The shape is told apart as the stages tell their formats apart: LLaVA records (LLaVA-Pretrain's included), TRL
    and the_cauldron rows come out as conversations, `image` + `caption` rows as captions.
    """
    return _load(source, split, image_folder, on_error, captions=None)


def source_columns(source: str, split: str, names) -> dict[str, dict]:
    """`{name: {sample id: value}}` for those of the columns (record keys) `names` that `source` has.

    The loaders keep only their shape's columns; this reads others (evaluation's `answers`) from the same rows.
    Ids are the loaders' (`id`, else the row's index), so the values join loaded rows even after skipped samples.
    """
    if os.path.isfile(source):
        records = _read_records(source, None)[0]
        present = [name for name in names if any(isinstance(record, dict) and name in record for record in records)]
    else:
        rows = _rows(source, split, CAPTION_SOURCES + CONVERSATION_SOURCES)
        present = [name for name in names if name in rows.column_names]
        records = rows.select_columns(present + ["id"] * ("id" in rows.column_names)) if present else []
    columns = {name: {} for name in present}
    for index, record in enumerate(records):
        sample_id = _sample_id(record, index)
        for name in present:
            if sample_id in columns[name]:
                raise ValueError(f"{source}: the id {sample_id!r} occurs twice, so its {name!r} cannot be told apart.")
            columns[name][sample_id] = record.get(name) if isinstance(record, dict) else None
    return columns


def _load(source: str, split: str, image_folder, on_error: str, *, captions: bool | None) -> Dataset:
    """Validated rows of a location; `captions`: the caption shape, the conversation shape, or (None) either."""
    if os.path.isfile(source):
        return _load_file(source, image_folder, on_error, captions)
    names = {True: CAPTION_SOURCES, False: CONVERSATION_SOURCES, None: ()}[captions]
    rows = _rows(source, split, names)
    columns = set(rows.column_names)
    if captions is not False and {"image", "caption"} <= columns:
        return load_captions(rows, image_folder, on_error=on_error)
    if captions is not True and ("messages" in columns or "texts" in columns):
        return load_conversations(rows, image_folder, on_error=on_error)
    wanted = {
        True: "'image' and 'caption' columns",
        False: "a 'messages' (TRL) or 'texts' (the_cauldron) column",
        None: "a 'messages' (TRL) or 'texts' (the_cauldron) column, or 'image' and 'caption' columns",
    }[captions]
    hint = " (conversations: use train_stage2.py)" if captions and columns & set(_CONVERSATION_KEYS) else ""
    raise ValueError(f"{source}: expected {wanted}{hint}; its columns are {sorted(columns)}.")


def _rows(source: str, split: str, names) -> Dataset:
    """The raw rows of a folder or Hub id; `names` are the source names that error messages offer."""
    if os.path.isdir(source):
        return _load_folder(source, split)
    listed = ", ".join(names)
    if _looks_like_path(source):
        kinds = f"one of {listed}, a file, a folder or a Hub id" if names else "a file, a folder or a Hub id"
        raise FileNotFoundError(f"No such file or folder: {source!r} (a dataset source is {kinds}).")
    try:
        return load_dataset(source, split=split)
    except Exception as error:  # datasets raises many kinds (not found, offline, no such split)
        kinds = f"a source name ({listed}), a file or a folder" if names else "a file or a folder"
        raise ValueError(
            f"{source!r} is not {kinds}, and loading it as a Hub dataset (split {split!r}) failed: {error}"
        ) from error


def _load_file(path: str, image_folder, on_error: str, captions: bool | None) -> Dataset:
    record = first_record(path)
    keys = set(record) if isinstance(record, dict) else set()
    if record is None or "conversations" in keys:  # LLaVA, and the loader's own errors for an unreadable file
        loader = load_llava_pretrain if captions else load_llava_instruct
    elif captions is not False and {"image", "caption"} <= keys:
        loader = load_captions
    elif captions is not True and keys & {"messages", "texts"}:
        loader = load_conversations
    else:
        wanted = {
            True: "LLaVA-Pretrain records ('conversations') or caption rows ('image', 'caption')",
            False: "LLaVA records ('conversations'), TRL rows ('messages') or the_cauldron rows ('texts')",
            None: "LLaVA records ('conversations'), TRL rows ('messages'), the_cauldron rows ('texts') or caption "
            "rows ('image', 'caption')",
        }[captions]
        raise ValueError(f"{path}: expected {wanted}; the first record has keys {sorted(keys)}.")
    return loader(path, image_folder, on_error=on_error)


def _load_folder(folder: str, split: str) -> Dataset:
    """A `save_to_disk` folder (the `split` of a DatasetDict), else a folder of data files as `load_dataset` reads it."""
    if not any((Path(folder) / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
        return load_dataset(folder, split=split)
    saved = load_from_disk(folder)
    if isinstance(saved, DatasetDict):
        if split not in saved:
            raise ValueError(f"{folder} holds the splits {list(saved)}, not {split!r}.")
        return saved[split]
    return saved


def _looks_like_path(source: str) -> bool:
    """A name meant as a local path: not a valid Hub repo id, or a data file's name."""
    return not is_hub_id(source) or source.endswith((".json", ".jsonl"))


def _text_length(messages: list[dict]) -> int:
    return sum(len(block["text"] or "") for message in messages for block in message["content"])


def _take(dataset: Dataset, max_samples: int | None, seed: int) -> Dataset:
    dataset = dataset.shuffle(seed=seed)
    return dataset.select(range(min(max_samples, len(dataset)))) if max_samples else dataset
