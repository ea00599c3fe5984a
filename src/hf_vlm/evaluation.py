"""VQA evaluation: greedy answers with and without the image, VQA accuracy per question type, reports.

The blind baseline asks the same model the same questions with the image block removed (no image
tokens, no `pixel_values`). What the model gets right blind comes from the question alone (priors
such as "yes/no questions are mostly yes"), so accuracy minus blind accuracy is what the image adds.

    dataset = easy_vqa_conversations("test", limit=500)
    results = evaluate_vqa(model, processor, dataset)
    write_reports(results, dataset, "eval")  # results.json, results.md, accuracy.png, samples.png

Rows are in the conversation shape (`hf_vlm.data.schema`) plus `answer` and `question_type`, as
`hf_vlm.data.easy_vqa_conversations` returns them. Scores come from the `vqa_accuracy` metric script
(`hf_vlm.metrics`), which normalises answers the official VQA way.
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


def easy_vqa_test_questions(limit: int | None, seed: int = 0):
    """The fixed held-out subset: easy-VQA test questions shuffled with `seed`, first `limit` (None: all 9,673).

    Its images are never trained on; every model evaluated with the same `seed` and `limit` gets the same questions.
    """
    from .data.easy_vqa import easy_vqa_conversations

    dataset = easy_vqa_conversations("test").shuffle(seed=seed)
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


def postprocess_answer(text: str) -> str:
    """The first line of a generated answer, stripped of whitespace and trailing punctuation.

    A model that does not stop at its end-of-turn token goes on with a new line ("blue\\nuser ..."),
    so only the first line is the answer: "  Blue.\\nuser: and" -> "Blue".
    """
    first_line = text.strip().split("\n", 1)[0]
    return first_line.strip().rstrip(_TRAILING_PUNCTUATION).rstrip()


def prompt_messages(messages: list[dict], blind: bool = False) -> list[dict]:
    """The turns before the first assistant turn; with `blind`, without their image blocks."""
    prompt = []
    for message in messages:
        if message["role"] == "assistant":
            break
        content = [block for block in message["content"] if not (blind and block["type"] == "image")]
        prompt.append({**message, "content": content})
    return prompt


def generate_answers(
    model, processor, dataset, batch_size: int = 16, max_new_tokens: int = 16, blind: bool = False, feature_cache=None
) -> list[str]:
    """Greedy answers to each row's first user turn, post-processed (see `postprocess_answer`).

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


def vqa_metrics(samples: list[dict]) -> dict:
    """`{group: {"n", "accuracy", "blind_accuracy"}}` for "overall" and each question type, from `samples`.

    Accuracies are VQA accuracy fractions in [0, 1] of `prediction` and `blind_prediction` against `answer`.
    """
    vqa = evaluate.load(metrics.path("vqa_accuracy"))
    groups = {"overall": samples}
    for kind in sorted({sample["question_type"] for sample in samples}):
        groups[kind] = [sample for sample in samples if sample["question_type"] == kind]

    def score(group, key):
        references = [[sample["answer"]] for sample in group]
        return vqa.compute(predictions=[sample[key] for sample in group], references=references)["vqa_accuracy"]

    return {
        name: {
            "n": len(group),
            "accuracy": score(group, "prediction"),
            "blind_accuracy": score(group, "blind_prediction"),
        }
        for name, group in groups.items()
    }


def evaluate_vqa(
    model, processor, dataset, batch_size: int = 16, max_new_tokens: int = 16, feature_cache=None
) -> dict:
    """Answers with the image and blind, and their VQA accuracy overall and per `question_type`.

    Returns `{"metrics": vqa_metrics(samples), "samples": samples, "generation_seconds"}`, one sample per row:
    `{"id", "question_type", "question", "answer", "prediction", "blind_prediction"}`; `generation_seconds` is
    the wall time of each pass, `{"with_image", "blind"}` (the projector study's latency).
    """
    start = time.perf_counter()
    predictions = generate_answers(model, processor, dataset, batch_size, max_new_tokens, feature_cache=feature_cache)
    middle = time.perf_counter()
    blind_predictions = generate_answers(model, processor, dataset, batch_size, max_new_tokens, blind=True)
    seconds = {"with_image": middle - start, "blind": time.perf_counter() - middle}
    samples = []
    # Without the image column, iterating decodes no pictures.
    rows = dataset.select_columns(["id", "question_type", "answer", "messages"])
    for row, prediction, blind_prediction in zip(rows, predictions, blind_predictions):
        blocks = [block for message in prompt_messages(row["messages"]) for block in message["content"]]
        texts = [block["text"] for block in blocks if block["type"] == "text"]
        samples.append(
            {
                "id": row["id"],
                "question_type": row["question_type"],
                "question": " ".join(texts),
                "answer": row["answer"],
                "prediction": prediction,
                "blind_prediction": blind_prediction,
            }
        )
    return {"metrics": vqa_metrics(samples), "samples": samples, "generation_seconds": seconds}


