"""hf_vlm: build, train, evaluate and share small vision-language models the Hugging Face way."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .modeling import PROJECTORS, VLMConfig, VLMForConditionalGeneration, VLMModel, VLMPreTrainedModel

AutoConfig.register(VLMConfig.model_type, VLMConfig, exist_ok=True)
AutoModel.register(VLMConfig, VLMModel, exist_ok=True)
AutoModelForImageTextToText.register(VLMConfig, VLMForConditionalGeneration, exist_ok=True)

__all__ = ["PROJECTORS", "VLMConfig", "VLMForConditionalGeneration", "VLMModel", "VLMPreTrainedModel"]
