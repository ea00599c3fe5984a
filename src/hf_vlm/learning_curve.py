"""Accuracy against samples seen, during training: the curve that says whether more data or a new recipe helps.

    curve = LearningCurveCallback(processor, questions, every_samples=400, output_dir="runs/stage2/curve")
    trainer = SFTTrainer(..., callbacks=[curve])

    python -m hf_vlm.learning_curve recipe=runs/a/curve/curve.json other=runs/b/curve/curve.json --output curves.png

Every `every_samples` training samples (and before the first step, and after the last) the callback answers
a fixed set of questions with and without the image (`evaluate_vqa`) and records accuracy overall and per
question type with the blind baseline. `curve.json` and `curve.png` are written after each point, so a run
that stops early still leaves its curve. Only the main process evaluates; the others wait for it at the next
step's gradient synchronisation under DDP; with FSDP or ZeRO-3, whose forward needs every rank, the
main process alone cannot generate (untested here; do not use the callback there).
"""

import json
from pathlib import Path

from transformers import TrainerCallback

from .evaluation import evaluate_vqa


class LearningCurveCallback(TrainerCallback):
    """Evaluate VQA accuracy (with image and blind) every `every_samples` samples; write curve.json and curve.png.

    Args:
        processor: the model's processor.
        questions: conversation rows with `answers` and `question_type` (e.g. `easy_vqa_test_questions(300)`).
        every_samples: training samples (all processes, accumulation included) between two points.
        output_dir: where `curve.json` and `curve.png` go; None keeps the points in `self.points` only.
        feature_cache: a `VisionFeatureCache` for the questions' images, or None.
    """

    def __init__(
        self, processor, questions, every_samples: int, output_dir=None, feature_cache=None, batch_size: int = 32
    ):
        self.processor, self.questions, self.every_samples = processor, questions, every_samples
        self.output_dir = Path(output_dir) if output_dir else None
        self.feature_cache, self.batch_size = feature_cache, batch_size
        self.points: list[dict] = []

    @staticmethod
    def samples_seen(args, state) -> int:
        return (
            state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.points:
            self._evaluate(args, state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        seen = self.samples_seen(args, state)
        previous = self.points[-1]["samples"] if self.points else 0
        if seen // self.every_samples > previous // self.every_samples:
            self._evaluate(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.points or self.points[-1]["step"] != state.global_step:
            self._evaluate(args, state, model)

    def _evaluate(self, args, state, model):
        if not state.is_world_process_zero:
            return
        was_training = model.training
        results = evaluate_vqa(
            model, self.processor, self.questions, self.batch_size, max_new_tokens=4, feature_cache=self.feature_cache
        )
        model.train(was_training)
        point = {"step": state.global_step, "samples": self.samples_seen(args, state), "metrics": results["metrics"]}
        self.points.append(point)
        overall = point["metrics"]["overall"]
        print(
            f"curve: {point['samples']} samples: {100 * overall['accuracy']:.1f}% (blind {100 * overall['blind_accuracy']:.1f}%)",
            flush=True,
        )
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "curve.json").write_text(json.dumps(self.points, indent=2) + "\n")
            plot_curves({"": self.points}, self.output_dir / "curve.png")


def plot_curves(curves: dict[str, list[dict]], path, title: str = "Accuracy against training samples") -> None:
    """One panel per question type: accuracy (solid) and the blind baseline (dashed) of each named curve."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg, no pyplot state

    groups = list(next(iter(curves.values()))[0]["metrics"])
    figure = Figure(figsize=(3.2 * len(groups) + 2.5, 3.6), layout="constrained")
    panels = figure.subplots(1, len(groups), sharey=True, squeeze=False)[0]
    for axes, group in zip(panels, groups):
        for index, (name, points) in enumerate(curves.items()):
            color = f"C{index}"
            samples = [point["samples"] for point in points]
            axes.plot(
                samples,
                [100 * p["metrics"][group]["accuracy"] for p in points],
                marker=".",
                color=color,
                label=name or "with image",
            )
            axes.plot(
                samples,
                [100 * p["metrics"][group]["blind_accuracy"] for p in points],
                ls="--",
                color=color,
                alpha=0.6,
                label=f"{name} blind".strip(),
            )
        axes.set(title=group, xlabel="training samples", ylim=(0, 102))
        axes.grid(alpha=0.3)
    panels[0].set_ylabel("VQA accuracy (%)")
    figure.legend(*panels[0].get_legend_handles_labels(), fontsize=7, loc="outside right upper")
    figure.suptitle(title)
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Draw several curve.json files into one figure: name=path ...")
    parser.add_argument("curves", nargs="+", help="name=path/to/curve.json")
    parser.add_argument("--output", required=True)
    parser.add_argument("--title", default="Accuracy against training samples")
    args = parser.parse_args()
    named = dict(item.split("=", 1) for item in args.curves)
    plot_curves({name: json.loads(Path(path).read_text()) for name, path in named.items()}, args.output, args.title)
