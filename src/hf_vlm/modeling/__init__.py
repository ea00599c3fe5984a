"""The model code that ships with every checkpoint (configuration, projectors, modeling)."""

from .configuration_vlm import VLMConfig
from .modeling_vlm import VLMForConditionalGeneration, VLMModel, VLMPreTrainedModel
from .projectors import PROJECTORS

__all__ = ["PROJECTORS", "VLMConfig", "VLMForConditionalGeneration", "VLMModel", "VLMPreTrainedModel"]
