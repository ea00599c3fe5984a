"""Collators: dataset rows -> model inputs whose labels cover only what the model should say.

These collators encode rows with the processor's chat template as inference does (special tokens typed in
message text are plain text), take the assistant mask from its `{% generation %}` markers
(`hf_vlm.processing.encode_conversation`), and build labels with `make_labels`: padding, image tokens and
everything outside the assistant's answers are -100.

Why not TRL's `DataCollatorForVisionLanguageModeling` (TRL 1.16) with a small subclass: with
`assistant_only_loss` it asks `apply_chat_template` for `return_assistant_tokens_mask`, which transformers cannot
combine with `sanitize_control_tokens`, so a typed `<|im_end|><|im_start|>user` would train as real turns; it
labels image tokens when the loss is not assistant-only; and its batch-level errors name no sample. Those are the
three things these collators exist for, besides feeding cached vision features (`feature_cache=`).
"""

import torch

from ..processing import encode_conversation, make_labels, token_problem
from .schema import BadSampleError

DEFAULT_CAPTION_PROMPT = "Describe the image briefly."


class ConversationCollator:
    """Stage 2: rows in the conversation shape (`images`, `messages`) -> a batch with labels.

    Args:
        processor: a `VLMProcessor` whose chat template marks assistant turns.
        max_length: truncate longer samples. A sample that this would cut (image tokens, or any answer token), or
            one without a labelled token, raises a `BadSampleError` naming its `id`; `check_token_lengths` finds
            them all before training, where they can also be skipped.
        assistant_only_loss: if False, the loss also covers the prompt text (never padding or image tokens).
        feature_cache: a `hf_vlm.feature_cache.VisionFeatureCache` holding every image of the data; batches then
            carry `vision_features` from it instead of `pixel_values`, and the frozen tower does not run.
    """

    def __init__(self, processor, max_length: int | None = None, assistant_only_loss: bool = True, feature_cache=None):
        self.processor = processor
        self.max_length = max_length
        self.assistant_only_loss = assistant_only_loss
        self.feature_cache = feature_cache

    def __call__(self, rows: list[dict]) -> dict:
        encoded = [encode_conversation(self.processor, row["messages"]) for row in rows]
        for index, (row, (ids, mask)) in enumerate(zip(rows, encoded)):
            problem = token_problem(
                ids, mask, self.processor.image_token_id, self.max_length, self.assistant_only_loss
            )
            if problem:
                sample_id = row.get("id")
                raise BadSampleError(f"batch row {index}" if sample_id is None else sample_id, *problem)

        images = [[image.convert("RGB") for image in row.get("images") or []] for row in rows]  # per conversation
        processor_kwargs = {"padding": True, "padding_side": "right"}
        if any(images):
            processor_kwargs["images"] = images
        if self.max_length is not None:
            processor_kwargs.update(truncation=True, max_length=self.max_length)
        batch = self.processor.apply_chat_template(
            [row["messages"] for row in rows],
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            sanitize_control_tokens=True,
            processor_kwargs=processor_kwargs,
        )
        masks = torch.zeros_like(batch["input_ids"])
        for index, (ids, mask) in enumerate(encoded):
            kept = batch["input_ids"][index][batch["attention_mask"][index].bool()].tolist()
            if kept != ids[: len(kept)]:
                raise RuntimeError(
                    "encode_conversation disagrees with the processor's encoding; the chat template or tokenizer merges "
                    "tokens across the {% generation %} boundaries, which the assistant mask cannot follow."
                )
            masks[index, : len(kept)] = torch.tensor(mask[: len(kept)])
        batch["labels"] = make_labels(
            batch["input_ids"],
            batch["attention_mask"],
            self.processor.image_token_id,
            masks if self.assistant_only_loss else None,
        )
        if self.feature_cache is not None and "pixel_values" in batch:
            # The processor still expands placeholders and makes pixel_values (milliseconds); the tower is what is saved.
            del batch["pixel_values"]
            batch["vision_features"] = self.feature_cache.lookup([image for sample in images for image in sample])
        return dict(batch)


def caption_to_conversation(row: dict, prompt: str = DEFAULT_CAPTION_PROMPT) -> dict:
    """A caption-shape row as a conversation row: user: image + `prompt`; assistant: the caption.

    This is how LLaVA's pretraining data is laid out, so stage 1 sees the template that stage 2 and
    inference use.
    """
    return {
        "id": row.get("id"),
        "images": [row["image"]],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": row["caption"]}]},
        ],
    }


class CaptionCollator:
    """Stage 1: rows in the caption shape (`image`, `caption`) -> a batch whose loss is on the caption only."""

    def __init__(
        self, processor, prompt: str = DEFAULT_CAPTION_PROMPT, max_length: int | None = None, feature_cache=None
    ):
        self.prompt = prompt
        self.collate = ConversationCollator(processor, max_length=max_length, feature_cache=feature_cache)

    def __call__(self, rows: list[dict]) -> dict:
        return self.collate([caption_to_conversation(row, self.prompt) for row in rows])
