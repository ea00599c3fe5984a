"""A disk cache of a frozen vision tower's output: each distinct image is encoded once, not at every step.

While the vision tower is frozen, `get_vision_features(image)` never changes, yet training would recompute it
at every step of both stages. `VisionFeatureCache` encodes each distinct image once, in batches under
`torch.inference_mode()`, and the model then reads the stored features through `vision_features=`; the
projector, which trains, still runs at every step.

    cache = VisionFeatureCache(model, processor)   # $HF_VLM_CACHE/vision_features/<key>/
    cache.encode(images)                           # encodes only what is not stored yet; returns the count
    features = cache.lookup(images)                # (num_images, N, C), read from memory-mapped shards

The folder name `<key>` hashes everything that changes the features: a fingerprint of every tensor of the
tower (weights and buffers), its config, `image_size`, `vision_feature_layer`, the prefix tokens dropped and the image
processor's settings. Inside it, an image is found by a hash of its pixels. Any change gives another folder or
a miss, so a stale feature is never used. Features are stored in the tower's dtype, N x C of them per image
(16 x 1280 floats, 82 kB, for the demo's CNN at 128 px; 196 x 768 for a ViT-B/16 at 224 px).

Shards are written under a temporary name and renamed when complete, so a killed run leaves at most a
`.shard-*.tmp` file that is never read, and each writer picks a fresh name, so no two ranks write the same file. Under `torchrun`, encode
inside `training_args.main_process_first()`: the main process encodes, the others then find it all stored.
"""

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.compute as pc
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .paths import cache_root

# Part of every key: raise it when what `get_vision_features` computes changes, so old caches are not read.
CACHE_FORMAT = 2
SHARD_BYTES = 256 * 2**20  # features held in memory before a shard is written
# Config entries that name or describe a checkpoint without changing what the tower computes.
_NOT_IN_KEY = (
    "_name_or_path",
    "transformers_version",
    "architectures",
    "dtype",
    "torch_dtype",
    "id2label",
    "label2id",
)


def default_cache_dir() -> Path:
    """`$HF_VLM_CACHE/vision_features`, else `~/.cache/hf_vlm/vision_features`."""
    return cache_root() / "vision_features"


def image_hash(image: Image.Image) -> str:
    """A hash of an image's content as the processor sees it (RGB pixels and size; not its file or format)."""
    if image.mode != "RGB":  # convert() copies even when the mode is already RGB
        image = image.convert("RGB")
    digest = hashlib.blake2b(f"{image.size}".encode(), digest_size=16)
    digest.update(image.tobytes())
    return digest.hexdigest()


def tower_fingerprint(tower: torch.nn.Module) -> str:
    """A hash of every tensor of `tower` (name, dtype, shape, bytes): changes when any weight or buffer does."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in tower.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(model, image_processor) -> str:
    """The name of the cache folder for this tower and image processor (see the module docstring)."""
    config = model.config
    settings = {
        "format": CACHE_FORMAT,
        "tower": tower_fingerprint(_vlm_model(model).vision_tower),
        "vision_config": {k: v for k, v in config.vision_config.to_dict().items() if k not in _NOT_IN_KEY},
        "image_size": config.image_size,
        "vision_feature_layer": config.vision_feature_layer,
        "drop_cls_token": config.drop_cls_token,
        "vision_num_prefix_tokens": config.vision_num_prefix_tokens,
        "image_processor": {k: v for k, v in image_processor.to_dict().items() if k not in _NOT_IN_KEY},
    }
    return hashlib.blake2b(json.dumps(settings, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def dataset_images(dataset) -> tuple[Iterator[Image.Image], int]:
    """`(images, count)`: every image of a caption-shape (`image`) or conversation-shape (`images`) dataset.

    The images are decoded one row at a time, as they are read; the count decodes nothing.
    """
    column = "images" if "images" in dataset.column_names else "image"
    raw = dataset.select_columns([column]).with_format("arrow")[column]  # Arrow data: nothing decoded
    count = pc.sum(pc.list_value_length(raw)).as_py() or 0 if column == "images" else len(raw)

    def images():
        for row in dataset.select_columns([column]):
            value = row[column]
            yield from value if isinstance(value, list) else [value]

    return images(), count


def prepare_feature_cache(model, processor, dataset, training_args, cache_dir=None) -> "VisionFeatureCache":
    """A cache that holds every image of `dataset`, encoded by the main process first.

    Inside `training_args.main_process_first()` the other processes run after it and find everything stored, so
    under `torchrun` only the main process writes, and a resumed or repeated run encodes nothing.
    """
    cache = VisionFeatureCache(model, processor, cache_dir)
    images, count = dataset_images(dataset)
    cache.model.vision_tower.to(training_args.device)  # encode where training runs; the trainer moves the rest
    with training_args.main_process_first(desc="encoding images for the feature cache"):
        cache.encode(images, total=count)
    return cache


def _vlm_model(model):
    """The `VLMModel` inside a `VLMForConditionalGeneration` (or a peft wrapper of one), or the model itself."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(model, "model", model)


