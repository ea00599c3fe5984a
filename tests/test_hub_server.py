"""The loopback Hub carries what hf_vlm needs from huggingface.co: uploads, pushes, revisions,
downloads, the client's not-found errors, and datasets, with atomic commits."""

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_dataset
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return LlamaForCausalLM(config).eval()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_upload_file_then_download_round_trip(hub):
    """A text file (sent inline) and a binary file (sent through LFS) come back byte for byte."""
    api = HfApi()
    api.create_repo("user/files")
    binary = bytes(range(256)) * 40
    api.upload_file(path_or_fileobj=b"hello hub\n", path_in_repo="notes/hello.txt", repo_id="user/files")
    api.upload_file(path_or_fileobj=binary, path_in_repo="weights.bin", repo_id="user/files")

    assert Path(hf_hub_download("user/files", "notes/hello.txt")).read_bytes() == b"hello hub\n"
    assert Path(hf_hub_download("user/files", "weights.bin")).read_bytes() == binary
    info = {f.path: f for f in api.get_paths_info("user/files", ["notes/hello.txt", "weights.bin"])}
    assert info["notes/hello.txt"].lfs is None and info["weights.bin"].lfs.size == len(binary)
    assert any(method == "PUT" for method, _, _ in hub.server.log)  # the binary really went through LFS


def test_resolve_answers_range_requests(hub):
    """A Range GET on /resolve/ returns just those bytes as a 206; a range past the end is a 416."""
    api = HfApi()
    api.create_repo("user/ranges")
    api.upload_file(path_or_fileobj=bytes(range(100)), path_in_repo="data.bin", repo_id="user/ranges")
    url = f"{hub.url}/user/ranges/resolve/main/data.bin"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=10-19"})) as response:
        assert response.status == 206 and response.read() == bytes(range(10, 20))
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=-5"})) as response:
        assert response.read() == bytes(range(95, 100))
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=100-"}))
    assert excinfo.value.code == 416


def test_create_repo_conflicts_unless_exist_ok(hub):
    """Creating an existing repo is a 409, which `exist_ok=True` accepts."""
    api = HfApi()
    api.create_repo("user/twice")
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo("user/twice")
    assert excinfo.value.response.status_code == 409
    assert api.create_repo("user/twice", exist_ok=True).repo_id == "user/twice"


def test_push_to_hub_then_from_pretrained_gives_identical_weights(hub):
    """A model pushed with push_to_hub reloads from its repo id with identical weights."""
    model = tiny_llama(seed=0)
    model.push_to_hub("user/tiny")
    assert_same_weights(LlamaForCausalLM.from_pretrained("user/tiny"), model)


def test_second_push_is_a_new_commit_and_old_revision_still_loads(hub):
    """A second push moves main; `revision=<first commit sha>` still loads the first weights."""
    first, second = tiny_llama(seed=0), tiny_llama(seed=1)
    first_sha = first.push_to_hub("user/tiny").oid
    second_sha = second.push_to_hub("user/tiny").oid

    assert first_sha != second_sha == HfApi().repo_info("user/tiny").sha
    assert_same_weights(LlamaForCausalLM.from_pretrained("user/tiny"), second)
    assert_same_weights(LlamaForCausalLM.from_pretrained("user/tiny", revision=first_sha), first)


@pytest.mark.parametrize("failing_file", ["model.safetensors", "config.json"])
def test_failed_upload_names_the_file_and_leaves_main_unchanged(hub, failing_file):
    """An upload that fails (LFS PUT or inline file) raises an error naming the file; main stays put."""
    first = tiny_llama(seed=0)
    first_sha = first.push_to_hub("user/tiny").oid
    changed = tiny_llama(seed=1)
    changed.config.rope_theta = 5000.0  # so config.json changes too and is uploaded again

    hub.server.fail_next_upload(failing_file)
    with pytest.raises(Exception) as excinfo:
        changed.push_to_hub("user/tiny")

    chain, error = [], excinfo.value
    while error is not None:  # the LFS path wraps the HTTP error in a RuntimeError
        chain.append(str(error))
        error = error.__cause__
    assert failing_file in chain[0]
    assert any("injected failure" in message for message in chain)
    assert HfApi().repo_info("user/tiny").sha == first_sha
    assert_same_weights(LlamaForCausalLM.from_pretrained("user/tiny"), first)


def test_commit_with_missing_lfs_object_is_rejected(hub):
    """The commit endpoint refuses an LFS file whose content never arrived, and main does not move."""
    api = HfApi()
    api.create_repo("user/atomic")
    head = api.repo_info("user/atomic").sha
    lines = [
        {"key": "header", "value": {"summary": "broken"}},
        {"key": "file", "value": {"path": "a.txt", "content": "YQ==", "encoding": "base64"}},
        {"key": "lfsFile", "value": {"path": "big.bin", "algo": "sha256", "oid": "0" * 64, "size": 3}},
    ]
    request = urllib.request.Request(
        f"{hub.url}/api/models/user/atomic/commit/main",
        method="POST",
        data=b"".join(json.dumps(line).encode() + b"\n" for line in lines),
    )
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(request)
    assert excinfo.value.code == 400 and "big.bin" in excinfo.value.read().decode()
    assert api.repo_info("user/atomic").sha == head
    assert [f.path for f in api.list_repo_tree("user/atomic")] == [".gitattributes"]


def test_snapshot_download_fetches_the_whole_tree(hub, tmp_path):
    """snapshot_download returns every file of the commit, nested folders included."""
    folder = tmp_path / "upload"
    (folder / "sub" / "deeper").mkdir(parents=True)
    files = {"top.txt": b"top", "sub/mid.json": b"{}", "sub/deeper/w.safetensors": b"\x00weights"}
    for name, content in files.items():
        (folder / name).write_bytes(content)
    api = HfApi()
    api.create_repo("user/snap")
    sha = api.upload_folder(folder_path=folder, repo_id="user/snap").oid

    local = snapshot_download("user/snap")
    assert local.endswith(sha)
    for name, content in files.items():
        assert Path(f"{local}/{name}").read_bytes() == content
    listed = {f.path for f in api.list_repo_tree("user/snap", recursive=True)}
    assert listed == {".gitattributes", "top.txt", "sub", "sub/mid.json", "sub/deeper", "sub/deeper/w.safetensors"}


def test_missing_repo_revision_and_file_raise_the_client_errors(hub):
    """Unknown repo, revision and file raise RepositoryNotFound, RevisionNotFound and EntryNotFound."""
    api = HfApi()
    api.create_repo("user/present")
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="user/present")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/absent", "x.txt")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("user/present", "x.txt", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/present", "absent.txt")
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("user/absent")


def test_dataset_push_to_hub_then_load_dataset(hub):
    """Dataset.push_to_hub then load_dataset by repo id gives back the same rows."""
    rows = {"text": ["a red square", "a blue circle", "a green triangle"], "label": [0, 1, 2]}
    Dataset.from_dict(rows).push_to_hub("user/ds")
    loaded = load_dataset("user/ds", split="train")
    assert loaded.to_dict() == rows
