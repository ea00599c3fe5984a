"""Run scripts/train_stage1.py's main under torchrun and save each rank's trainable weights and the number of images
its data loader validated (rank{N}.pt, beside the output folder, which the final save replaces whole)."""

import importlib.util
import sys
from pathlib import Path

import torch
from transformers import TrainingArguments
from trl import TrlParser

import hf_vlm.data.llava as llava
from hf_vlm.build import ModelArguments

spec = importlib.util.spec_from_file_location("train_stage1", Path(__file__).parents[2] / "scripts" / "train_stage1.py")
stage1 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage1)

validated = []
image_entry = llava.image_entry
llava.image_entry = lambda *args, **kwargs: validated.append(1) or image_entry(*args, **kwargs)

if __name__ == "__main__":
    args = TrlParser((ModelArguments, stage1.DataArguments, TrainingArguments)).parse_args_and_config(sys.argv[1:])
    trainer = stage1.main(*args)
    model = trainer.accelerator.unwrap_model(trainer.model)
    weights = {k: v.detach().cpu() for k, v in model.named_parameters() if v.requires_grad}
    torch.save({"weights": weights, "world_size": trainer.args.world_size, "validated": len(validated)}, Path(args[2].output_dir).parent / f"rank{trainer.args.process_index}.pt")
