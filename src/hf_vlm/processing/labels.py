"""Labels for training: the loss falls only on text the model should produce.

`encode_conversation` encodes one conversation exactly as inference does (`VLMProcessor.apply_chat_template`
with `sanitize_control_tokens=True`: a special token typed in message text, such as `<|im_end|>` or `<image>`,
is plain text) and says which of its tokens belong to the assistant's answers. transformers cannot give that
mask together with sanitized control tokens (`apply_chat_template` refuses the combination, because the markers
it wraps typed tokens in shift the character offsets the mask is computed from), so this module splits the
rendered chat at the template's `{% generation %}` spans and encodes each piece with transformers' own
`encode_marked_chat`: the ids are those transformers makes, and the mask is known piece by piece.
"""

import torch
from transformers.utils.chat_template_utils import encode_marked_chat, render_jinja_template


def encode_conversation(processor, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of one conversation with image placeholders expanded, and its assistant mask (1 = answer token).

    The ids equal what `processor.apply_chat_template([messages], tokenize=True, sanitize_control_tokens=True)`
    returns before truncation and padding (`ConversationCollator` checks this on every batch). No pixels are
    needed: each image block stands for `processor.image_seq_length` image tokens.
    """
    tokenizer, template = processor.tokenizer, processor.chat_template
    # The tokenizer's own marking step, as apply_chat_template(sanitize_control_tokens=True) runs it.
    [marked], _, _, template_kwargs = tokenizer._mark_chat_inputs(template, [messages], None, None, {}, True, False)
    rendered, spans = render_jinja_template(
        conversations=[marked],
        chat_template=template,
        return_assistant_tokens_mask=True,
        **{**tokenizer.special_tokens_map, **template_kwargs},
    )
    text, spans = rendered[0], spans[0]
    ids, mask = [], []
    for piece_start, piece_end, is_answer in _pieces(spans, len(text)):
        piece_ids = encode_marked_chat(tokenizer, text[piece_start:piece_end])
        ids += piece_ids
        mask += [int(is_answer)] * len(piece_ids)
    expanded_ids, expanded_mask = [], []
    for token, flag in zip(ids, mask):
        repeat = processor.image_seq_length if token == processor.image_token_id else 1
        expanded_ids += [token] * repeat
        expanded_mask += [flag] * repeat
    return expanded_ids, expanded_mask


def _pieces(spans: list[tuple[int, int]], length: int):
    """(start, end, is_answer) covering [0, length): the generation spans and the text between them."""
    start = 0
    for span_start, span_end in spans:
        if span_start > start:
            yield start, span_start, False
        if span_end > span_start:
            yield span_start, span_end, True
        start = max(start, span_end)
    if start < length:
        yield start, length, False


def token_problem(
    ids: list[int], mask: list[int], image_token_id: int, max_length: int | None, assistant_only: bool = True
):
    """`(reason, detail)` when a sample encoded as `ids` with assistant `mask` cannot train as it is, else None.

    Reasons (`hf_vlm.data.schema.REASONS`): `no_labels` (no labelled token at all), `image_truncated` (`max_length`
    would cut an image's tokens, which the model cannot take), `answer_truncated` (it would cut answer tokens; a
    sample whose answer is gone entirely would train on nothing, and one cut short teaches answers that stop early).
    `assistant_only=False` labels all text, as `ConversationCollator(assistant_only_loss=False)` does.
    """
    labelled = (
        [i for i, flag in enumerate(mask) if flag]
        if assistant_only
        else [i for i, t in enumerate(ids) if t != image_token_id]
    )
    if not labelled:
        return "no_labels", "no token carries a label (the answers are empty)"
    if max_length is None or len(ids) <= max_length:
        return None
    image_positions = [i for i, token in enumerate(ids) if token == image_token_id]
    if image_positions and image_positions[-1] >= max_length:
        needed = image_positions[-1] + 1
        return (
            "image_truncated",
            f"{len(ids)} tokens; max_length={max_length} would cut image tokens; it needs max_length >= {needed}",
        )
    if labelled[-1] >= max_length:
        cut = sum(position >= max_length for position in labelled)
        return "answer_truncated", (
            f"{len(ids)} tokens; max_length={max_length} would cut {cut} of its {len(labelled)} answer tokens; "
            f"it needs max_length >= {labelled[-1] + 1}"
        )
    return None


def make_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    assistant_masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy `input_ids` into labels with -100 wherever no loss belongs.

    Masked: padding (`attention_mask == 0`), image tokens, and, when `assistant_masks` is given (from
    `encode_conversation`), every token outside the assistant's answers. All tensors are (batch, seq_len); the
    model shifts labels itself.
    """
    keep = attention_mask.bool() & (input_ids != image_token_id)
    if assistant_masks is not None:
        keep &= assistant_masks.bool()
    return input_ids.masked_fill(~keep, -100)
