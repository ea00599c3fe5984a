"""Evaluate a saved hf_vlm model on easy-VQA or your own data, with the image and blind (the image removed).

    python scripts/run_eval.py --model_name_or_path runs/stage2 --output_dir runs/stage2/eval --limit 1000
    python scripts/run_eval.py --model_name_or_path runs/stage2 --dataset data/val.json --image_folder data/images
    python scripts/run_eval.py --model_name_or_path runs/stage1 --dataset data/captions.jsonl --metric caption_metrics
    python scripts/run_eval.py --config eval.yaml  # the same fields in YAML; command-line flags override them

`--dataset` takes what the training scripts take (`hf_vlm.evaluation_data`): easy-VQA (the default: its test
split, whose images are never trained on), a LLaVA / TRL / caption-row JSON or JSONL file, a `save_to_disk`
folder or a Hub id, in the conversation or caption shape. The reference is the last assistant turn (or the
caption), or the row's `answers` where the data has that column. The questions are shuffled with `seed`, first
`limit`: every model evaluated with the same `seed` and `limit` gets the same questions. `--metric vqa_accuracy`
scores short answers, `--metric caption_metrics` captions (BLEU-4, CIDEr-D, ROUGE-L). Writes `results.json`
(metrics and every prediction), `results.md` (the table), `accuracy.png` (`scores.png` for captions: image vs
blind) and `samples.png` (pictures with question, answer and predictions) into `output_dir`. Named
`run_eval.py` because a script named `evaluate.py` would shadow the `evaluate` package.
"""

from dataclasses import asdict, dataclass, field

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import TrlParser

import hf_vlm  # noqa: F401  (registers model_type "hf_vlm" with the Auto classes)
from hf_vlm.evaluation import evaluate_answers, markdown_table, write_reports
from hf_vlm.evaluation_data import evaluation_dataset
from hf_vlm.feature_cache import VisionFeatureCache


@dataclass
class EvalArguments:
    model_name_or_path: str = field(metadata={"help": "A save_pretrained folder (or Hub id) of model and processor."})
    output_dir: str = field(default="eval", metadata={"help": "Where the reports go."})
    dataset: str = field(
        default="easy_vqa",
        metadata={
            "help": "easy_vqa or another source name of the training scripts, a LLaVA / TRL / the_cauldron / "
            "caption-row JSON or JSONL file, a dataset folder or a Hub id (hf_vlm.evaluation_data)."
        },
    )
    split: str = field(
        default="test", metadata={"help": "Split of an easy-VQA name, a DatasetDict folder or a Hub dataset."}
    )
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder that relative image paths in a data file start from."}
    )
    on_error: str = field(
        default="raise",
        metadata={
            "help": "A bad sample: 'raise' names it, 'skip' drops it with a count.",
            "choices": ["raise", "skip"],
        },
    )
    metric: str = field(
        default="vqa_accuracy",
        metadata={
            "help": "vqa_accuracy (short answers) or caption_metrics (BLEU-4, CIDEr-D, ROUGE-L).",
            "choices": ["vqa_accuracy", "caption_metrics"],
        },
    )
    limit: int | None = field(default=1000, metadata={"help": "Questions to evaluate; None: all of the split."})
    seed: int = field(default=0, metadata={"help": "Seed of the shuffle that picks the fixed subset."})
    batch_size: int = field(default=16, metadata={"help": "Questions per generate call."})
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Longest answer; default 8 for vqa_accuracy (one-word answers), 48 for captions."},
    )
    cache_vision_features: bool = field(
        default=False, metadata={"help": "Read and store the tower's features in the feature cache."}
    )
    feature_cache_dir: str | None = field(
        default=None, metadata={"help": "Root of the feature cache; default $HF_VLM_CACHE/vision_features."}
    )


def main(args: EvalArguments) -> dict:
    """Run the evaluation and write the reports; returns `evaluate_answers`'s results with the settings added."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path).to(device)
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)

    dataset = evaluation_dataset(args.dataset, args.split, args.limit, args.seed, args.image_folder, args.on_error)
    cache = VisionFeatureCache(model, processor, args.feature_cache_dir) if args.cache_vision_features else None
    max_new_tokens = args.max_new_tokens or (8 if args.metric == "vqa_accuracy" else 48)
    results = evaluate_answers(model, processor, dataset, args.metric, args.batch_size, max_new_tokens, cache)
    results["settings"] = {**asdict(args), "max_new_tokens": max_new_tokens, "num_questions": len(dataset)}

    paths = write_reports(results, dataset, args.output_dir)
    print(markdown_table(results["metrics"]))
    print("Reports:", ", ".join(str(path) for path in paths.values()))
    return results


if __name__ == "__main__":
    (script_args,) = TrlParser((EvalArguments,)).parse_args_and_config()
    main(script_args)
