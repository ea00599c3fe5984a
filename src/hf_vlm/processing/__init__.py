"""The processor (shipped with checkpoints), its chat templates and the training labels."""

from .chat_templates import CHAT_TEMPLATES, END_OF_TURN
from .labels import encode_conversation, make_labels, token_problem
from .processing_vlm import VLMProcessor

__all__ = ["CHAT_TEMPLATES", "END_OF_TURN", "VLMProcessor", "encode_conversation", "make_labels", "token_problem"]
