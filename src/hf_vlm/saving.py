"""Folders that a kill leaves whole: a model folder is replaced in one swap, scratch copies are always removed.

`save_pretrained` writes file after file (the weights through a temporary file beside them), so a run killed while
saving over an existing folder leaves old weights beside a new config and code, plus the temporary file.
`replacing` has the new folder written beside the old one and swaps it in:

    with replacing("runs/stage1") as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

The folders these write are named `<host>-<pid>-<random>` and locked (`flock`) while in use. The kernel drops a
process's locks when it dies (SIGKILL runs no handler, but this it does), so a leftover whose lock can be taken is
dead, whichever host or container it ran on and whatever its pid now names: the next save into the same place, or
the next scratch folder under the same parent, removes it. Where locks are unavailable (Windows; NFS refuses them on
folders) the name is the only hint: a leftover of this host whose process is not running.
"""

import os
import secrets
import shutil
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

MODEL_FILES = (
    # weights and shards
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json",
    "adapter_model.safetensors", "adapter_model.bin", "adapter_config.json",  # peft
    # config, and the remote code that save_pretrained copies beside it
    "config.json", "generation_config.json",
    "configuration_vlm.py", "modeling_vlm.py", "projectors.py", "processing_vlm.py",
    # tokenizer and processor
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "special_tokens_map.json", "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "processor_config.json", "preprocessor_config.json",
    # what save_run and the demo write besides
    "loss.png", "training_args.bin",
)  # fmt: skip
"""Top-level files that a model or processor save owns, by exact name (and shard pattern). When `replacing` swaps
in a new folder, the old folder's files matching these go, so that a stale shard cannot stay beside the new ones;
a `README.md` goes only when it is a model card (it starts with YAML front matter). All else in it (the user's files,
symlinks, `checkpoint-N` and other subfolders) is carried over."""


def _owned(path: Path) -> bool:
    """Whether `path`, a top-level entry of a model folder, belongs to a model save (see `MODEL_FILES`)."""
    if path.is_dir() or path.is_symlink():
        return False
    if path.name == "README.md":
        with open(path, "rb") as file:
            return file.read(4) == b"---\n"
    return any(fnmatch(path.name, pattern) for pattern in MODEL_FILES)


