"""Training data by name or location, as the training scripts' `--dataset` takes it.

A source is one of:

- a built-in name (`CAPTION_SOURCES`, `CONVERSATION_SOURCES`);
- a JSON list or JSON Lines file: LLaVA records (`conversations`), TRL rows (`messages`), the_cauldron rows
  (`texts`), or caption rows (`image` + `caption`), told apart by the first record's keys;
- a folder written by `Dataset.save_to_disk` (a `DatasetDict` gives `split`);
- a Hub dataset id, or a local folder of data files, read with `datasets.load_dataset(source, split=split)`.

Whatever the source, rows are validated (`hf_vlm.data.llava`) and come out in the caption or conversation shape.
"""

import os
from pathlib import Path

from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset, load_from_disk

from ..paths import is_hub_id
from .easy_vqa import easy_vqa_balanced, easy_vqa_captions, easy_vqa_conversations, easy_vqa_dialogues
from .llava import first_record, load_captions, load_conversations, load_llava_instruct, load_llava_pretrain
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


def _load(source: str, split: str, image_folder, on_error: str, *, captions: bool) -> Dataset:
    names = CAPTION_SOURCES if captions else CONVERSATION_SOURCES
    if os.path.isfile(source):
        return _load_file(source, image_folder, on_error, captions)
    if os.path.isdir(source):
        rows = _load_folder(source, split)
    elif _looks_like_path(source):
        raise FileNotFoundError(
            f"No such file or folder: {source!r} (a dataset source is one of {', '.join(names)}, a file, a folder or a Hub id)."
        )
    else:
        try:
            rows = load_dataset(source, split=split)
        except Exception as error:  # datasets raises many kinds (not found, offline, no such split)
            raise ValueError(
                f"{source!r} is not a source name ({', '.join(names)}), a file or a folder, and loading it as a Hub "
                f"dataset (split {split!r}) failed: {error}"
            ) from error
    columns = set(rows.column_names)
    if captions and {"image", "caption"} <= columns:
        return load_captions(rows, image_folder, on_error=on_error)
    if not captions and ("messages" in columns or "texts" in columns):
        return load_conversations(rows, image_folder, on_error=on_error)
    wanted = "'image' and 'caption' columns" if captions else "a 'messages' (TRL) or 'texts' (the_cauldron) column"
    hint = " (conversations: use train_stage2.py)" if captions and columns & set(_CONVERSATION_KEYS) else ""
    raise ValueError(f"{source}: expected {wanted}{hint}; its columns are {sorted(columns)}.")


def _load_file(path: str, image_folder, on_error: str, captions: bool) -> Dataset:
    record = first_record(path)
    keys = set(record) if isinstance(record, dict) else set()
    if record is None or "conversations" in keys:  # LLaVA, and the loader's own errors for an unreadable file
        loader = load_llava_pretrain if captions else load_llava_instruct
    elif captions and {"image", "caption"} <= keys:
        loader = load_captions
    elif not captions and keys & {"messages", "texts"}:
        loader = load_conversations
    else:
        wanted = (
            "LLaVA-Pretrain records ('conversations') or caption rows ('image', 'caption')"
            if captions
            else ("LLaVA records ('conversations'), TRL rows ('messages') or the_cauldron rows ('texts')")
        )
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
