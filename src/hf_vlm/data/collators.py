"""Collators: dataset rows -> model inputs whose labels cover only what the model should say.

TRL's `DataCollatorForVisionLanguageModeling` masks padding only, so image tokens and the user's
prompt stay in its loss. These collators render rows with the processor's chat template, take the
assistant mask from its `{% generation %}` markers, and build labels with `make_labels`: padding,
image tokens and everything outside the assistant's answers are -100.
"""

from ..processing import make_labels

DEFAULT_CAPTION_PROMPT = "Describe the image briefly."


class ConversationCollator:
    """Stage 2: rows in the conversation shape (`images`, `messages`) -> a batch with labels.

    Args:
        processor: a `VLMProcessor` whose chat template marks assistant turns.
        max_length: truncate longer samples; truncation that would cut image tokens raises and says which
            `max_length` is needed.
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
            return_assistant_tokens_mask=self.assistant_only_loss,
            processor_kwargs=processor_kwargs,
        )
        assistant_masks = batch.pop("assistant_masks", None)
        batch["labels"] = make_labels(batch["input_ids"], batch["attention_mask"], self.processor.image_token_id, assistant_masks)
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
        "images": [row["image"]],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": row["caption"]}]},
        ],
    }


class CaptionCollator:
    """Stage 1: rows in the caption shape (`image`, `caption`) -> a batch whose loss is on the caption only."""

    def __init__(self, processor, prompt: str = DEFAULT_CAPTION_PROMPT, max_length: int | None = None, feature_cache=None):
        self.prompt = prompt
        self.collate = ConversationCollator(processor, max_length=max_length, feature_cache=feature_cache)

    def __call__(self, rows: list[dict]) -> dict:
        return self.collate([caption_to_conversation(row, self.prompt) for row in rows])
