"""Evaluation: greedy answers with and without the image, scored per question type, and reports.

The blind baseline asks the same model the same questions with the image block removed (no image
tokens, no `pixel_values`). What the model gets right blind comes from the question alone (priors
such as "yes/no questions are mostly yes"), so accuracy minus blind accuracy is what the image adds.

    dataset = easy_vqa_test_questions(limit=500)  # or hf_vlm.evaluation_data.evaluation_dataset(any source)
    results = evaluate_vqa(model, processor, dataset)  # evaluate_answers(..., metric="caption_metrics") for captions
    write_reports(results, dataset, "eval")  # results.json, results.md, accuracy.png, samples.png

Rows are in the conversation shape (`hf_vlm.data.schema`) plus `answers` (the reference answers) and
`question_type` (None for none), as `easy_vqa_test_questions` and `evaluation_dataset` return them; the model
answers in place of the last (assistant) turn. Scores come from a metric script of `hf_vlm.metrics`: `vqa_accuracy` (answers normalised
the official VQA way) or `caption_metrics` (BLEU-4, CIDEr-D, ROUGE-L).
"""

import json
import re
import textwrap
import time
from pathlib import Path

import evaluate
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import metrics

# Answers are only cut at the end: the metric's normalisation handles case, articles and inner punctuation.
_TRAILING_PUNCTUATION = ".,;:!?"
# Names the reports give a metric's scores; vqa_accuracy's one score is "accuracy", as results.json has always had it.
_SCORE_KEYS = {"vqa_accuracy": "accuracy"}
_SCORE_LABELS = {"accuracy": "VQA accuracy", "bleu4": "BLEU-4", "cider": "CIDEr-D", "rouge_l": "ROUGE-L"}


def easy_vqa_test_questions(limit: int | None, seed: int = 0):
    """The fixed held-out subset: easy-VQA test questions shuffled with `seed`, first `limit` (None: all 9,673).

    Its images are never trained on; every model evaluated with the same `seed` and `limit` gets the same questions.
    Rows as `easy_vqa_conversations` plus `answers`, the one reference answer in a list.
    """
    from datasets import List, Value

    from .data.easy_vqa import easy_vqa_conversations

    dataset = easy_vqa_conversations("test").shuffle(seed=seed)
    dataset = dataset if limit is None else dataset.select(range(min(limit, len(dataset))))
    return dataset.add_column("answers", [[answer] for answer in dataset["answer"]], feature=List(Value("string")))


def postprocess_answer(text: str) -> str:
    """The first line of a generated answer, stripped of whitespace and trailing punctuation.

    A model that does not stop at its end-of-turn token goes on with a new line ("blue\\nuser ..."),
    so only the first line is the answer: "  Blue.\\nuser: and" -> "Blue".
    """
    first_line = text.strip().split("\n", 1)[0]
    return first_line.strip().rstrip(_TRAILING_PUNCTUATION).rstrip()


def prompt_messages(messages: list[dict], blind: bool = False) -> list[dict]:
    """The turns before the last one, the assistant turn to answer; with `blind`, without their image blocks."""
    return [
        {**message, "content": [block for block in message["content"] if not (blind and block["type"] == "image")]}
        for message in messages[:-1]
    ]


