"""Projector designs compared: tokens, speed, memory and accuracy, each design trained and evaluated the same way.

    python scripts/compare_projectors.py            # all designs x 2 seeds on the demo's parts (61 min on 2 CPU cores)
    python scripts/compare_projectors.py --quick    # 4 designs x 2 seeds on tiny random backbones, a few minutes
    python scripts/compare_projectors.py --designs mlp,pixel_shuffle_r2 --seeds 0,1,2

Each design (`hf_vlm.projector_study.DESIGNS`) trains stage 1 (`train_stage1.main`, `configs/stage1_offline.yaml`)
then stage 2 (`train_stage2.main`, `configs/stage2_offline.yaml`) with the same parts, data, sample budget and seed,
then answers the same held-out easy-VQA questions with and without the image. Writes `projectors.json`,
`projectors.md`, `accuracy_tokens.png`, `accuracy_time.png` and `token_maps.png` into `--output_dir`
(`--render_only true` redraws all but the JSON from it). docs/projectors.md has the committed run.
"""

import sys
from pathlib import Path

import train_stage1
import train_stage2
from transformers import TrainingArguments
from trl import SFTConfig, TrlParser

from hf_vlm.cli import ModelArguments
from hf_vlm.projector_study import Stage, StudyArguments, main

CONFIGS = Path(__file__).parent / "configs"
STAGES = (
    Stage(
        train_stage1.main,
        (ModelArguments, train_stage1.DataArguments, TrainingArguments),
        str(CONFIGS / "stage1_offline.yaml"),
    ),
    Stage(
        train_stage2.main,
        (ModelArguments, train_stage2.DataArguments, train_stage2.TuningArguments, SFTConfig),
        str(CONFIGS / "stage2_offline.yaml"),
    ),
)

if __name__ == "__main__":
    (study_args,) = TrlParser((StudyArguments,)).parse_args_and_config()
    main(study_args, STAGES, command=["python", *sys.argv])
