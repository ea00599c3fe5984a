"""What the two training stages differ in: which parts train, and at which learning rate.

Stage 1 (alignment) trains the projector only; stage 2 (instruction tuning) trains the projector and
the language model (fully, or LoRA adapters on it). The vision tower stays frozen in both, and a
frozen tower also stays in eval mode (see `VLMModel.train`) and runs without an autograd graph.
Both stages' trainers (`VLMTrainer`, `VLMSFTTrainer`) make the optimizer groups per part and save a complete model.
"""

import copy
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_optimizer import is_optimizer_factory
from trl import SFTTrainer

from .saving import replacing

try:  # TRL's own test for devices where its fused LM head keeps only the labelled positions
    from trl.kernels.chunked_logprob import _use_triton
except ImportError:  # a private helper: if TRL moves it, assume what TRL 1.16 does

    def _use_triton(device: torch.device) -> bool:
        return device.type in ("cuda", "xpu")


# Part name -> attribute of `VLMModel`; `lm_head` belongs to the language part.
PARTS = {"vision": "vision_tower", "projector": "multi_modal_projector", "language": "language_model"}


def _unwrap(model: nn.Module) -> nn.Module:
    """The `VLMForConditionalGeneration` inside a peft wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "merge_and_unload")


def part_of(parameter_name: str) -> str:
    """Which part (`vision`, `projector`, `language`) a parameter name belongs to, wrapped or not."""
    for part, attribute in PARTS.items():
        if f"{attribute}." in parameter_name:
            return part
    if "lm_head." in parameter_name:
        return "language"
    # e.g. FSDP1 with use_orig_params=False flattens every name: the per-part rates would silently be lost
    raise ValueError(f"Parameter {parameter_name!r} belongs to no part of the VLM ({', '.join(PARTS)}, lm_head).")


def set_trainable(model: nn.Module, *, vision: bool, projector: bool, language: bool) -> dict[str, int]:
    """Set `requires_grad` per part and return the number of trainable parameters per part.

    For LoRA, call this before `apply_lora`: peft then freezes the language model's base weights and trains
    only its adapters.
    """
    vlm = _unwrap(model)
    flags = {"vision": vision, "projector": projector, "language": language}
    for part, attribute in PARTS.items():
        getattr(vlm.model, attribute).requires_grad_(flags[part])
    vlm.lm_head.requires_grad_(language)
    model.train(model.training)  # re-applies the frozen-tower eval mode
    return trainable_parameters(model)


def _trainable(model: nn.Module):
    """`(name, part, parameter)` for each trainable parameter, a tensor shared by two names (tied) once."""
    seen = set()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and id(parameter) not in seen:
            seen.add(id(parameter))
            yield name, part_of(name), parameter


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameter count per part (shared tensors counted once)."""
    counts = dict.fromkeys(PARTS, 0)
    for _, part, parameter in _trainable(model):
        counts[part] += parameter.numel()
    return counts


def param_groups(
    model: nn.Module, learning_rates: dict[str, float], weight_decay: float, decay_parameters
) -> list[dict]:
    """Optimizer groups for the trainable parameters: one per part and per decay split, each part at its own rate.

    `decay_parameters` names the parameters that decay (a Trainer's `get_decay_parameter_names(model)`); the others
    (biases, norms) get weight decay 0. Frozen parameters are left out, as are empty groups. Groups are named
    `<part>` and `<part>.no_decay`; the language part comes first, since trainers log the first group's rate.
    """
    decay_parameters = set(decay_parameters)
    grouped: dict[str, list[torch.nn.Parameter]] = {}
    for name, part, parameter in _trainable(model):
        grouped.setdefault(part if name in decay_parameters else f"{part}.no_decay", []).append(parameter)
    missing = sorted({name.split(".")[0] for name in grouped} - learning_rates.keys())
    if missing:
        raise ValueError(
            f"No learning rate for the trainable part(s) {missing}; learning_rates has {sorted(learning_rates)}."
        )
    order = [
        name for part in ("language", "projector", "vision") for name in (part, f"{part}.no_decay") if name in grouped
    ]
    return [
        {
            "params": grouped[name],
            "lr": learning_rates[name.split(".")[0]],
            "weight_decay": 0.0 if name.endswith(".no_decay") else weight_decay,
            "name": name,
        }
        for name in order
    ]


