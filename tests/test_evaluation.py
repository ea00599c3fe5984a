"""hf_vlm.evaluation and scripts/run_eval.py on the tiny model and a few easy-VQA questions."""

import importlib.util
import json
from pathlib import Path

import evaluate
import pytest
import yaml
from PIL import Image
from trl import TrlParser

import hf_vlm.metrics
from hf_vlm.data import easy_vqa_conversations
from hf_vlm.evaluation import generate_answers, postprocess_answer, score_samples

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "run_eval.py"


def load_script():
    spec = importlib.util.spec_from_file_location("run_eval", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows():
    return easy_vqa_conversations("test", limit=4)


def test_postprocess_answer_keeps_the_first_line_without_trailing_punctuation():
    """An answer is its first line, stripped of whitespace and trailing punctuation only."""
    assert postprocess_answer("  Blue.\nuser: and the shape?") == "Blue"
    assert postprocess_answer("\n circle \n") == "circle"
    assert postprocess_answer("no?!") == "no"
    assert postprocess_answer("2.5") == "2.5"
    assert postprocess_answer("yes/no, maybe.") == "yes/no, maybe"
    assert postprocess_answer("") == ""


def test_score_samples_on_hand_made_samples():
    """Accuracy with image and blind, per question type and overall, match hand-scored samples."""
    samples = [
        {"question_type": "color", "answers": ["red"], "prediction": "Red.", "blind_prediction": "blue"},
        {"question_type": "color", "answers": ["blue"], "prediction": "green", "blind_prediction": "blue"},
        {"question_type": "yes/no", "answers": ["yes"], "prediction": "yes", "blind_prediction": "yes"},
        {"question_type": "shape", "answers": ["circle"], "prediction": "a circle", "blind_prediction": "no"},
    ]
    # "Red." and "a circle" count as right: the metric drops the period and the article.
    assert score_samples(samples) == {
        "overall": {"n": 4, "accuracy": 0.75, "blind_accuracy": 0.5},
        "color": {"n": 2, "accuracy": 0.5, "blind_accuracy": 0.5},
        "shape": {"n": 1, "accuracy": 1.0, "blind_accuracy": 0.0},
        "yes/no": {"n": 1, "accuracy": 1.0, "blind_accuracy": 1.0},
    }


def test_blind_generation_gets_no_image(built, rows, monkeypatch):
    """Blind prompts carry no pixel_values and no image tokens; with the image, both are there."""
    model, processor = built
    calls = []
    generate = model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    generate_answers(model, processor, rows, batch_size=2, max_new_tokens=2, blind=True)
    generate_answers(model, processor, rows, batch_size=2, max_new_tokens=2)
    image_token_id = model.config.image_token_id
    blind, seeing = calls[:2], calls[2:]
    assert len(blind) == len(seeing) == 2
    for call in blind:
        assert "pixel_values" not in call
        assert not (call["input_ids"] == image_token_id).any()
    for call in seeing:
        assert call["pixel_values"].shape[0] == 2
        assert ((call["input_ids"] == image_token_id).sum(-1) == processor.image_seq_length).all()
    for call in calls:
        assert call["use_cache"] is True and call["do_sample"] is False
        assert call["attention_mask"][:, -1].all()  # left padding: every prompt ends at the last position
        assert processor.tokenizer.decode(call["input_ids"][0]).endswith("<|im_start|>assistant\n")


def test_batched_answers_equal_one_at_a_time(built, rows):
    """Left-padded batches give the answers each question gets alone, with the image and blind."""
    model, processor = built
    for blind in (False, True):
        batched = generate_answers(model, processor, rows, batch_size=4, max_new_tokens=4, blind=blind)
        alone = generate_answers(model, processor, rows, batch_size=1, max_new_tokens=4, blind=blind)
        assert batched == alone


def test_run_eval_reports_match_their_saved_predictions(built, tmp_path):
    """run_eval writes valid JSON, Markdown and PNGs, and the JSON's accuracies equal the metric on its predictions."""
    model, processor = built
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    config = tmp_path / "eval.yaml"
    settings = {"model_name_or_path": str(tmp_path / "model"), "output_dir": str(tmp_path / "eval"), "limit": 8}
    config.write_text(yaml.safe_dump(settings | {"batch_size": 4, "max_new_tokens": 3}))
    run_eval = load_script()
    (args,) = TrlParser((run_eval.EvalArguments,)).parse_args_and_config(["--config", str(config)])
    run_eval.main(args)

    output_dir = tmp_path / "eval"
    header = "| question type | n | with image (%) | blind (%) | image adds (points) |"
    assert header in (output_dir / "results.md").read_text()
    for name in ("accuracy.png", "samples.png"):
        with Image.open(output_dir / name) as image:
            assert image.format == "PNG"
            image.verify()
    results = json.loads((output_dir / "results.json").read_text())
    samples = results["samples"]
    assert len(samples) == 8 and results["settings"]["num_questions"] == 8

    vqa = evaluate.load(hf_vlm.metrics.path("vqa_accuracy"))
    groups = {"overall": samples}
    for kind in {sample["question_type"] for sample in samples}:
        groups[kind] = [sample for sample in samples if sample["question_type"] == kind]
    assert set(results["metrics"]) == set(groups)
    for name, group in groups.items():
        references = [sample["answers"] for sample in group]
        expected = {"n": len(group)}
        for key, predicted in (("accuracy", "prediction"), ("blind_accuracy", "blind_prediction")):
            scores = vqa.compute(predictions=[sample[predicted] for sample in group], references=references)
            expected[key] = scores["vqa_accuracy"]
        assert results["metrics"][name] == expected, name


def test_answers_from_the_feature_cache_equal_answers_from_pixels(built, rows, tmp_path):
    """generate_answers with a feature cache encodes each image once and answers as from pixels."""
    from hf_vlm.feature_cache import VisionFeatureCache

    model, processor = built
    cache = VisionFeatureCache(model, processor, tmp_path)
    from_pixels = generate_answers(model, processor, rows, batch_size=2, max_new_tokens=4)
    assert generate_answers(model, processor, rows, batch_size=2, max_new_tokens=4, feature_cache=cache) == from_pixels
    encoded = cache.num_encoded
    assert encoded == len(set(rows["images"][i][0].tobytes() for i in range(len(rows))))
    generate_answers(model, processor, rows, batch_size=2, max_new_tokens=4, feature_cache=cache)
    assert cache.num_encoded == encoded  # the second pass encoded nothing


def test_caption_accuracy_counts_colour_and_shape_words(built, monkeypatch):
    """easy_vqa_caption_accuracy scores a caption right when it names the true colour (shape) and no other."""
    from hf_vlm import evaluation
    from hf_vlm.data import easy_vqa_captions

    captions = easy_vqa_captions("test").select(range(3))
    truths = captions["caption"]
    monkeypatch.setattr(
        evaluation, "generate_answers", lambda *args, **kwargs: [truths[0], "a blue red thing", "nothing"]
    )
    scores = evaluation.easy_vqa_caption_accuracy(*built, captions)
    # Only the first names its image's colour and shape; two colours, or none, is wrong.
    assert scores == {
        "n": 3,
        "color": pytest.approx(1 / 3),
        "shape": pytest.approx(1 / 3),
        "both": pytest.approx(1 / 3),
    }