class VisionFeatureCache:
    """Stored `get_vision_features` outputs of one frozen tower and image processor.

    Args:
        model: a `VLMForConditionalGeneration` or `VLMModel` whose vision tower stays frozen while the cache is used.
        processor: its `VLMProcessor` (or the image processor alone).
        cache_dir: the root folder; default `default_cache_dir()`.
    """

    def __init__(self, model, processor, cache_dir: str | os.PathLike | None = None):
        self.model = _vlm_model(model)
        self.image_processor = getattr(processor, "image_processor", processor)
        self.folder = Path(cache_dir or default_cache_dir()) / cache_key(self.model, self.image_processor)
        self.num_encoded = 0  # images this object has encoded
        self._index: dict[str, tuple[Path, int]] = {}  # image hash -> (shard, row)
        self._handles: dict[Path, object] = {}
        self._pid = os.getpid()
        self._read_index()

    def __len__(self) -> int:
        return len(self._index)

    def _read_index(self) -> None:
        """Index every complete shard in the folder (only their headers are read)."""
        if not self.folder.is_dir():
            return
        for shard in sorted(self.folder.glob("*.safetensors")):
            if shard not in self._handles:
                self._add_shard(shard)

    def _add_shard(self, shard: Path) -> None:
        with safe_open(shard, framework="pt") as handle:
            hashes = json.loads(handle.metadata()["hashes"])
        for row, key in enumerate(hashes):
            self._index.setdefault(key, (shard, row))
        self._handles[shard] = None  # opened on first read

    @torch.inference_mode()
    def encode(
        self, images: Iterable[Image.Image], batch_size: int = 32, total: int | None = None, progress: bool = True
    ) -> int:
        """Encode and store every image not stored yet (duplicates once); returns how many were encoded.

        `images` is streamed: at most `batch_size` images and one shard of features are held in memory.
        """
        self._read_index()  # another process may have written shards since
        tower_was_training = self.model.vision_tower.training
        self.model.vision_tower.eval()
        pending, features, hashes, fresh = [], [], [], set()  # fresh: hashes encoded by this call
        bar = tqdm(images, total=total, desc="encoding images (new ones only)", unit="image", disable=not progress)

        def run_batch():
            pixels = self.image_processor([image for _, image in pending], return_tensors="pt")["pixel_values"]
            device = next(self.model.vision_tower.parameters()).device
            features.append(self.model.get_vision_features(pixels.to(device)).cpu())
            hashes.extend(key for key, _ in pending)
            pending.clear()

        try:
            for image in bar:
                image = image.convert("RGB")
                key = image_hash(image)
                if key in self._index or key in fresh:
                    continue
                fresh.add(key)
                pending.append((key, image))
                if len(pending) == batch_size:
                    run_batch()
                    if sum(f.numel() * f.element_size() for f in features) >= SHARD_BYTES:
                        self._write_shard(features, hashes)
                        features, hashes = [], []
            if pending:
                run_batch()
            if hashes:
                self._write_shard(features, hashes)
        finally:
            bar.close()
            self.model.vision_tower.train(tower_was_training)
        self.num_encoded += len(fresh)
        return len(fresh)

    def _write_shard(self, features: list[torch.Tensor], hashes: list[str]) -> None:
        """Write one shard under a temporary name, then rename it: readers never see a partial file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{uuid.uuid4().hex}.safetensors"
        temporary = self.folder / f".{name}.tmp"
        save_file({"features": torch.cat(features).contiguous()}, temporary, metadata={"hashes": json.dumps(hashes)})
        os.replace(temporary, self.folder / name)
        self._add_shard(self.folder / name)

    def lookup(self, images: list[Image.Image]) -> torch.Tensor:
        """The stored features of `images`, in order: (num_images, N, C). Raises if any was never encoded."""
        keys = [image_hash(image) for image in images]
        missing = [i for i, key in enumerate(keys) if key not in self._index]
        if missing:
            self._read_index()
            missing = [i for i in missing if keys[i] not in self._index]
        if missing:
            raise KeyError(
                f"{len(missing)} of {len(images)} images (positions {missing[:5]}) are not in the feature cache at "
                f"{self.folder}: encode them first with VisionFeatureCache.encode."
            )
        if os.getpid() != self._pid:  # a forked dataloader worker opens its own memory maps
            self._handles, self._pid = dict.fromkeys(self._handles), os.getpid()
        rows = []
        for key in keys:
            shard, row = self._index[key]
            if self._handles[shard] is None:
                self._handles[shard] = safe_open(shard, framework="pt")
            rows.append(self._handles[shard].get_slice("features")[row : row + 1])
        return torch.cat(rows)
