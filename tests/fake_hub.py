"""A small in-memory fake of the Hugging Face Hub HTTP API, for offline tests.

The real `huggingface_hub` client (and `transformers` / `datasets` on top of it) talks to this
server exactly as it would talk to huggingface.co once `HF_ENDPOINT` points here (see
`tests/conftest.py`). It implements only what pushing and pulling models and datasets needs:
repo creation, pre-upload, Git LFS batch + basic `PUT` upload, NDJSON commits, repo info, tree and
paths-info listings, refs, branches and `resolve` downloads (with `Range` support).

It checks *our use* of the client, not the real upload path: there is no Xet storage, no
authentication (any token is accepted), no `.gitattributes` parsing (LFS is decided from the
Hub's default patterns, binary content and size), and listings are never paginated. Requests
to routes it does not know answer 404 and are logged and recorded in
`FakeHub.unhandled_requests`, so an unsupported client call fails loudly instead of hanging.

Standard library only.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import logging
import re
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger("fake_hub")

USER_NAME = "fake-user"
DEFAULT_BRANCH = "main"
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # files this large always go through LFS on the real Hub
# The patterns of the `.gitattributes` the Hub writes into every new repo.
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
    "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "*.tar.*", "*.tar", "*.tflite",
    "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
)  # fmt: skip
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS)
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_PREFIX_TYPES = {prefix: repo_type for repo_type, prefix in URL_PREFIXES.items()}

# Route patterns match the raw (still percent-encoded) path, so a quoted revision such as
# `refs%2Fpr%2F1` stays one segment; captured groups are unquoted before use.
_API_REPO = r"/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
_GIT_REPO = r"/(?P<prefix>datasets/|spaces/)?(?P<repo>[^/]+/[^/]+)"


class HubError(Exception):
    """An error answer, with the `X-Error-Code` header the client maps to its exceptions."""

    def __init__(self, status: int, message: str, error_code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code


def _now() -> str:
    """Timestamp in the only format `huggingface_hub.utils.parse_datetime` accepts."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _should_use_lfs(path: str, size: int, sample: bytes) -> bool:
    name = path.rsplit("/", 1)[-1]
    matches_pattern = any(fnmatch.fnmatch(name, pattern) for pattern in LFS_PATTERNS)
    return matches_pattern or size >= LFS_SIZE_THRESHOLD or b"\0" in sample


@dataclass(frozen=True)
class Blob:
    """A file's content; `is_lfs` says whether it was committed as an LFS pointer."""

    content: bytes
    is_lfs: bool

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @cached_property
    def git_oid(self) -> str:
        """The git blob id: of the content, or of the LFS pointer file for LFS files."""
        if not self.is_lfs:
            return _git_blob_oid(self.content)
        return _git_blob_oid(self._lfs_pointer())

    @property
    def etag(self) -> str:
        """What the Hub sends as ETag: the sha256 for LFS files, the git blob id otherwise."""
        return self.sha256 if self.is_lfs else self.git_oid

    def _lfs_pointer(self) -> bytes:
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
            f"size {len(self.content)}\n"
        ).encode()

    def entry(self, path: str) -> dict[str, Any]:
        """The JSON object the tree and paths-info endpoints return for this file."""
        entry: dict[str, Any] = {
            "type": "file",
            "oid": self.git_oid,
            "size": len(self.content),
            "path": path,
        }
        if self.is_lfs:
            entry["lfs"] = {
                "oid": self.sha256,
                "size": len(self.content),
                "pointerSize": len(self._lfs_pointer()),
            }
        return entry

    def sibling(self, path: str) -> dict[str, Any]:
        """The JSON object of the `siblings` list in repo info."""
        sibling: dict[str, Any] = {
            "rfilename": path,
            "size": len(self.content),
            "blobId": self.git_oid,
        }
        if self.is_lfs:
            sibling["lfs"] = {
                "sha256": self.sha256,
                "size": len(self.content),
                "pointerSize": len(self._lfs_pointer()),
            }
        return sibling


