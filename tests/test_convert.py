"""hf_vlm.convert: exact conversions to and from transformers' Llava, and refusals for designs Llava cannot express."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import _LM, _VIT, IMAGE_SIZE, check_remote_code, tiny_model, tiny_tokenizer
from PIL import Image
from torch import nn
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    Dinov2WithRegistersConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PixtralImageProcessor,
    PixtralProcessor,
    PixtralVisionConfig,
    SiglipVisionConfig,
)

from hf_vlm import VLMForConditionalGeneration, VLMProcessor, build_vlm
from hf_vlm.convert import copy_weights, from_llava, llava_config, main, to_llava
from hf_vlm.processing import CHAT_TEMPLATES

# vision backbone, build_vlm options, and the Llava fields they become.
EXPORTABLE = {
    # SigLIP emits no CLS: "full" keeps all its patches; its last hidden state (before post_layernorm) is layer -1.
    "siglip_layer_-1": ("siglip", dict(vision_feature_layer=-1), "full", -1),
    "clip_cls_dropped": ("clip", dict(vision_feature_layer=-2), "default", -2),
    "clip_cls_kept": ("clip", dict(vision_feature_layer=-2, drop_cls_token=False), "full", -2),
    # CLIP's last_hidden_state is its last hidden state (post_layernorm touches only the pooled output).
    "clip_last_hidden_state": ("clip", dict(), "default", -1),
    "clip_layer_list": ("clip", dict(vision_feature_layer=[-2, -1]), "default", [-2, -1]),
}


def build(backbones, case):
    vision, options, _, _ = EXPORTABLE[case]
    torch.manual_seed(0)
    return build_vlm(backbones[vision], backbones["llama"], "mlp", **options)


def sample(processor):
    image = Image.new("RGB", (20, 12), "teal")
    return processor(images=[image], text=f"{processor.image_token} What is in the image?", return_tensors="pt")


def logits_and_answer(model, inputs):
    with torch.no_grad():
        logits = model(**inputs).logits
        answer = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    return logits, answer


@pytest.mark.parametrize("case", list(EXPORTABLE))
def test_round_trip_through_llava_keeps_logits_and_greedy_answers(backbones, case):
    """hf_vlm -> Llava -> hf_vlm: both converted models give the source's logits (1e-5) and greedy answers."""
    _, _, strategy, layer = EXPORTABLE[case]
    model, processor = build(backbones, case)
    llava, llava_processor = to_llava(model, processor)
    back, back_processor = from_llava(llava, llava_processor)
    assert type(llava) is LlavaForConditionalGeneration and type(back) is VLMForConditionalGeneration
    assert (llava.config.vision_feature_select_strategy, llava.config.vision_feature_layer) == (strategy, layer)
    assert back.config.drop_cls_token == model.config.drop_cls_token and back.config.vision_feature_layer == layer

    inputs = sample(processor)
    # Llava's processor counts image tokens its own way (patches, CLS, strategy); it must come to the same ids.
    for other in (llava_processor, back_processor):
        assert torch.equal(sample(other)["input_ids"], inputs["input_ids"])
        assert torch.equal(sample(other)["pixel_values"], inputs["pixel_values"])
    logits, answer = logits_and_answer(model, inputs)
    for converted in (llava, back):
        converted_logits, converted_answer = logits_and_answer(converted, inputs)
        torch.testing.assert_close(converted_logits, logits, atol=1e-5, rtol=0)
        assert torch.equal(converted_answer, answer)


