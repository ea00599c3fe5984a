"""build_vlm: a VLM and its processor from a pretrained vision encoder and a pretrained causal LM."""

import os
from contextlib import contextmanager

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    ViTImageProcessor,
)

from .modeling import VLMConfig, VLMForConditionalGeneration
from .paths import is_hub_id
from .processing import CHAT_TEMPLATES, END_OF_TURN, VLMProcessor


def build_vlm(
    vision_model: str,
    text_model: str,
    projector_type: str = "mlp",
    *,
    image_size: int | None = None,
    chat_template: str = "chatml",
    image_token: str = "<image>",
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> tuple[VLMForConditionalGeneration, VLMProcessor]:
    """Compose a pretrained vision encoder and a pretrained causal LM into a VLM with a fresh projector.

    Args:
        vision_model: Hub id or local folder of a vision encoder: a SigLIP or CLIP checkpoint (its vision tower
            is kept), a vision-only model, or a timm model saved through `TimmWrapperModel`.
        text_model: Hub id or local folder of a causal LM with its tokenizer.
        projector_type: a key of `hf_vlm.PROJECTORS`.
        image_size: input side in pixels. ViT encoders fix it; a CNN takes any size, so this sets it (the
            default is the size its image processor was made for).
        chat_template: a name in `hf_vlm.processing.CHAT_TEMPLATES` or a Jinja template.
        image_token: the placeholder for one image; added to the tokenizer as a special token.
        dtype: the dtype both backbones are loaded in.
        config_overrides: further `VLMConfig` fields (`vision_feature_layer`, `pixel_shuffle_factor`, ...).

    Returns:
        `(model, processor)` that agree on `image_token_id` and `image_seq_length`, the model in eval mode as
        `from_pretrained` returns it. The tokenizer pads on the left, as generation needs.
    """
    with loading_from(vision_model, "vision_model"):
        tower = _load_vision_tower(vision_model, dtype)
        image_processor = AutoImageProcessor.from_pretrained(vision_model)
    image_processor, image_size = _fit_image_processor(image_processor, tower, image_size)

    with loading_from(text_model, "text_model"):
        language_model = AutoModelForCausalLM.from_pretrained(text_model, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(text_model, padding_side="left")
    tokenizer.add_tokens([image_token], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _add_token_rows(language_model, len(tokenizer))

    config = VLMConfig(
        vision_config=tower.config,
        text_config=language_model.config,
        projector_type=projector_type,
        image_token_id=tokenizer.convert_tokens_to_ids(image_token),
        **(_vision_geometry(tower, image_size, config_overrides.get("vision_feature_layer")) | config_overrides),
    )
    model = VLMForConditionalGeneration(config).to(dtype)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(language_model.base_model.state_dict())
    model.lm_head.load_state_dict(language_model.get_output_embeddings().state_dict())
    model.generation_config = language_model.generation_config
    _stop_at_end_of_turn(model.generation_config, tokenizer, END_OF_TURN.get(chat_template))
    model.eval()

    processor = VLMProcessor(
        image_processor,
        tokenizer,
        chat_template=CHAT_TEMPLATES.get(chat_template, chat_template),
        image_token=image_token,
        image_seq_length=config.image_seq_length,
    )
    return model, processor


@contextmanager
def loading_from(name: str, argument: str):
    """Load from `name`, a local folder or a Hub id, saying plainly when a folder is missing.

    A name that can only be a path (huggingface_hub's repo-id rules reject `/abs`, `./x`, `~/x`, `a/b/c`) and does
    not exist fails here, before any Hub lookup whose error would speak of connections. A name that could be
    either (`runs/stage1`, `google/siglip-base-patch16-224`) goes to the Hub, and its failure says that it is not
    a local folder either.
    """
    if not os.path.exists(name) and not is_hub_id(name):
        raise FileNotFoundError(f"{argument}: no such folder: {name}")
    try:
        yield
    except OSError as error:
        if os.path.exists(name):
            raise
        raise OSError(
            f"{argument}={name!r} is not a local folder, and the Hub could not provide it: {error}"
        ) from error


def _stop_at_end_of_turn(generation_config, tokenizer, end_token: str | None) -> None:
    """Make the chat template's end-of-turn token an EOS for `generate`, beside the LM's own EOS tokens."""
    end_id = tokenizer.convert_tokens_to_ids(end_token) if end_token else None
    if end_id is None or end_id == tokenizer.unk_token_id:
        return
    eos = generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if end_id not in eos:
        generation_config.eos_token_id = eos + [end_id]
    if generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id


def _add_token_rows(language_model: PreTrainedModel, vocab_size: int) -> None:
    """Grow the embeddings (and an untied head) to `vocab_size`; new rows start at the mean of the old ones.

    The image token's input embedding is always overwritten by image features, so its value only needs to be
    harmless; the mean is deterministic, which keeps builds reproducible.
    """
    old_size = language_model.get_input_embeddings().num_embeddings
    if vocab_size <= old_size:
        return
    language_model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        matrices = {
            id(m.weight): m.weight
            for m in (language_model.get_input_embeddings(), language_model.get_output_embeddings())
        }
        for weight in matrices.values():
            weight[old_size:] = weight[:old_size].mean(0)


def _load_vision_tower(name: str, dtype: torch.dtype) -> PreTrainedModel:
    """The vision encoder alone; from a dual-encoder checkpoint (CLIP, SigLIP) only its vision half."""
    config = AutoConfig.from_pretrained(name)
    # A dual-encoder's vision model keeps the checkpoint's `vision_model.*` keys, so its weights load as they are.
    config = getattr(config, "vision_config", config)
    return AutoModel.from_pretrained(name, config=config, dtype=dtype).eval()


def _fit_image_processor(image_processor, tower: PreTrainedModel, image_size: int | None):
    """An image processor that outputs `image_size` pixels; timm's is replaced by a stock equivalent.

    `TimmWrapperImageProcessor` does not save on its own (its settings live in the timm model's config.json),
    so a VLM processor holding it would not round-trip; `ViTImageProcessor` with the same mean, std and
    resampling does, and it resizes to the full square rather than cropping, which keeps small images whole.
    """
    fixed_size = getattr(tower.config, "image_size", None)
    if fixed_size is not None and image_size not in (None, fixed_size):
        raise ValueError(
            f"The vision encoder takes {fixed_size}px images; image_size={image_size} cannot change that."
        )
    if type(image_processor).__name__ == "TimmWrapperImageProcessor":
        data = image_processor.data_config
        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}.get(data.get("interpolation"), Image.BICUBIC)
        image_processor = ViTImageProcessor(
            size={"height": image_size or data["input_size"][-1], "width": image_size or data["input_size"][-1]},
            image_mean=list(data["mean"]),
            image_std=list(data["std"]),
            resample=resample,
        )
    elif image_size is not None and fixed_size is None:
        image_processor.size = {"height": image_size, "width": image_size}

    produced = image_processor(Image.new("RGB", (37, 23)), return_tensors="pt")["pixel_values"].shape[-2:]
    wanted = fixed_size or image_size or produced[-1]
    if tuple(produced) != (wanted, wanted):
        raise ValueError(
            f"The image processor makes {tuple(produced)} images, the vision encoder needs {wanted}x{wanted}."
        )
    return image_processor, wanted


def _vision_geometry(tower: PreTrainedModel, image_size: int, vision_feature_layer) -> dict:
    """`image_size`, `vision_grid_size` and `vision_hidden_size`, measured when the config cannot say them (timm)."""
    if getattr(tower.config, "patch_size", None) is not None:
        return {}
    with torch.no_grad():
        outputs = tower(
            torch.zeros(1, 3, image_size, image_size, dtype=tower.dtype),
            output_hidden_states=vision_feature_layer is not None,
        )
    layers = vision_feature_layer if isinstance(vision_feature_layer, list) else [vision_feature_layer]
    maps = [outputs.last_hidden_state if layer is None else outputs.hidden_states[layer] for layer in layers]
    if len({tuple(m.shape) for m in maps}) != 1 or maps[0].ndim != 4:
        raise ValueError(
            f"vision_feature_layer={vision_feature_layer} selects maps of shapes {[tuple(m.shape) for m in maps]}; they must be equal (C, H, W) maps."
        )
    _, channels, height, width = maps[0].shape
    if height != width:
        raise ValueError(f"The vision encoder gives a {height}x{width} feature map; square maps only.")
    return {"image_size": image_size, "vision_grid_size": height, "vision_hidden_size": channels}
