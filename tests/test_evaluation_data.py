"""Evaluation on your own data: hf_vlm.evaluation_data and scripts/run_eval.py --dataset / --metric."""

import importlib.util
import json
from pathlib import Path

import evaluate
import pytest
from datasets import Dataset
from PIL import Image
from trl import TrlParser

import hf_vlm.metrics
from hf_vlm.data import SkippedSamplesWarning
from hf_vlm.evaluation import generate_answers
from hf_vlm.evaluation_data import evaluation_dataset

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "run_eval.py"
COLORS = ("red", "green", "blue", "yellow")


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory):
    """The tiny built model and processor, saved: (folder, model, processor)."""
    model, processor = built
    folder = tmp_path_factory.mktemp("eval_model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder), model, processor


def write_images(folder: Path) -> list[str]:
    """One 16-pixel PNG per colour in `folder/images`; returns their paths relative to `folder`."""
    (folder / "images").mkdir(exist_ok=True)
    for color in COLORS:
        Image.new("RGB", (16, 16), color).save(folder / "images" / f"{color}.png")
    return [f"images/{color}.png" for color in COLORS]


def run_eval(*flags) -> dict:
    """scripts/run_eval.py's main on these command-line flags; returns the results.json it wrote."""
    spec = importlib.util.spec_from_file_location("run_eval", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (args,) = TrlParser((script.EvalArguments,)).parse_args_and_config(list(flags))
    script.main(args)
    return json.loads((Path(args.output_dir) / "results.json").read_text())


def own_answers(model, processor, path, max_new_tokens) -> dict[str, str]:
    """{id: the model's greedy answer with the image} for the rows of a data file (its references play no part)."""
    rows = evaluation_dataset(str(path))
    return dict(zip(rows["id"], generate_answers(model, processor, rows, max_new_tokens=max_new_tokens)))


def test_run_eval_on_llava_json_gives_the_vqa_accuracy_of_its_saved_predictions(saved, tmp_path):
    """On a LLaVA JSON, run_eval scores the last gpt turn as the reference, and its accuracies equal vqa_accuracy's."""
    folder, model, processor = saved
    images = write_images(tmp_path)
    records = [
        {"id": f"q{i}", "image": image, "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"}]}
        for i, image in enumerate(images)
    ]
    # A two-turn record: the question is the second, asked after the first turn and its answer.
    records[3]["conversations"] += [
        {"from": "gpt", "value": "a square"},
        {"from": "human", "value": "And its colour?"},
    ]
    references = dict(zip(["q0", "q1", "q2", "q3"], COLORS))
    for record in records:
        record["conversations"].append({"from": "gpt", "value": references[record["id"]]})
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(records))
    # The first two references become the model's own answers, so that two of the four questions score 1.
    own = own_answers(model, processor, path, max_new_tokens=4)
    references |= {"q0": own["q0"], "q1": own["q1"]}
    for record in records:
        record["conversations"][-1]["value"] = references[record["id"]]
    path.write_text(json.dumps(records))

    output_dir = tmp_path / "eval"
    flags = ["--dataset", str(path), "--metric", "vqa_accuracy", "--max_new_tokens", "4", "--batch_size", "3"]
    results = run_eval("--model_name_or_path", folder, "--output_dir", str(output_dir), *flags)

    samples = {sample["id"]: sample for sample in results["samples"]}
    assert {i: sample["answers"] for i, sample in samples.items()} == {i: [a] for i, a in references.items()}
    assert samples["q3"]["question"] == "And its colour?"
    assert samples["q0"]["prediction"] == own["q0"] and samples["q1"]["prediction"] == own["q1"]
    vqa = evaluate.load(hf_vlm.metrics.path("vqa_accuracy"))
    expected = {"n": 4}
    for key, predicted in (("accuracy", "prediction"), ("blind_accuracy", "blind_prediction")):
        predictions = [sample[predicted] for sample in results["samples"]]
        references_in_order = [sample["answers"] for sample in results["samples"]]
        expected[key] = vqa.compute(predictions=predictions, references=references_in_order)["vqa_accuracy"]
    assert results["metrics"] == {"overall": expected}  # LLaVA records have no question types
    assert expected["accuracy"] >= 0.5
    assert results["metric"] == "vqa_accuracy" and results["settings"]["dataset"] == str(path)
    assert "| overall | 4 |" in (output_dir / "results.md").read_text()
    for name in ("accuracy.png", "samples.png"):
        with Image.open(output_dir / name) as image:
            assert image.format == "PNG"
            image.verify()


