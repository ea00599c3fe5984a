import ast
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import check_remote_code
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

import hf_vlm
from hf_vlm import VLMConfig, VLMForConditionalGeneration, VLMModel, VLMProcessor, build_vlm
from hf_vlm.cli import ModelArguments, load_vlm

SHIPPED = Path(hf_vlm.__file__).parent
SHIPPED_FILES = [
    SHIPPED / "modeling" / "configuration_vlm.py",
    SHIPPED / "modeling" / "modeling_vlm.py",
    SHIPPED / "modeling" / "projectors.py",
    SHIPPED / "processing" / "processing_vlm.py",
]


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory):
    """The built tiny model and processor saved in one folder."""
    model, processor = built
    folder = tmp_path_factory.mktemp("saved")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_auto_classes_return_hf_vlm_classes(saved):
    """With hf_vlm imported, the Auto classes load a saved folder as hf_vlm classes."""
    assert type(AutoConfig.from_pretrained(saved)) is VLMConfig
    assert type(AutoModel.from_pretrained(saved)) is VLMModel
    assert type(AutoModelForImageTextToText.from_pretrained(saved)) is VLMForConditionalGeneration
    assert type(AutoProcessor.from_pretrained(saved)) is VLMProcessor


def test_saved_folder_carries_its_code_and_auto_map(saved):
    """save_pretrained copies the shipped files and maps both model heads and the processor."""
    assert {f.name for f in SHIPPED_FILES} <= {p.name for p in saved.iterdir()}
    config = AutoConfig.from_pretrained(saved)
    assert config.auto_map == {
        "AutoConfig": "configuration_vlm.VLMConfig",
        "AutoModel": "modeling_vlm.VLMModel",
        "AutoModelForImageTextToText": "modeling_vlm.VLMForConditionalGeneration",
    }


def test_saved_config_has_no_local_paths(saved, backbones):
    """build_vlm got local folders; config.json names neither, and nothing of their path."""
    text = (saved / "config.json").read_text()
    config = json.loads(text)
    assert str(Path(backbones["siglip"]).parent) not in text
    assert [config[part].get("_name_or_path", "") for part in ("vision_config", "text_config")] == ["", ""]


def missing(tmp_path) -> dict[str, str]:
    return {
        "absolute": str(tmp_path / "stage1x"),
        "nested": "runs/demo/stage1x",
        "dot": "./stage1x",
        "home": "~/stage1x",
    }


@pytest.mark.parametrize("kind", ["absolute", "nested", "dot", "home"])
@pytest.mark.parametrize("argument", ["model_name_or_path", "vision_model", "text_model"])
def test_missing_local_folder_says_no_such_folder(backbones, tmp_path, monkeypatch, argument, kind):
    """A name that can only be a path and does not exist fails as "no such folder: <path>", before any Hub lookup."""
    monkeypatch.chdir(tmp_path)
    path = missing(tmp_path)[kind]
    fields = {"model_name_or_path": None, "vision_model": backbones["siglip"], "text_model": backbones["llama"]} | {
        argument: path
    }
    with pytest.raises(FileNotFoundError, match=f"{argument}: no such folder: {re.escape(path)}$"):
        load_vlm(ModelArguments(**fields))


