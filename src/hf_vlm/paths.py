"""Where things are: hf_vlm's cache (`$HF_VLM_CACHE`, else `~/.cache/hf_vlm`), and whether a name is a Hub id.

Below it: `vision_features/` (`hf_vlm.feature_cache`), `datasets/` (validated data, `hf_vlm.data.cache`),
`push-tmp/` (`hf_vlm.hub.push`'s scratch copies), and the offline assets (`hf_vlm.offline`).
"""

import os
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

CACHE_ENV = "HF_VLM_CACHE"


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """The cache folder: `cache`, else `$HF_VLM_CACHE`, else `~/.cache/hf_vlm`."""
    return Path(cache or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hf_vlm").expanduser()


def is_hub_id(name: str | None) -> bool:
    """A name the Hub could hold (huggingface_hub's repo-id rules: `name` or `org/name`) that is not a local path.

    (The model code shipped with checkpoints keeps its own copy in `VLMPreTrainedModel.save_pretrained`: it cannot
    import hf_vlm.)
    """
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return bool(name) and not os.path.exists(name)