def test_run_eval_on_llava_captions_gives_the_caption_metrics_of_its_saved_predictions(saved, tmp_path):
    """On LLaVA-Pretrain-style caption records, run_eval's BLEU-4, CIDEr-D and ROUGE-L equal caption_metrics'."""
    folder, model, processor = saved
    images = write_images(tmp_path)

    def records(captions):
        return [
            {
                "id": f"c{i}",
                "image": image,
                "conversations": [
                    {"from": "human", "value": "Describe the image.\n<image>"},
                    {"from": "gpt", "value": caption},
                ],
            }
            for i, (image, caption) in enumerate(zip(images, captions))
        ]

    path = tmp_path / "captions.jsonl"
    captions = [f"A {color} square on nothing." for color in COLORS]
    path.write_text("\n".join(json.dumps(record) for record in records(captions)))
    own = own_answers(model, processor, path, max_new_tokens=12)
    captions[0] = own["c0"]  # one caption the model's own, so that the scores are not all zero
    path.write_text("\n".join(json.dumps(record) for record in records(captions)))

    output_dir = tmp_path / "eval"
    flags = ["--dataset", str(path), "--metric", "caption_metrics", "--max_new_tokens", "12"]
    results = run_eval("--model_name_or_path", folder, "--output_dir", str(output_dir), *flags)

    assert [sample["answers"] for sample in sorted(results["samples"], key=lambda s: s["id"])] == [
        [c] for c in captions
    ]
    scorer = evaluate.load(hf_vlm.metrics.path("caption_metrics"))
    references = [sample["answers"] for sample in results["samples"]]
    expected = {"n": 4}
    for prefix, key in (("", "prediction"), ("blind_", "blind_prediction")):
        scores = scorer.compute(predictions=[sample[key] for sample in results["samples"]], references=references)
        expected |= {prefix + name: value for name, value in scores.items()}
    assert results["metrics"] == {"overall": expected}
    assert set(expected) == {"n", "bleu4", "cider", "rouge_l", "blind_bleu4", "blind_cider", "blind_rouge_l"}
    assert expected["rouge_l"] > 0
    table = (output_dir / "results.md").read_text()
    assert "| overall | 4 | CIDEr-D |" in table and "# Caption metrics" in table
    for name in ("scores.png", "samples.png"):
        with Image.open(output_dir / name) as image:
            assert image.format == "PNG"
            image.verify()


def test_answers_and_question_types_come_from_a_saved_folders_columns(tmp_path):
    """A save_to_disk folder's `answers` and `question_type` columns reach the rows by id, skipped samples or not."""
    picture = Image.new("RGB", (16, 16), "red")

    def turn(role, text, image=False):
        return {"role": role, "content": [{"type": "image"}] * image + [{"type": "text", "text": text}]}

    rows = {
        "id": ["a", "bad", "b", "c"],
        "images": [[picture], [], [picture], [picture]],  # "bad" has an image block but no image
        "messages": [[turn("user", "Colour?", image=True), turn("assistant", f"last turn {i}")] for i in range(4)],
        "answers": [["red", "Red", "crimson"], ["red"], None, ["blue"]],
        "question_type": ["color", "color", None, "color"],
    }
    Dataset.from_dict(rows).save_to_disk(tmp_path / "saved")
    with pytest.warns(SkippedSamplesWarning, match="image_count_mismatch"):
        dataset = evaluation_dataset(str(tmp_path / "saved"), on_error="skip")
    by_id = {
        row["id"]: (row["answers"], row["question_type"])
        for row in dataset.select_columns(["id", "answers", "question_type"])
    }
    # "b" has no answers value, so its last assistant turn is the reference.
    assert by_id == {"a": (["red", "Red", "crimson"], "color"), "b": (["last turn 2"], None), "c": (["blue"], "color")}

    Dataset.from_dict({"image": [picture] * 2, "caption": ["A red square.", "Red."]}).save_to_disk(tmp_path / "caps")
    captions = evaluation_dataset(str(tmp_path / "caps"), limit=1, seed=1)
    assert len(captions) == 1 and captions[0]["messages"][-1]["content"][0]["text"] == captions[0]["answers"][0]
    assert captions[0]["messages"][0]["content"][0]["type"] == "image" and len(captions[0]["images"]) == 1

    Dataset.from_dict(rows | {"answers": [[], ["x"], ["y"], ["z"]]}).save_to_disk(tmp_path / "empty")
    with pytest.raises(ValueError, match="sample 'a': 'answers' must be a string or a non-empty list"):
        evaluation_dataset(str(tmp_path / "empty"), on_error="skip")


def test_a_hub_dataset_of_trl_rows_gives_rows_with_its_answers(hub):
    """A Hub id of TRL rows with `answers` and `question_type` (pushed to the loopback Hub) gives them, by id."""
    picture = Image.new("RGB", (16, 16), "blue")
    rows = {
        "id": ["q0", "q1"],
        "images": [[picture], [picture]],
        "messages": [
            [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "blue"}],
            [{"role": "user", "content": "Is it red?"}, {"role": "assistant", "content": "no"}],
        ],
        "answers": [["blue", "navy"], ["no", "nope"]],
        "question_type": ["color", "yes/no"],
    }
    Dataset.from_dict(rows).push_to_hub("user/eval-questions")
    dataset = evaluation_dataset("user/eval-questions", split="train")
    by_id = {row["id"]: row for row in dataset.select_columns(["id", "answers", "question_type", "messages"])}
    assert {i: (row["answers"], row["question_type"]) for i, row in by_id.items()} == {
        "q0": (["blue", "navy"], "color"),
        "q1": (["no", "nope"], "yes/no"),
    }
    assert by_id["q1"]["messages"][0]["content"][0] == {"type": "image", "text": None}  # TRL's image placement


def test_the_training_scripts_names_give_held_out_rows_with_references():
    """easy_vqa_balanced reads the test split with its question types; synthetic's captions become the references."""
    balanced = evaluation_dataset("easy_vqa_balanced", limit=6)
    assert len(balanced) == 6 and all(i.startswith("easy_vqa-test-") for i in balanced["id"])
    last_turns = [messages[-1]["content"][0]["text"] for messages in balanced["messages"]]
    assert balanced["answers"] == [[text] for text in last_turns]
    assert set(balanced["question_type"]) <= {"yes/no", "color", "shape"} and None not in balanced["question_type"]
    assert set(balanced.column_names) == {"id", "images", "messages", "answers", "question_type"}

    scenes = evaluation_dataset("synthetic", limit=3, seed=7)
    assert len(scenes) == 3 and all(i.startswith("synthetic-7-") for i in scenes["id"])
    assert scenes["answers"] == [[messages[-1]["content"][0]["text"]] for messages in scenes["messages"]]
    assert scenes["question_type"] == [None] * 3
