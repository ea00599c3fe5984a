"""A loopback server speaking the part of the Hugging Face Hub HTTP API that huggingface_hub 2.4,
transformers 5.24 and datasets 5.2 use, so tests can push and pull without the real Hub.

Each repo is a chain of commits; a commit holds the full map path -> file entry, so any old commit
sha still resolves. File contents live once on disk, under `root/objects/<sha256>`.

What the client sees: `create_repo` (409 when the repo exists), `upload_file`/`create_commit`
(preupload, then LFS batch + PUT for large or binary files, then an NDJSON commit),
`repo_info`, `list_repo_tree`, `get_paths_info`, and `hf_hub_download`'s HEAD/GET on `/resolve/`
with the headers its cache keys on. Not modelled: auth (any token is user "user"), private or
gated repos, branches other than `main`, pull requests, Xet, pagination, spaces.
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

USER = "user"
REPO_TYPES = {"models": "model", "datasets": "dataset"}
URL_PREFIX = {"model": "", "dataset": "datasets/"}
LFS_BATCH = ["info", "lfs", "objects", "batch"]  # after "{ns}/{name}.git/"
# The suffixes the Hub's default .gitattributes sends to LFS (a subset: what ML repos hold).
LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".onnx",
    ".msgpack",
    ".gguf",
    ".npy",
    ".npz",
    ".pkl",
    ".pickle",
    ".parquet",
    ".arrow",
    ".model",
    ".zip",
    ".gz",
    ".tar",
)
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub sends any file over 10 MB to LFS
# An injected failure answers 400: the client retries a 5xx on the LFS PUT with back-off (~20 s)
# and then succeeds, so a 500 "once" would test nothing.
INJECTED_FAILURE_STATUS = 400


class HubError(Exception):
    """An HTTP error answer; `code` goes to `X-Error-Code`, which the client maps to its exceptions."""

    def __init__(self, status: int, message: str, code: str | None = None, repo_commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.repo_commit = status, message, code, repo_commit


@dataclass(frozen=True)
class Entry:
    """One file of a commit. `oid` is the git blob sha1 (of the LFS pointer for LFS files)."""

    sha256: str
    size: int
    oid: str
    lfs: bool

    @property
    def pointer_size(self) -> int:
        return len(_lfs_pointer(self.sha256, self.size))

    def describe(self, path: str) -> dict:
        """The file as `/tree` and `/paths-info` list it."""
        item = {"type": "file", "path": path, "size": self.size, "oid": self.oid}
        if self.lfs:
            item["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return item


@dataclass
class Commit:
    oid: str
    title: str
    date: str
    files: dict[str, Entry]


@dataclass
class Repo:
    type: str  # "model" or "dataset"
    id: str  # "namespace/name"
    created: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json(payload, status: int = 200) -> Response:
    return Response(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    """The small text file git stores in place of an LFS file's content."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _lfs_entry(sha256: str, size: int) -> Entry:
    return Entry(sha256, size, _git_blob_sha1(_lfs_pointer(sha256, size)), lfs=True)


