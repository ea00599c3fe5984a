"""Tiny random backbones shared by the tests: hidden size 32, 2 layers, 16-pixel images."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

# A private Hugging Face home and hf_vlm cache for the whole session, set before transformers and evaluate read
# them at import: no test reads or writes the user's caches (feature caches included), and nothing is fetched from
# the Hub (the `hub` fixture serves a loopback Hub where a test needs one).
HF_HOME = tempfile.mkdtemp(prefix="hf_vlm_tests_")
atexit.register(shutil.rmtree, HF_HOME, ignore_errors=True)
os.environ.update(
    HF_HOME=HF_HOME,
    HF_VLM_CACHE=os.path.join(HF_HOME, "hf_vlm"),
    HF_MODULES_CACHE=os.path.join(HF_HOME, "modules"),
    HF_METRICS_CACHE=os.path.join(HF_HOME, "metrics"),
    HF_HUB_OFFLINE="1",
)

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPVisionConfig, LlamaConfig, Qwen2Config, SiglipVisionConfig, TimmWrapperConfig  # noqa: E402

from hf_vlm import VLMConfig, VLMForConditionalGeneration  # noqa: E402

VOCAB_SIZE = 128
IMAGE_TOKEN_ID = 127  # an ordinary id of the tiny vocabulary, reserved for images in the tests
IMAGE_SIZE = 16

_VIT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=IMAGE_SIZE,
    patch_size=4,
)
_LM = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB_SIZE,
)

VISION_CONFIGS = {
    "siglip": lambda: SiglipVisionConfig(**_VIT),
    "clip": lambda: CLIPVisionConfig(**_VIT),
    # timm's test_resnet: stage 1 gives a 32-channel 4x4 map at 16 px; a timm config says none of this.
    "timm": lambda: TimmWrapperConfig(architecture="test_resnet", do_pooling=False, num_labels=0),
}
TIMM_GEOMETRY = dict(vision_feature_layer=1, image_size=IMAGE_SIZE, vision_grid_size=4, vision_hidden_size=32)
TEXT_CONFIGS = {"llama": lambda: LlamaConfig(**_LM), "qwen2": lambda: Qwen2Config(**_LM)}


def tiny_config(vision: str = "siglip", text: str = "llama", **overrides) -> VLMConfig:
    """A VLMConfig over tiny random backbones; `overrides` go to VLMConfig."""
    kwargs = dict(
        vision_config=VISION_CONFIGS[vision](), text_config=TEXT_CONFIGS[text](), image_token_id=IMAGE_TOKEN_ID
    )
    if vision == "timm":
        kwargs.update(TIMM_GEOMETRY)
    kwargs.update(projector_num_tokens=4)
    return VLMConfig(**(kwargs | overrides))


def tiny_model(vision: str = "siglip", text: str = "llama", **overrides) -> VLMForConditionalGeneration:
    """A seeded tiny model in eval mode."""
    torch.manual_seed(0)
    return VLMForConditionalGeneration(tiny_config(vision, text, **overrides)).eval()


def image_prompt(config: VLMConfig, num_images: int = 1, text: list[int] = (5, 6, 7)) -> list[int]:
    """Token ids: BOS, then each image's expanded tokens, then some text."""
    return [1] + [config.image_token_id] * (config.image_seq_length * num_images) + list(text)


@pytest.fixture
def model():
    return tiny_model()


# The start of a subprocess script that runs as on a machine without hf_vlm (remote-code checks).
WITHOUT_HF_VLM = """
import sys
sys.modules["hf_vlm"] = None  # `import hf_vlm` now fails, as on a machine without it
try:
    import hf_vlm
    raise SystemExit("hf_vlm is importable")
except ImportError:
    pass
"""

_REMOTE_CHECK = (
    WITHOUT_HF_VLM
    + """
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

location, expected_file = sys.argv[1:3]
expected = torch.load(expected_file)
model = AutoModelForImageTextToText.from_pretrained(location, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(location, trust_remote_code=True)
inputs = processor(images=[Image.new("RGB", (9, 9), "blue")], text="<image> What?", return_tensors="pt")
assert all(torch.equal(inputs[k], expected["inputs"][k]) for k in expected["inputs"]), "processor outputs differ"
with torch.no_grad():
    logits = model(**inputs).logits
assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
print(type(model).__module__, type(processor).__name__)
"""
)


def check_remote_code(location, model, processor, workdir, env, then: str = "", args=()) -> list[str]:
    """Load `location` (a folder or Hub repo) with trust_remote_code in a process where `import hf_vlm` fails.

    Asserts that its processor outputs and logits equal those of `processor` and `model`, then runs the script
    `then` (which sees `location`, `model`, `processor` and `sys.argv[3:] == args`) in the same process. Returns
    its stdout lines; the first is the loaded model's module and the processor's class name.
    """
    inputs = processor(images=[Image.new("RGB", (9, 9), "blue")], text="<image> What?", return_tensors="pt")
    with torch.no_grad():
        torch.save({"inputs": dict(inputs), "logits": model(**inputs).logits}, f"{workdir}/expected.pt")
    result = subprocess.run(
        [sys.executable, "-c", _REMOTE_CHECK + then, str(location), f"{workdir}/expected.pt", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=workdir,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


CORPUS = [
    "What is in the image? A red circle. Two blue squares. Is there a green triangle? yes no",
    "user assistant system",
]


def tiny_tokenizer():
    """A byte-level BPE tokenizer with ChatML's special tokens, trained on a few sentences (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def backbones(tmp_path_factory):
    """Folders of tiny pretrained-style backbones, as build_vlm takes them from the Hub: {name: path}."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        LlamaForCausalLM,
        Qwen2ForCausalLM,
        SiglipImageProcessor,
        SiglipVisionModel,
        TimmWrapperModel,
    )

    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    special = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    for name, model in [
        ("llama", LlamaForCausalLM(LlamaConfig(**(_LM | special)))),
        ("qwen2", Qwen2ForCausalLM(Qwen2Config(**(_LM | special)))),
    ]:
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)

    SiglipVisionModel(SiglipVisionConfig(**_VIT)).save_pretrained(root / "siglip")
    SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(root / "siglip")
    # A full dual-encoder checkpoint, as CLIP ships on the Hub; build_vlm keeps its vision half.
    clip_text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    CLIPModel(CLIPConfig(vision_config=_VIT, text_config=clip_text, projection_dim=16)).save_pretrained(root / "clip")
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(root / "clip")
    # timm keeps its preprocessing in config.json's pretrained_cfg, which TimmWrapperImageProcessor reads.
    timm_config = VISION_CONFIGS["timm"]()
    timm_config.pretrained_cfg = {
        "input_size": [3, IMAGE_SIZE, IMAGE_SIZE],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    TimmWrapperModel(timm_config).save_pretrained(root / "timm")
    return {path.name: str(path) for path in root.iterdir()}


@pytest.fixture(scope="session")
def built(backbones):
    """build_vlm over the tiny SigLIP and Llama folders: (model, processor)."""
    from hf_vlm import build_vlm

    torch.manual_seed(0)
    return build_vlm(backbones["siglip"], backbones["llama"], "mlp")


from hub_fixture import hub  # noqa: E402, F401  (the loopback Hub fixture)
