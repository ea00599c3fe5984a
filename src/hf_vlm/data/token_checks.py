"""Token-level checks of a training set, before step 1: what truncation would cut, and what would train on nothing.

Every sample's tokens are known without touching its pixels (`hf_vlm.processing.encode_conversation`), so a
sample that `max_length` would cut (an image's tokens, or any answer token) and a sample without a labelled token
are found at load time, by id, instead of at step N as a crash or as a silent loss of 0. `ConversationCollator`
applies the same rule to every batch, so nothing that slips past (a dataset not checked here) trains on nothing.

The result is cached per dataset (`datasets` fingerprint) and processor, so a second run reads it instead of
encoding everything again.
"""

import hashlib
import json

from datasets import Dataset
from tqdm.auto import tqdm

from ..processing import encode_conversation, token_problem
from .cache import data_cache_dir, write_atomically
from .collators import DEFAULT_CAPTION_PROMPT, caption_to_conversation
from .schema import BadSampleError, SampleErrors

CHECK_FORMAT = 1  # bump when the rule or the stored layout changes


def check_token_lengths(
    dataset: Dataset,
    processor,
    max_length: int | None = None,
    *,
    on_error: str = "raise",
    caption_prompt: str = DEFAULT_CAPTION_PROMPT,
    cache: bool = True,
    progress: bool = True,
) -> Dataset:
    """Return `dataset` without the samples that cannot train as they are, or raise on the first one.

    Args:
        dataset: rows in the conversation shape (`id`, `messages`, `images`) or the caption shape (`id`, `image`,
            `caption`). Only the text columns are read; no image is decoded.
        processor: the `VLMProcessor` whose chat template and tokenizer will encode the rows.
        max_length: the truncation length of training (None: no truncation).
        on_error: "raise" (a `BadSampleError` naming the first bad sample) or "skip" (dropped, one
            `SkippedSamplesWarning` counting them by reason with the first id of each).
        caption_prompt: the user turn before each caption (caption shape), as `CaptionCollator` writes it.
        cache: reuse the result of an earlier call with the same dataset fingerprint, processor and settings.

    Reasons: `image_truncated`, `answer_truncated` (any answer token past `max_length`), `no_labels`.
    """
    captions = "caption" in dataset.column_names
    key = _key(dataset, processor, max_length, caption_prompt if captions else None)
    path = data_cache_dir() / "token_checks" / f"{key}.json"
    errors = SampleErrors(on_error)
    if cache and path.is_file():
        stored = json.loads(path.read_text())
        for error in stored["errors"]:
            errors.handle(BadSampleError(error["id"], error["reason"], error["detail"]))
        errors.finish(len(dataset))
        return dataset.select(stored["kept"]) if len(stored["kept"]) < len(dataset) else dataset

    text_columns = [name for name in dataset.column_names if name not in ("image", "images")]
    rows = dataset.select_columns(text_columns)
    kept, found = [], []
    for index, row in enumerate(tqdm(rows, desc="checking token lengths", disable=not progress, mininterval=2)):
        sample_id = str(row.get("id", index))
        row = caption_to_conversation(row | {"image": None}, caption_prompt) if captions else row
        ids, mask = encode_conversation(processor, row["messages"])
        problem = token_problem(ids, mask, processor.image_token_id, max_length)
        if problem is None:
            kept.append(index)
            continue
        error = BadSampleError(sample_id, *problem)
        found.append({"id": error.sample_id, "reason": error.reason, "detail": error.detail})
        errors.handle(error)  # raises under on_error="raise", before anything is stored
    if cache:
        write_atomically(path, json.dumps({"kept": kept, "errors": found}))
    errors.finish(len(dataset))
    return dataset.select(kept) if len(kept) < len(dataset) else dataset


def _tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the ids: the fast tokenizer's full definition, else vocabulary and class."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = (
        backend.to_str()
        if backend is not None
        else json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())])
    )
    return hashlib.sha256(definition.encode()).hexdigest()


def _key(dataset: Dataset, processor, max_length, caption_prompt) -> str:
    parts = {
        "format": CHECK_FORMAT,
        "dataset": dataset._fingerprint,
        "tokenizer": _tokenizer_fingerprint(processor.tokenizer),
        "chat_template": processor.chat_template,
        "image_token": processor.image_token,
        "image_seq_length": processor.image_seq_length,
        "max_length": max_length,
        "caption_prompt": caption_prompt,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
