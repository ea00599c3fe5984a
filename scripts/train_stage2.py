"""Stage 2, instruction tuning: train projector and language model (full or LoRA) on conversations.

The vision tower stays frozen, and its features come from the disk cache (`--cache_vision_features`); loss falls
on the assistant's answers only (hf_vlm.data.ConversationCollator). Driven by TRL's SFTTrainer (hf_vlm's
`VLMSFTTrainer`, whose loss projects only the answer positions on every device). Start from stage 1's output folder:

    python scripts/train_stage2.py --config scripts/configs/stage2_offline.yaml
    torchrun --nproc_per_node 2 scripts/train_stage2.py --config scripts/configs/stage2_offline.yaml
    accelerate launch scripts/train_stage2.py --config scripts/configs/stage2_siglip_smollm2.yaml  # GPU, Hub ids
"""

from dataclasses import dataclass, field

from transformers import set_seed
from trl import SFTConfig, TrlParser

from hf_vlm import cli
from hf_vlm.checkpoints import checkpoint_to_resume
from hf_vlm.cli import ModelArguments, load_vlm
from hf_vlm.data.collators import ConversationCollator
from hf_vlm.data.sources import conversation_dataset
from hf_vlm.data.token_checks import check_token_lengths
from hf_vlm.doctor import check_before_training
from hf_vlm.evaluation import easy_vqa_test_questions
from hf_vlm.feature_cache import prepare_feature_cache
from hf_vlm.learning_curve import LearningCurveCallback
from hf_vlm.training import VLMSFTTrainer, apply_lora, set_trainable, trainable_parameters


@dataclass
class DataArguments(cli.DataArguments):
    curve_every: int | None = field(
        default=None, metadata={"help": "Evaluate easy-VQA accuracy every N samples (a learning curve)."}
    )
    curve_questions: int = field(
        default=300, metadata={"help": "Held-out easy-VQA test questions per learning-curve point."}
    )
    doctor: bool = field(
        default=False, metadata={"help": "Audit the data first (hf_vlm.doctor); stop on a blocking finding."}
    )


@dataclass
class TuningArguments:
    projector_learning_rate: float = field(
        default=1e-4, metadata={"help": "The projector's rate; learning_rate is the LM's."}
    )
    use_lora: bool = field(default=False, metadata={"help": "LoRA adapters on the LM instead of full fine-tuning."})
    lora_r: int = 16
    lora_alpha: int = 32


def main(
    model_args: ModelArguments, data_args: DataArguments, tuning_args: TuningArguments, training_args: SFTConfig
) -> VLMSFTTrainer:
    # Model: projector and language model train (the LM through adapters with LoRA); the vision tower does not.
    set_seed(training_args.seed)  # a new projector or LoRA adapters start from random weights
    model, processor = load_vlm(model_args)
    set_trainable(model, vision=False, projector=True, language=not tuning_args.use_lora)
    if tuning_args.use_lora:
        model = apply_lora(model, rank=tuning_args.lora_r, alpha=tuning_args.lora_alpha)
    if training_args.process_index == 0:
        print("trainable parameters:", trainable_parameters(model))

    if data_args.doctor:  # every problem of the data, by sample id, before any is raised alone or trained on
        check_before_training(
            data_args,
            processor,
            stage=2,
            max_length=training_args.max_length,
            seed=training_args.seed,
            main_process=training_args.process_index == 0,
        )

    # Dataset: conversations in TRL's images + messages shape, validated once (cached) and checked against max_length
    # before step 1; our collator builds the labels.
    with training_args.main_process_first(desc="dataset validation"):
        dataset = conversation_dataset(
            data_args.dataset,
            max_samples=data_args.max_samples,
            seed=training_args.seed,
            image_folder=data_args.image_folder,
            on_error=data_args.on_error,
        )
        dataset = check_token_lengths(dataset, processor, training_args.max_length, on_error=data_args.on_error)
    if training_args.process_index == 0:
        print(f"training on {len(dataset)} conversations")
    training_args.dataset_kwargs = {"skip_prepare_dataset": True}
    training_args.remove_unused_columns = False
    cache = (
        prepare_feature_cache(model, processor, dataset, training_args, model_args.feature_cache_dir)
        if model_args.cache_vision_features
        else None
    )
    callbacks = []
    if data_args.curve_every:
        questions = easy_vqa_test_questions(data_args.curve_questions)
        callbacks.append(
            LearningCurveCallback(
                processor, questions, data_args.curve_every, f"{training_args.output_dir}/curve", feature_cache=cache
            )
        )

    # Training
    trainer = VLMSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=processor,
        data_collator=ConversationCollator(processor, max_length=training_args.max_length, feature_cache=cache),
        projector_learning_rate=tuning_args.projector_learning_rate,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=checkpoint_to_resume(training_args))
    trainer.save_model()  # model (LoRA merged), processor, code, loss.png, swapped in whole; --push_to_hub pushes it
    return trainer


if __name__ == "__main__":
    main(*TrlParser((ModelArguments, DataArguments, TuningArguments, SFTConfig)).parse_args_and_config())