def markdown_table(metrics_by_group: dict) -> str:
    """A Markdown table of `vqa_metrics` output: n, accuracy with image, blind, and their difference (percent)."""
    lines = [
        "| question type | n | with image (%) | blind (%) | image adds (points) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in metrics_by_group.items():
        accuracy, blind = 100 * row["accuracy"], 100 * row["blind_accuracy"]
        lines.append(f"| {name} | {row['n']} | {accuracy:.1f} | {blind:.1f} | {accuracy - blind:+.1f} |")
    return "\n".join(lines) + "\n"


def write_reports(results: dict, dataset, output_dir, num_samples: int = 12) -> dict[str, Path]:
    """Write `results.json`, `results.md`, `accuracy.png` and `samples.png` into `output_dir`.

    `results` is `evaluate_vqa`'s output (extra JSON-serialisable keys are kept); `dataset` holds the same rows
    in the same order and supplies the pictures of the first `num_samples` samples. Returns {name: path}.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: output_dir / name for name in ("results.json", "results.md", "accuracy.png", "samples.png")}
    paths["results.json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["results.md"].write_text(
        "# VQA accuracy with and without the image\n\n"
        "Blind: the same model and questions with the image removed; the difference is what the image adds.\n\n"
        + markdown_table(results["metrics"])
        + "\n![accuracy](accuracy.png)\n\n![samples](samples.png)\n"
    )
    plot_accuracy(results["metrics"], paths["accuracy.png"])
    plot_samples(results["samples"][:num_samples], dataset, paths["samples.png"])
    return paths


def plot_accuracy(metrics_by_group: dict, path) -> None:
    """A grouped bar chart, with image vs blind, per group of `vqa_metrics` output, saved as a PNG."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg, no pyplot state

    names = list(metrics_by_group)
    positions = range(len(names))
    figure = Figure(figsize=(1.8 * len(names) + 2, 4.5), layout="constrained")
    axes = figure.subplots()
    bars = [(-0.2, "accuracy", "with image", "tab:blue"), (0.2, "blind_accuracy", "blind", "tab:gray")]
    for offset, key, label, color in bars:
        values = [100 * metrics_by_group[name][key] for name in names]
        drawn = axes.bar([p + offset for p in positions], values, width=0.4, label=label, color=color)
        axes.bar_label(drawn, fmt="%.1f", padding=2, fontsize=9)
    axes.set_xticks(list(positions), [f"{name}\n(n={metrics_by_group[name]['n']})" for name in names])
    axes.set_xlabel("question type")
    axes.set_ylabel("VQA accuracy (%)")
    axes.set_ylim(0, 110)
    axes.set_title("VQA accuracy with and without the image")
    axes.legend(loc="upper left", bbox_to_anchor=(1, 1))
    figure.savefig(path, dpi=120)


def plot_samples(samples: list[dict], dataset, path, columns: int = 4) -> None:
    """A grid of pictures with question, answer and both predictions (green when the metric scores them 1)."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg, no pyplot state

    ids = dataset.select(range(len(samples)))["id"]
    if list(ids) != [sample["id"] for sample in samples]:
        raise ValueError("The dataset's first rows are not the samples to draw; pass the dataset that was evaluated.")
    vqa = evaluate.load(metrics.path("vqa_accuracy"))
    rows = -(-len(samples) // columns)
    figure = Figure(figsize=(2.8 * columns, 3.9 * rows), layout="constrained")
    for index, (sample, row) in enumerate(zip(samples, dataset)):
        axes = figure.add_subplot(rows, columns, index + 1)
        # easy-VQA images are 64 px; NEAREST keeps their edges sharp when enlarged.
        axes.imshow(row["images"][0].resize((192, 192), Image.NEAREST))
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_title("\n".join(textwrap.wrap(sample["question"], 30)), fontsize=9, parse_math=False)
        lines = [(f"answer: {sample['answer']}", "black")]
        for label, key in (("with image", "prediction"), ("blind", "blind_prediction")):
            correct = vqa.compute(predictions=[sample[key]], references=[[sample["answer"]]])["vqa_accuracy"] == 1.0
            # repr shows an empty answer as '' and control characters a random model may emit as escapes.
            shown = textwrap.shorten(repr(sample[key]), 26, placeholder="...")
            lines.append((f"{label}: {shown}", "green" if correct else "red"))
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
