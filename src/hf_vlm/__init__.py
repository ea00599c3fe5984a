"""hf_vlm: build, train, evaluate and share small vision-language models the Hugging Face way."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .build import build_vlm
from .modeling import PROJECTORS, VLMConfig, VLMForConditionalGeneration, VLMModel, VLMPreTrainedModel
from .processing import VLMProcessor

# With hf_vlm imported, the Auto classes resolve `model_type="hf_vlm"` to these classes.
AutoConfig.register(VLMConfig.model_type, VLMConfig, exist_ok=True)
AutoModel.register(VLMConfig, VLMModel, exist_ok=True)
AutoModelForImageTextToText.register(VLMConfig, VLMForConditionalGeneration, exist_ok=True)
AutoProcessor.register(VLMConfig, VLMProcessor, exist_ok=True)

# Without it, checkpoints still load: save_pretrained copies the model, config and processor code beside the
# weights and writes `auto_map`, which `trust_remote_code=True` follows.
VLMConfig.register_for_auto_class()
VLMModel.register_for_auto_class("AutoModel")
VLMForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
VLMProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "PROJECTORS",
    "VLMConfig",
    "VLMForConditionalGeneration",
    "VLMModel",
    "VLMPreTrainedModel",
    "VLMProcessor",
    "build_vlm",
]
