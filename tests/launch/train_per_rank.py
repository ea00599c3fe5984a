"""Run scripts/train_<stage>.py's main under torchrun and save each rank's trainable weights, its optimizer's groups
(name, initial lr, weight decay) and the number of images its data loader validated (rank{N}.pt, beside the output
folder, which the final save replaces whole).

    torchrun --nproc_per_node 2 tests/launch/train_per_rank.py stage1 --config recipe.yaml
"""

import importlib.util
import sys
from pathlib import Path

import torch
from transformers import TrainingArguments
from trl import SFTConfig, TrlParser

import hf_vlm.data.llava as llava
from hf_vlm.cli import ModelArguments

stage = sys.argv[1]
spec = importlib.util.spec_from_file_location(
    f"train_{stage}", Path(__file__).parents[2] / "scripts" / f"train_{stage}.py"
)
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)

validated = []
image_entry = llava.image_entry
llava.image_entry = lambda *args, **kwargs: validated.append(1) or image_entry(*args, **kwargs)

if __name__ == "__main__":
    if stage == "stage2":
        types = (ModelArguments, script.DataArguments, script.TuningArguments, SFTConfig)
    else:
        types = (ModelArguments, script.DataArguments, TrainingArguments)
    args = TrlParser(types).parse_args_and_config(sys.argv[2:])
    trainer = script.main(*args)
    model = trainer.accelerator.unwrap_model(trainer.model)
    weights = {k: v.detach().cpu() for k, v in model.named_parameters() if v.requires_grad}
    groups = [(g["name"], g["initial_lr"], g["weight_decay"]) for g in trainer.optimizer.param_groups]
    rank = {"weights": weights, "groups": groups, "world_size": trainer.args.world_size, "validated": len(validated)}
    torch.save(rank, Path(args[-1].output_dir).parent / f"rank{trainer.args.process_index}.pt")
