"""Labels for training: the loss falls only on text the model should produce."""

import torch


def make_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    assistant_masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy `input_ids` into labels with -100 wherever no loss belongs.

    Masked: padding (`attention_mask == 0`), image tokens, and, when `assistant_masks` is given (from
    `apply_chat_template(..., return_assistant_tokens_mask=True)`), every token outside the assistant's
    answers. All tensors are (batch, seq_len); the model shifts labels itself.
    """
    keep = attention_mask.bool() & (input_ids != image_token_id)
    if assistant_masks is not None:
        keep &= assistant_masks.bool()
    return input_ids.masked_fill(~keep, -100)
