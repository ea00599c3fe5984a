"""Run scripts/train_stage1.py and SIGKILL it while it saves its second checkpoint: the weights are written,
optimizer.pt only halfway, and nothing after it (scheduler, RNG and trainer state), as a kill at that moment leaves
the folder."""

import io
import os
import runpy
import signal
import sys
from pathlib import Path

import torch
from transformers import Trainer

SCRIPT = str(Path(__file__).parents[2] / "scripts" / "train_stage1.py")
save_optimizer_and_scheduler = Trainer._save_optimizer_and_scheduler
saves = 0


def save_then_die_in_the_second(self, output_dir):
    global saves
    saves += 1
    if saves < 2:
        return save_optimizer_and_scheduler(self, output_dir)
    state = io.BytesIO()
    torch.save(self.optimizer.state_dict(), state)
    with open(os.path.join(output_dir, "optimizer.pt"), "wb") as file:
        file.write(state.getvalue()[: state.tell() // 2])
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    Trainer._save_optimizer_and_scheduler = save_then_die_in_the_second
    sys.argv = [SCRIPT, *sys.argv[1:]]
    runpy.run_path(SCRIPT, run_name="__main__")
