"""Where hf_vlm keeps what it computes once: `$HF_VLM_CACHE`, else `~/.cache/hf_vlm`.

Below it: `vision_features/` (`hf_vlm.feature_cache`), `datasets/` (validated data, `hf_vlm.data.cache`),
`push-tmp/` (`hf_vlm.hub.push`'s scratch copies), and the offline assets (`hf_vlm.offline`).
"""

import os
from pathlib import Path

CACHE_ENV = "HF_VLM_CACHE"


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """The cache folder: `cache`, else `$HF_VLM_CACHE`, else `~/.cache/hf_vlm`."""
    return Path(cache or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hf_vlm").expanduser()