@dataclass
class Commit:
    oid: str
    title: str
    message: str
    parents: list[str]
    files: dict[str, Blob]
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    created_at: str = field(default_factory=_now)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    pull_requests: int = 0

    @property
    def url(self) -> str:
        return f"{URL_PREFIXES[self.repo_type]}{self.repo_id}"

    def resolve(self, revision: str) -> Commit:
        """A branch name or a full commit id -> commit, like the Hub's `{revision}` segment."""
        oid = self.branches.get(revision, revision)
        if oid not in self.commits:
            raise HubError(
                404,
                f"Invalid rev id: {revision} in {self.repo_type} {self.repo_id}",
                "RevisionNotFound",
            )
        return self.commits[oid]

    def add_commit(self, branch: str, title: str, message: str, files: dict[str, Blob]) -> Commit:
        parent = self.branches.get(branch)
        commit = Commit(
            oid=secrets.token_hex(20),
            title=title,
            message=message,
            parents=[parent] if parent else [],
            files=files,
        )
        self.commits[commit.oid] = commit
        self.branches[branch] = commit.oid
        return commit


@dataclass
class Request:
    """One parsed HTTP request, as a route handler sees it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Message
    body: bytes
    params: dict[str, str]

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Request body of {self.path} is not JSON: {error}") from error

    def flag(self, name: str) -> bool:
        return self.query.get(name, ["0"])[-1].lower() in ("1", "true")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, payload: Any, status: int = 200) -> Response:
        body = json.dumps(payload).encode()
        return cls(status, body, {"Content-Type": "application/json"})


class FakeHub:
    """In-memory Hub server on 127.0.0.1 (ephemeral port unless `port` is given).

    The socket is bound in `__init__`, so `endpoint` is known before `start()` serves it on a
    daemon thread; `stop()` shuts it down. `reset()` forgets all repos and LFS objects.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled_requests: list[tuple[str, str]] = []
        self._routes = self._build_routes()
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._thread: threading.Thread | None = None
        bound_host, bound_port = self._server.server_address[:2]
        self.endpoint = f"http://{bound_host}:{bound_port}"

    # ----- lifecycle and inspection helpers for tests -----

    def start(self) -> FakeHub:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def reset(self) -> None:
        with self._lock:
            self._repos.clear()
            self._lfs_objects.clear()
            self.requests.clear()
            self.unhandled_requests.clear()

    def repo_files(
        self, repo_id: str, repo_type: str = "model", revision: str = DEFAULT_BRANCH
    ) -> dict[str, bytes]:
        """Path -> content of every file at `revision`, to assert on what a push committed."""
        with self._lock:
            commit = self._get_repo(repo_type, repo_id).resolve(revision)
            return {path: blob.content for path, blob in commit.files.items()}

    def commit_titles(
        self, repo_id: str, repo_type: str = "model", branch: str = DEFAULT_BRANCH
    ) -> list[str]:
        """Titles of the commits on `branch`, newest first."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            titles, oid = [], repo.branches.get(branch)
            while oid:
                commit = repo.commits[oid]
                titles.append(commit.title)
                oid = commit.parents[0] if commit.parents else None
            return titles

    # ----- HTTP plumbing -----

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub._handle(self, "GET")

            def do_HEAD(self) -> None:
                hub._handle(self, "HEAD")

            def do_POST(self) -> None:
                hub._handle(self, "POST")

            def do_PUT(self) -> None:
                hub._handle(self, "PUT")

            def do_DELETE(self) -> None:
                hub._handle(self, "DELETE")

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug(format, *args)

        return Handler

    def _build_routes(self) -> list[tuple[set[str], re.Pattern[str], Any]]:
        routes = [
            ({"GET"}, r"/api/whoami-v2", self._whoami),
            ({"POST"}, r"/api/repos/create", self._create_repo),
            ({"DELETE"}, r"/api/repos/delete", self._delete_repo),
            ({"POST"}, r"/api/validate-yaml", self._validate_yaml),
            ({"GET"}, _API_REPO + r"(?:/revision/(?P<rev>[^/]+))?", self._repo_info),
            ({"GET"}, _API_REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self._tree),
            ({"POST"}, _API_REPO + r"/paths-info/(?P<rev>[^/]+)", self._paths_info),
            ({"GET"}, _API_REPO + r"/refs", self._refs),
            ({"POST"}, _API_REPO + r"/branch/(?P<rev>[^/]+)", self._create_branch),
            ({"POST"}, _API_REPO + r"/preupload/(?P<rev>[^/]+)", self._preupload),
            ({"POST"}, _API_REPO + r"/commit/(?P<rev>[^/]+)", self._commit),
            ({"POST"}, _GIT_REPO + r"\.git/info/lfs/objects/batch", self._lfs_batch),
            ({"PUT"}, r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self._lfs_upload),
            ({"GET", "HEAD"}, _GIT_REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self._resolve),
            ({"GET"}, r"/api/(?P<type>models|datasets|spaces)/(?P<name>[^/]+)", self._no_namespace),
        ]
        return [
            (methods, re.compile(pattern + "$"), handler) for methods, pattern, handler in routes
        ]

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(handler.path)
        # Always read the body first: answering before it is consumed breaks the client's send.
        body = _read_body(handler)
        with self._lock:
            self.requests.append((method, url.path))
        try:
            response = self._dispatch(method, url.path, url.query, handler.headers, body)
        except HubError as error:
            response = Response.json({"error": error.message}, status=error.status)
            response.headers["X-Error-Message"] = error.message
            if error.error_code:
                response.headers["X-Error-Code"] = error.error_code
        response.headers.setdefault("Content-Length", str(len(response.body)))
        handler.send_response(response.status)
        for name, value in response.headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(response.body)

    def _dispatch(
        self, method: str, path: str, query: str, headers: Message, body: bytes
    ) -> Response:
        for methods, pattern, route in self._routes:
            match = pattern.match(path)
            if match and method in methods:
                params = {
                    key: unquote(value)
                    for key, value in match.groupdict().items()
                    if value is not None
                }
                request = Request(method, path, parse_qs(query), headers, body, params)
                with self._lock:
                    return route(request)
        logger.warning("fake hub: no route for %s %s", method, path)
        with self._lock:
            self.unhandled_requests.append((method, path))
        raise HubError(404, f"Fake Hub has no route for {method} {path}")

    # ----- repo lookup -----

    def _get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def _repo_from(self, request: Request) -> Repo:
        """The repo named by an `/api/{type}s/{repo}` or `/{prefix}{repo}` route."""
        if "type" in request.params:
            repo_type = REPO_TYPES[request.params["type"]]
        else:
            repo_type = _PREFIX_TYPES[request.params.get("prefix", "")]
        return self._get_repo(repo_type, request.params["repo"])

    # ----- routes -----

    def _no_namespace(self, request: Request) -> Response:
        """Existence probes such as datasets' `repo_info("name")` must see RepoNotFound to create it."""
        name = request.params["name"]
        raise HubError(
            404, f"Repository {name!r} not found: ids are 'namespace/name'", "RepoNotFound"
        )

    def _whoami(self, request: Request) -> Response:
        return Response.json(
            {
                "type": "user",
                "name": USER_NAME,
                "fullname": "Fake User",
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "fake", "role": "write"},
                },
            }
        )

    def _create_repo(self, request: Request) -> Response:
        payload = request.json()
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(
                400, f"Invalid repo type {repo_type!r}, expected one of {sorted(URL_PREFIXES)}"
            )
        repo_id = f"{payload.get('organization') or USER_NAME}/{payload['name']}"
        url = f"{self.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self._repos:
            return Response.json(
                {"error": f"You already created this {repo_type} repo", "url": url}, status=409
            )
        private = (
            payload.get("visibility", "private" if payload.get("private") else "public") != "public"
        )
        repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private)
        gitattributes = Blob(DEFAULT_GITATTRIBUTES.encode(), is_lfs=False)
        repo.add_commit(DEFAULT_BRANCH, "initial commit", "", {".gitattributes": gitattributes})
        self._repos[(repo_type, repo_id)] = repo
        return Response.json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, request: Request) -> Response:
        payload = request.json()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or USER_NAME}/{payload['name']}"
        self._get_repo(repo_type, repo_id)
        del self._repos[(repo_type, repo_id)]
        return Response.json({})

    def _validate_yaml(self, request: Request) -> Response:
        return Response.json({"errors": [], "warnings": []})

    def _repo_info(self, request: Request) -> Response:
        repo = self._repo_from(request)
        commit = repo.resolve(request.params.get("rev", DEFAULT_BRANCH))
        siblings = [blob.sibling(path) for path, blob in sorted(commit.files.items())]
        return Response.json(
            {
                "_id": repo.repo_id,
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "createdAt": repo.created_at,
                "lastModified": commit.date,
                "siblings": siblings,
            }
        )

    def _tree(self, request: Request) -> Response:
        repo = self._repo_from(request)
        commit = repo.resolve(request.params["rev"])
        folder = request.params.get("path", "").strip("/")
        entries = _list_folder(commit.files, folder, recursive=request.flag("recursive"))
        if entries is None:
            raise HubError(
                404, f"Folder {folder!r} not found at {request.params['rev']}", "EntryNotFound"
            )
        return Response.json(entries)

    def _paths_info(self, request: Request) -> Response:
        repo = self._repo_from(request)
        commit = repo.resolve(request.params["rev"])
        if request.headers.get("Content-Type", "").startswith("application/json"):
            paths = request.json().get("paths", [])
        else:
            paths = parse_qs(request.body.decode()).get("paths", [])
        folders = {folder for path in commit.files for folder in _parent_folders(path)}
        entries = []
        for path in (p.strip("/") for p in paths):
            if path in commit.files:
                entries.append(commit.files[path].entry(path))
            elif path in folders:
                entries.append(_folder_entry(path))
        return Response.json(entries)

    def _refs(self, request: Request) -> Response:
        repo = self._repo_from(request)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
            for name, oid in repo.branches.items()
            if not name.startswith("refs/pr/")
        ]
        return Response.json({"branches": branches, "tags": [], "converts": []})

    def _create_branch(self, request: Request) -> Response:
        repo = self._repo_from(request)
        branch = request.params["rev"]
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        starting_point = request.json().get("startingPoint") or DEFAULT_BRANCH
        repo.branches[branch] = repo.resolve(starting_point).oid
        return Response.json({})

    def _preupload(self, request: Request) -> Response:
        repo = self._repo_from(request)
        current_files = repo.resolve(request.params["rev"]).files
        answers = []
        for file in request.json()["files"]:
            path, size = file["path"], file["size"]
            sample = base64.b64decode(file["sample"])
            is_lfs = _should_use_lfs(path, size, sample)
            existing = current_files.get(path)
            answers.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if is_lfs else "regular",
                    "shouldIgnore": False,
                    "oid": existing.etag if existing is not None else None,
                }
            )
        return Response.json({"files": answers})

    def _lfs_batch(self, request: Request) -> Response:
        self._repo_from(request)
        objects = []
        for obj in request.json()["objects"]:
            answer: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self._lfs_objects:
                href = f"{self.endpoint}/lfs-upload/{obj['oid']}"
                answer["actions"] = {"upload": {"href": href, "expires_in": 3600}}
            objects.append(answer)
        return Response.json({"transfer": "basic", "objects": objects})

    def _lfs_upload(self, request: Request) -> Response:
        oid = request.params["oid"]
        actual = hashlib.sha256(request.body).hexdigest()
        if actual != oid:
            raise HubError(400, f"LFS upload to {oid} has sha256 {actual}: content does not match")
        self._lfs_objects[oid] = request.body
        return Response(headers={"ETag": f'"{oid}"'})

    def _commit(self, request: Request) -> Response:
        repo = self._repo_from(request)
        revision = request.params["rev"]
        base = repo.resolve(revision)
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a 'header' line")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent is not None and parent != base.oid:
            raise HubError(412, f"Parent commit {parent} is not the head {base.oid} of {revision}")
        files = dict(base.files)
        for line in lines[1:]:
            self._apply_operation(files, line["key"], line["value"])
        branch = revision
        pull_request_url = None
        if request.flag("create_pr"):
            repo.pull_requests += 1
            branch = f"refs/pr/{repo.pull_requests}"
            repo.branches[branch] = base.oid
            pull_request_url = f"{self.endpoint}/{repo.url}/discussions/{repo.pull_requests}"
        elif revision not in repo.branches:
            raise HubError(400, f"Can only commit to a branch, got revision {revision!r}")
        commit = repo.add_commit(
            branch, header.get("summary", ""), header.get("description", ""), files
        )
        return Response.json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.endpoint}/{repo.url}/commit/{commit.oid}",
                "pullRequestUrl": pull_request_url,
            }
        )

    def _apply_operation(self, files: dict[str, Blob], key: str, value: dict[str, Any]) -> None:
        path = value["path"]
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise HubError(400, f"Unsupported encoding {value['encoding']!r} for {path}")
            files[path] = Blob(base64.b64decode(value["content"]), is_lfs=False)
        elif key == "lfsFile":
            content = self._lfs_objects.get(value["oid"])
            if content is None:
                raise HubError(422, f"LFS object {value['oid']} for {path} was never uploaded")
            files[path] = Blob(content, is_lfs=True)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"Cannot delete {path}: no such file", "EntryNotFound")
        elif key == "deletedFolder":
            prefix = path.rstrip("/") + "/"
            for name in [name for name in files if name.startswith(prefix)]:
                del files[name]
        else:
            raise HubError(400, f"Unknown commit operation {key!r} for {path}")

    def _resolve(self, request: Request) -> Response:
        repo = self._repo_from(request)
        commit = repo.resolve(request.params["rev"])
        path = request.params["path"]
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(
                404, f"Entry not found: {path} at {request.params['rev']}", "EntryNotFound"
            )
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if blob.is_lfs:
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(len(blob.content))
        content, status = _apply_range(blob.content, request.headers.get("Range"), headers)
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(content))
            content = b""
        return Response(status, content, headers)


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0], 16)
            chunk = handler.rfile.read(size)
            handler.rfile.readline()  # the CRLF after each chunk
            if size == 0:
                return b"".join(chunks)
            chunks.append(chunk)
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