class HubServer:
    """The Hub, in one process. `start()` serves on 127.0.0.1 in a thread; `url` is the endpoint."""

    def __init__(self, root: str | Path, port: int = 0):
        self.objects = Path(root) / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.log: list[tuple[str, str, int]] = []  # (method, path, status) of every request, for debugging
        self.errors: list[str] = []  # server-side exceptions; the fixture fails the test on any
        self._fail_path: str | None = None  # armed by fail_next_upload, waiting for its file
        self._fail_blob: tuple[str, int, bytes] | None = None  # (path, size, first 512 bytes) of that LFS file
        self._lock = threading.Lock()  # one request at a time: the state is small, the clarity is worth it
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._httpd.hub = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def fail_next_upload(self, path_substring: str) -> None:
        """Make the next upload of a file whose repo path contains `path_substring` fail once.

        An LFS file fails at its storage PUT (the client then never sends the commit); a regular
        file, which travels inside the commit, fails the commit. Either way the answer is a 400
        whose message names the file.
        """
        self._fail_path, self._fail_blob = path_substring, None

    # -- dispatch ------------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, body: bytes) -> Response:
        """Route one request; every route runs under the lock."""
        split = urlsplit(raw_path)
        # Split before unquoting: a revision like "refs%2Fpr%2F1" is one segment.
        parts = [unquote(p) for p in split.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        with self._lock:
            try:
                response = self._route(method, parts, query, body)
            except HubError as e:
                response = _json({"error": e.message}, e.status)
                response.headers["X-Error-Message"] = e.message.encode("latin-1", "replace").decode("latin-1")
                if e.code:
                    response.headers["X-Error-Code"] = e.code
                if e.repo_commit:
                    response.headers["X-Repo-Commit"] = e.repo_commit
            except Exception as e:  # a bug here: answer 500 and let the fixture report it
                self.errors.append(f"{method} {raw_path}: {e!r}")
                response = _json({"error": f"test hub crashed: {e!r}"}, 500)
            self.log.append((method, raw_path, response.status))
            return response

    def _route(self, method: str, parts: list[str], query: dict, body: bytes) -> Response:
        if parts[:1] == ["api"]:
            if method == "GET" and parts == ["api", "whoami-v2"]:
                token = {"displayName": "test", "role": "write"}
                return _json(
                    {
                        "type": "user",
                        "name": USER,
                        "fullname": "Test User",
                        "orgs": [],
                        "auth": {"type": "access_token", "accessToken": token},
                    }
                )
            if method == "GET" and parts == ["api", "agent-harnesses"]:
                return _json({"standardEnvVars": [], "harnesses": {}})
            if method == "POST" and parts == ["api", "validate-yaml"]:
                return _json({"errors": [], "warnings": []})
            if method == "POST" and parts == ["api", "repos", "create"]:
                return self._create_repo(json.loads(body))
            if len(parts) >= 4 and parts[1] in REPO_TYPES:
                repo = self._repo(REPO_TYPES[parts[1]], f"{parts[2]}/{parts[3]}")
                return self._repo_api(method, repo, parts[4:], query, body)
        if method == "PUT" and parts[:1] == ["lfs-storage"] and len(parts) == 2:
            return self._lfs_put(parts[1], body)
        if method == "POST" and parts == ["lfs-verify"]:
            return self._lfs_verify(json.loads(body))
        repo_type = "dataset" if parts[:1] == ["datasets"] else "model"
        rest = parts[1:] if repo_type == "dataset" else parts
        if method == "POST" and len(rest) == 6 and rest[1].endswith(".git") and rest[2:] == LFS_BATCH:
            self._repo(repo_type, f"{rest[0]}/{rest[1].removesuffix('.git')}")
            return self._lfs_batch(json.loads(body))
        if method in ("GET", "HEAD") and len(rest) >= 5 and rest[2] == "resolve":
            repo = self._repo(repo_type, f"{rest[0]}/{rest[1]}")
            return self._resolve(repo, rest[3], "/".join(rest[4:]))
        raise HubError(404, f"the test hub does not implement {method} /{'/'.join(parts)}")

    def _repo_api(self, method: str, repo: Repo, rest: list[str], query: dict, body: bytes) -> Response:
        """`/api/{models|datasets}/{ns}/{name}/...`."""
        if method == "GET" and rest == []:
            return self._info(repo, "main")
        if method == "GET" and len(rest) == 2 and rest[0] == "revision":
            return self._info(repo, rest[1])
        if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
            return self._tree(repo, rest[1], "/".join(rest[2:]), query.get("recursive", "False").lower() == "true")
        if method == "POST" and len(rest) == 2 and rest[0] == "paths-info":
            return self._paths_info(repo, rest[1], parse_qs(body.decode()).get("paths", []))
        if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
            return self._preupload(repo, rest[1], json.loads(body))
        if method == "POST" and len(rest) == 2 and rest[0] == "commit":
            if query.get("create_pr"):
                raise HubError(400, "the test hub does not support pull requests")
            return self._commit(repo, rest[1], body)
        raise HubError(404, f"the test hub does not implement {method} .../{'/'.join(rest)}")

    # -- repos and revisions -------------------------------------------------------------------

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def _revision(self, repo: Repo, revision: str) -> Commit:
        """A branch name or a full commit sha."""
        commit = repo.commits.get(repo.branches.get(revision, revision))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _create_repo(self, payload: dict) -> Response:
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise HubError(400, f"the test hub has no {repo_type} repos")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        key = (repo_type, repo_id)
        url = f"{self.url}/{URL_PREFIX[repo_type]}{repo_id}"
        if key in self.repos:
            # create_repo(exist_ok=True) swallows the 409 and then reads "url" from this very body.
            return _json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
        repo = self.repos[key] = Repo(repo_type, repo_id, created=_now())
        # Like the Hub: a first commit holding .gitattributes, so main exists from the start.
        gitattributes = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
        self._add_commit(repo, "initial commit", {".gitattributes": self._store(gitattributes, lfs=False)})
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def _add_commit(self, repo: Repo, title: str, files: dict[str, Entry]) -> Commit:
        parent = repo.branches.get("main")
        listing = sorted((p, e.oid) for p, e in files.items())
        seed = json.dumps([repo.type, repo.id, parent, title, len(repo.commits), listing])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), title, _now(), files)
        repo.commits[commit.oid] = commit
        repo.branches["main"] = commit.oid
        return commit

    def _info(self, repo: Repo, revision: str) -> Response:
        commit = self._revision(repo, revision)
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling = {"rfilename": path, "size": entry.size, "blobId": entry.oid}
            if entry.lfs:
                sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        return _json(
            {
                "_id": repo.id,
                "id": repo.id,
                "author": repo.id.split("/")[0],
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": repo.created,
                "private": False,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
        )

    # -- listing -------------------------------------------------------------------------------

    def _tree(self, repo: Repo, revision: str, path: str, recursive: bool) -> Response:
        """The files and folders right under `path` (everything under it if `recursive`), in one page."""
        commit = self._revision(repo, revision)
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        under = {p: e for p, e in commit.files.items() if p.startswith(prefix)}
        if prefix and not under:
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound", commit.oid)
        items, folders = [], set()
        for file_path, entry in sorted(under.items()):
            dirs = file_path[len(prefix) :].split("/")[:-1]
            if recursive:
                folders.update(prefix + "/".join(dirs[:depth]) for depth in range(1, len(dirs) + 1))
                items.append(entry.describe(file_path))
            elif dirs:
                folders.add(prefix + dirs[0])
            else:
                items.append(entry.describe(file_path))
        items += [self._describe_folder(commit, folder) for folder in sorted(folders)]
        return _json(items)

    def _describe_folder(self, commit: Commit, folder: str) -> dict:
        listing = sorted((p, e.oid) for p, e in commit.files.items() if p.startswith(folder + "/"))
        return {"type": "directory", "path": folder, "oid": hashlib.sha1(json.dumps(listing).encode()).hexdigest()}

    def _paths_info(self, repo: Repo, revision: str, paths: list[str]) -> Response:
        commit = self._revision(repo, revision)
        items = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                items.append(commit.files[path].describe(path))
            elif any(p.startswith(path + "/") for p in commit.files):
                items.append(self._describe_folder(commit, path))
        return _json(items)

    # -- download ------------------------------------------------------------------------------

    def _resolve(self, repo: Repo, revision: str, path: str) -> Response:
        commit = self._revision(repo, revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path} at {revision}", "EntryNotFound", commit.oid)
        headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if entry.lfs:  # the client keys its cache on the sha256 of LFS files
            headers |= {
                "ETag": f'"{entry.sha256}"',
                "X-Linked-Etag": f'"{entry.sha256}"',
                "X-Linked-Size": str(entry.size),
            }
        else:
            headers["ETag"] = f'"{entry.oid}"'
        return Response(200, (self.objects / entry.sha256).read_bytes(), headers)

    # -- upload --------------------------------------------------------------------------------

    def _store(self, content: bytes, lfs: bool) -> Entry:
        """Write `content` to the object store (once) and describe it."""
        sha256 = hashlib.sha256(content).hexdigest()
        target = self.objects / sha256
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(content)
            tmp.replace(target)
        return _lfs_entry(sha256, len(content)) if lfs else Entry(sha256, len(content), _git_blob_sha1(content), False)

    def _preupload(self, repo: Repo, revision: str, payload: dict) -> Response:
        commit = self._revision(repo, revision)
        files = []
        for item in payload["files"]:
            path, size, sample = item["path"], item["size"], base64.b64decode(item["sample"])
            lfs = path.endswith(LFS_SUFFIXES) or size > LFS_MIN_SIZE or b"\0" in sample
            if lfs and self._fail_path is not None and self._fail_path in path:
                # The LFS batch and PUT carry only the sha256, so remember the armed file by its
                # size and first bytes to recognise its PUT.
                self._fail_path, self._fail_blob = None, (path, size, sample)
            remote = commit.files.get(path)
            # The client skips a file whose oid here equals its own (sha256 for LFS, git sha1 otherwise).
            remote_oid = None if remote is None else remote.sha256 if remote.lfs else remote.oid
            mode = "lfs" if lfs else "regular"
            files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": remote_oid})
        return _json({"files": files, "commitOid": commit.oid})

    def _lfs_batch(self, payload: dict) -> Response:
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            answer = {"oid": oid, "size": size, "authenticated": True}
            stored = self.objects / oid
            if not (stored.exists() and stored.stat().st_size == size):  # no "actions": already uploaded
                answer["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-storage/{oid}"},
                    "verify": {"href": f"{self.url}/lfs-verify"},
                }
            objects.append(answer)
        return Response(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            {"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _lfs_put(self, oid: str, body: bytes) -> Response:
        if self._fail_blob is not None:
            path, size, sample = self._fail_blob
            if len(body) == size and body.startswith(sample):
                self._fail_blob = None
                raise HubError(INJECTED_FAILURE_STATUS, f"injected failure: upload of {path} failed")
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"content does not match sha256 {oid}")
        self._store(body, lfs=True)
        return Response(200)

    def _lfs_verify(self, payload: dict) -> Response:
        stored = self.objects / payload["oid"]
        if not (stored.exists() and stored.stat().st_size == payload["size"]):
            raise HubError(404, f"LFS object {payload['oid']} ({payload['size']} bytes) was not uploaded")
        return _json({"success": True})

    def _commit(self, repo: Repo, revision: str, body: bytes) -> Response:
        """Apply an NDJSON commit to a branch; on any error nothing moves (the commit is atomic)."""
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision} (commits go to branches)", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        head = repo.branches[revision]
        if header.get("parentCommit") not in (None, head):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[head].files)
        for line in lines:
            key, value = line["key"], line["value"]
            path = value.get("path", "").strip("/")
            if key == "file":
                if self._fail_path is not None and self._fail_path in path:
                    self._fail_path = None
                    raise HubError(INJECTED_FAILURE_STATUS, f"injected failure: upload of {path} failed")
                content = value["content"]
                content = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                files[path] = self._store(content, lfs=False)
            elif key == "lfsFile":
                stored = self.objects / value["oid"]
                size = stored.stat().st_size if stored.exists() else None
                if size is None or value.get("size", size) != size:  # copies send no size
                    raise HubError(
                        400, f"LFS object for {path} (sha256 {value['oid']}) was never uploaded; commit rejected"
                    )
                files[path] = _lfs_entry(value["oid"], size)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                files = {p: e for p, e in files.items() if not p.startswith(path + "/")}
        commit = self._add_commit(repo, header.get("summary", ""), files)
        url = f"{self.url}/{URL_PREFIX[repo.type]}{repo.id}/commit/{commit.oid}"
        return _json({"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None})


_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 plumbing: read the body, call the hub, apply Range to GETs, write the answer."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

    def _serve(self) -> None:
        response = self.server.hub.handle(self.command, self.path, self._read_body())
        body = response.body
        if response.status == 200 and self.command in ("GET", "HEAD") and self.headers.get("Range"):
            response, body = self._apply_range(response, self.headers["Range"])
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = _serve

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # streamed uploads have no length
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    @staticmethod
    def _apply_range(response: Response, range_header: str) -> tuple[Response, bytes]:
        """Answer `bytes=a-b`, `bytes=a-` or `bytes=-n` with a 206, or a 416 past the end."""
        match, size = _RANGE.match(range_header.strip()), len(response.body)
        if match is None or match.groups() == ("", ""):  # not a range we know: send it all
            return response, response.body
        first, last = match.groups()
        if first == "":  # the last `last` bytes
            start, end = max(size - int(last), 0), size - 1
        else:
            start, end = int(first), min(int(last or size - 1), size - 1)
        if start >= size or start > end:
            return Response(416, b"", {"Content-Range": f"bytes */{size}"}), b""
        headers = response.headers | {"Content-Range": f"bytes {start}-{end}/{size}"}
        return Response(206, b"", headers), response.body[start : end + 1]

    def log_message(self, format, *args) -> None:  # the hub keeps its own log; stay quiet on stderr
        pass