@contextmanager
def replacing(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder to write into; when the block ends without an error it takes `folder`'s place.

    The new folder is written as a sibling, `.<name>.saving-<host>-<pid>-<random>`, so that the swap is two renames
    on one filesystem: `folder` to `.<name>.old-...`, then the new one to `folder`. A kill or an error before the
    swap leaves `folder` as it was; between the two renames (microseconds) `folder` is absent and the old one lies
    whole beside it. The next `replacing(folder)` (or `recover(folder)`) puts that back and removes the rest.
    After the swap, whatever the old folder has and the new one lacks moves in, except `MODEL_FILES`.

    Where renaming `folder` would break something, this warns and yields `folder` itself, to be written in place
    as a plain `save_pretrained` would: when it is or holds the working directory (which would then be gone), is
    a mount point (a Docker volume cannot be renamed), or its parent is not writable.
    """
    folder = Path(folder).resolve()  # a symlinked folder is replaced where it lies, and the link stays
    recover(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    reason = _cannot_swap(folder)
    if reason:
        warnings.warn(
            f"Saving into {folder} in place, not atomically, because {reason}: a kill while saving "
            "can leave old and new files mixed there.",
            stacklevel=3,
        )
        folder.mkdir(exist_ok=True)
        yield folder
        return
    staging = _new_folder(folder.parent, f".{folder.name}.saving-")
    with _locked(staging):
        try:
            yield staging
            _swap(staging, folder)
        except BaseException:  # KeyboardInterrupt too
            shutil.rmtree(staging, ignore_errors=True)
            raise


def recover(folder: str | os.PathLike) -> None:
    """Undo what a killed `replacing(folder)` left: if `folder` is absent, its old version goes back; what an old
    version still holds moves into `folder` as after a swap; half-written new versions are removed."""
    folder = Path(folder).resolve()
    for path in _leftovers(folder.parent, f".{folder.name}.old-"):
        if not folder.exists():
            os.replace(path, folder)
            continue
        _carry_over(path, folder)
        shutil.rmtree(path)
    for path in _leftovers(folder.parent, f".{folder.name}.saving-"):
        shutil.rmtree(path)


@contextmanager
def scratch_folder(parent: str | os.PathLike) -> Iterator[Path]:
    """A new folder `parent/<host>-<pid>-<random>`, removed when the block ends, whatever ends it; those that
    killed processes left under `parent` are removed first."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for path in _leftovers(parent, ""):
        shutil.rmtree(path, ignore_errors=True)
    folder = _new_folder(parent, "")
    with _locked(folder):
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _cannot_swap(folder: Path) -> str | None:
    """Why renaming `folder` away would break something, or None when it would not."""
    cwd = Path.cwd().resolve()
    if folder == cwd or folder in cwd.parents:
        return "it holds the working directory"
    if os.path.ismount(folder):
        return "it is a mount point"
    if not os.access(folder.parent, os.W_OK | os.X_OK):
        return f"its parent {folder.parent} is not writable"
    return None


def _swap(staging: Path, folder: Path) -> None:
    if not folder.exists():
        os.replace(staging, folder)
        return
    os.chmod(staging, folder.stat().st_mode & 0o7777)  # the folder keeps its permissions
    previous = folder.parent / f".{folder.name}.old-{staging.name.removeprefix(f'.{folder.name}.saving-')}"
    with _locked(folder):  # the lock stays on the folder as it becomes `previous`
        os.replace(folder, previous)
        os.replace(staging, folder)
        _carry_over(previous, folder)
        shutil.rmtree(previous)


def _carry_over(source: Path, target: Path) -> None:
    """Move what `source` has and `target` lacks into `target`, except `MODEL_FILES` (renames: nothing is copied)."""
    for path in sorted(source.iterdir()):
        if not _owned(path) and not os.path.lexists(target / path.name):
            os.replace(path, target / path.name)


def _new_folder(parent: Path, prefix: str) -> Path:
    """`parent/<prefix><host>-<pid>-<random>`, created with the usual permissions (`mkdtemp` makes them 0700)."""
    folder = parent / f"{prefix}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    folder.mkdir()
    return folder


@contextmanager
def _locked(folder: Path) -> Iterator[bool | None]:
    """Try to take an exclusive `flock` on `folder`, without waiting, and hold it while the block runs.

    Yields True when taken, False when another process (or another `_locked` in this one) holds it or `folder` is
    gone, None where locks are unavailable.
    """
    if fcntl is None:
        yield None
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except FileNotFoundError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            taken = True
        except BlockingIOError:
            taken = False
        except OSError:  # NFS wants a file opened for writing, which a folder cannot be
            taken = None
        yield taken
    finally:
        os.close(fd)  # and with it the lock


def _leftovers(parent: Path, prefix: str) -> Iterator[Path]:
    """Yield each folder `parent/<prefix><host>-<pid>-<random>` whose process has ended, holding its lock while the
    caller deals with it, so that two processes never clean up the same one."""
    if not parent.is_dir():
        return
    for path in sorted(parent.iterdir()):
        owner = path.name[len(prefix) :].rsplit("-", 2)
        if not path.name.startswith(prefix) or len(owner) != 3 or not owner[1].isdigit() or not path.is_dir():
            continue
        with _locked(path) as ended:
            if ended is None:  # no lock to go by: the name says which process made it
                ended = owner[0] == socket.gethostname() and not _alive(int(owner[1]))
            if ended and path.exists():  # its owner may have renamed it before letting go
                yield path


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


__all__ = ["MODEL_FILES", "recover", "replacing", "scratch_folder"]
