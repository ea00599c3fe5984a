"""benchmarks/generation.py --quick runs on tiny backbones and reports what the full run reports; throughput.py's
hf_vlm-against-Llava tables run on a tiny LM."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_generation_benchmark_quick_reports_both_models_and_one_tower_call(tmp_path):
    """--quick writes the table and JSON for both models; hf_vlm runs its tower once per generate, tokens match."""
    generation = load("generation")
    record = generation.main(["--quick", "--repeats", "2", "--output_dir", str(tmp_path)])

    saved = json.loads((tmp_path / "generation.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert set(saved["results"]) == {"hf_vlm", "Llava"}
    keys = [key for _, key, _, _ in generation.ROWS]
    for results in saved["results"].values():
        assert all(results[key] > 0 for key in keys)
        assert all(isinstance(n, int) and n >= 1 for n in results["vision_tower_calls_per_generate"])
        assert all(len(seconds) == 2 for seconds in results["seconds_per_repetition"].values())
    # generate encodes the images once, before prefill, and drops them after: one tower call per call, every time.
    assert saved["results"]["hf_vlm"]["vision_tower_calls_per_generate"] == [1]
    assert saved["same_tokens"] is True  # Llava has a copy of every weight, so greedy decoding agrees
    assert set(saved["ratios_hf_vlm_over_llava"]) == set(keys)

    report = (tmp_path / "generation.md").read_text()
    assert saved["command"] in report and saved["machine"] in report
    assert report.count("\n| ") == len(keys) + 2  # the header row and one row per measure, plus tower calls
    assert "| vision-tower calls per generate call | 1 |" in report
    timed_rows = [line for line in report.splitlines() if line.startswith(("| generate", "| time to first"))]
    cells = [cell for line in timed_rows for cell in line.strip("| ").split(" | ")[1:]]
    assert len(cells) == 9 and all(re.fullmatch(r"[\d.]+ \([\d.]+-[\d.]+\)", cell) for cell in cells)  # (min-max)


def test_throughput_llava_tables_run_on_a_tiny_lm():
    """Both settings give a table of Llava, hf_vlm on pixels and on cached features (a smoke test: the Llava is
    to_llava's copy of the weights, which tests/test_convert.py checks)."""
    from transformers import LlamaConfig

    throughput = load("throughput")
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=128,
    )
    tables = throughput.llava_tables(text, rounds=1, batch_size=2)
    assert len(tables) == 2
    for markdown, rows in tables:
        assert [row["variant"] for row in rows] == [
            "LlavaForConditionalGeneration (pixels, its loss)",
            "hf_vlm, pixels",
            "hf_vlm, cached vision features",
        ]
        assert all(row["samples_per_s"] > 0 for row in rows)
        assert all(row["variant"] in markdown for row in rows)
