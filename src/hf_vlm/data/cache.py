"""Validate once: loaders and token checks keep their results under `$HF_VLM_CACHE/datasets`.

Validating LLaVA-Pretrain opens 558k images (~1.7 ms each, a quarter of an hour); a run that fails at step N, or
a second rank under `torchrun`, should not pay that again. `cached_validation` stores a loader's validated rows
and its skip report, keyed by what decides them: the source (a file's path, size and modification time, or a
`datasets.Dataset`'s fingerprint), the image folder and the loader's options. Images referenced by path are
stored as paths (no pixels are copied), with the size and modification time of every such file: an entry whose
files changed or vanished since is validated again. Images that came as bytes (converted ones, or rows of a
`Dataset` with embedded images) are stored as bytes. A failed validation is stored for the other ranks.

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

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetInfo, Features, Image, List, Value, load_from_disk

from ..paths import cache_root
from .schema import BadSampleError, SampleErrors

# Bump when what a loader checks or stores changes, so old entries are not read. 2: converted images keep source_mode.
VALIDATION_FORMAT = 2


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
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cached_validation(
    kind: str, key: dict | None, features: Features, build: Callable[[], tuple[dict, SampleErrors, int]]
) -> Dataset:
    """The validated dataset for `key`, from the cache, or built by `build()` and stored.

    `build()` returns `(columns, errors, total)`: the kept rows as a dict of columns, the `SampleErrors` that
    collected the bad ones, and the number of records read. `key=None` builds without caching. A stored skip
    report is warned about again when read, so a cached run reports the same drops; a stored failure (the first
    bad sample under `on_error="raise"`) is raised again on the other ranks of a launcher, which then do not
    validate up to it.
    An entry whose referenced image files changed or vanished since (size, modification time) is built again.
    """
    if key is None:
        columns, errors, total = build()
        errors.finish(total)
        return Dataset.from_dict(columns, features=features)
    digest = hashlib.sha256(
        json.dumps({"format": VALIDATION_FORMAT, "kind": kind, **key}, sort_keys=True).encode()
    ).hexdigest()[:24]
    folder = data_cache_dir() / "validated" / f"{kind}-{digest}"
    report_file = folder / "report.json"
    if report_file.is_file():
        report = json.loads(report_file.read_text())
        dataset = _load(folder, features)
        if report.get("files") == _files_digest(dataset):
            SampleErrors.from_report(report).finish(report["total"])
            return dataset
        shutil.rmtree(folder, ignore_errors=True)  # an image file changed since: validate again
    failure = folder.with_name(folder.name + ".failed.json")
    if failure.is_file() and os.environ.get("LOCAL_RANK", "0") != "0":
        # The main rank of this launch just failed here (`main_process_first` lets this one in after it). A run's
        # main rank always validates again, as a missing image may have been restored since.
        raise BadSampleError(**json.loads(failure.read_text()))

    try:
        columns, errors, total = build()
    except BadSampleError as error:
        write_atomically(
            failure, json.dumps({"sample_id": error.sample_id, "reason": error.reason, "detail": error.detail})
        )
        raise
    failure.unlink(missing_ok=True)
    errors.finish(total)
    # Stored as plain {"bytes", "path"} structs: save_to_disk would otherwise copy every referenced image file in.
    stored = Dataset.from_dict(columns, features=Features({name: _storage(f) for name, f in features.items()}))
    temporary = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    stored.save_to_disk(str(temporary))
    report = errors.report() | {"total": total, "files": _files_digest(stored)}
    (temporary / "report.json").write_text(json.dumps(report))
    try:
        os.rename(temporary, folder)
    except OSError:  # another process stored the same entry first; theirs is as good
        shutil.rmtree(temporary, ignore_errors=True)
    return _load(folder, features)


def _load(folder: Path, features: Features) -> Dataset:
    """The stored entry, memory-mapped, with `Image` features over the stored structs.

    An `Image` column is stored as exactly this struct, so the features are relabelled rather than cast:
    `Dataset.cast` / `cast_column` would write a full copy of a `List(Image)` column into the folder.
    """
    stored = load_from_disk(str(folder))
    return Dataset(stored.data, info=DatasetInfo(features=features), fingerprint=stored._fingerprint)


def _files_digest(dataset: Dataset) -> str:
    """A hash of (path, size, modification time) of every image file the rows reference by path (not by bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in dataset.column_names:
        column = dataset.data.column(name).combine_chunks()
        while pa.types.is_list(column.type):
            column = pc.list_flatten(column)
        if not pa.types.is_struct(column.type) or {f.name for f in column.type} != {"bytes", "path"}:
            continue
        by_path = pc.is_null(column.field("bytes"))
        for path in pc.filter(column.field("path"), by_path).to_pylist():
            try:
                stat = os.stat(path)
                digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()


def _storage(feature):
    if isinstance(feature, Image):
        return {"bytes": Value("binary"), "path": Value("string")}
    if isinstance(feature, List):
        return List(_storage(feature.feature))
    return feature
