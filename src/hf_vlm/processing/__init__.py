"""The processor (shipped with checkpoints), its chat templates and the training labels."""

from .chat_templates import CHAT_TEMPLATES
from .labels import make_labels
from .processing_vlm import VLMProcessor

__all__ = ["CHAT_TEMPLATES", "VLMProcessor", "make_labels"]