# Linear layers of Llama-family LMs (SmolLM2, Qwen2, Llama) that LoRA adapts; only inside the language model.
LORA_TARGETS = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def apply_lora(
    model: nn.Module, rank: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules: str = LORA_TARGETS
):
    """Wrap `model` with peft LoRA adapters on the language model; the projector stays fully trainable.

    peft freezes everything but the adapters, so the projector's `requires_grad` is restored afterwards.
    `save_run` (the trainers' final save) merges the adapters back, so the saved folder is a plain hf_vlm model.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
    peft_model = get_peft_model(model, config)
    _unwrap(peft_model).model.multi_modal_projector.requires_grad_(True)
    return peft_model


def save_run(trainer: Trainer, processor=None, output_dir: str | os.PathLike | None = None) -> None:
    """Save a complete model folder (weights, config, remote code, processor, `loss.png`); every process calls it.

    `output_dir` defaults to `trainer.args.output_dir`, `processor` to `trainer.processing_class`. The weights go
    through the Trainer's own `save_model`, which gathers sharded states (FSDP, DeepSpeed) on every process and
    writes on the main one. LoRA adapters are merged into a copy of the model that only the main process makes, so
    `from_pretrained` loads the folder as it is and the trained peft model stays as it was. The folder is replaced in
    one swap (`hf_vlm.saving.replacing`): a kill leaves the old model or the new one, never a mix. What else it
    holds (`checkpoint-N`, logs, the user's files and symlinks) stays; files of an earlier model save that this one
    did not write (old weight shards, an old model card: `hf_vlm.saving.MODEL_FILES`) do not. A save that wrote no
    weights raises and leaves the folder as it was. Where the folder cannot be renamed (the working directory, a
    mount point, a parent the user cannot write to) it is written in place, with a warning.
    """
    output_dir = trainer.args.output_dir if output_dir is None else output_dir
    processor = trainer.processing_class if processor is None else processor
    model = trainer.accelerator.unwrap_model(trainer.model)
    writer = trainer.args.should_save  # the process(es) that write, as in Trainer.save_model
    with replacing(output_dir) if writer else nullcontext(Path(output_dir)) as folder:
        if _is_peft(model):
            if writer:
                copy.deepcopy(model).merge_and_unload().save_pretrained(folder)
        else:  # Trainer's, not the subclass's: that one would come back here
            Trainer.save_model(trainer, str(folder), _internal_call=True)
        if writer:
            if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
                # e.g. FSDP with a SHARDED_STATE_DICT: the swap would replace a model with a folder of no weights
                raise RuntimeError(f"Saving to {output_dir} wrote no weights; {output_dir} is left as it was.")
            processor.save_pretrained(folder)
            save_loss_curve(trainer.state.log_history, folder / "loss.png")
    trainer.accelerator.wait_for_everyone()  # no process goes on before the folder is whole


def save_loss_curve(log_history: list[dict], path: str, title: str = "Training loss") -> None:
    """Plot the `loss` entries of a trainer's log history against the step."""
    # A bare Figure renders with Agg and leaves pyplot alone: matplotlib.use("Agg") here would switch the backend of
    # the whole process, and a notebook that trains would show no plots afterwards.
    from matplotlib.figure import Figure

    points = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    figure = Figure(figsize=(6, 3.5))
    axes = figure.subplots()
    if points:
        axes.plot(*zip(*points, strict=True), marker="." if len(points) < 50 else None)
    axes.set(xlabel="step", ylabel="loss (answer tokens)", title=title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


class VLMTrainerMixin:
    """What both stages' trainers add to their base (`Trainer` in stage 1, TRL's `SFTTrainer` in stage 2): optimizer
    groups per trainable part, made where the Trainer makes its optimizer, and a complete model as the run's save.

    `projector_learning_rate` (default: `args.learning_rate`) is the projector's rate; every other trainable part
    trains at `args.learning_rate`. The scheduler scales every group's rate by the same factor, so the ratio holds
    all run long.
    """

    def __init__(self, *args, projector_learning_rate: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.projector_learning_rate = projector_learning_rate
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if _is_peft(self.model) and (self.is_fsdp_enabled or zero3):
            # `save_run` merges the adapters into a copy of the whole model on the main process.
            raise ValueError(
                "LoRA with FSDP or DeepSpeed ZeRO-3 is not supported: the final save merges the adapters on the main "
                "process, which holds only a shard of the model."
            )

    def create_optimizer(self, model=None):
        """The optimizer that `--optim` names, with its settings (`--adam_beta1/2`, `--adam_epsilon`, `--optim_args`),
        over `param_groups`: per part, and without weight decay where the Trainer's `get_decay_parameter_names` says
        (biases, norms). The Trainer calls this before FSDP2 or DeepSpeed take the parameters over (they remap the
        optimizer's) or, under FSDP1, with the wrapped model."""
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        optimizer_cls, kwargs = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(self.args, model)
        if is_optimizer_factory(optimizer_cls) or kwargs.keys() & {"params", "model", "optimizer_dict"}:
            raise ValueError(
                f"The optimizer of --optim {self.args.optim} (or of optimizer_cls_and_kwargs) brings its own "
                "parameters or groups; the per-part learning rates need one that takes groups (adamw_torch, "
                "adafactor, sgd, ...)."
            )
        rates = dict.fromkeys(PARTS, self.args.learning_rate)
        if self.projector_learning_rate is not None:
            rates["projector"] = self.projector_learning_rate
        groups = param_groups(model, rates, self.args.weight_decay, self.get_decay_parameter_names(model))
        self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Into `args.output_dir` (the default, and where `push_to_hub` saves before it uploads): a complete model
        folder through `save_run`. Anywhere else (`checkpoint-N`): as the Trainer saves, what resuming reads."""
        if output_dir is not None and Path(output_dir).resolve() != Path(self.args.output_dir).resolve():
            return super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.push_to_hub and not _internal_call:
            # push_to_hub saves here (back through this method) and uploads the folder: one save, not two.
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
            return
        save_run(self)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
        """Write no card. The Trainer's and TRL's (TRL writes one into `output_dir` at every checkpoint; both write one
        before `push_to_hub` uploads) describe a text model fine-tuned from "None"; `hf_vlm.hub.model_card` writes
        this model's card."""


class VLMTrainer(VLMTrainerMixin, Trainer):
    """Stage 1's trainer: transformers' `Trainer` with `VLMTrainerMixin`'s per-part optimizer and complete save."""


class VLMSFTTrainer(VLMTrainerMixin, SFTTrainer):
    """TRL's `SFTTrainer` with `VLMTrainerMixin`, and a loss that projects only the labelled positions through the LM
    head on any device.

    TRL's fused LM head keeps only the labelled positions on Triton devices (CUDA, XPU) and scores every position
    elsewhere, the CPU included, to keep tile shapes fixed for compilers such as Neuron's
    (`trl.kernels.chunked_logprob._use_triton`). A stage-2 sample has ~27 positions and an answer of ~2 tokens,
    so off Triton this trainer lets the model compute its loss, which projects labelled positions only
    (`VLMForConditionalGeneration.forward`), through `Trainer.compute_loss` (its scaling for `num_items_in_batch`
    and multiple processes included), and logs the same `entropy` and `mean_token_accuracy` as TRL.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        plain_nll = self.args.loss_type == "nll" and self.label_smoother is None and self.compute_loss_func is None
        if (
            _use_triton(self.accelerator.device)
            or not plain_nll
            or self.aux_loss_enabled
            or "attention_mask" not in inputs
        ):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        loss, outputs = Trainer.compute_loss(
            self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )

        # The logits are those of the labelled positions, in the order of `shift_labels[shift_labels != -100]`.
        with torch.no_grad():
            shift_labels = nn.functional.pad(inputs["labels"][:, 1:], (0, 1), value=-100)
            targets = shift_labels[shift_labels != -100]
            log_probs = outputs.logits.float().log_softmax(-1)
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            gather = self.accelerator.gather_for_metrics
            num_valid = gather(torch.tensor(targets.numel(), device=targets.device)).sum()
            entropy_sum = gather(entropy.sum()).sum()
            num_correct = gather((outputs.logits.argmax(-1) == targets).sum()).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if return_outputs:  # as TRL: whoever asks for outputs gets (batch, seq_len, vocab) logits
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        return (loss, outputs) if return_outputs else loss
