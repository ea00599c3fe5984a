"""lmms-eval's command line with one more model, `hf_vlm` (`hf_vlm_model.HfVlm`), registered first.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python docs/lmms_eval/run.py --model hf_vlm \
        --model_args pretrained=runs/demo/model,device=cpu,device_map=cpu \
        --tasks easy_vqa_hf_vlm --include_path docs/lmms_eval --batch_size 1 --output_path runs/lmms_eval/out

All flags are lmms-eval's own (`python -m lmms_eval --help`). One difference: where lmms-eval logs a failed
evaluation and exits 0 (at every `--verbosity` but DEBUG, where it re-raises), this exits 1.
"""

import sys

import lmms_eval.__main__ as lmms_main
from lmms_eval.models import MODEL_REGISTRY_V2
from lmms_eval.models.registry_v2 import ModelManifest

failures = []
evaluate_one = lmms_main.cli_evaluate_single


def evaluate_one_and_record(args):
    """lmms-eval's per-config evaluation, remembering that it raised (cli_evaluate catches and logs it)."""
    try:
        return evaluate_one(args)
    except Exception:
        failures.append(args.tasks)
        raise


if __name__ == "__main__":
    MODEL_REGISTRY_V2.register_manifest(ModelManifest(model_id="hf_vlm", chat_class_path="hf_vlm_model.HfVlm"))
    lmms_main.cli_evaluate_single = evaluate_one_and_record
    lmms_main.cli_evaluate()
    sys.exit(1 if failures else 0)
