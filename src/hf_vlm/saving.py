"""Folders that a kill leaves whole: a model folder is replaced in one swap, scratch copies are always removed.

`save_pretrained` writes file after file (the weights through a temporary file beside them), so a run killed while
saving over an existing folder leaves old weights beside a new config and code, plus the temporary file.
`replacing` has the new folder written beside the old one and swaps it in:

    with replacing("runs/stage1") as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

Whatever a killed process leaves is named after its host and process id, so the next save into the same place,
or the next scratch folder under the same parent, recognises it and removes it (SIGKILL runs no handler).
"""

import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder to write into; when the block ends without an error it takes `folder`'s place.

    The new folder is written as a sibling, `.<name>.saving-<host>-<pid>-<random>`, so that the swap is two renames
    on one filesystem: `folder` to `.<name>.old-...`, then the new one to `folder`. A kill or an error before the
    swap leaves `folder` as it was; between the two renames (microseconds) `folder` is absent and the old one lies
    whole beside it. The next `replacing(folder)` (or `recover(folder)`) puts that back and removes the rest.

    Subfolders of the old folder (`checkpoint-N`, logs, learning curves) move into the new one; its files do not,
    so the files in `folder` are exactly those written in the block (a stale card or weight shard cannot stay).
    """
    folder = Path(folder).resolve()  # a symlinked folder is replaced where it lies, and the link stays
    recover(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_folder(folder.parent, f".{folder.name}.saving-")
    try:
        yield staging
    except BaseException:  # KeyboardInterrupt too
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not folder.exists():
        os.replace(staging, folder)
        return
    os.chmod(staging, folder.stat().st_mode & 0o7777)  # the folder keeps its permissions
    previous = folder.parent / f".{folder.name}.old-{staging.name.removeprefix(f'.{folder.name}.saving-')}"
    os.replace(folder, previous)
    os.replace(staging, folder)
    _move_subfolders(previous, folder)
    shutil.rmtree(previous)


def recover(folder: str | os.PathLike) -> None:
    """Undo what a killed `replacing(folder)` on this host left: if `folder` is absent, its old version goes back;
    subfolders still in an old version move into `folder`; half-written new versions are removed."""
    folder = Path(folder).resolve()
    for path in _leftovers(folder.parent, f".{folder.name}.old-"):
        if not folder.exists():
            os.replace(path, folder)
            continue
        _move_subfolders(path, folder)
        shutil.rmtree(path)
    for path in _leftovers(folder.parent, f".{folder.name}.saving-"):
        shutil.rmtree(path)


@contextmanager
def scratch_folder(parent: str | os.PathLike) -> Iterator[Path]:
    """A new folder `parent/<host>-<pid>-<random>`, removed when the block ends, whatever ends it; those that
    killed processes on this host left under `parent` are removed first."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for path in _leftovers(parent, ""):
        shutil.rmtree(path, ignore_errors=True)
    folder = _new_folder(parent, "")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _new_folder(parent: Path, prefix: str) -> Path:
    """`parent/<prefix><host>-<pid>-<random>`, created with the usual permissions (`mkdtemp` makes them 0700)."""
    folder = parent / f"{prefix}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    folder.mkdir()
    return folder


def _leftovers(parent: Path, prefix: str) -> list[Path]:
    """Entries `parent/<prefix><host>-<pid>-<random>` of this host whose process has ended."""
    if not parent.is_dir():
        return []
    found = []
    for path in sorted(parent.iterdir()):
        if not path.name.startswith(prefix):
            continue
        owner = path.name[len(prefix):].rsplit("-", 2)
        if len(owner) == 3 and owner[0] == socket.gethostname() and owner[1].isdigit() and not _alive(int(owner[1])):
            found.append(path)
    return found


def _alive(pid: int) -> bool:
    if os.name != "posix":  # Windows' os.kill(pid, 0) would end the process: treat every one as alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _move_subfolders(source: Path, target: Path) -> None:
    """Move the subfolders of `source` that `target` lacks into `target` (renames: nothing is copied)."""
    for path in sorted(source.iterdir()):
        if path.is_dir() and not path.is_symlink() and not (target / path.name).exists():
            os.replace(path, target / path.name)


__all__ = ["recover", "replacing", "scratch_folder"]
