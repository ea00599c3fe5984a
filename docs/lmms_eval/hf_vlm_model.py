"""lmms-eval's generic `huggingface` chat model, with the two changes a saved hf_vlm model needs (lmms-eval 0.7.3).

1. It picks the Auto class with `config.model_type in AutoModelForImageTextToText._model_mapping.keys()`, but those
   keys are config classes, not strings, so every model falls through to `AutoModel`; for a saved hf_vlm folder that
   is `VLMModel`, which has no `lm_head` and cannot generate. Here the model is reloaded with
   `AutoModelForImageTextToText` (the folder's `auto_map` names `VLMForConditionalGeneration`), in `dtype` ("auto":
   the dtype in config.json, as scripts/run_eval.py loads it; the parent always loads bfloat16).
2. It calls the processor with `videos=[]` and `audios=[]`; transformers 5 rejects `audios` in any processor
   ("You passed keyword argument `audios` which is deprecated"), so the empty media lists are dropped.

Everything else (chat template, batching, greedy decoding, decoding only the new tokens) is the parent's.
Nothing here imports hf_vlm: the model and processor load as remote code from the folder.
"""

from lmms_eval.models.chat.huggingface import Huggingface
from transformers import AutoModelForImageTextToText


class _ImagesOnly:
    """The processor, called without the empty `videos` / `audios` lists lmms-eval adds."""

    def __init__(self, processor):
        self._processor = processor

    def __call__(self, *args, videos=None, audios=None, images=None, **kwargs):
        if videos or audios:
            raise ValueError("hf_vlm models take images only, not videos or audio.")
        return self._processor(*args, images=images or None, **kwargs)

    def __getattr__(self, name):
        return getattr(self._processor, name)


class HfVlm(Huggingface):
    is_simple = False

    def __init__(self, pretrained: str, dtype: str = "auto", trust_remote_code: bool = True, **kwargs) -> None:
        super().__init__(pretrained=pretrained, trust_remote_code=trust_remote_code, **kwargs)
        self._model = AutoModelForImageTextToText.from_pretrained(
            pretrained, trust_remote_code=trust_remote_code, dtype=dtype, device_map=self.device_map
        ).eval()
        self._config = self._model.config
        # Batched prompts must end where generation continues, as in hf_vlm's own evaluation.
        self.processor.tokenizer.padding_side = "left"
        self.processor = _ImagesOnly(self.processor)
