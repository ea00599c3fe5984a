"""The projector study's bookkeeping: designs, seed aggregates, ratios to mlp, the table."""

import pytest
from conftest import tiny_config

from hf_vlm.projector_study import DESIGNS, markdown_table, summarize


@pytest.mark.parametrize("name", list(DESIGNS))
def test_each_design_makes_the_tokens_its_name_says_on_a_4x4_grid(name):
    """On a 4 x 4 patch grid (both study backbones), compressing designs make 4 tokens and the others 16."""
    compressing = "_r2" in name or name.endswith("_4")
    assert tiny_config(**DESIGNS[name]).image_seq_length == (4 if compressing else 16)


def fake_run(design: str, seed: int, accuracy: float, samples_per_s: float) -> dict:
    """A run shaped as `run_design` returns it, with the numbers that matter here."""
    speed = {"samples_per_s": samples_per_s, "seconds": 10.0}
    metric = {"n": 4, "accuracy": accuracy, "blind_accuracy": 0.25}
    return {
        "design": design,
        "seed": seed,
        "image_seq_length": 16 if design == "mlp" else 4,
        "trainable_parameters": {"stage1": 10, "stage2": 100},
        "train": {"stage1": speed, "stage2": speed},
        "peak_memory_mib": 500.0 + seed,
        "latency_ms_per_answer": 20.0 if design == "mlp" else 10.0,
        "metrics": {"overall": metric, "color": metric},
        "stage1_caption_accuracy": {"n": 2, "color": 1.0, "shape": 0.5, "both": 0.5},
    }


def test_summary_gives_seed_spread_and_timing_ratios_to_mlp():
    """Means, min-max and std over seeds; samples/s and latency divided by mlp's means."""
    runs = [
        fake_run("mlp", 0, 0.5, 10.0),
        fake_run("mlp", 1, 0.7, 30.0),
        fake_run("resampler_4", 0, 0.4, 40.0),
        fake_run("resampler_4", 1, 0.4, 40.0),
    ]
    summary = summarize(runs)
    overall = summary["mlp"]["accuracy_overall"]
    assert overall["mean"] == pytest.approx(0.6) and (overall["min"], overall["max"]) == (0.5, 0.7)
    assert overall["std"] == pytest.approx(0.1414, abs=1e-4) and overall["n"] == 2
    assert summary["resampler_4"]["ratio_to_mlp"]["samples_per_s_stage1"] == 2.0  # 40 / mean(10, 30)
    assert summary["resampler_4"]["ratio_to_mlp"]["latency_ms_per_answer"] == 0.5
    table = markdown_table(summary).splitlines()
    assert table[2].startswith("| mlp | 16 | 10 / 100 | 20.0 (10.0-30.0), 1.00x |")
    assert "| 60.0 (50.0-70.0) |" in table[2] and "| 40.0 (40.0-40.0), 2.00x |" in table[3]


def test_summary_without_mlp_has_no_ratios():
    """Ratios need mlp in the same run; without it there are none rather than ratios to something else."""
    summary = summarize([fake_run("resampler_4", 0, 0.4, 40.0)])
    rows = markdown_table(summary).splitlines()[2:]
    assert "ratio_to_mlp" not in summary["resampler_4"] and not any("x |" in row for row in rows)
