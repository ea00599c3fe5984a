"""lmms-eval's command line with one more model, `hf_vlm` (`hf_vlm_model.HfVlm`), registered first.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python docs/lmms_eval/run.py --model hf_vlm \
        --model_args pretrained=runs/demo/model,device=cpu,device_map=cpu \
        --tasks easy_vqa_hf_vlm --include_path docs/lmms_eval --batch_size 1 --output_path runs/lmms_eval/out

All flags are lmms-eval's own (`python -m lmms_eval --help`).
"""

from lmms_eval.__main__ import cli_evaluate
from lmms_eval.models import MODEL_REGISTRY_V2
from lmms_eval.models.registry_v2 import ModelManifest

if __name__ == "__main__":
    MODEL_REGISTRY_V2.register_manifest(ModelManifest(model_id="hf_vlm", chat_class_path="hf_vlm_model.HfVlm"))
    cli_evaluate()
