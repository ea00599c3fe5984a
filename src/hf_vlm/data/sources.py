"""Training data by name, as the training scripts and recipes refer to it."""

import os

from datasets import Dataset, concatenate_datasets

from .easy_vqa import easy_vqa_balanced, easy_vqa_captions, easy_vqa_conversations, easy_vqa_dialogues
from .llava import load_llava_instruct, load_llava_pretrain
from .synthetic import synthetic_captions

CAPTION_SOURCES = ("easy_vqa", "synthetic", "emoji")
CONVERSATION_SOURCES = ("easy_vqa", "easy_vqa_balanced", "easy_vqa_dialogues")


def caption_dataset(sources: str, split: str = "train", max_samples: int | None = None, seed: int = 0, image_folder: str | None = None) -> Dataset:
    """Caption-shape data for stage 1: comma-separated names from `CAPTION_SOURCES`, or a LLaVA-Pretrain JSON path.

    Several names are concatenated and shuffled with `seed`; `max_samples` keeps the first rows after that.
    `synthetic` renders as many scenes as `max_samples` asks for (1,000 without it).
    """
    parts = []
    for source in sources.split(","):
        if source == "easy_vqa":
            parts.append(easy_vqa_captions(split, seed=seed))
        elif source == "synthetic":
            parts.append(synthetic_captions(max_samples or 1000, seed=seed))
        elif source == "emoji":
            from .emoji import emoji_captions

            parts.append(emoji_captions(seed=seed))
        elif os.path.isfile(source):
            parts.append(load_llava_pretrain(source, image_folder))
        else:
            raise ValueError(f"Unknown caption source {source!r}: use {', '.join(CAPTION_SOURCES)} or a LLaVA-Pretrain JSON file.")
    return _take(concatenate_datasets(parts), max_samples, seed)


def conversation_dataset(source: str, split: str = "train", max_samples: int | None = None, seed: int = 0, image_folder: str | None = None) -> Dataset:
    """Conversation-shape data for stage 2: a name in `CONVERSATION_SOURCES` or a LLaVA-Instruct JSON/JSONL file.

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
    elif os.path.isfile(source):
        dataset = load_llava_instruct(source, image_folder)
    else:
        raise ValueError(f"Unknown conversation source {source!r}: use {', '.join(CONVERSATION_SOURCES)} or a LLaVA-Instruct JSON/JSONL file.")
    dataset = _take(dataset, max_samples, seed)
    return dataset.map(lambda messages: {"length": _text_length(messages)}, input_columns=["messages"])


def _text_length(messages: list[dict]) -> int:
    return sum(len(block["text"] or "") for message in messages for block in message["content"])


def _take(dataset: Dataset, max_samples: int | None, seed: int) -> Dataset:
    dataset = dataset.shuffle(seed=seed)
    return dataset.select(range(min(max_samples, len(dataset)))) if max_samples else dataset
