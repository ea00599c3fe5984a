"""Stage 1, feature alignment: train the projector on image-caption pairs; vision tower and LM frozen.

Loss falls on the caption only (hf_vlm.data.CaptionCollator). Driven by transformers' Trainer (hf_vlm's
`VLMTrainer`). The frozen tower encodes each image once into a disk cache (`--cache_vision_features false` turns that
off), which stage 2 and later runs reuse.

    python scripts/train_stage1.py --config scripts/configs/stage1_offline.yaml
    torchrun --nproc_per_node 2 scripts/train_stage1.py --config scripts/configs/stage1_offline.yaml
    accelerate launch scripts/train_stage1.py --config scripts/configs/stage1_siglip_smollm2.yaml  # GPU, Hub ids

Add `--resume_from_checkpoint <output_dir>/checkpoint-N` (or `true` for the newest complete one) to continue a run.
"""

from dataclasses import dataclass, field

from transformers import TrainingArguments, set_seed
from trl import TrlParser

from hf_vlm import cli
from hf_vlm.checkpoints import checkpoint_to_resume
from hf_vlm.cli import ModelArguments, load_vlm
from hf_vlm.data.collators import DEFAULT_CAPTION_PROMPT, CaptionCollator
from hf_vlm.data.sources import caption_dataset
from hf_vlm.data.token_checks import check_token_lengths
from hf_vlm.doctor import check_before_training
from hf_vlm.feature_cache import prepare_feature_cache
from hf_vlm.training import VLMTrainer, set_trainable


@dataclass
class DataArguments(cli.DataArguments):
    prompt: str = field(default=DEFAULT_CAPTION_PROMPT, metadata={"help": "The user turn before each caption."})
    max_length: int | None = field(default=None, metadata={"help": "Truncate longer samples."})
    doctor: bool = field(
        default=False, metadata={"help": "Audit the data first (hf_vlm.doctor); stop on a blocking finding."}
    )


def main(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> VLMTrainer:
    # Model: only the projector trains.
    set_seed(training_args.seed)  # the new projector's initial weights depend on it too
    model, processor = load_vlm(model_args)
    counts = set_trainable(model, vision=False, projector=True, language=False)
    if training_args.process_index == 0:
        print("trainable parameters:", counts)

    if data_args.doctor:  # every problem of the data, by sample id, before any is raised alone or trained on
        check_before_training(
            data_args,
            processor,
            stage=1,
            max_length=data_args.max_length,
            seed=training_args.seed,
            main_process=training_args.process_index == 0,
            prompt=data_args.prompt,
        )

    # Dataset: captions, validated once (cached) and checked against max_length before step 1; the collator renders
    # them as chat turns and keeps the raw columns it needs.
    with training_args.main_process_first(desc="dataset validation"):
        dataset = caption_dataset(
            data_args.dataset,
            max_samples=data_args.max_samples,
            seed=training_args.seed,
            image_folder=data_args.image_folder,
            on_error=data_args.on_error,
        )
        dataset = check_token_lengths(
            dataset, processor, data_args.max_length, on_error=data_args.on_error, caption_prompt=data_args.prompt
        )
    if training_args.process_index == 0:
        print(f"training on {len(dataset)} captions")
    training_args.remove_unused_columns = False
    cache = (
        prepare_feature_cache(model, processor, dataset, training_args, model_args.feature_cache_dir)
        if model_args.cache_vision_features
        else None
    )

    # Training
    trainer = VLMTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=processor,
        data_collator=CaptionCollator(
            processor, prompt=data_args.prompt, max_length=data_args.max_length, feature_cache=cache
        ),
    )
    trainer.train(resume_from_checkpoint=checkpoint_to_resume(training_args))
    trainer.save_model()  # model, processor, remote code, loss.png, swapped in whole; pushed with --push_to_hub true
    return trainer


if __name__ == "__main__":
    main(*TrlParser((ModelArguments, DataArguments, TrainingArguments)).parse_args_and_config())
