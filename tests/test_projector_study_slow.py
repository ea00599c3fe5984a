"""The projector study's smoke run, as CI runs it: `scripts/compare_projectors.py --quick` on tiny random backbones."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_quick_study_reports_each_design_with_its_model_token_count_seed_spread_and_mlp_ratios(tmp_path):
    """--quick writes the table, JSON, figures and token maps; tokens equal each design's config; 2-seed spreads; mlp ratios."""
    from hf_vlm import build_vlm
    from hf_vlm.projector_study import DESIGNS, QUICK_DESIGNS

    out = tmp_path / "study"
    command = [sys.executable, "scripts/compare_projectors.py", "--quick", "--output_dir", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    for name in ("projectors.json", "projectors.md", "accuracy_tokens.png", "accuracy_time.png", "token_maps.png"):
        assert (out / name).stat().st_size > 0

    report = json.loads((out / "projectors.json").read_text())
    summary = report["summary"]
    assert list(summary) == list(QUICK_DESIGNS)
    # Seed 1 runs the designs in an order turned by one: no design is always first on a cold machine.
    order = [(name, 0) for name in QUICK_DESIGNS] + [(name, 1) for name in QUICK_DESIGNS[1:] + QUICK_DESIGNS[:1]]
    assert [(run["design"], run["seed"]) for run in report["runs"]] == order
    rows = {
        cells[0]: cells
        for line in (out / "projectors.md").read_text().splitlines()[4:]
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    tokens = {}
    for name in QUICK_DESIGNS:
        model, _ = build_vlm(str(out / "backbones" / "siglip"), str(out / "backbones" / "llama"), **DESIGNS[name])
        tokens[name] = model.config.image_seq_length
        assert summary[name]["image_seq_length"]["mean"] == tokens[name]
        assert rows[name][1] == str(tokens[name])
        accuracies = [key for key in summary[name] if key.startswith(("accuracy_", "blind_"))]
        assert "accuracy_overall" in accuracies and len(accuracies) == 8  # overall + 3 question types, image and blind
        for key in accuracies + ["caption_both"]:
            stats = summary[name][key]
            assert stats["n"] == 2 and stats["min"] <= stats["mean"] <= stats["max"], (name, key, stats)
        assert set(summary[name]["ratio_to_mlp"]) == {
            "samples_per_s_stage1",
            "samples_per_s_stage2",
            "train_s",
            "latency_ms_per_answer",
        }
        assert rows[name][3].endswith("x") and rows[name][6].endswith("x")  # the ratios reach the table
    assert summary["mlp"]["ratio_to_mlp"]["latency_ms_per_answer"] == 1
    assert tokens["mlp"] == 4 * tokens["pixel_shuffle_r2"]  # the compressing designs really compress

    # A second invocation with the same settings trains nothing: every run comes back from its run.json.
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    second = json.loads((out / "projectors.json").read_text())
    assert second["reused"] == [f"{name}/seed{seed}" for name, seed in order]
    assert (
        second["runs"] == report["runs"] and "reused from an earlier invocation" in (out / "projectors.md").read_text()
    )

    # --render_only rewrites the table and figures from projectors.json and the saved models, training nothing.
    for name in ("projectors.md", "token_maps.png"):
        (out / name).unlink()
    rendered = subprocess.run(
        [*command, "--render_only", "true"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert rendered.returncode == 0, rendered.stderr[-4000:]
    assert json.loads((out / "projectors.json").read_text()) == second
    assert (out / "projectors.md").read_text().count("\n| ") == len(QUICK_DESIGNS) + 1 and (
        out / "token_maps.png"
    ).exists()
