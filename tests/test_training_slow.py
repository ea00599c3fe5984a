"""The training scripts as users launch them: from the command line with a YAML recipe, killed and resumed,
and under torchrun with two processes (gloo on the CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow


def write_recipe(path: Path, **entries) -> Path:
    path.write_text(yaml.safe_dump(entries))
    return path


def tiny_stage1_recipe(backbones, path, **overrides):
    entries = dict(
        vision_model=backbones["siglip"],
        text_model=backbones["llama"],
        max_samples=32,
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=0.01,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    return write_recipe(path, **(entries | overrides))


def tiny_stage2_recipe(path, **entries):
    common = dict(
        max_samples=16, per_device_train_batch_size=4, max_steps=3, learning_rate=0.001, projector_learning_rate=0.01,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
    )  # fmt: skip
    return write_recipe(path, **(common | entries))


def run(command, **kwargs):
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_both_scripts_run_from_the_command_line_with_yaml_recipes(backbones, tmp_path):
    """train_stage1.py then train_stage2.py, each with --config, leave folders that from_pretrained loads."""
    from hf_vlm import VLMForConditionalGeneration, VLMProcessor

    stage1 = tiny_stage1_recipe(backbones, tmp_path / "stage1.yaml", output_dir=str(tmp_path / "s1"))
    run([sys.executable, "scripts/train_stage1.py", "--config", str(stage1)])
    stage2 = tiny_stage2_recipe(
        tmp_path / "stage2.yaml", model_name_or_path=str(tmp_path / "s1"), output_dir=str(tmp_path / "s2")
    )
    run([sys.executable, "scripts/train_stage2.py", "--config", str(stage2)])
    for folder in ("s1", "s2"):
        assert VLMForConditionalGeneration.from_pretrained(tmp_path / folder) and VLMProcessor.from_pretrained(
            tmp_path / folder
        )
        assert (tmp_path / folder / "loss.png").is_file()


def test_killed_run_resumes_to_the_uninterrupted_weights(backbones, tmp_path):
    """A stage-1 run killed with SIGKILL and resumed from its last checkpoint ends with the uninterrupted run's
    weights."""
    settings = dict(max_steps=40, save_strategy="steps", save_steps=10, learning_rate=0.01, max_samples=64)
    whole = tiny_stage1_recipe(backbones, tmp_path / "whole.yaml", output_dir=str(tmp_path / "whole"), **settings)
    run([sys.executable, "scripts/train_stage1.py", "--config", str(whole)])

    cut = tiny_stage1_recipe(backbones, tmp_path / "cut.yaml", output_dir=str(tmp_path / "cut"), **settings)
    process = subprocess.Popen(
        [sys.executable, "scripts/train_stage1.py", "--config", str(cut)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first_checkpoint = tmp_path / "cut" / "checkpoint-10" / "trainer_state.json"
    while not first_checkpoint.exists() and process.poll() is None:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "model.safetensors").exists(), "the run finished before it was killed"

    run([sys.executable, "scripts/train_stage1.py", "--config", str(cut), "--resume_from_checkpoint", "true"])
    expected, resumed = (
        load_file(tmp_path / "whole" / "model.safetensors"),
        load_file(tmp_path / "cut" / "model.safetensors"),
    )
    assert expected.keys() == resumed.keys()
    projector = [k for k in expected if "multi_modal_projector" in k]
    assert projector and max((expected[k] - resumed[k]).abs().max().item() for k in expected) <= 1e-6


def test_run_killed_while_saving_resumes_from_the_last_complete_checkpoint(backbones, tmp_path):
    """A stage-1 run SIGKILLed halfway through its second checkpoint resumes with `true` from the first one, trains
    the remaining steps only, and ends with the uninterrupted run's weights."""
    from hf_vlm.checkpoints import checkpoint_problems

    settings = dict(max_steps=6, save_strategy="steps", save_steps=2)
    whole = tiny_stage1_recipe(backbones, tmp_path / "whole.yaml", output_dir=str(tmp_path / "whole"), **settings)
    run([sys.executable, "scripts/train_stage1.py", "--config", str(whole)])

    cut = tiny_stage1_recipe(backbones, tmp_path / "cut.yaml", output_dir=str(tmp_path / "cut"), **settings)
    killed = subprocess.run(
        [sys.executable, "tests/launch/stage1_killed_while_saving.py", "--config", str(cut)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    assert checkpoint_problems(tmp_path / "cut" / "checkpoint-2") == []
    problems = checkpoint_problems(tmp_path / "cut" / "checkpoint-4")
    assert (tmp_path / "cut" / "checkpoint-4" / "model.safetensors").is_file() and problems[-1].startswith(
        "optimizer.pt is unreadable"
    ), problems

    resumed = run(
        [sys.executable, "scripts/train_stage1.py", "--config", str(cut), "--resume_from_checkpoint", "true"]
    )
    assert f"resuming from {tmp_path / 'cut' / 'checkpoint-2'}, skipping incomplete checkpoint-4" in resumed.stdout
    assert resumed.stdout.count("{'loss'") == 4, resumed.stdout  # steps 3 to 6
    expected, final = (
        load_file(tmp_path / "whole" / "model.safetensors"),
        load_file(tmp_path / "cut" / "model.safetensors"),
    )
    assert expected.keys() == final.keys()
    assert max((expected[k] - final[k]).abs().max().item() for k in expected) <= 1e-6


def torchrun(stage: str, recipe: Path) -> subprocess.CompletedProcess:
    """Two processes (gloo on the CPU) of scripts/train_<stage>.py through tests/launch/train_per_rank.py."""
    launcher = Path(sys.executable).parent / "torchrun"
    return run(
        [str(launcher), "--nproc_per_node", "2", "tests/launch/train_per_rank.py", stage, "--config", str(recipe)]
    )


def test_two_process_torchrun_stage1_ends_with_identical_weights(backbones, tmp_path):
    """torchrun --nproc_per_node 2 runs stage 1 (gloo on CPU) from a caption file; both ranks end with the same
    trained weights, only the main process validated the data and printed, and only one wrote the feature cache (the
    other found every image stored)."""
    from PIL import Image

    features = tmp_path / "features"
    rows = []
    for i in range(32):
        Image.new("RGB", (16, 16), (i * 8, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"id": f"c{i}", "image": f"{i}.png", "caption": f"A square of red {i}."}))
    (tmp_path / "captions.jsonl").write_text("\n".join(rows))
    recipe = tiny_stage1_recipe(
        backbones,
        tmp_path / "ddp.yaml",
        output_dir=str(tmp_path / "ddp"),
        feature_cache_dir=str(features),
        dataset=str(tmp_path / "captions.jsonl"),
    )
    result = torchrun("stage1", recipe)
    assert result.stdout.count("trainable parameters:") == result.stdout.count("training on 32 captions") == 1, (
        result.stdout
    )
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["validated"] for r in ranks] == [32, 0]
    first, second = ranks[0]["weights"], ranks[1]["weights"]
    assert first.keys() == second.keys() and all("multi_modal_projector" in k for k in first)
    assert all(torch.equal(first[k], second[k]) for k in first)
    saved = load_file(tmp_path / "ddp" / "model.safetensors")
    assert all(torch.equal(saved[k], first[k]) for k in first)
    shards = list(features.glob("*/*.safetensors"))
    assert len(shards) == 1 and not list(features.glob("*/.*.tmp")), shards


