"""Evaluate a saved hf_vlm model on easy-VQA, with the image and blind (the image removed).

    python scripts/run_eval.py --model_name_or_path runs/stage2 --output_dir runs/stage2/eval --limit 1000
    python scripts/run_eval.py --config eval.yaml  # the same fields in YAML; command-line flags override them

The questions are a fixed held-out subset: easy-VQA's test split (its images are never trained on), shuffled
with `seed`, first `limit` questions. Every model evaluated with the same `seed` and `limit` gets the same
questions. Writes `results.json` (metrics and every prediction), `results.md` (the table), `accuracy.png`
(image vs blind per question type) and `samples.png` (pictures with question, answer and predictions) into
`output_dir`. Named `run_eval.py` because a script named `evaluate.py` would shadow the `evaluate` package.
"""

from dataclasses import asdict, dataclass, field

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import TrlParser

import hf_vlm  # noqa: F401  (registers model_type "hf_vlm" with the Auto classes)
from hf_vlm.evaluation import easy_vqa_test_questions, evaluate_vqa, markdown_table, write_reports
from hf_vlm.feature_cache import VisionFeatureCache


@dataclass
class EvalArguments:
    model_name_or_path: str = field(metadata={"help": "A save_pretrained folder (or Hub id) of model and processor."})
    output_dir: str = field(default="eval", metadata={"help": "Where the reports go."})
    limit: int | None = field(default=1000, metadata={"help": "Questions to evaluate; None: all 9,673 of the split."})
    seed: int = field(default=0, metadata={"help": "Seed of the shuffle that picks the fixed subset."})
    batch_size: int = field(default=16, metadata={"help": "Questions per generate call."})
    max_new_tokens: int = field(default=8, metadata={"help": "Longest answer; easy-VQA answers are one word."})
    cache_vision_features: bool = field(
        default=False, metadata={"help": "Read and store the tower's features in the feature cache."}
    )
    feature_cache_dir: str | None = field(
        default=None, metadata={"help": "Root of the feature cache; default $HF_VLM_CACHE/vision_features."}
    )


def main(args: EvalArguments) -> dict:
    """Run the evaluation and write the reports; returns `evaluate_vqa`'s results with the settings added."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path).to(device)
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)

    dataset = easy_vqa_test_questions(args.limit, args.seed)
    cache = VisionFeatureCache(model, processor, args.feature_cache_dir) if args.cache_vision_features else None
    results = evaluate_vqa(
        model, processor, dataset, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, feature_cache=cache
    )
    results["settings"] = {**asdict(args), "split": "test", "num_questions": len(dataset)}

    paths = write_reports(results, dataset, args.output_dir)
    print(markdown_table(results["metrics"]))
    print("Reports:", ", ".join(str(path) for path in paths.values()))
    return results


if __name__ == "__main__":
    (script_args,) = TrlParser((EvalArguments,)).parse_args_and_config()
    main(script_args)