def test_name_that_could_be_a_hub_id_says_no_such_folder_too(monkeypatch, tmp_path):
    """`runs/stage1x` could be a Hub repo, so the Hub is asked; its failure still says that it is no local folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        OSError, match="model_name_or_path='runs/stage1x' is not a local folder, and the Hub could not provide it"
    ):
        load_vlm(ModelArguments(model_name_or_path="runs/stage1x"))


def test_remote_code_loads_without_hf_vlm(built, saved, tmp_path):
    """In a process where `import hf_vlm` fails, trust_remote_code loads model and processor with identical logits."""
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    then = """
from transformers import AutoModel
print(type(AutoModel.from_pretrained(location, trust_remote_code=True)).__name__)
"""
    lines = check_remote_code(saved, *built, tmp_path, env, then)
    module, processor_name = lines[0].split()
    assert module.startswith("transformers_modules.") and processor_name == "VLMProcessor" and lines[1] == "VLMModel"


ALLOWED_TOP_LEVEL = {"torch", "transformers", "huggingface_hub"} | set(sys.stdlib_module_names)


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=lambda p: p.name)
def test_shipped_files_import_only_what_the_hub_has(path):
    """Shipped files import only torch, transformers, huggingface_hub, the standard library and flat siblings."""
    siblings = {p.stem for p in SHIPPED_FILES}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] in ALLOWED_TOP_LEVEL, f"{path.name}: import {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert node.module.split(".")[0] in ALLOWED_TOP_LEVEL, f"{path.name}: from {node.module}"
            else:
                assert node.level == 1 and node.module in siblings, (
                    f"{path.name}: from {'.' * node.level}{node.module or ''}"
                )


def test_import_guard_catches_bad_imports(tmp_path):
    """The guard above rejects `import hf_vlm`, `from ..x` and `from . import x` (so it can fail)."""
    for bad in [
        "import hf_vlm",
        "from ..modeling import x",
        "from . import projectors",
        "from .pkg.mod import x",
        "import numpy",
    ]:
        path = tmp_path / "modeling_vlm.py"
        path.write_text(bad + "\n")
        with pytest.raises(AssertionError):
            test_shipped_files_import_only_what_the_hub_has(path)


@pytest.mark.parametrize(("vision", "text"), [("siglip", "llama"), ("clip", "qwen2"), ("timm", "llama")])
def test_build_vlm_from_local_folders_trains_and_generates(backbones, vision, text):
    """build_vlm from saved tiny backbones gives a model and processor that agree, train a step and generate."""
    overrides = {"vision_feature_layer": 1} if vision == "timm" else {}
    model, processor = build_vlm(backbones[vision], backbones[text], "pixel_shuffle", **overrides)
    assert (
        model.config.image_token_id == processor.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    )
    assert model.config.image_seq_length == processor.image_seq_length == 4
    assert model.get_input_embeddings().num_embeddings >= len(processor.tokenizer)

    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
    ]
    batch = processor.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        return_assistant_tokens_mask=True,
        processor_kwargs={"images": [Image.new("RGB", (30, 30), "red")]},
    )
    batch["labels"] = hf_vlm.processing.make_labels(
        batch["input_ids"], batch["attention_mask"], processor.image_token_id, batch.pop("assistant_masks")
    )
    model.model.vision_tower.requires_grad_(False)  # as in both training stages; a frozen CNN keeps its BN statistics
    model.train()
    before = model.model.multi_modal_projector.linear.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(**batch).loss.backward()
    optimizer.step()
    assert not torch.equal(before, model.model.multi_modal_projector.linear.weight)

    model.eval()
    prompt = processor.apply_chat_template(
        messages[:1],
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        add_generation_prompt=True,
        processor_kwargs={"images": [Image.new("RGB", (30, 30), "red")]},
    )
    generated = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_build_vlm_keeps_pretrained_weights(backbones):
    """The built model's towers hold the pretrained weights, not fresh random ones."""
    from transformers import AutoModelForCausalLM, SiglipVisionModel

    model, _ = build_vlm(backbones["siglip"], backbones["llama"])
    vision = SiglipVisionModel.from_pretrained(backbones["siglip"])
    lm = AutoModelForCausalLM.from_pretrained(backbones["llama"])
    for ours, theirs in [(model.model.vision_tower, vision), (model.model.language_model, lm.model)]:
        expected = theirs.state_dict()
        assert ours.state_dict().keys() == expected.keys()
        # The embedding matrix gained one row for <image>; every pretrained row is kept.
        assert all(torch.equal(value[: len(expected[key])], expected[key]) for key, value in ours.state_dict().items())


@pytest.mark.parametrize("source", ["object", "folder"])
def test_pipeline_answers_an_image_question(built, saved, source):
    """pipeline("image-text-to-text") returns generated text for chat messages and for plain text."""
    model, processor = built
    pipe = pipeline("image-text-to-text", model=model if source == "object" else str(saved), processor=processor)
    image = Image.new("RGB", (12, 12), "green")
    chat = pipe(
        text=[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}],
        max_new_tokens=3,
    )
    assert chat[0]["generated_text"][-1]["role"] == "assistant"
    assert isinstance(chat[0]["generated_text"][-1]["content"], str)
    plain = pipe(images=image, text="<image> What?", max_new_tokens=3)
    assert plain[0]["generated_text"].startswith("<image> What?")
