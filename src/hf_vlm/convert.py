"""Convert between hf_vlm models and transformers' Llava, for the designs Llava expresses exactly.

Llava is a ViT-style tower, a choice of its hidden states (`vision_feature_layer`, one or a list concatenated on
channels) with or without the one leading CLS token (`vision_feature_select_strategy`: "default" drops it, "full"
keeps every token), then Linear-activation-Linear (`LlavaMultiModalProjector`), then a causal LM. An hf_vlm model of
that design (the `mlp` projector over SigLIP, CLIP and the like) has the same modules under the same names, so
conversion copies every weight as it is; any other design raises a `ValueError` that says why and what would export.

    python -m hf_vlm.convert to-llava runs/stage2 runs/stage2-llava      # loads with plain transformers
    python -m hf_vlm.convert from-llava llava-hf/llava-1.5-7b-hf runs/llava-1.5   # continue training it here

Both commands save model and processor to the output folder, load that folder back and print the largest absolute
difference between its logits and the source's on one sample.
"""

import argparse
import copy
import os
import re
import warnings

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedModel

from .build import loading_from
from .modeling import VLMConfig, VLMForConditionalGeneration
from .modeling.configuration_vlm import default_num_prefix_tokens
from .paths import is_hub_id
from .processing import VLMProcessor

EXPORTABLE = (
    "Llava expresses a ViT-style tower (SigLIP, CLIP, ...) whose hidden states (vision_feature_layer, an int or a "
    "list) reach the 'mlp' projector with the one CLS token dropped or kept"
)


def llava_config(model: VLMForConditionalGeneration) -> LlavaConfig:
    """The `LlavaConfig` of `model`'s design, exactly; a `ValueError` that says why for a design Llava cannot express."""
    config, vision = model.config, model.config.vision_config
    if config.projector_type != "mlp":
        raise ValueError(
            f"Cannot export the {config.projector_type!r} projector to Llava: Llava has one projector, "
            f"Linear-GELU-Linear, which is hf_vlm's 'mlp'. {EXPORTABLE}."
        )
    if (
        getattr(vision, "patch_size", None) is None
        or getattr(vision, "hidden_size", None) != config.vision_hidden_size
    ):
        raise ValueError(
            f"Cannot export the {vision.model_type!r} vision tower to Llava: Llava reads a ViT's sequence of hidden "
            "states and counts image tokens from the vision config's patch_size and hidden_size, which a CNN's "
            f"feature maps (flattened by hf_vlm) do not have. {EXPORTABLE}."
        )
    if not config.drop_cls_token:
        strategy = "full"
    elif config.vision_num_prefix_tokens == 1:
        strategy = "default"
    else:
        raise ValueError(
            f"Cannot export to Llava: this model drops the {config.vision_num_prefix_tokens} leading tokens (CLS and "
            f"register tokens) of its {vision.model_type!r} tower, and Llava's 'default' strategy drops exactly one. "
            f"{EXPORTABLE}; a model of this tower trained with drop_cls_token=False would export."
        )
    layer = config.vision_feature_layer
    if layer is None:
        # Llava selects hidden states only. CLIP's last_hidden_state is its last hidden state (its post_layernorm
        # touches the pooled output alone); SigLIP's has been through post_layernorm, which no selection applies.
        if not _last_hidden_state_is_last_layer(model.model.vision_tower, config):
            raise ValueError(
                f"Cannot export to Llava: this model reads the {vision.model_type!r} tower's last_hidden_state, which "
                "is not any of its hidden states (SigLIP's includes its post_layernorm), and Llava's "
                f"vision_feature_layer selects hidden states only. {EXPORTABLE}: a model trained with "
                "vision_feature_layer=-1 (the same features before that norm) or another layer would export."
            )
        layer = -1
    return LlavaConfig(
        vision_config=_portable(vision),
        text_config=_portable(config.text_config),
        image_token_index=config.image_token_id,
        image_seq_length=config.image_seq_length,
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        tie_word_embeddings=config.tie_word_embeddings,
        **_llava_projector_fields(model.model.multi_modal_projector),
    )


