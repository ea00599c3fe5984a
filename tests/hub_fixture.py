"""The `hub` fixture: a loopback HubServer that huggingface_hub, transformers and datasets talk to
instead of huggingface.co, with every cache in the test's tmp_path."""

from dataclasses import dataclass

import datasets.config
import huggingface_hub.constants as constants
import huggingface_hub.hf_api
import pytest
import transformers.utils.hub
from hub_server import HubServer

TOKEN = "hf_test_token"  # any token works; the server does not check it


@dataclass
class Hub:
    url: str
    server: HubServer


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Serve a fresh, empty Hub on 127.0.0.1 for one test and point all three libraries at it."""
    server = HubServer(tmp_path / "hub_storage").start()
    home = tmp_path / "hf_home"
    env = {
        "HF_ENDPOINT": server.url,
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_XET": "1",  # with hf_xet installed, LFS uploads would otherwise go to a Xet CAS
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_DATASETS_CACHE": str(home / "datasets"),
    }
    for name, value in env.items():  # for subprocesses, and for modules imported after this point
        monkeypatch.setenv(name, value)
    for name in ("TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)

    # The libraries read these at import time, so the environment alone does not reach them.
    for name, value in {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
    }.items():
        monkeypatch.setattr(constants, name, value)
    # Module-level clients that captured the endpoint when they were built.
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", server.url)  # behind huggingface_hub.upload_file etc.
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)  # push_to_hub's shared HfApi, rebuilt on next use
    for name, value in {
        "HF_ENDPOINT": server.url,
        "HUB_DATASETS_URL": server.url + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_HUB_OFFLINE": False,
        "HF_DATASETS_OFFLINE": False,
        "HF_DATASETS_CACHE": home / "datasets",
        "DOWNLOADED_DATASETS_PATH": home / "datasets" / "downloads",
        "EXTRACTED_DATASETS_PATH": home / "datasets" / "downloads" / "extracted",
        # Both reach past the Hub: load_dataset asks datasets-server.<endpoint host> for a parquet
        # export and HEADs an S3 bucket to count downloads.
        "USE_PARQUET_EXPORT": False,
        "HF_UPDATE_DOWNLOAD_COUNTS": False,
    }.items():
        monkeypatch.setattr(datasets.config, name, value)

    yield Hub(server.url, server)

    server.stop()
    assert not server.errors, f"the test hub crashed: {server.errors}"
