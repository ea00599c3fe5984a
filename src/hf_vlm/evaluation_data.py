"""Evaluation rows from any source the training scripts take: conversations with their reference answers.

    dataset = evaluation_dataset("data/vqa.json", limit=500)  # LLaVA JSON, images beside it
    results = evaluate_answers(model, processor, dataset, "vqa_accuracy")  # hf_vlm.evaluation

A source is "easy_vqa" (its test split, the default), another name the training scripts take, or any location
`hf_vlm.data.sources` reads: a LLaVA, TRL, the_cauldron or caption-row JSON / JSONL file, a `save_to_disk` folder,
a folder of data files or a Hub id, in the conversation or the caption shape. Of the names, the easy-VQA ones read
`split` (default "test", never trained on); "synthetic" renders `limit` scenes from `seed`, the same scenes as a
training run with that seed (stage 1 uses 0, so evaluate with another); "emoji" has no held-out split. Rows come
out in the conversation shape plus `answers` (the references, a list of strings) and `question_type` (None where the
source has none).

Each conversation is asked its last assistant turn: the prompt is every turn before it (earlier answers included),
the reference is that turn's text, or the row's `answers` column where the source has one (VQA's ten annotators,
COCO's five captions). A caption row is asked as in stage 1 (`caption_to_conversation`), its caption the reference.
"""

from datasets import Dataset, List, Value

from .data.collators import caption_to_conversation
from .data.schema import CONVERSATION_FEATURES
from .data.sources import (
    CAPTION_SOURCES,
    CONVERSATION_SOURCES,
    any_dataset,
    caption_dataset,
    conversation_dataset,
    source_columns,
)
from .evaluation import easy_vqa_test_questions


def evaluation_dataset(
    source: str = "easy_vqa",
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    image_folder: str | None = None,
    on_error: str = "raise",
) -> Dataset:
    """The rows of `source` shuffled with `seed`, first `limit` (None: all), with `answers` and `question_type`.

    easy-VQA is `easy_vqa_test_questions(limit, seed)`; `split` and `image_folder` are the other sources'.
    `on_error` goes to the loaders. A value in an `answers` column is a string or a non-empty list of strings; a row
    whose value is missing (None) takes its last assistant turn.
    """
    if source == "easy_vqa":
        return easy_vqa_test_questions(limit, seed)
    columns = {}
    if source in CONVERSATION_SOURCES:
        dataset = conversation_dataset(source, split, limit, seed)
    elif source in CAPTION_SOURCES:
        dataset = caption_dataset(source, split, limit, seed)
    else:
        dataset = any_dataset(source, split, image_folder, on_error).shuffle(seed=seed)
        dataset = dataset if limit is None else dataset.select(range(min(limit, len(dataset))))
        columns = source_columns(source, split, ("answers", "question_type"))
    if "caption" in dataset.column_names:
        dataset = dataset.map(
            caption_to_conversation, remove_columns=dataset.column_names, features=CONVERSATION_FEATURES
        )
    given = columns.get("answers", {})
    answers = [
        _references(sample_id, given.get(sample_id), messages)
        for sample_id, messages in zip(dataset["id"], dataset["messages"])
    ]
    given_types = columns.get("question_type", {})
    types = (
        dataset["question_type"]
        if "question_type" in dataset.column_names
        else [given_types.get(i) for i in dataset["id"]]
    )
    dataset = dataset.select_columns(list(CONVERSATION_FEATURES))  # easy-VQA's `answer`, stage 2's `length` go
    dataset = dataset.add_column("answers", answers, feature=List(Value("string")))
    return dataset.add_column("question_type", types, feature=Value("string"))


def _references(sample_id: str, given, messages: list[dict]) -> list[str]:
    """The row's `answers` value as a list, else the text of its last turn (an assistant turn: the loaders check)."""
    if given is None:
        return [" ".join(block["text"].strip() for block in messages[-1]["content"] if block["type"] == "text")]
    answers = [given] if isinstance(given, str) else given
    if not isinstance(answers, list) or not answers or not all(isinstance(answer, str) for answer in answers):
        raise ValueError(f"sample {sample_id!r}: 'answers' must be a string or a non-empty list of strings: {given!r}")
    return answers
