"""What the two training stages differ in: which parts train, and at which learning rate.

Stage 1 (alignment) trains the projector only; stage 2 (instruction tuning) trains the projector and
the language model (fully, or LoRA adapters on it). The vision tower stays frozen in both, and a
frozen tower also stays in eval mode (see `VLMModel.train`) and runs without an autograd graph.
"""

import copy

import torch
from torch import nn
from transformers import Trainer
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


def part_of(parameter_name: str) -> str:
    """Which part (`vision`, `projector`, `language`) a parameter name belongs to, wrapped or not."""
    for part, attribute in PARTS.items():
        if f"{attribute}." in parameter_name:
            return part
    return "language"  # lm_head


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


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameter count per part (shared tensors counted once)."""
    counts, seen = dict.fromkeys(PARTS, 0), set()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and id(parameter) not in seen:
            seen.add(id(parameter))
            counts[part_of(name)] += parameter.numel()
    return counts


def param_groups(model: nn.Module, learning_rates: dict[str, float], weight_decay: float = 0.0) -> list[dict]:
    """One optimizer group per trainable part with its own learning rate; frozen parameters are left out.

    Pass the result as `optimizer_cls_and_kwargs=(torch.optim.AdamW, {"params": groups})` to a `Trainer` or
    `SFTTrainer`: its scheduler scales every group's rate by the same factor, so the ratios hold all run long.
    """
    grouped: dict[str, list[torch.nn.Parameter]] = {part: [] for part in PARTS}
    seen = set()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and id(parameter) not in seen:
            seen.add(id(parameter))
            grouped[part_of(name)].append(parameter)
    missing = [part for part, params in grouped.items() if params and part not in learning_rates]
    if missing:
        raise ValueError(f"No learning rate for the trainable part(s) {missing}; give learning_rates for {list(grouped)}.")
    # The language group first: trainers log the first group's rate, which is then `learning_rate`.
    order = sorted(grouped, key=lambda part: part != "language")
    return [
        {"params": grouped[part], "lr": learning_rates[part], "weight_decay": weight_decay, "name": part}
        for part in order
        if grouped[part]
    ]


# Linear layers of Llama-family LMs (SmolLM2, Qwen2, Llama) that LoRA adapts; only inside the language model.
LORA_TARGETS = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def apply_lora(model: nn.Module, rank: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules: str = LORA_TARGETS):
    """Wrap `model` with peft LoRA adapters on the language model; the projector stays fully trainable.

    peft freezes everything but the adapters, so the projector's `requires_grad` is restored afterwards.
    `save_run` merges the adapters back, so the saved folder is a plain hf_vlm model.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
    peft_model = get_peft_model(model, config)
    _unwrap(peft_model).model.multi_modal_projector.requires_grad_(True)
    return peft_model


def save_run(trainer, processor, output_dir: str) -> None:
    """Save a complete model folder (weights, processor, remote code) and `loss.png` into `output_dir`.

    The folder is replaced in one swap (`hf_vlm.saving.replacing`): a kill leaves the old model or the new one,
    never a mix. Its subfolders (`checkpoint-N`, logs, learning curves) stay; files that earlier saves or the
    trainer left at the top (an old card, old weight shards) do not. LoRA adapters are merged into a copy of the
    model, so `from_pretrained` loads the folder as it is and the trained peft model stays as it was. Only the
    main process writes.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    if trainer.is_world_process_zero():
        with replacing(output_dir) as folder:
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
            save_loss_curve(trainer.state.log_history, folder / "loss.png")


def save_loss_curve(log_history: list[dict], path: str, title: str = "Training loss") -> None:
    """Plot the `loss` entries of a trainer's log history against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    if points:
        axes.plot(*zip(*points), marker="." if len(points) < 50 else None)
    axes.set(xlabel="step", ylabel="loss (answer tokens)", title=title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


class VLMSFTTrainer(SFTTrainer):
    """TRL's `SFTTrainer`, with a loss that projects only the labelled positions through the LM head on any device.

    TRL's fused LM head keeps only the labelled positions on Triton devices (CUDA, XPU) and scores every position
    elsewhere, the CPU included, to keep tile shapes fixed for compilers such as Neuron's
    (`trl.kernels.chunked_logprob._use_triton`). A stage-2 sample has ~27 positions and an answer of ~2 tokens,
    so off Triton this trainer lets the model compute its loss, which projects labelled positions only
    (`VLMForConditionalGeneration.forward`), through `Trainer.compute_loss` (its scaling for `num_items_in_batch`
    and multiple processes included), and logs the same `entropy` and `mean_token_accuracy` as TRL.
    """

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """Write no card. TRL's (written into `output_dir` at every checkpoint, and by `push_to_hub`) describes a
        text-generation model fine-tuned from "None"; `hf_vlm.hub.model_card` writes this model's card."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        plain_nll = self.args.loss_type == "nll" and self.label_smoother is None and self.compute_loss_func is None
        if _use_triton(self.accelerator.device) or not plain_nll or self.aux_loss_enabled or "attention_mask" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)

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
