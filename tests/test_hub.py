"""Sharing through the Hub, against the loopback Hub: push model + processor + card in one commit, load by repo
id with and without hf_vlm, the card's metadata and snippet, revisions, failed, unreachable, interrupted and killed
pushes, no local paths in what is pushed, and dataset pushes."""

import copy
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from conftest import check_remote_code
from datasets import Dataset, Features, List, Value
from datasets import Image as ImageFeature
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from PIL import Image
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

from hf_vlm import VLMForConditionalGeneration, VLMModel, VLMProcessor
from hf_vlm.data import CAPTION_FEATURES, CONVERSATION_FEATURES
from hf_vlm.data.sources import caption_dataset, conversation_dataset
from hf_vlm.hub import model_card, push

REPO = "user/tiny-vlm"
REPORT = {
    "dataset": {"name": "easy-VQA test subset", "type": "easy_vqa", "split": "test"},
    "metrics": {"vqa_accuracy": 0.816, "accuracy_color": 0.689},
}
SHIPPED_CODE = {"configuration_vlm.py", "modeling_vlm.py", "projectors.py", "processing_vlm.py"}


def changed(model: VLMForConditionalGeneration) -> VLMForConditionalGeneration:
    """A copy whose projector weights differ from the original's."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in model.model.multi_modal_projector.parameters():
            parameter.add_(1.0)
    return model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_pushed_repo_loads_without_hf_vlm_and_card_snippet_runs(hub, built, tmp_path):
    """In a process where `import hf_vlm` fails, the pushed repo loads with equal logits and the card's snippet runs."""
    model, processor = built
    push(model, processor, REPO)
    assert [m for m, path, _ in hub.server.log if m == "POST" and "/commit/" in path] == ["POST"]  # one commit
    files = {f.rfilename for f in HfApi().repo_info(REPO).siblings}
    assert {"README.md", "model.safetensors", "processor_config.json", "chat_template.jinja"} | SHIPPED_CODE <= files
    snippets = re.findall(r"```python\n(.*?)```", ModelCard.load(REPO).text, re.S)
    assert len(snippets) == 1 and f'from_pretrained("{REPO}", trust_remote_code=True)' in snippets[0]
    assert ".generate(" in snippets[0]
    (tmp_path / "snippet.py").write_text(snippets[0])

    # A fresh download cache, so everything comes over HTTP from the loopback Hub.
    env = os.environ | {"HF_HUB_CACHE": str(tmp_path / "fresh_cache"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    # The model card's usage snippet, as written.
    then = 'exec(open(sys.argv[3]).read(), {})\nprint("snippet ran")\n'
    lines = check_remote_code(REPO, model, processor, tmp_path, env, then, args=[tmp_path / "snippet.py"])
    assert lines[-1] == "snippet ran"  # after our check's line and the snippet's answer (random text)
    module, processor_name = lines[0].split()
    assert module.startswith("transformers_modules.") and processor_name == "VLMProcessor"


def test_push_to_hub_methods_then_auto_classes_need_no_remote_code(hub, built):
    """model/processor.push_to_hub upload weights and code; with hf_vlm imported the Auto classes load them."""
    model, processor = built
    model.push_to_hub(REPO)
    processor.push_to_hub(REPO)

    files = {f.rfilename for f in HfApi().repo_info(REPO).siblings}
    assert {"model.safetensors", "config.json", "processor_config.json", "chat_template.jinja"} | SHIPPED_CODE <= files
    assert type(AutoModel.from_pretrained(REPO)) is VLMModel
    assert type(AutoProcessor.from_pretrained(REPO)) is VLMProcessor
    loaded = AutoModelForImageTextToText.from_pretrained(REPO)
    assert type(loaded) is VLMForConditionalGeneration
    assert_same_weights(loaded, model)


def test_model_card_carries_hub_metadata(hub, built):
    """The pushed card parses with ModelCard and carries pipeline tag, library, backbones, datasets and results."""
    model, processor = built
    named = copy.deepcopy(model)
    named.config.vision_config._name_or_path, named.config.text_config._name_or_path = "org/vision", "org/text"
    push(
        named,
        processor,
        REPO,
        datasets=["user/tiny-captions"],
        eval_results=REPORT,
        license="apache-2.0",
        training="Stage 1 trains the projector on captions.",
    )

    card = ModelCard.load(REPO)
    assert card.data.pipeline_tag == "image-text-to-text" and card.data.library_name == "transformers"
    assert {"hf_vlm", "vision-language", "image-text-to-text"} <= set(card.data.tags)
    assert card.data.base_model == ["org/vision", "org/text"]
    assert card.data.datasets == ["user/tiny-captions"] and card.data.license == "apache-2.0"
    results = {(r.dataset_type, r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("easy_vqa", "test", "vqa_accuracy"): 0.816, ("easy_vqa", "test", "accuracy_color"): 0.689}
    assert "| easy-VQA test subset | test | vqa_accuracy | 0.816 |" in card.text
    assert "Stage 1 trains the projector on captions." in card.text
    # build_vlm got local folders here; a folder is no base model.
    assert model_card(model, repo_id=REPO).data.base_model is None


def test_old_revision_still_loads_after_a_second_push(hub, built):
    """A second push is a new commit on main; `revision=<first commit>` still loads the first weights."""
    model, processor = built
    second_model = changed(model)
    first = push(model, processor, REPO)
    second = push(second_model, processor, REPO)

    assert first.oid != second.oid == HfApi().repo_info(REPO).sha
    assert_same_weights(VLMForConditionalGeneration.from_pretrained(REPO, revision=first.oid), model)
    assert_same_weights(VLMForConditionalGeneration.from_pretrained(REPO), second_model)


@pytest.mark.parametrize("failing_file", ["model.safetensors", "README.md"])  # sent through LFS / inside the commit
def test_failed_upload_names_the_file_and_keeps_the_previous_commit(hub, built, failing_file):
    """A push whose upload of one file fails raises an error naming the repo and the file; main stays put."""
    model, processor = built
    first = push(model, processor, REPO)
    hub.server.fail_next_upload(failing_file)
    with pytest.raises(RuntimeError) as excinfo:
        push(changed(model), processor, REPO, training="Changed, so that README.md is uploaded again.")

    assert REPO in str(excinfo.value) and failing_file in str(excinfo.value)
    assert HfApi().repo_info(REPO).sha == first.oid
    assert_same_weights(VLMForConditionalGeneration.from_pretrained(REPO), model)


def closed_port() -> int:
    """A loopback port that nothing listens on: connecting to it is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_hub_raises_a_clear_error(hub, built, monkeypatch):
    """With the endpoint down, push fails at create_repo with a RuntimeError naming repo and endpoint, and the cause."""
    model, processor = built
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    with pytest.raises(RuntimeError) as excinfo:
        push(model, processor, REPO)
    message = str(excinfo.value)
    assert REPO in message and endpoint in message and "refused" in message.lower(), message


def push_copies(root) -> list[str]:
    folder = root / "push-tmp"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_interrupted_push_leaves_no_copy(hub, built, tmp_path, monkeypatch):
    """Ctrl-C during the upload, or a failed upload, leaves no model copy under $HF_VLM_CACHE/push-tmp."""
    model, processor = built
    monkeypatch.setenv("HF_VLM_CACHE", str(tmp_path / "cache"))
    seen = []

    def interrupted(self, folder_path, **kwargs):
        seen.append(sorted(p.name for p in Path(folder_path).iterdir()))
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(HfApi, "upload_folder", interrupted)
        push(model, processor, REPO)
    assert "model.safetensors" in seen[0] and push_copies(tmp_path / "cache") == []

    hub.server.fail_next_upload("model.safetensors")
    with pytest.raises(RuntimeError, match="model.safetensors"):
        push(model, processor, REPO)
    assert push_copies(tmp_path / "cache") == []


KILLED_PUSH = """
import os, signal, sys
from huggingface_hub import HfApi
from hf_vlm import VLMForConditionalGeneration, VLMProcessor
from hf_vlm.hub import push

folder, repo = sys.argv[1:]
HfApi.upload_folder = lambda self, **kwargs: os.kill(os.getpid(), signal.SIGKILL)  # no handler runs
push(VLMForConditionalGeneration.from_pretrained(folder), VLMProcessor.from_pretrained(folder), repo)
"""


def test_copy_left_by_a_killed_push_goes_with_the_next_push(hub, built, tmp_path, monkeypatch):
    """A push killed mid-upload leaves its copy; the next push removes it and its own."""
    model, processor = built
    monkeypatch.setenv("HF_VLM_CACHE", str(tmp_path / "cache"))
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLED_PUSH), str(tmp_path / "model"), REPO],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -9, result.stderr[-3000:]
    (left,) = push_copies(tmp_path / "cache")
    assert (tmp_path / "cache" / "push-tmp" / left / "model.safetensors").exists()

    push(model, processor, REPO)
    assert push_copies(tmp_path / "cache") == []


def test_pushed_config_names_hub_backbones_not_local_folders(hub, built, backbones):
    """config.json on the Hub keeps a backbone's Hub id and drops a local folder (build_vlm got one of each here)."""
    model, processor = built
    named = copy.deepcopy(model)
    named.config.vision_config._name_or_path = "org/vision"  # as if built from the Hub; the LM stays a local folder
    push(named, processor, REPO)
    config = json.loads(Path(hf_hub_download(REPO, "config.json")).read_text())
    assert config["vision_config"]["_name_or_path"] == "org/vision"
    assert config["text_config"].get("_name_or_path", "") == ""  # "" is the default, left out
    assert str(Path(backbones["llama"]).parent) not in json.dumps(config)
    assert named.config.text_config._name_or_path == backbones["llama"]  # the model in memory is unchanged
    assert model_card(VLMForConditionalGeneration.from_pretrained(REPO), repo_id=REPO).data.base_model == [
        "org/vision"
    ]


def tiny_images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(count)]


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b))