def test_two_process_torchrun_stage2_ends_with_identical_weights(backbones, tmp_path):
    """torchrun --nproc_per_node 2 runs stage 2 (gloo on CPU, projector and LM training, its per-part optimizer made
    by the trainer); both ranks end with the same trained weights, which the main process saved and printed once."""
    recipe = tiny_stage2_recipe(
        tmp_path / "ddp.yaml",
        vision_model=backbones["siglip"],
        text_model=backbones["llama"],
        output_dir=str(tmp_path / "ddp"),
        weight_decay=0.1,
        seed=0,
    )
    result = torchrun("stage2", recipe)
    assert result.stdout.count("trainable parameters:") == result.stdout.count("training on 16 conversations") == 1, (
        result.stdout
    )
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    first, second = ranks[0]["weights"], ranks[1]["weights"]
    assert first.keys() == second.keys()
    assert any("multi_modal_projector" in k for k in first) and any("language_model" in k for k in first)
    assert not any("vision_tower" in k for k in first)
    assert all(torch.equal(first[k], second[k]) for k in first)
    saved = load_file(tmp_path / "ddp" / "model.safetensors")
    assert all(torch.equal(saved[k], first[k]) for k in first)
    # Each rank's optimizer holds the trainer-made per-part groups, with the recipe's rates and decay...
    expected = [
        ("language", 0.001, 0.1),
        ("language.no_decay", 0.001, 0.0),
        ("projector", 0.01, 0.1),
        ("projector.no_decay", 0.01, 0.0),
    ]
    assert [sorted(r["groups"]) for r in ranks] == [expected, expected]
    # ...and both parts trained: the weights moved from the ones the same seed builds.
    from transformers import set_seed

    from hf_vlm import build_vlm

    set_seed(0)
    initial = build_vlm(backbones["siglip"], backbones["llama"])[0].state_dict()
    for part in ("multi_modal_projector", "language_model"):
        assert any(not torch.equal(initial[k], first[k]) for k in first if part in k), part