def test_converted_weights_are_copies_and_ties_stay():
    """The Llava model owns its weights (changing one leaves the source as it was), and tied weights stay tied."""
    model = tiny_model("clip", vision_feature_layer=-2, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    before = model.lm_head.weight.clone()
    llava = copy_weights(model, LlavaForConditionalGeneration, llava_config(model))
    assert llava.lm_head.weight is llava.model.language_model.embed_tokens.weight
    with torch.no_grad():
        llava.lm_head.weight.add_(1.0)
    assert torch.equal(model.lm_head.weight, before)
    assert not any(tensor.is_meta for tensor in llava.state_dict().values())


# In a process where `import hf_vlm` fails: plain transformers classes load the folder, and the pipeline answers.
PLAIN_TRANSFORMERS = """
from transformers import LlavaForConditionalGeneration, LlavaProcessor, pipeline

llava = LlavaForConditionalGeneration.from_pretrained(location)
plain_processor = AutoProcessor.from_pretrained(location)
assert type(plain_processor) is LlavaProcessor, type(plain_processor)
with torch.no_grad():
    assert torch.equal(llava(**plain_processor(images=[Image.new("RGB", (9, 9), "blue")], text="<image> What?",
                                               return_tensors="pt")).logits, expected["logits"])
pipe = pipeline("image-text-to-text", model=location)
chat = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (12, 12), "green")},
                                     {"type": "text", "text": "What?"}]}]
answer = pipe(text=chat, max_new_tokens=3)[0]["generated_text"][-1]
assert answer["role"] == "assistant" and isinstance(answer["content"], str), answer
print(type(pipe.model).__name__)
"""


def test_exported_folder_loads_with_transformers_alone(backbones, tmp_path):
    """The saved Llava folder holds no code and loads, logits equal to the source's, where hf_vlm is not importable."""
    model, processor = build(backbones, "clip_cls_dropped")
    processor.save_pretrained(tmp_path / "vlm")
    # Loaded from an hf_vlm folder, as the command line loads it: its parts then carry that folder's auto_map.
    processor = VLMProcessor.from_pretrained(tmp_path / "vlm")
    llava, llava_processor = to_llava(model, processor)
    folder = tmp_path / "llava"
    llava.save_pretrained(folder)
    llava_processor.save_pretrained(folder)
    assert not list(folder.glob("*.py"))
    saved_json = "".join(path.read_text() for path in folder.glob("*.json"))
    assert "auto_map" not in saved_json and "VLM" not in saved_json and "hf_vlm" not in saved_json

    # trust_remote_code is on in the shared check, so the classes it loaded show that no remote code was needed.
    lines = check_remote_code(folder, model, processor, tmp_path, dict(os.environ), PLAIN_TRANSFORMERS)
    assert lines == ["transformers.models.llava.modeling_llava LlavaProcessor", "LlavaForConditionalGeneration"]


def tiny_llava(**overrides):
    """A LlavaForConditionalGeneration over tiny CLIP and Llama, random weights, and its LlavaProcessor."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    fields = dict(
        vision_config=CLIPVisionConfig(**_VIT),
        text_config=LlamaConfig(**(_LM | dict(vocab_size=len(tokenizer)))),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
    )
    config = LlavaConfig(**(fields | overrides))
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=_VIT["patch_size"],
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=CHAT_TEMPLATES["chatml"],
        num_additional_image_tokens=1,
    )
    return llava, processor


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    """A tiny Llava checkpoint as transformers saves it: (folder, model, processor)."""
    llava, processor = tiny_llava()
    folder = tmp_path_factory.mktemp("llava")
    llava.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, llava, processor


def test_from_llava_checkpoint_gives_its_logits(llava_folder):
    """A Llava checkpoint saved by transformers becomes an hf_vlm model and processor with the same logits."""
    folder, llava, llava_processor = llava_folder
    model, processor = from_llava(folder)
    assert type(model) is VLMForConditionalGeneration and type(processor) is VLMProcessor
    assert (model.config.projector_type, model.config.drop_cls_token, model.config.image_seq_length) == (
        "mlp",
        True,
        16,
    )
    inputs = sample(processor)
    assert torch.equal(inputs["input_ids"], sample(llava_processor)["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, llava(**inputs).logits, atol=1e-5, rtol=0)


# The refusal tests pass the session's built processor: to_llava checks the design before it reads the processor.


@pytest.mark.parametrize("projector_type", ["linear", "pixel_shuffle", "c_abstractor", "resampler"])
def test_to_llava_refuses_other_projectors(built, projector_type):
    """Every projector but mlp raises, naming it and what Llava expresses."""
    model = tiny_model("siglip", projector_type=projector_type, vision_feature_layer=-1)
    with pytest.raises(ValueError, match=rf"Cannot export the '{projector_type}' projector to Llava.*'mlp'"):
        to_llava(model, built[1])


def test_to_llava_refuses_a_cnn_tower(built):
    """A timm CNN tower raises: Llava reads a ViT's hidden-state sequence."""
    model = tiny_model("timm", projector_type="mlp")
    with pytest.raises(ValueError, match=r"Cannot export the 'timm_wrapper' vision tower to Llava.*CNN"):
        to_llava(model, built[1])


def test_to_llava_refuses_siglip_last_hidden_state(built):
    """SigLIP read at last_hidden_state (post_layernorm applied) raises and names vision_feature_layer=-1."""
    model, processor = built
    assert model.config.vision_feature_layer is None  # build_vlm's default
    with pytest.raises(ValueError, match=r"last_hidden_state.*post_layernorm.*vision_feature_layer=-1"):
        to_llava(model, processor)


def test_to_llava_refuses_dropping_register_tokens(built):
    """Dropping CLS plus register tokens raises: Llava's "default" drops exactly one token."""
    vision = Dinov2WithRegistersConfig(**(_VIT | dict(num_register_tokens=2)))  # a CLS and 2 register tokens
    model = tiny_model(vision_config=vision, vision_feature_layer=-1)
    assert model.config.vision_num_prefix_tokens == 3
    with pytest.raises(ValueError, match=r"drops the 3 leading tokens.*drops exactly one"):
        to_llava(model, built[1])


@pytest.mark.parametrize("change", ["tanh_gelu", "one_bias"])
def test_to_llava_refuses_a_projector_llava_computes_differently(built, change):
    """An mlp whose activation is not exact GELU, or with a bias on one map only, raises."""
    model = tiny_model("siglip", vision_feature_layer=-1)
    projector = model.model.multi_modal_projector
    if change == "tanh_gelu":
        projector.act = nn.GELU(approximate="tanh")
    else:
        projector.linear_2 = nn.Linear(32, 32, bias=False)
    with pytest.raises(ValueError, match=r"Cannot export this mlp projector to Llava"):
        to_llava(model, built[1])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(projector_hidden_act="silu"), r"projector_hidden_act='silu'"),
        (dict(multimodal_projector_bias=False), r"multimodal_projector_bias=False"),
        (dict(vision_config=SiglipVisionConfig(**_VIT)), r"'default' strategy drops the first token"),
    ],
    ids=["silu", "no_bias", "siglip_default"],
)
def test_from_llava_refuses_what_hf_vlm_cannot_express(overrides, message):
    """A Llava projector other than GELU with biases, or "default" on a tower without one CLS, raises."""
    llava, processor = tiny_llava(**overrides)
    with pytest.raises(ValueError, match=message):
        from_llava(llava, processor)