def test_caption_dataset_takes_a_hub_id_and_validates_it(hub):
    """caption_dataset of a pushed repo id validates as stage 1 does: same pixels, stripped captions, blanks raise."""
    images = tiny_images(3)
    captions = [" A red circle.", "Two blue squares.\n", "A green triangle."]
    rows = {"id": ["a", "b", "c"], "image": images, "caption": captions}
    Dataset.from_dict(rows, features=CAPTION_FEATURES).push_to_hub("user/tiny-captions")

    loaded = caption_dataset("user/tiny-captions")
    assert loaded.features == CAPTION_FEATURES
    by_id = {row["id"]: row for row in loaded}  # caption_dataset shuffles
    assert [by_id[i]["caption"] for i in rows["id"]] == ["A red circle.", "Two blue squares.", "A green triangle."]
    assert all(same_pixels(by_id[i]["image"], image) for i, image in zip(rows["id"], images, strict=True))

    rows["caption"][1] = " "
    Dataset.from_dict(rows, features=CAPTION_FEATURES).push_to_hub("user/blank-captions")
    with pytest.raises(ValueError, match="sample 'b': empty_text"):
        caption_dataset("user/blank-captions")


def test_conversation_dataset_reads_trl_rows_from_a_hub_id(hub):
    """conversation_dataset of a pushed repo of TRL rows (string content) gives image blocks and the same pixels."""
    images = tiny_images(3)
    rows = {
        "id": ["q0", "q1"],
        "images": [images[:1], images[1:]],
        "messages": [
            [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "red"}],
            [{"role": "user", "content": "Same shape?"}, {"role": "assistant", "content": "yes"}],
        ],
    }
    trl_messages = List({"role": Value("string"), "content": Value("string")})
    features = Features({"id": Value("string"), "images": List(ImageFeature()), "messages": trl_messages})
    Dataset.from_dict(rows, features=features).push_to_hub("user/trl-conversations")

    loaded = conversation_dataset("user/trl-conversations")
    assert loaded.features == Features({**CONVERSATION_FEATURES, "length": Value("int64")})
    by_id = {row["id"]: row for row in loaded}  # conversation_dataset shuffles
    image, text = {"type": "image", "text": None}, lambda words: {"type": "text", "text": words}
    assert by_id["q1"]["messages"] == [
        {"role": "user", "content": [image, image, text("Same shape?")]},
        {"role": "assistant", "content": [text("yes")]},
    ]
    assert by_id["q0"]["messages"][0]["content"] == [image, text("What colour?")]
    got = by_id["q0"]["images"] + by_id["q1"]["images"]
    assert all(same_pixels(a, b) for a, b in zip(got, images, strict=True))