def _last_hidden_state_is_last_layer(tower: nn.Module, config: VLMConfig) -> bool:
    """Whether the tower's `last_hidden_state` is exactly its `hidden_states[-1]`, on one random image."""
    channels = getattr(config.vision_config, "num_channels", 3)
    pixels = torch.randn(1, channels, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    parameter = next(tower.parameters())
    with torch.no_grad():
        outputs = tower(pixels.to(parameter.device, parameter.dtype), output_hidden_states=True, return_dict=True)
    return torch.equal(outputs.last_hidden_state, outputs.hidden_states[-1])


def _llava_projector_fields(projector: nn.Module) -> dict:
    """`projector_hidden_act` and `multimodal_projector_bias` of a `LlavaMultiModalProjector` computing `projector`."""
    # Llava's "gelu" is the exact (erf) GELU, as nn.GELU() is; its one bias flag covers both linear maps.
    biases = {projector.linear_1.bias is not None, projector.linear_2.bias is not None}
    act = projector.act
    if type(act) is not nn.GELU or act.approximate != "none" or len(biases) != 1:
        raise ValueError(
            f"Cannot export this mlp projector to Llava: its activation is {act!r} and its linear maps have "
            f"biases {projector.linear_1.bias is not None} and {projector.linear_2.bias is not None}; Llava's "
            "projector is exact GELU (projector_hidden_act='gelu') between two maps that both have biases or both not."
        )
    return {"projector_hidden_act": "gelu", "multimodal_projector_bias": biases.pop()}


def to_llava(
    model: VLMForConditionalGeneration, processor: VLMProcessor
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A `LlavaForConditionalGeneration` with a copy of every weight of `model`, and a `LlavaProcessor` with its chat
    template, whose `save_pretrained` folder loads with transformers alone (no remote code, no hf_vlm).

    Raises `ValueError` for a design Llava cannot express exactly (see `llava_config`).
    """
    config = model.config
    llava = copy_weights(model, LlavaForConditionalGeneration, llava_config(model))
    # LlavaProcessor counts image tokens from the pixels: (side // patch_size)**2, plus the prefix tokens, minus the
    # CLS under "default"; the same count as config.image_seq_length for every design llava_config accepts.
    llava_processor = LlavaProcessor(
        image_processor=_copy_component(processor.image_processor),
        tokenizer=_copy_component(processor.tokenizer),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
        chat_template=processor.chat_template,
        image_token=processor.image_token,
        num_additional_image_tokens=config.vision_num_prefix_tokens,
    )
    return llava, llava_processor


def from_llava(
    llava: str | os.PathLike | LlavaForConditionalGeneration, processor: LlavaProcessor | None = None
) -> tuple[VLMForConditionalGeneration, VLMProcessor]:
    """An hf_vlm model (the `mlp` projector) and processor from a Llava checkpoint: a folder or Hub id, or a
    `LlavaForConditionalGeneration` with its `processor`. Every weight is copied as it is.

    Raises `ValueError` for a Llava that hf_vlm cannot express: a Pixtral tower (images of varying size), a
    projector other than GELU with biases, or the "default" strategy (drop one token) on a tower whose leading
    tokens are not exactly one CLS; and for a processor other than `LlavaProcessor`.
    """
    if isinstance(llava, (str, os.PathLike)):
        with loading_from(str(llava), "llava"):
            if processor is None:
                processor = AutoProcessor.from_pretrained(llava)
            llava = LlavaForConditionalGeneration.from_pretrained(llava)
    elif processor is None:
        raise ValueError("from_llava(model) needs the model's LlavaProcessor too: from_llava(model, processor).")
    source = llava.config
    # hf_vlm's towers take one image size and give image_seq_length tokens per image, which LlavaProcessor makes.
    # Pixtral (a Llava with a pixtral tower and PixtralProcessor) takes images of varying size, with a break token
    # after each row of patches; it has no hf_vlm form.
    if source.vision_config.model_type == "pixtral":
        raise ValueError(
            "Cannot express this Llava in hf_vlm: its 'pixtral' tower takes images of varying size (a break token "
            "after each row of patches), and hf_vlm's towers take one size. A Llava over a ViT-style tower such as "
            "CLIP or SigLIP converts."
        )
    if not isinstance(processor, LlavaProcessor):
        raise ValueError(
            f"from_llava needs the checkpoint's LlavaProcessor, got {type(processor).__name__}: hf_vlm's processor "
            "is made from its image processor, tokenizer and chat template."
        )
    if source.projector_hidden_act != "gelu" or not source.multimodal_projector_bias:
        raise ValueError(
            f"Cannot express this Llava projector in hf_vlm: projector_hidden_act={source.projector_hidden_act!r}, "
            f"multimodal_projector_bias={source.multimodal_projector_bias}; hf_vlm's 'mlp' is exact GELU "
            "('gelu') with biases."
        )
    vision = source.vision_config
    drop_cls_token = source.vision_feature_select_strategy == "default"
    if drop_cls_token and default_num_prefix_tokens(vision) != 1:
        raise ValueError(
            f"Cannot express this Llava in hf_vlm: its 'default' strategy drops the first token of the "
            f"{vision.model_type!r} tower, which has {default_num_prefix_tokens(vision)} leading non-patch tokens, "
            "and hf_vlm drops exactly those (drop_cls_token). A Llava with the 'full' strategy would convert."
        )
    config = VLMConfig(
        vision_config=_portable(vision),
        text_config=_portable(source.text_config),
        projector_type="mlp",
        image_token_id=source.image_token_id,
        vision_feature_layer=source.vision_feature_layer,
        drop_cls_token=drop_cls_token,
        tie_word_embeddings=source.tie_word_embeddings,
    )
    if processor.patch_size is not None:
        llava_tokens = (config.image_size // processor.patch_size) ** 2 + processor.num_additional_image_tokens
        llava_tokens -= processor.vision_feature_select_strategy == "default"
        if llava_tokens != config.image_seq_length:
            raise ValueError(
                f"The LlavaProcessor makes {llava_tokens} image tokens per image, the model's tower gives "
                f"{config.image_seq_length} features (hf_vlm assumes {config.vision_num_prefix_tokens} leading "
                f"non-patch tokens for {vision.model_type!r}); the checkpoint's processor and model disagree."
            )
    model = copy_weights(llava, VLMForConditionalGeneration, config)
    if not re.search(r"{%-?\s*generation\s*-?%}", processor.chat_template or ""):
        warnings.warn(
            "The Llava chat template has no {% generation %} markers, which hf_vlm's answer-only loss reads "
            "(stage 2); set processor.chat_template to one that has them before training (hf_vlm.processing."
            "CHAT_TEMPLATES for ChatML LMs).",
            stacklevel=2,
        )
    vlm_processor = VLMProcessor(
        _copy_component(processor.image_processor),
        _copy_component(processor.tokenizer),
        chat_template=processor.chat_template,
        image_token=processor.image_token,
        image_seq_length=config.image_seq_length,
    )
    return model, vlm_processor


def _portable(sub_config) -> dict:
    """A backbone config as a dict for the other model's config, without a local `_name_or_path`.

    As `VLMPreTrainedModel.save_pretrained` does: a local folder means nothing elsewhere and would publish the user's
    paths in config.json; a Hub id names the base model.
    """
    values = sub_config.to_dict()
    if not is_hub_id(values.get("_name_or_path")):
        values.pop("_name_or_path", None)
    return values


def _copy_component(component):
    """A copy of a processor's tokenizer or image processor without the `auto_map` it was loaded with.

    Loaded from an hf_vlm folder, both carry that folder's `auto_map` (VLMProcessor as remote code), and another
    processor's `save_pretrained` would write it again, pointing at code its folder does not hold.
    """
    component = copy.deepcopy(component)
    getattr(component, "init_kwargs", {}).pop("auto_map", None)  # tokenizers keep it there
    if "auto_map" in vars(component):  # image processors, as an attribute
        del component.auto_map
    return component


def copy_weights(source: PreTrainedModel, target_class: type[PreTrainedModel], config) -> PreTrainedModel:
    """A `target_class(config)` whose every parameter and buffer is a copy of `source`'s under the same name.

    The target is built on the meta device (no random initialisation to throw away), then each tensor is copied in,
    on the source's device and in its dtype, with a progress bar on a terminal. Tied weights stay tied; names or
    shapes that differ raise.
    """
    with torch.device("meta"):
        target = target_class(config)

    def tensors(model):
        return dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))

    sources, targets = tensors(source), tensors(target)
    if sources.keys() != targets.keys():
        differ = sorted(sources.keys() ^ targets.keys())
        raise ValueError(f"{type(source).__name__} and {target_class.__name__} differ in tensors {differ[:8]}.")
    shapes = [name for name, tensor in sources.items() if tensor.shape != targets[name].shape]
    if shapes:
        raise ValueError(f"{type(source).__name__} and {target_class.__name__} differ in the shapes of {shapes[:8]}.")
    unique = {id(tensor): tensor for tensor in sources.values()}
    copies = {}  # id of a source tensor -> its copy, so that tied weights share one copy as in the source
    total = sum(tensor.numel() * tensor.element_size() for tensor in unique.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"Copying to {target_class.__name__}", disable=None) as bar:
        for name, tensor in sources.items():
            if id(tensor) not in copies:
                data = tensor.detach().clone()
                copies[id(tensor)] = nn.Parameter(data) if isinstance(tensor, nn.Parameter) else data
                bar.update(tensor.numel() * tensor.element_size())
            module_name, _, attribute = name.rpartition(".")
            setattr(target.get_submodule(module_name), attribute, copies[id(tensor)])
    target.generation_config = copy.deepcopy(source.generation_config)
    target.config.dtype = source.dtype
    return target.train(source.training)


def logits_difference(reference, candidate) -> float:
    """Largest absolute difference between the logits of two (model, processor) pairs on one sample image and question.

    Both processors must encode the sample alike (same input ids); a `ValueError` says so otherwise.
    """
    (model, processor), (other_model, other_processor) = reference, candidate
    size = model.config.vision_config.image_size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    text = f"{processor.image_token} What is in the image?"
    inputs = processor(images=[image], text=text, return_tensors="pt")
    other_inputs = other_processor(images=[image], text=text, return_tensors="pt")
    if not torch.equal(inputs["input_ids"], other_inputs["input_ids"]):
        raise ValueError("The two processors encode the sample differently: their image token counts disagree.")
    with torch.no_grad():
        logits = model(**inputs.to(model.device)).logits
        other_logits = other_model(**other_inputs.to(other_model.device)).logits
    return (logits.float() - other_logits.float().to(logits.device)).abs().max().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hf_vlm.convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, about in (
        ("to-llava", "an hf_vlm checkpoint -> a LlavaForConditionalGeneration folder"),
        ("from-llava", "a Llava checkpoint -> an hf_vlm folder"),
    ):
        command = commands.add_parser(name, help=about)
        command.add_argument("source", help="folder or Hub id to convert")
        command.add_argument("output", help="folder to save the converted model and processor in")
    args = parser.parse_args(argv)

    with loading_from(args.source, "source"):
        if args.command == "to-llava":
            source = (
                VLMForConditionalGeneration.from_pretrained(args.source, dtype="auto"),
                VLMProcessor.from_pretrained(args.source),
            )
        else:
            source = (
                LlavaForConditionalGeneration.from_pretrained(args.source, dtype="auto"),
                AutoProcessor.from_pretrained(args.source),
            )
    try:
        model, processor = (to_llava if args.command == "to-llava" else from_llava)(*source)
    except ValueError as error:  # a design the other side cannot express: the reason, not a traceback
        raise SystemExit(f"error: {error}") from None
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    del model  # the check loads the saved folder back, as a user would
    loaded_class = LlavaForConditionalGeneration if args.command == "to-llava" else VLMForConditionalGeneration
    saved = loaded_class.from_pretrained(args.output, dtype="auto"), AutoProcessor.from_pretrained(args.output)
    difference = logits_difference(source, saved)
    print(f"Saved {type(saved[0]).__name__} to {args.output}")
    print(f"Logits check on one sample: max abs difference {difference:.3g}")
    # The same modules run in the same order; anything beyond rounding means the conversion is wrong.
    tolerance = 1e-4 if source[0].dtype == torch.float32 else 1e-2
    if difference > tolerance:
        raise SystemExit(f"Logits check failed: {difference:.3g} > {tolerance:g}.")


if __name__ == "__main__":
    main()
