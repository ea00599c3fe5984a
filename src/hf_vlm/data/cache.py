"""Validate once: loaders and token checks keep their results under `$HF_VLM_CACHE/datasets`.

Validating LLaVA-Pretrain opens 558k images (~1.7 ms each, a quarter of an hour); a run that fails at step N, or
a second rank under `torchrun`, should not pay that again. `cached_validation` stores a loader's validated rows
and its skip report, keyed by what decides them: the source (a file's path, size and modification time, or a
`datasets.Dataset`'s fingerprint), the image folder and the loader's options. Images referenced by path are
stored as paths (no pixels are copied) and are not re-checked when the key matches: a file replaced after the
first run is found when training decodes it, as a `BadSampleError` naming the sample.

Entries are written into a temporary folder and renamed when complete, so a killed run leaves nothing that is
read. Under a launcher, build inside `training_args.main_process_first()`: the main process validates, the other
ranks then find the entry.
"""

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, Features, Image, List, Value, load_from_disk

from ..paths import cache_root
from .schema import SampleErrors

VALIDATION_FORMAT = 1  # bump when what a loader checks or stores changes, so old entries are not read


def data_cache_dir() -> Path:
    """`$HF_VLM_CACHE/datasets`, else `~/.cache/hf_vlm/datasets`."""
    return cache_root() / "datasets"


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def file_key(path) -> dict:
    """What identifies a data file's content without reading it: absolute path, size, modification time."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such data file: {os.fspath(path)}")
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cached_validation(kind: str, key: dict | None, features: Features, build: Callable[[], tuple[dict, SampleErrors, int]]) -> Dataset:
    """The validated dataset for `key`, from the cache, or built by `build()` and stored.

    `build()` returns `(columns, errors, total)`: the kept rows as a dict of columns, the `SampleErrors` that
    collected the bad ones, and the number of records read. `key=None` builds without caching. A stored skip
    report is warned about again when read, so a cached run reports the same drops.
    """
    if key is None:
        columns, errors, total = build()
        errors.finish(total)
        return Dataset.from_dict(columns, features=features)
    digest = hashlib.sha256(json.dumps({"format": VALIDATION_FORMAT, "kind": kind, **key}, sort_keys=True).encode()).hexdigest()[:24]
    folder = data_cache_dir() / "validated" / f"{kind}-{digest}"
    report_file = folder / "report.json"
    if report_file.is_file():
        report = json.loads(report_file.read_text())
        SampleErrors.from_report(report).finish(report["total"])
        return _load(folder, features)

    columns, errors, total = build()
    errors.finish(total)
    # Stored as plain {"bytes", "path"} structs: save_to_disk would otherwise copy every referenced image file in.
    stored = Dataset.from_dict(columns, features=Features({name: _storage(f) for name, f in features.items()}))
    temporary = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    stored.save_to_disk(str(temporary))
    (temporary / "report.json").write_text(json.dumps(errors.report() | {"total": total}))
    try:
        os.rename(temporary, folder)
    except OSError:  # another process stored the same entry first; theirs is as good
        shutil.rmtree(temporary, ignore_errors=True)
    return _load(folder, features)


def _load(folder: Path, features: Features) -> Dataset:
    dataset = load_from_disk(str(folder))
    for name, feature in features.items():
        if feature != dataset.features[name]:
            dataset = dataset.cast_column(name, feature)  # in memory, on the memory-mapped table; writes no file
    return dataset


def _storage(feature):
    if isinstance(feature, Image):
        return {"bytes": Value("binary"), "path": Value("string")}
    if isinstance(feature, List):
        return List(_storage(feature.feature))
    return feature