def test_from_llava_refuses_pixtral_and_other_processors():
    """Pixtral's variable-size images have no hf_vlm form: its tower raises, and so does its processor beside a
    Llava that would otherwise convert, each with its own reason."""
    pixtral = PixtralVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16, patch_size=4
    )
    llava, processor = tiny_llava(vision_config=pixtral, vision_feature_select_strategy="full")
    processor.num_additional_image_tokens = 0  # a LlavaProcessor whose token count agrees with the tower
    with pytest.raises(ValueError, match=r"its 'pixtral' tower takes images of varying size"):
        from_llava(llava, processor)

    llava, processor = tiny_llava()
    tokenizer = processor.tokenizer
    tokenizer.add_tokens(["[IMG]", "[IMG_BREAK]", "[IMG_END]"], special_tokens=True)
    pixtral_processor = PixtralProcessor(PixtralImageProcessor(), tokenizer, patch_size=4)
    with pytest.raises(ValueError, match=r"needs the checkpoint's LlavaProcessor, got PixtralProcessor"):
        from_llava(llava, pixtral_processor)


def test_from_llava_warns_when_the_chat_template_has_no_generation_markers():
    """A Llava chat template without {% generation %} converts, with a warning that stage 2's loss needs them."""
    llava, processor = tiny_llava()
    processor.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    with pytest.warns(UserWarning, match=r"no \{% generation %\} markers"):
        _, vlm_processor = from_llava(llava, processor)
    assert vlm_processor.chat_template == processor.chat_template


def test_cli_to_llava_prints_the_logits_check(backbones, tmp_path):
    """`python -m hf_vlm.convert to-llava IN OUT` saves a Llava folder and prints a logits difference below 1e-5."""
    model, processor = build(backbones, "clip_layer_list")
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    result = subprocess.run(
        [sys.executable, "-m", "hf_vlm.convert", "to-llava", str(tmp_path / "vlm"), str(tmp_path / "llava")],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    difference = re.search(r"Logits check on one sample: max abs difference (\S+)", result.stdout)
    assert difference and float(difference[1]) < 1e-5, result.stdout
    assert json.loads((tmp_path / "llava" / "config.json").read_text())["model_type"] == "llava"


def test_cli_from_llava_prints_the_logits_check(llava_folder, tmp_path, capsys):
    """`from-llava IN OUT` (in process) saves an hf_vlm folder and prints a logits difference below 1e-5."""
    main(["from-llava", str(llava_folder[0]), str(tmp_path / "vlm")])
    difference = re.search(r"max abs difference (\S+)", capsys.readouterr().out)
    assert difference and float(difference[1]) < 1e-5
    assert json.loads((tmp_path / "vlm" / "config.json").read_text())["model_type"] == "hf_vlm"


def test_cli_says_why_a_design_cannot_export_without_a_traceback(built, tmp_path):
    """`to-llava` on a pixel-shuffle model exits with the reason as one error line, and writes nothing."""
    model = tiny_model("siglip", projector_type="pixel_shuffle", vision_feature_layer=-1)
    model.save_pretrained(tmp_path / "vlm")
    built[1].save_pretrained(tmp_path / "vlm")  # the design is checked before the processor is read
    with pytest.raises(SystemExit, match=r"^error: Cannot export the 'pixel_shuffle' projector to Llava"):
        main(["to-llava", str(tmp_path / "vlm"), str(tmp_path / "llava")])
    assert not (tmp_path / "llava").exists()
