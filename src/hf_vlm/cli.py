"""What the command-line scripts share: which model and data to train on, as arguments, and how they become a model.

`ModelArguments` and `DataArguments` (which each script extends) are parsed by `TrlParser` beside the trainer's
arguments (`scripts/train_stage1.py`, `scripts/train_stage2.py`, the demo); `load_vlm` turns `ModelArguments` into
`(model, processor)`; `stage_arguments` parses a stage's recipe plus overrides for the scripts that drive the stages
(the demo, the projector study).
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import TrlParser

from .build import build_vlm, loading_from
from .modeling import VLMForConditionalGeneration
from .processing import VLMProcessor


@dataclass
class ModelArguments:
    """Which VLM to train: an existing folder or Hub id, or a new one composed by `build_vlm`."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved hf_vlm model (e.g. stage 1's output)."}
    )
    vision_model: str | None = field(
        default=None, metadata={"help": "Vision encoder for a new VLM (Hub id or folder)."}
    )
    text_model: str | None = field(default=None, metadata={"help": "Causal LM for a new VLM (Hub id or folder)."})
    projector_type: str = field(default="mlp", metadata={"help": "A key of hf_vlm.PROJECTORS."})
    image_size: int | None = field(default=None, metadata={"help": "Input pixels for a CNN vision encoder."})
    vision_feature_layer: int | None = field(default=None, metadata={"help": "Hidden state fed to the projector."})
    projector_num_tokens: int = field(default=64, metadata={"help": "Tokens per image for c_abstractor / resampler."})
    pixel_shuffle_factor: int = field(default=2, metadata={"help": "r for pixel_shuffle."})
    pixel_shuffle_layernorm: bool = field(default=True, metadata={"help": "LayerNorm in pixel_shuffle, as InternVL."})
    cache_vision_features: bool = field(
        default=True,
        metadata={"help": "Encode each image once with the frozen tower and train on the stored features."},
    )
    feature_cache_dir: str | None = field(
        default=None, metadata={"help": "Root of the feature cache; default $HF_VLM_CACHE/vision_features."}
    )


@dataclass
class DataArguments:
    """Which data to train on, as both scripts take it; each script adds its own fields."""

    dataset: str = field(
        default="easy_vqa",
        metadata={
            "help": "A source name, a LLaVA / TRL / the_cauldron / caption-row JSON or JSONL file, a dataset folder "
            "or a Hub id (hf_vlm.data.sources); stage 1 takes several, comma-separated."
        },
    )
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder that relative image paths in a data file start from."}
    )
    on_error: str = field(
        default="raise",
        metadata={
            "help": "A bad sample (image, format, too long for max_length): 'raise' names it, "
            "'skip' drops it with a count.",
            "choices": ["raise", "skip"],
        },
    )
    max_samples: int | None = field(default=None, metadata={"help": "Train on this many samples at most."})


def load_vlm(args: ModelArguments) -> tuple[VLMForConditionalGeneration, VLMProcessor]:
    """`from_pretrained` when `model_name_or_path` is given, else `build_vlm(vision_model, text_model, ...)`."""
    if args.model_name_or_path is not None:
        with loading_from(args.model_name_or_path, "model_name_or_path"):
            model = VLMForConditionalGeneration.from_pretrained(args.model_name_or_path, dtype=torch.float32)
            return model, VLMProcessor.from_pretrained(args.model_name_or_path)
    if args.vision_model is None or args.text_model is None:
        raise ValueError("Give model_name_or_path, or both vision_model and text_model.")
    overrides = {
        "projector_num_tokens": args.projector_num_tokens,
        "pixel_shuffle_factor": args.pixel_shuffle_factor,
        "pixel_shuffle_layernorm": args.pixel_shuffle_layernorm,
    }
    if args.vision_feature_layer is not None:
        overrides["vision_feature_layer"] = args.vision_feature_layer
    return build_vlm(args.vision_model, args.text_model, args.projector_type, image_size=args.image_size, **overrides)


def stage_arguments(recipe: str, dataclass_types: tuple, output_dir: Path, **overrides) -> list:
    """Parse a YAML recipe into its script's dataclasses as `--config recipe --name value ...` would on the command
    line (TrlParser, the scripts' own parser): `overrides` and `output_dir` become flags after the recipe."""
    flags = ["--config", recipe, "--output_dir", str(output_dir)]
    for name, value in overrides.items():
        flags += [f"--{name}", str(value)]
    return list(TrlParser(dataclass_types).parse_args_and_config(flags))
