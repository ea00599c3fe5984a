"""Which checkpoint `--resume_from_checkpoint` resumes: a named one, or the newest complete one in `output_dir`.

`Trainer` writes `checkpoint-N` in place, in this order (transformers 5.24, `Trainer._save_checkpoint`): the weights
and config, `optimizer.pt`, `scheduler.pt`, `scaler.pt` (mixed precision only), the RNG state, and `trainer_state.json`
last. A run killed while saving leaves a folder with some of these, or with one cut short, and `Trainer.train` fails
on it. So a checkpoint counts as complete when every part below is there and every file it holds is readable: JSON
parses, a safetensors header parses and covers the file, a torch file is a zip archive with its central directory
(written last). These checks read headers and directories only, never the tensors.
"""

import json
import zipfile
from argparse import ArgumentTypeError
from pathlib import Path

from safetensors import SafetensorError, safe_open
from transformers.hf_argparser import string_to_bool
from transformers.trainer_utils import sort_checkpoints

from .saving import recover

# Part -> the names that hold it, the plain PyTorch one (one process or DDP) first. FSDP and DeepSpeed keep weights and
# optimizer state in their own files and folders (optimizer.bin, optimizer_0/, pytorch_model_fsdp_0/, global_stepN/),
# which count by name only: untested here.
PARTS = {
    "weights": (
        "model.safetensors",
        "model.safetensors.index.json",
        "adapter_model.safetensors",
        "pytorch_model_fsdp*",
        "global_step*",
    ),
    "optimizer": ("optimizer.pt", "optimizer.bin", "optimizer_0", "global_step*"),
    "scheduler": ("scheduler.pt", "global_step*"),
    "RNG state": ("rng_state.pth", "rng_state_*.pth"),  # one file per process under DDP
    "trainer state": ("trainer_state.json",),
}
ONLY_MODEL_PARTS = ("weights", "trainer state")  # what `save_only_model=True` saves, and Trainer resumes from
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def _unreadable(path: Path) -> str | None:
    """Why a file cannot be read back, or None; files of other kinds (code, templates) are not looked into."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            with safe_open(path, "pt"):
                pass
        elif path.suffix in TORCH_SUFFIXES:
            zipfile.ZipFile(path).close()
    except (OSError, ValueError, zipfile.BadZipFile, SafetensorError) as error:  # ValueError: bad JSON or UTF-8
        return f"{path.name} is unreadable ({type(error).__name__}: {error})"
    return None


def checkpoint_problems(folder: str | Path, save_only_model: bool = False, world_size: int = 1) -> list[str]:
    """What keeps `folder` from being resumed: missing parts and unreadable files; empty when it is complete.

    With `world_size > 1` every process's RNG state (`rng_state_<rank>.pth`, as Trainer writes them) must be there:
    a rank that resumed without its own would not continue exactly.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    required = ONLY_MODEL_PARTS if save_only_model else PARTS
    problems = [
        f"{PARTS[part][0]} is missing" for part in required if not any(any(folder.glob(name)) for name in PARTS[part])
    ]
    if world_size > 1 and not save_only_model:
        problems += [
            f"rng_state_{rank}.pth is missing"
            for rank in range(world_size)
            if not (folder / f"rng_state_{rank}.pth").is_file()
        ]
    index = folder / "model.safetensors.index.json"
    if index.is_file() and not _unreadable(index):
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        problems += [
            f"{shard} (listed in {index.name}) is missing" for shard in shards if not (folder / shard).is_file()
        ]
    return problems + [reason for path in sorted(folder.iterdir()) if path.is_file() and (reason := _unreadable(path))]


def checkpoint_to_resume(args) -> str | None:
    """`--resume_from_checkpoint` as `Trainer.train` takes it: a checkpoint path, or None to train from scratch.

    `true` or `last` (any case, or a YAML boolean) picks the newest complete `checkpoint-N` in `args.output_dir` and
    prints, on the main process, which newer ones it skipped and why; `false`, `none` or empty gives None. An explicit
    path must be complete too. Raises `ValueError` naming what is missing, also when `true` finds no complete checkpoint:
    that run asked to continue, and starting over instead would silently train from scratch.
    """
    value = args.resume_from_checkpoint
    text = "" if value is None else str(value).strip()  # YAML gives booleans, the command line strings
    if text.lower() in ("", "none"):
        return None
    try:
        # true/false/yes/no/1/0, as HfArgumentParser reads flags
        wanted = text.lower() == "last" or string_to_bool(text)
    except ArgumentTypeError:  # not a boolean: a path
        problems = checkpoint_problems(text, args.save_only_model, args.world_size)
        if problems:
            raise ValueError(
                f"--resume_from_checkpoint {text} is not a complete checkpoint: {'; '.join(problems)}. A run killed while "
                "saving leaves such a folder: pass an earlier checkpoint-N, or `true` for the newest complete one."
            ) from None
        return text
    if not wanted:
        return None
    with args.main_process_first(desc="repairing an interrupted save"):
        if args.process_index == 0:  # a kill during the final save's swap may have left checkpoint-N beside the folder
            recover(args.output_dir)

    skipped = []
    for folder in reversed(sort_checkpoints(args.output_dir)):  # newest first
        problems = checkpoint_problems(folder, args.save_only_model, args.world_size)
        if not problems:
            if skipped and args.process_index == 0:
                print(
                    f"--resume_from_checkpoint {text}: resuming from {folder}, skipping incomplete "
                    + "; ".join(skipped),
                    flush=True,
                )
            return folder
        skipped.append(f"{Path(folder).name} ({', '.join(problems)})")
    found = f": {'; '.join(skipped)}" if skipped else ""
    raise ValueError(
        f"--resume_from_checkpoint {text}: no complete checkpoint-N folder in {args.output_dir}{found}. "
        "Pass a checkpoint path, or --resume_from_checkpoint false to train from scratch."
    )
