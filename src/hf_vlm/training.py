"""What the two training stages differ in: which parts train, and at which learning rate.

Stage 1 (alignment) trains the projector only; stage 2 (instruction tuning) trains the projector and
the language model (fully, or LoRA adapters on it). The vision tower stays frozen in both, and a
frozen tower also stays in eval mode (see `VLMModel.train`) and runs without an autograd graph.
"""

import torch
from torch import nn

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
    return [
        {"params": params, "lr": learning_rates[part], "weight_decay": weight_decay, "name": part}
        for part, params in grouped.items()
        if params
    ]
