"""The two dataset shapes hf_vlm trains on, and the error for a sample that fits neither.

Stage 1 (alignment) reads the caption shape, stage 2 (instruction tuning) the conversation shape.
Every loader in `hf_vlm.data` returns a `datasets.Dataset` with exactly these features, so
datasets of one shape from different sources can be joined with `datasets.concatenate_datasets`.

Caption shape, `CAPTION_FEATURES`::

    {"id": "synthetic-0-000003", "image": <PIL.Image RGB>, "caption": "A red circle on the left."}

Conversation shape, `CONVERSATION_FEATURES` (TRL's vision-language format, what `SFTTrainer`'s
`DataCollatorForVisionLanguageModeling` and `trl.data_utils.prepare_multimodal_messages` read)::

    {"id": "...",
     "images": [<PIL.Image RGB>, ...],
     "messages": [
         {"role": "user", "content": [{"type": "image", "text": None},
                                      {"type": "text", "text": "What colour is the shape?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]}

Roles are "system", "user" or "assistant". The i-th `{"type": "image"}` block, counted across all
messages in order, stands for `images[i]`; TRL fills the blocks from `images` in that order and
raises if the counts differ. Arrow stores a list of dicts as a list of structs with one set of
fields, so an image block reads back with `"text": None`. TRL only checks `type == "image"` and
the absence of an `"image"` key, and chat templates branch on `type`, so the `None` is harmless;
we write it explicitly so that what goes in equals what comes out.

Every image in either shape decodes to an RGB `PIL.Image` (see `hf_vlm.data.images`).
"""

import warnings
from collections import Counter

from datasets import Features, Image, List, Value

CAPTION_FEATURES = Features({"id": Value("string"), "image": Image(), "caption": Value("string")})

MESSAGES_FEATURE = List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})

CONVERSATION_FEATURES = Features({"id": Value("string"), "images": List(Image()), "messages": MESSAGES_FEATURE})

# easy-VQA adds what evaluation needs: the question type ("shape", "color" or "yes/no") and the
# reference answer as a plain string.
EASY_VQA_FEATURES = Features({**CONVERSATION_FEATURES, "question_type": Value("string"), "answer": Value("string")})

ROLES = ("system", "user", "assistant")

# Why a sample can be rejected. The keys of the skip summary, and `BadSampleError.reason`.
REASONS = (
    "missing_image",  # the image file does not exist
    "corrupt_image",  # Pillow cannot identify or fully decode the file
    "image_too_large",  # more pixels than PIL.Image.MAX_IMAGE_PIXELS (decompression bomb guard)
    "unsupported_image",  # a mode Pillow cannot turn into RGB
    "image_count_mismatch",  # number of <image> placeholders / image blocks != number of images
    "empty_text",  # an empty caption or answer, or a user turn with neither text nor image
    "bad_format",  # anything else about the record's structure (keys, roles, turn order)
    # Found by `hf_vlm.data.check_token_lengths`, which knows the tokenizer and `max_length`:
    "image_truncated",  # max_length would cut an image's tokens
    "answer_truncated",  # max_length would cut answer tokens (any of them)
    "no_labels",  # no token would carry a label, so the sample would train on nothing
)


class BadSampleError(ValueError):
    """A sample that cannot be turned into a valid row; names the sample and the reason.

    `reason` is one of `REASONS`; `sample_id` is the sample's id as a string.
    """

    def __init__(self, sample_id, reason: str, detail: str):
        self.sample_id = str(sample_id)
        self.reason = reason
        self.detail = detail
        super().__init__(f"sample {self.sample_id!r}: {reason}: {detail}")


class SkippedSamplesWarning(UserWarning):
    """Issued once per load when `on_error="skip"` dropped samples.

    `report` is `SampleErrors.report()` of that load: counts by reason and the first few ids and details of each,
    which `hf_vlm.doctor` lists.
    """

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


class SampleErrors:
    """Collects `BadSampleError`s during one load: raises the first, or counts them for one warning.

    Usage: call `handle(error)` for every bad sample, then `finish(total)` once at the end. Under "skip" the first
    `EXAMPLES` errors of each reason are kept as `(id, detail)` pairs, for reports that name more than the first.
    """

    EXAMPLES = 5

    def __init__(self, on_error: str):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.counts = Counter()
        self.first_ids = {}
        self.examples = {}

    def handle(self, error: BadSampleError) -> None:
        if self.on_error == "raise":
            raise error
        self.counts[error.reason] += 1
        self.first_ids.setdefault(error.reason, error.sample_id)
        examples = self.examples.setdefault(error.reason, [])
        if len(examples) < self.EXAMPLES:
            examples.append([error.sample_id, error.detail])

    def report(self) -> dict:
        """The skip counts, first ids and examples, as `from_report` reads them back (for caches)."""
        return {
            "on_error": self.on_error,
            "counts": dict(self.counts),
            "first_ids": self.first_ids,
            "examples": self.examples,
        }

    @classmethod
    def from_report(cls, report: dict) -> "SampleErrors":
        errors = cls(report["on_error"])
        errors.counts.update(report["counts"])
        errors.first_ids.update(report["first_ids"])
        errors.examples.update(report.get("examples", {}))  # entries stored before examples were kept have none
        return errors

    def finish(self, total: int) -> None:
        """Warn once with the counts by reason and what is kept; raise if nothing is left to train on."""
        skipped = sum(self.counts.values())
        if not skipped:
            return
        by_reason = ", ".join(
            f"{count} {reason} (first: {self.first_ids[reason]!r})" for reason, count in self.counts.most_common()
        )
        if skipped == total:
            # An empty dataset would only fail later, in the trainer, with a less helpful message.
            raise ValueError(f"all {total} samples were skipped: {by_reason}")
        message = f"skipped {skipped} of {total} samples, kept {total - skipped}: {by_reason}"
        warnings.warn(SkippedSamplesWarning(message, self.report()), stacklevel=3)