def generate_answers(
    model, processor, dataset, batch_size: int = 16, max_new_tokens: int = 16, blind: bool = False, feature_cache=None
) -> list[str]:
    """Greedy answers to each row's last assistant turn (`prompt_messages`), post-processed (`postprocess_answer`).

    Prompts come from the processor's chat template with `add_generation_prompt=True`, batched with left
    padding; generation uses the KV cache and only the new tokens are decoded. `blind=True` removes the
    image blocks and passes no images, so the model sees the question alone. With a `feature_cache`
    (`hf_vlm.feature_cache.VisionFeatureCache`) the images' tower outputs are encoded once and reused.
    """
    model.eval()
    tokenizer = processor.tokenizer
    answers = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="blind" if blind else "with image", unit="batch"):
        batch = dataset[start : start + batch_size]
        conversations = [prompt_messages(messages, blind) for messages in batch["messages"]]
        # Left padding puts every prompt's last token at the end, where generation continues.
        processor_kwargs = {"padding": True, "padding_side": "left"}
        if not blind:
            processor_kwargs["images"] = batch["images"]
        inputs = processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs=processor_kwargs,
        ).to(model.device)
        if feature_cache is not None and not blind:
            images = [image for row in batch["images"] for image in row]
            feature_cache.encode(images, progress=False)
            inputs["vision_features"] = feature_cache.lookup(images).to(model.device)
            inputs.pop("pixel_values", None)
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answers += [postprocess_answer(text) for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def score_samples(samples: list[dict], metric: str = "vqa_accuracy") -> dict:
    """`{group: {"n", score, ..., "blind_" + score, ...}}` for "overall" and each question type, from `samples`.

    Scores are those of the `hf_vlm.metrics` script `metric` for `prediction` and `blind_prediction` against `answers`:
    `accuracy` (VQA accuracy in [0, 1]) for `vqa_accuracy`; `bleu4`, `cider`, `rouge_l` for `caption_metrics`, whose
    CIDEr-D takes its IDF from the group's references. Samples with no `question_type` count in "overall" only.
    """
    scorer = evaluate.load(metrics.path(metric))
    groups = {"overall": samples}
    for kind in sorted({sample.get("question_type") for sample in samples} - {None}):
        groups[kind] = [sample for sample in samples if sample.get("question_type") == kind]

    def scores(group, key):
        values = scorer.compute(
            predictions=[sample[key] for sample in group], references=[s["answers"] for s in group]
        )
        return {_SCORE_KEYS.get(name, name): value for name, value in values.items()}

    results = {}
    for name, group in groups.items():
        blind = {f"blind_{score}": value for score, value in scores(group, "blind_prediction").items()}
        results[name] = {"n": len(group), **scores(group, "prediction"), **blind}
    return results


def evaluate_answers(
    model,
    processor,
    dataset,
    metric: str = "vqa_accuracy",
    batch_size: int = 16,
    max_new_tokens: int = 16,
    feature_cache=None,
) -> dict:
    """Answers with the image and blind, scored by `metric` overall and per `question_type` (`score_samples`).

    Returns `{"metric", "metrics": score_samples(samples, metric), "samples", "generation_seconds"}`, one sample per
    row: `{"id", "question_type", "question", "answers", "prediction", "blind_prediction"}`, the question being the
    text of the last user turn; `generation_seconds` is the wall time of each pass, `{"with_image", "blind"}` (the
    projector study's latency).
    """
    start = time.perf_counter()
    predictions = generate_answers(model, processor, dataset, batch_size, max_new_tokens, feature_cache=feature_cache)
    middle = time.perf_counter()
    blind_predictions = generate_answers(model, processor, dataset, batch_size, max_new_tokens, blind=True)
    seconds = {"with_image": middle - start, "blind": time.perf_counter() - middle}
    samples = []
    # Without the image column, iterating decodes no pictures.
    rows = dataset.select_columns(["id", "question_type", "answers", "messages"])
    for row, prediction, blind_prediction in zip(rows, predictions, blind_predictions):
        question = [message for message in prompt_messages(row["messages"]) if message["role"] == "user"][-1]
        samples.append(
            {
                "id": row["id"],
                "question_type": row["question_type"],
                "question": " ".join(block["text"] for block in question["content"] if block["type"] == "text"),
                "answers": row["answers"],
                "prediction": prediction,
                "blind_prediction": blind_prediction,
            }
        )
    return {
        "metric": metric,
        "metrics": score_samples(samples, metric),
        "samples": samples,
        "generation_seconds": seconds,
    }


def evaluate_vqa(
    model, processor, dataset, batch_size: int = 16, max_new_tokens: int = 16, feature_cache=None
) -> dict:
    """`evaluate_answers` with `vqa_accuracy`: metrics `{group: {"n", "accuracy", "blind_accuracy"}}`."""
    return evaluate_answers(model, processor, dataset, "vqa_accuracy", batch_size, max_new_tokens, feature_cache)


def score_names(metrics_by_group: dict) -> list[str]:
    """The scores in `score_samples` output, in order: ["accuracy"], or ["bleu4", "cider", "rouge_l"]."""
    first = next(iter(metrics_by_group.values()))
    return [key for key in first if key != "n" and not key.startswith("blind_")]


def markdown_table(metrics_by_group: dict) -> str:
    """A Markdown table of `score_samples` output: n, each score with image, blind, and their difference.

    VQA accuracy is in percent (one row per group); other scores are as the metric gives them (a row per score).
    """
    if score_names(metrics_by_group) == ["accuracy"]:
        lines = [
            "| question type | n | with image (%) | blind (%) | image adds (points) |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, row in metrics_by_group.items():
            accuracy, blind = 100 * row["accuracy"], 100 * row["blind_accuracy"]
            lines.append(f"| {name} | {row['n']} | {accuracy:.1f} | {blind:.1f} | {accuracy - blind:+.1f} |")
        return "\n".join(lines) + "\n"
    lines = ["| question type | n | score | with image | blind | image adds |", "|---|---:|---|---:|---:|---:|"]
    for name, row in metrics_by_group.items():
        for score in score_names(metrics_by_group):
            value, blind = row[score], row[f"blind_{score}"]
            label = _SCORE_LABELS.get(score, score)
            lines.append(f"| {name} | {row['n']} | {label} | {value:.4f} | {blind:.4f} | {value - blind:+.4f} |")
    return "\n".join(lines) + "\n"


def write_reports(results: dict, dataset, output_dir, num_samples: int = 12) -> dict[str, Path]:
    """Write `results.json`, `results.md`, `accuracy.png` (`scores.png` for captions) and `samples.png`.

    `results` is `evaluate_answers`'s output (extra JSON-serialisable keys are kept); `dataset` holds the same rows
    in the same order and supplies the pictures of the first `num_samples` samples. Returns {name: path}.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    vqa = results["metric"] == "vqa_accuracy"
    chart = "accuracy.png" if vqa else "scores.png"
    paths = {name: output_dir / name for name in ("results.json", "results.md", chart, "samples.png")}
    paths["results.json"].write_text(json.dumps(results, indent=2) + "\n")
    title = (
        "VQA accuracy" if vqa else "Caption metrics" if results["metric"] == "caption_metrics" else results["metric"]
    )
    paths["results.md"].write_text(
        f"# {title} with and without the image\n\n"
        "Blind: the same model and questions with the image removed; the difference is what the image adds.\n\n"
        + markdown_table(results["metrics"])
        + f"\n![{chart[:-4]}]({chart})\n\n![samples](samples.png)\n"
    )
    plot_scores(results["metrics"], paths[chart])
    plot_samples(results["samples"][:num_samples], dataset, paths["samples.png"], results["metric"])
    return paths


def plot_scores(metrics_by_group: dict, path) -> None:
    """A grouped bar chart, with image vs blind, of each group's scores in `score_samples` output, saved as a PNG.

    VQA accuracy in percent, one pair of bars per group; other metrics one pair per group and score, as given.
    """
    from matplotlib.figure import Figure  # a bare Figure renders with Agg, no pyplot state

    scores = score_names(metrics_by_group)
    percent = scores == ["accuracy"]
    bars = [(name, score) for name in metrics_by_group for score in scores]
    positions = range(len(bars))
    figure = Figure(figsize=(1.8 * len(bars) + 2, 4.5), layout="constrained")
    axes = figure.subplots()
    for offset, prefix, label, color in [(-0.2, "", "with image", "tab:blue"), (0.2, "blind_", "blind", "tab:gray")]:
        values = [(100 if percent else 1) * metrics_by_group[name][prefix + score] for name, score in bars]
        drawn = axes.bar([p + offset for p in positions], values, width=0.4, label=label, color=color)
        axes.bar_label(drawn, fmt="%.1f" if percent else "%.3f", padding=2, fontsize=9)
    labels = [f"{name}\n(n={metrics_by_group[name]['n']})" for name, _ in bars]
    if not percent:
        labels = [f"{_SCORE_LABELS.get(score, score)}\n{label}" for (_, score), label in zip(bars, labels)]
    axes.set_xticks(list(positions), labels)
    axes.set_xlabel("question type")
    if percent:
        axes.set_ylabel("VQA accuracy (%)")
        axes.set_ylim(0, 110)
    else:
        axes.set_ylabel("score")
        axes.margins(y=0.15)
    axes.set_title(f"{'VQA accuracy' if percent else 'Scores'} with and without the image")
    axes.legend(loc="upper left", bbox_to_anchor=(1, 1))
    figure.savefig(path, dpi=120)


def plot_samples(samples: list[dict], dataset, path, metric: str = "vqa_accuracy", columns: int = 4) -> None:
    """A grid of pictures with question, first reference and both predictions.

    For `vqa_accuracy` a prediction is green when the metric scores it 1, else red; captions have no such line.
    """
    from matplotlib.figure import Figure  # a bare Figure renders with Agg, no pyplot state

    ids = dataset.select(range(len(samples)))["id"]
    if list(ids) != [sample["id"] for sample in samples]:
        raise ValueError("The dataset's first rows are not the samples to draw; pass the dataset that was evaluated.")
    vqa = evaluate.load(metrics.path("vqa_accuracy")) if metric == "vqa_accuracy" else None
    rows = -(-len(samples) // columns)
    figure = Figure(figsize=(2.8 * columns, 3.9 * rows), layout="constrained")
    for index, (sample, row) in enumerate(zip(samples, dataset)):
        axes = figure.add_subplot(rows, columns, index + 1)
        if row["images"]:
            image = row["images"][0]
            # Small images (easy-VQA's are 64 px) are enlarged with NEAREST, which keeps their edges sharp.
            axes.imshow(image.resize((192, 192), Image.NEAREST) if max(image.size) < 192 else image)
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_title("\n".join(textwrap.wrap(sample["question"], 30)), fontsize=9, parse_math=False)
        more = f" (+{len(sample['answers']) - 1})" if len(sample["answers"]) > 1 else ""
        lines = [(textwrap.shorten(f"answer: {sample['answers'][0]}", 34, placeholder="...") + more, "black")]
        for label, key in (("with image", "prediction"), ("blind", "blind_prediction")):
            color = "black"
            if vqa is not None:
                score = vqa.compute(predictions=[sample[key]], references=[sample["answers"]])["vqa_accuracy"]
                color = "green" if score == 1.0 else "red"
            # repr shows an empty answer as '' and control characters a random model may emit as escapes.
            shown = textwrap.shorten(repr(sample[key]), 26 if vqa else 34, placeholder="...")
            lines.append((f"{label}: {shown}", color))
        for line, (text, color) in enumerate(lines):
            # parse_math=False: a "$" in generated text is text, not the start of a formula.
            axes.annotate(
                text,
                (0.5, 0),
                xycoords="axes fraction",
                xytext=(0, -4 - 13 * line),
                textcoords="offset points",
                color=color,
                fontsize=9,
                ha="center",
                va="top",
                parse_math=False,
            )
    figure.savefig(path, dpi=100)


def easy_vqa_caption_accuracy(model, processor, captions, batch_size: int = 16, feature_cache=None) -> dict:
    """How often generated captions of easy-VQA images name the right colour, the right shape, and both.

    `captions` is caption-shape easy-VQA data (`easy_vqa_captions`), whose captions name the truth. The model
    is prompted as in stage 1; a caption names a colour (shape) when that word appears in it. This is the
    check that stage 1 aligned what matters before stage 2 starts. Returns `{"n", "color", "shape", "both"}`.
    """
    from .data.collators import caption_to_conversation
    from .data.easy_vqa import COLORS, SHAPES

    conversations = captions.map(caption_to_conversation, remove_columns=captions.column_names)
    generated = generate_answers(
        model, processor, conversations, batch_size, max_new_tokens=16, feature_cache=feature_cache
    )

    def words(text: str, vocabulary) -> set[str]:
        return {word for word in re.findall(r"[a-z]+", text.lower()) if word in vocabulary}

    scores = {"color": 0, "shape": 0, "both": 0}
    for truth, caption in zip(captions["caption"], generated):
        color, shape = words(caption, COLORS) == words(truth, COLORS), words(caption, SHAPES) == words(truth, SHAPES)
        scores["color"] += color
        scores["shape"] += shape
        scores["both"] += color and shape
    return {"n": len(generated)} | {key: value / max(1, len(generated)) for key, value in scores.items()}