def _apply_range(
    content: bytes, range_header: str | None, headers: dict[str, str]
) -> tuple[bytes, int]:
    """Serve `bytes=start-end` / `bytes=-suffix` ranges: HfFileSystem reads parquet files this way."""
    if not range_header:
        return content, 200
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())
    if match is None or match.groups() == ("", ""):
        raise HubError(416, f"Unsupported Range header {range_header!r}")
    first, last = match.groups()
    size = len(content)
    if first == "":
        start, stop = max(size - int(last), 0), size
    else:
        start, stop = int(first), min(int(last) + 1, size) if last else size
    if start >= size and size > 0:
        raise HubError(416, f"Range {range_header!r} starts past the end of a {size}-byte file")
    headers["Content-Range"] = f"bytes {start}-{max(stop - 1, start)}/{size}"
    return content[start:stop], 206


def _parent_folders(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _folder_entry(path: str) -> dict[str, Any]:
    return {
        "type": "directory",
        "oid": hashlib.sha1(path.encode()).hexdigest(),
        "size": 0,
        "path": path,
    }


def _list_folder(
    files: dict[str, Blob], folder: str, recursive: bool
) -> list[dict[str, Any]] | None:
    """Tree entries under `folder` ('' is the root); None when the folder does not exist."""
    prefix = f"{folder}/" if folder else ""
    entries: dict[str, dict[str, Any]] = {}
    for path, blob in sorted(files.items()):
        if not path.startswith(prefix):
            continue
        relative_folders = [f for f in _parent_folders(path) if f.startswith(prefix)]
        if not recursive:
            relative_folders = relative_folders[:1]
        for sub_folder in relative_folders:
            entries.setdefault(sub_folder, _folder_entry(sub_folder))
        if recursive or "/" not in path[len(prefix) :]:
            entries[path] = blob.entry(path)
    if not entries and folder:
        return None
    return list(entries.values())
