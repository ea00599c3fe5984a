"""Which checkpoint --resume_from_checkpoint resumes, against a checkpoint folder a real stage-1 Trainer wrote."""

import json
import shutil
from pathlib import Path

import pytest
from test_training import run_stage1
from transformers import TrainingArguments
from trl import TrlParser

from hf_vlm.checkpoints import checkpoint_problems, checkpoint_to_resume

REQUIRED = {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}


@pytest.fixture(scope="module")
def checkpoint(backbones, tmp_path_factory) -> Path:
    """checkpoint-1 of a one-step stage-1 run, as Trainer saves it."""
    output_dir = tmp_path_factory.mktemp("run")
    run_stage1(backbones, output_dir, max_steps=1, save_strategy="steps", save_steps=1)
    return output_dir / "checkpoint-1"


def cut(path: Path) -> None:
    """Keep the first half of a file, as a process killed while writing it leaves it."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def killed_while_saving_optimizer(folder: Path) -> Path:
    """Undo what Trainer writes after the optimizer, and cut the optimizer file short."""
    cut(folder / "optimizer.pt")
    for name in ("scheduler.pt", "rng_state.pth", "trainer_state.json"):
        (folder / name).unlink()
    return folder


def run_folder(checkpoint: Path, root: Path, complete: list[int], killed: list[int]) -> Path:
    """An output_dir with copies of `checkpoint` as checkpoint-N, complete or killed while saving."""
    for step in complete + killed:
        copy = Path(shutil.copytree(checkpoint, root / f"checkpoint-{step}"))
        if step in killed:
            killed_while_saving_optimizer(copy)
    return root


def args(output_dir: Path, resume) -> TrainingArguments:
    return TrainingArguments(output_dir=str(output_dir), resume_from_checkpoint=resume, use_cpu=True, report_to="none")


def test_a_trainer_checkpoint_is_complete_and_each_cut_or_missing_file_is_named(checkpoint, tmp_path):
    """Trainer's own checkpoint passes; cutting any file but code in half, or deleting a required one, fails naming
    that file; the other files (config, training_args.bin) may be absent."""
    assert checkpoint_problems(checkpoint) == []
    checked = sorted(
        path.name for path in checkpoint.iterdir() if path.suffix not in (".py", ".jinja")
    )  # code, templates
    assert REQUIRED <= set(checked), checked
    for name in checked:
        damaged = Path(shutil.copytree(checkpoint, tmp_path / f"cut-{name}"))
        cut(damaged / name)
        assert [problem.split()[:3] for problem in checkpoint_problems(damaged)] == [[name, "is", "unreadable"]]
        damaged = Path(shutil.copytree(checkpoint, tmp_path / f"without-{name}"))
        (damaged / name).unlink()
        assert checkpoint_problems(damaged) == ([f"{name} is missing"] if name in REQUIRED else [])


def test_save_only_model_checkpoints_need_weights_and_trainer_state_only(checkpoint, tmp_path):
    """With save_only_model (no optimizer, scheduler or RNG state saved) a weights-only checkpoint is complete."""
    weights_only = Path(shutil.copytree(checkpoint, tmp_path / "checkpoint-1"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (weights_only / name).unlink()
    assert checkpoint_problems(weights_only, save_only_model=True) == []
    assert len(checkpoint_problems(weights_only)) == 3
    (weights_only / "trainer_state.json").unlink()
    assert checkpoint_problems(weights_only, save_only_model=True) == ["trainer_state.json is missing"]


def test_true_skips_a_half_written_newest_checkpoint_and_says_so(checkpoint, tmp_path, capsys):
    """`true` passes over checkpoint-10, killed while saving, for checkpoint-9 (by step, not by name) and prints why."""
    output_dir = run_folder(checkpoint, tmp_path, complete=[2, 9], killed=[10])
    assert checkpoint_to_resume(args(output_dir, "true")) == str(output_dir / "checkpoint-9")
    printed = capsys.readouterr().out
    assert "skipping incomplete checkpoint-10" in printed and "optimizer.pt is unreadable" in printed
    assert "scheduler.pt is missing" in printed and "checkpoint-2" not in printed


@pytest.mark.parametrize(
    "entry, resumes",
    [
        ("true", True),
        ("True", True),
        ("last", True),
        ("LAST", True),
        ("false", False),
        ("False", False),
        ("none", False),
        ("''", False),
    ],
)
def test_yaml_and_command_line_values_through_trl_parser(checkpoint, tmp_path, entry, resumes):
    """`resume_from_checkpoint` from a YAML recipe (booleans there) or the command line (strings): true/last resume
    the newest complete checkpoint, false/none/empty train from scratch."""
    output_dir = run_folder(checkpoint, tmp_path / "run", complete=[1], killed=[2])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {output_dir}\nresume_from_checkpoint: {entry}\nuse_cpu: true\nreport_to: none\n")
    parser = TrlParser((TrainingArguments,))
    (from_yaml,) = parser.parse_args_and_config(["--config", str(recipe)])
    command_line = ["--output_dir", str(output_dir), "--resume_from_checkpoint", entry.strip("'"), "--use_cpu", "true"]
    (from_command_line,) = parser.parse_args_and_config(command_line)
    expected = str(output_dir / "checkpoint-1") if resumes else None
    assert checkpoint_to_resume(from_yaml) == expected
    assert checkpoint_to_resume(from_command_line) == expected


def test_an_explicit_path_is_checked_the_same_way(checkpoint, tmp_path):
    """A named checkpoint resumes when complete; else the error names each missing or cut file, or the missing folder."""
    output_dir = run_folder(checkpoint, tmp_path, complete=[1], killed=[2])
    assert checkpoint_to_resume(args(output_dir, str(output_dir / "checkpoint-1"))) == str(output_dir / "checkpoint-1")
    with pytest.raises(ValueError, match="checkpoint-2 is not a complete checkpoint") as error:
        checkpoint_to_resume(args(output_dir, str(output_dir / "checkpoint-2")))
    for problem in (
        "optimizer.pt is unreadable",
        "scheduler.pt is missing",
        "rng_state.pth is missing",
        "trainer_state.json is missing",
    ):
        assert problem in str(error.value)
    with pytest.raises(ValueError, match="checkpoint-3 is not a folder"):
        checkpoint_to_resume(args(output_dir, str(output_dir / "checkpoint-3")))


def test_sharded_weights_need_every_shard_their_index_lists(checkpoint, tmp_path):
    """Weights saved as shards with an index are complete only with every listed shard."""
    sharded = Path(shutil.copytree(checkpoint, tmp_path / "checkpoint-1"))
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert checkpoint_problems(sharded) == [
        "model-00002-of-00002.safetensors (listed in model.safetensors.index.json) is missing"
    ]


def test_true_without_a_complete_checkpoint_raises(checkpoint, tmp_path):
    """`true` with only incomplete checkpoints, or none, raises naming them and how to start from scratch."""
    output_dir = run_folder(checkpoint, tmp_path / "killed", complete=[], killed=[5])
    with pytest.raises(
        ValueError,
        match=r"no complete checkpoint-N folder .*checkpoint-5 \(.*optimizer.pt is unreadable.*false to train",
    ):
        checkpoint_to_resume(args(output_dir, True))
    with pytest.raises(ValueError, match="no complete checkpoint-N folder"):
        checkpoint_to_resume(args(tmp_path / "empty", "last"))


def test_every_rank_needs_its_own_rng_state(checkpoint, tmp_path):
    """Under DDP each process writes rng_state_<rank>.pth; a checkpoint missing one rank's is not complete."""
    ddp = Path(shutil.copytree(checkpoint, tmp_path / "checkpoint-1"))
    (ddp / "rng_state.pth").rename(ddp / "rng_state_0.pth")
    assert checkpoint_problems(ddp, world_size=2) == ["rng_state_1.pth is missing"]
    shutil.copy(ddp / "rng_state_0.pth", ddp / "rng_state_1.pth")
    assert checkpoint_problems(ddp, world_size=2) == []


def test_true_finds_checkpoints_that_a_kill_during_the_final_swap_left_beside_the_folder(checkpoint, tmp_path):
    """A kill between the two renames of the final save leaves output_dir absent and its old version (with the
    checkpoints) beside it; `true` repairs that first and resumes from the newest checkpoint."""
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old = tmp_path / f".run.old-{socket.gethostname()}-{dead.stdout.strip()}-0badf00d"
    run_folder(checkpoint, old, complete=[3], killed=[])
    output_dir = tmp_path / "run"
    assert not output_dir.exists()
    assert checkpoint_to_resume(args(output_dir, "true")) == str(output_dir / "checkpoint-3")
    assert not old.exists()
