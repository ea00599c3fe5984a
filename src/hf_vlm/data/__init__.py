"""Datasets for two-stage VLM training, as `datasets.Dataset`s with `Image` features.

Stage 1 (alignment) trains on the caption shape (`CAPTION_FEATURES`: `id`, `image`, `caption`);
stage 2 (instruction tuning) on the conversation shape (`CONVERSATION_FEATURES`: `id`, `images`,
`messages` in TRL's format). `hf_vlm.data.schema` documents both. Sources:

- easy-VQA (PyPI `easy-vqa`): `easy_vqa_conversations` (one question each), `easy_vqa_balanced`
  (yes/no answers not guessable from the wording), `easy_vqa_dialogues`
  (all questions about an image in one conversation), `easy_vqa_captions`
- rendered scenes with true captions: `synthetic_captions`
- LLaVA JSON / JSONL with an image folder: `load_llava_pretrain`, `load_llava_instruct`
- rows already in TRL's (or the_cauldron's) shape: `load_conversations`; in the caption shape: `load_captions`

Loaders validate every sample while building, once (the result is cached, `hf_vlm.data.cache`); see
`BadSampleError` and `on_error`. `check_token_lengths` then finds, before step 1, every sample that
`max_length` would cut or that has no labelled token. The training scripts pick sources by name or
location through `hf_vlm.data.sources`; `CaptionCollator` and `ConversationCollator` turn rows into
batches whose loss covers only the answers.
"""

from .collators import CaptionCollator, ConversationCollator, caption_to_conversation
from .easy_vqa import easy_vqa_balanced, easy_vqa_captions, easy_vqa_conversations, easy_vqa_dialogues
from .images import load_image, to_rgb
from .llava import load_captions, load_conversations, load_llava_instruct, load_llava_pretrain
from .schema import (
    CAPTION_FEATURES,
    CONVERSATION_FEATURES,
    EASY_VQA_FEATURES,
    BadSampleError,
    SkippedSamplesWarning,
)
from .synthetic import synthetic_captions
from .token_checks import check_token_lengths

__all__ = [
    "CaptionCollator",
    "ConversationCollator",
    "caption_to_conversation",
    "check_token_lengths",
    "CAPTION_FEATURES",
    "CONVERSATION_FEATURES",
    "EASY_VQA_FEATURES",
    "BadSampleError",
    "SkippedSamplesWarning",
    "easy_vqa_balanced",
    "easy_vqa_captions",
    "easy_vqa_conversations",
    "easy_vqa_dialogues",
    "load_captions",
    "load_conversations",
    "load_image",
    "load_llava_instruct",
    "load_llava_pretrain",
    "synthetic_captions",
    "to_rgb",
]
