"""The processor (shipped with checkpoints), its chat templates and the training labels."""

from .chat_templates import CHAT_TEMPLATES, END_OF_TURN
from .labels import make_labels
from .processing_vlm import VLMProcessor

__all__ = ["CHAT_TEMPLATES", "END_OF_TURN", "VLMProcessor", "make_labels"]
