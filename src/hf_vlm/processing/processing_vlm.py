"""VLMProcessor: a stock image processor + the language model's own tokenizer + a chat template.

Each image placeholder (`<image>`, a special token of the tokenizer) in the text becomes
`image_seq_length` image tokens, which the model replaces with the image's features.
`ProcessorMixin.__call__` does the work (placeholder counting, expansion through
`replace_image_token`, tokenization, the truncation check); this class adds the expansion rule and
clearer errors.

A literal `<image>` typed by a user is indistinguishable from a placeholder in plain text, so a
count that disagrees with the images raises. Through `apply_chat_template`, image blocks become
placeholders and, with `sanitize_control_tokens=True` (the default here), special tokens typed in
message text are encoded as plain text, so they can neither become image slots nor shift images.
"""

from transformers.image_utils import make_flat_list_of_images
from transformers.processing_utils import MultiModalData, ProcessorMixin


class VLMProcessor(ProcessorMixin):
    r"""
    Args:
        image_processor: any `AutoImageProcessor` that resizes images to the model's `image_size`.
        tokenizer: the language model's tokenizer, with `image_token` added as a special token.
        chat_template (`str`, *optional*): a Jinja template rendering `{"type": "image"}` blocks as `image_token`
            and wrapping assistant turns in `{% generation %}` (see `hf_vlm.processing.chat_templates`).
        image_token (`str`): the placeholder for one image in the text.
        image_seq_length (`int`): image tokens per image; `VLMConfig.image_seq_length` of the model.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_token="<image>",
        image_seq_length=None,
        **kwargs,
    ):
        # No default: a wrong count only shows later, as a feature-count error in the model (or not at all, if the
        # model is never run). `from_pretrained` reads it from processor_config.json; build_vlm passes the config's.
        if isinstance(image_seq_length, bool) or not isinstance(image_seq_length, int) or image_seq_length < 1:
            raise ValueError(
                "image_seq_length must be a positive int, the model's config.image_seq_length; "
                f"got {image_seq_length!r}."
            )
        self.image_token = image_token
        self.image_seq_length = image_seq_length
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"The tokenizer has no {image_token!r} token; add it as a special token (hf_vlm.build_vlm does)."
            )

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.image_seq_length

    def validate_inputs(self, images=None, text=None, **kwargs):
        """The base checks, after one whose message counts images and placeholders (per sample, for nested images)."""
        # `__call__` has wrapped `text` in a list by now; other types get the base class's type error.
        if isinstance(text, list) and all(isinstance(sample, str) for sample in text):
            placeholders = [sample.count(self.image_token) for sample in text]
            flat = [] if images is None else make_flat_list_of_images(images)
            if len(flat) != sum(placeholders):
                per_sample = f"{placeholders} placeholders"
                if isinstance(images, (list, tuple)) and all(isinstance(sample, (list, tuple)) for sample in images):
                    per_sample += f", {[len(sample) for sample in images]} images"
                raise ValueError(
                    f"Got {len(flat)} images for {sum(placeholders)} {self.image_token} placeholders (per sample: "
                    f"{per_sample}). Each image needs exactly one placeholder, in order."
                )
        super().validate_inputs(images=images, text=text, **kwargs)

    def _check_special_mm_tokens(self, text, text_inputs, modalities):
        """Truncation must not cut image tokens: say which `max_length` would keep them."""
        try:
            super()._check_special_mm_tokens(text, text_inputs, modalities)
        except ValueError:
            needed = max(len(ids) for ids in self.tokenizer(text, add_special_tokens=True)["input_ids"])
            raise ValueError(
                f"Truncation cut image tokens: each image is {self.image_seq_length} tokens and the longest sample "
                f"needs max_length >= {needed}. Raise max_length or shorten the text."
            ) from None

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """`ProcessorMixin.apply_chat_template`, safe against placeholders typed in message text.

        When tokenizing without `return_assistant_tokens_mask` (which transformers cannot combine with it),
        `sanitize_control_tokens` defaults to True and typed special tokens are encoded as plain text.
        Otherwise a message text that contains `image_token` raises instead of silently becoming an image slot.
        """
        if kwargs.get("tokenize") and not kwargs.get("return_assistant_tokens_mask"):
            kwargs.setdefault("sanitize_control_tokens", True)
        if not kwargs.get("sanitize_control_tokens"):
            self._reject_typed_placeholders(conversation)
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def _reject_typed_placeholders(self, conversation):
        conversations = conversation if conversation and isinstance(conversation[0], list) else [conversation]
        for index, messages in enumerate(conversations):
            for turn, message in enumerate(messages):
                content = message["content"]
                texts = (
                    [content]
                    if isinstance(content, str)
                    else [b.get("text") or "" for b in content if b["type"] == "text"]
                )
                if any(self.image_token in text for text in texts):
                    raise ValueError(
                        f"Conversation {index}, message {turn} has the image placeholder {self.image_token!r} typed "
                        'in its text. Give images as {"type": "image"} blocks; to keep the literal text, tokenize '
                        "with sanitize_control_tokens=True."
                    )

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        """Image tokens per image, which vLLM's Transformers backend reads to lay out prompts.

        Args:
            image_sizes (`list[tuple[int, int]]`, *optional*): (height, width) of each image.

        Returns:
            `MultiModalData`: `image_seq_length` tokens and one `pixel_values` entry (`num_image_patches`) per image,
            whatever its size: the image processor resizes every image to the model's `image_size`.
        """
        if image_sizes is None:
            return MultiModalData()
        return MultiModalData(
            num_image_tokens=[self.image_seq_length] * len(image_sizes), num_image_patches=[1] * len(image_sizes)
        )

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = ["VLMProcessor"]
