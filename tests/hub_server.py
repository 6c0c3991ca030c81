"""A local Hugging Face Hub for tests: the plain-LFS protocol huggingface_hub 2.4.0 speaks, over real HTTP.

`HubServer` answers the endpoints described in `/work/shared/hub-protocol.md` (E0-E12): whoami, repo
creation, README metadata validation, preupload, the LFS batch API with single-part and multipart uploads,
atomic ndjson commits (optionally as pull requests, guarded by `parentCommit`), tags, branches, repo info
and refs; and, for `snapshot_download` and `hf_hub_download`, tree listings and file downloads (`resolve`).
It keeps an in-memory model that tests can assert on (`repos`, `lfs_objects`, `files_at`, `requests`) and
mirrors it under `storage_dir`. Faults (`fail_next`, `hang_next`) make one request fail or stall.

`hub_environment` points an already-imported huggingface_hub at the server: it sets the environment
variables the client reads per call and patches the module constants it read at import time.

Example:
    ```py
    with HubServer(tmp_path / "hub") as server, hub_environment(server, tmp_path / "home", DEFAULT_TOKEN):
        HfApi().create_repo("tester/toy")
        assert server.commit_count("tester/toy") == 1
    ```
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import re
import socket
import sys
import threading
import traceback
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

import yaml

DEFAULT_TOKEN = "hf_test_token"
DEFAULT_USER = "tester"

MiB = 1024 * 1024
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
LFS_SIZE_THRESHOLD = 10 * MiB
DEFAULT_MULTIPART_THRESHOLD = 8 * MiB
DEFAULT_CHUNK_SIZE = 5 * MiB
MAX_HANG_SECONDS = 60.0
# A connection idle this long is closed, so keep-alive handler threads do not pile up.
IDLE_CONNECTION_SECONDS = 30.0
MAX_CONNECTIONS = 64

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_NAME_PART = re.compile(r"[A-Za-z0-9._-]{1,96}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_PR_REF = re.compile(r"refs/pr/([1-9][0-9]*)")
_YAML_BLOCK = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
_PROXY_VARS = _PROXY_VARS + tuple(name.lower() for name in _PROXY_VARS)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of `data` as a blob: what the Hub reports as a regular file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_lfs_file(path: str, size: int, sample: bytes) -> bool:
    """The server's rule for preupload's `uploadMode`: weights by name, large files, binary-looking samples."""
    return path.endswith(LFS_SUFFIXES) or size >= LFS_SIZE_THRESHOLD or b"\0" in sample


def validate_repo_part(part: str) -> str | None:
    """Why `part` (a namespace or a repo name) is not valid on the Hub, or None when it is."""
    if not _NAME_PART.fullmatch(part):
        return f"'{part}' must be 1-96 characters from A-Z, a-z, 0-9, '.', '_' and '-'"
    if "--" in part or ".." in part:
        return f"'{part}' must not contain '--' or '..'"
    if part[0] in "-." or part[-1] in "-.":
        return f"'{part}' must not start or end with '-' or '.'"
    return None


def _front_matter(readme: str) -> tuple[bool, Any]:
    """(whether `readme` has a YAML block, its parsed value); raises yaml.YAMLError when it does not parse."""
    match = _YAML_BLOCK.search(readme)
    if match is None:
        return False, None
    return True, yaml.safe_load(match.group(2))


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Commit:
    """One commit. `files` is the whole tree after the commit; `lfs_paths` says which of its files are LFS."""

    oid: str
    parent: str | None
    ref: str
    summary: str
    description: str
    files: Mapping[str, bytes]
    lfs_paths: frozenset[str]
    pr: int | None
    created_at: str


@dataclass
class PullRequest:
    num: int
    target_branch: str
    head: str
    title: str

    @property
    def ref(self) -> str:
        return f"refs/pr/{self.num}"


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: list[Commit] = field(default_factory=list)
    pull_requests: dict[int, PullRequest] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    @property
    def pr_refs(self) -> dict[str, str]:
        """{"refs/pr/N": head commit oid} for every pull request."""
        return {pr.ref: pr.head for pr in self.pull_requests.values()}

    def commit(self, oid: str) -> Commit:
        for commit in self.commits:
            if commit.oid == oid:
                return commit
        raise KeyError(f"{self.repo_id} has no commit {oid}")

    def resolve(self, revision: str) -> str | None:
        """The commit oid `revision` (branch, tag, refs/heads|tags/…, refs/pr/N or commit oid) points at."""
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        for prefix, refs in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if revision.startswith(prefix) and revision[len(prefix) :] in refs:
                return refs[revision[len(prefix) :]]
        pr_match = _PR_REF.fullmatch(revision)
        if pr_match and int(pr_match.group(1)) in self.pull_requests:
            return self.pull_requests[int(pr_match.group(1))].head
        if any(commit.oid == revision for commit in self.commits):
            return revision
        return None


class RecordedHeaders(dict[str, str]):
    """Request headers with lower-cased names (httpx sends them so); lookups ignore case."""

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__((name.lower(), value) for name, value in items)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(name.lower(), default)


class RecordedRequest(NamedTuple):
    method: str
    path: str
    headers: RecordedHeaders


@dataclass
class _Fault:
    method: str
    pattern: re.Pattern[str]
    remaining: int
    status: int | None = None
    seconds: float = 0.0


@dataclass
class _PendingUpload:
    size: int
    chunk_size: int | None
    part_etags: dict[int, str] = field(default_factory=dict)


class HubError(Exception):
    """An error answer: JSON `{"error": message, **extra}` with `status` and an optional `X-Error-Code`."""

    def __init__(self, status: int, message: str, error_code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.extra = extra


def _repo_key(repo_id: str, repo_type: str) -> str:
    return repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"


class HubServer:
    """A threaded Hugging Face Hub on 127.0.0.1 with an ephemeral port.

    Args:
        storage_dir (`Path`): where repos, blobs and LFS objects are mirrored (created if missing).
        tokens (`Mapping[str, str]`, *optional*): accepted bearer tokens and the user each belongs to.
            Defaults to `{DEFAULT_TOKEN: DEFAULT_USER}`.
        orgs (`Mapping[str, list[str]]`, *optional*): organisations per user; a user may create and
            write repos in its own namespace and in its organisations'.
        multipart_threshold (`int`, *optional*): LFS objects larger than this many bytes are uploaded in parts.
        chunk_size (`int`, *optional*): the part size; defaults to 5 MiB, or the threshold when that is smaller.
    """

    def __init__(
        self,
        storage_dir: Path,
        *,
        tokens: Mapping[str, str] | None = None,
        orgs: Mapping[str, list[str]] | None = None,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        chunk_size: int | None = None,
    ) -> None:
        if multipart_threshold < 1:
            raise ValueError(f"multipart_threshold must be at least 1 byte, got {multipart_threshold}")
        self.storage_dir = Path(storage_dir)
        self.tokens: dict[str, str] = dict(tokens if tokens is not None else {DEFAULT_TOKEN: DEFAULT_USER})
        self.orgs: dict[str, list[str]] = {user: list(names) for user, names in (orgs or {}).items()}
        self.multipart_threshold = multipart_threshold
        self.chunk_size = chunk_size if chunk_size is not None else min(DEFAULT_CHUNK_SIZE, multipart_threshold)
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[RecordedRequest] = []
        self.request_bodies: list[bytes] = []
        self.errors: list[str] = []
        self._pending_uploads: dict[str, _PendingUpload] = {}
        self._faults: list[_Fault] = []
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._serve_thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> HubServer:
        if self._httpd is not None:
            raise RuntimeError("HubServer is already running; call stop() first")
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self._stopping.clear()
        self._httpd = _HTTPServer(self)
        self._serve_thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._serve_thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, wake hung handlers, close open connections and wait (bounded) for handler threads."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        httpd.join_handlers(timeout=5.0)
        if self._serve_thread is not None:
            self._serve_thread.join(timeout=5.0)
            self._serve_thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("HubServer is not running; call start() or use it as a context manager")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- assertions helpers ----------------------------------------------------------------------

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        with self._lock:
            return self.repos[_repo_key(repo_id, repo_type)]

    def files_at(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of `repo_id` at a branch, tag, `refs/pr/N` or commit oid; KeyError when unknown."""
        with self._lock:
            repo = self.repo(repo_id, repo_type)
            oid = repo.resolve(revision)
            if oid is None:
                raise KeyError(f"{repo_id} has no revision {revision!r}")
            return dict(repo.commit(oid).files)

    def commit_count(self, repo_id: str, repo_type: str = "model") -> int:
        """Commits in the repo over all refs, the initial commit made by create_repo included."""
        with self._lock:
            return len(self.repo(repo_id, repo_type).commits)

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        with self._lock:
            oid = self.repo(repo_id, repo_type).resolve(revision)
            if oid is None:
                raise KeyError(f"{repo_id} has no revision {revision!r}")
            return oid

    # -- fault injection -------------------------------------------------------------------------

    def fail_next(self, method: str, path_regex: str, status: int = 500, times: int = 1) -> None:
        """Answer the next `times` requests matching `method` and `path_regex` (re.search on the raw
        request target, query included) with `status` and a JSON error, without handling them."""
        if times < 1:
            raise ValueError(f"times must be at least 1, got {times}")
        with self._lock:
            self._faults.append(_Fault(method.upper(), re.compile(path_regex), times, status=status))

    def hang_next(self, method: str, path_regex: str, seconds: float) -> None:
        """Delay the next matching request by `seconds` (at most MAX_HANG_SECONDS; stop() cuts it short),
        then handle it normally."""
        if not 0 < seconds <= MAX_HANG_SECONDS:
            raise ValueError(f"seconds must be in (0, {MAX_HANG_SECONDS}], got {seconds}")
        with self._lock:
            self._faults.append(_Fault(method.upper(), re.compile(path_regex), 1, seconds=seconds))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str, target: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.method == method and fault.pattern.search(target):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    # -- persistence -----------------------------------------------------------------------------

    def _persist_repo(self, repo: Repo) -> None:
        repo_dir = self.storage_dir / "repos" / f"{repo.repo_type}s" / repo.repo_id
        blob_dir = self.storage_dir / "blobs"
        repo_dir.mkdir(parents=True, exist_ok=True)
        blob_dir.mkdir(parents=True, exist_ok=True)
        commits = []
        for commit in repo.commits:
            files = {}
            for path, data in commit.files.items():
                if path in commit.lfs_paths:
                    files[path] = {"lfs": True, "oid": sha256_hex(data), "size": len(data)}
                else:
                    oid = git_blob_sha1(data)
                    blob_path = blob_dir / oid
                    if not blob_path.exists():
                        blob_path.write_bytes(data)
                    files[path] = {"lfs": False, "oid": oid, "size": len(data)}
            commits.append(
                {
                    "oid": commit.oid,
                    "parent": commit.parent,
                    "ref": commit.ref,
                    "summary": commit.summary,
                    "description": commit.description,
                    "pr": commit.pr,
                    "createdAt": commit.created_at,
                    "files": files,
                }
            )
        state = {
            "id": repo.repo_id,
            "type": repo.repo_type,
            "private": repo.private,
            "branches": repo.branches,
            "tags": repo.tags,
            "pullRequests": {
                str(pr.num): {"target": pr.target_branch, "head": pr.head, "title": pr.title}
                for pr in repo.pull_requests.values()
            },
            "commits": commits,
        }
        (repo_dir / "repo.json").write_text(json.dumps(state, indent=2))

    def _lfs_dir(self) -> Path:
        path = self.storage_dir / "lfs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _store_lfs_object(self, oid: str, data: bytes) -> None:
        (self._lfs_dir() / oid).write_bytes(data)
        with self._lock:
            self.lfs_objects[oid] = data

    # -- request handling ------------------------------------------------------------------------

    def _handle(self, request: _Request) -> _Response:
        fault = self._take_fault(request.method, request.target)
        if fault is not None:
            if fault.seconds:
                self._stopping.wait(fault.seconds)
            if fault.status is not None:
                raise HubError(fault.status, f"Injected fault: {fault.status} on {request.method} {request.path}")
        return self._route(request)

    def _route(self, request: _Request) -> _Response:
        method, segments = request.method, request.segments
        if len(segments) >= 5 and segments[-4:] == ["info", "lfs", "objects", "batch"] and method == "POST":
            return self._lfs_batch(request, segments[:-4])
        if segments[:1] == ["lfs-storage"] and len(segments) in (2, 3):
            return self._lfs_storage(request, segments[1:])
        if segments[:1] == ["lfs-verify"] and len(segments) == 2 and method == "POST":
            return self._lfs_verify(request, segments[1])
        resolve_target = _resolve_target(segments)
        if resolve_target is not None and method in ("GET", "HEAD"):
            return self._resolve_file(request, *resolve_target)
        if segments[:1] != ["api"]:
            raise HubError(404, f"Not found: {request.method} {request.path}")
        rest = segments[1:]
        if rest == ["agent-harnesses"] and method == "GET":
            return _Response(200, {"standardEnvVars": [], "harnesses": {}})
        if rest == ["whoami-v2"] and method == "GET":
            return self._whoami(request)
        if rest == ["repos", "create"] and method == "POST":
            return self._create_repo(request)
        if rest == ["validate-yaml"] and method == "POST":
            return self._validate_yaml(request)
        if len(rest) >= 3 and rest[0] in _REPO_TYPES:
            repo_type = _REPO_TYPES[rest[0]]
            repo_id = f"{rest[1]}/{rest[2]}"
            action, args = (rest[3] if len(rest) > 3 else None), rest[4:]
            revision = "/".join(args)
            if method == "GET" and action is None:
                return self._repo_info(request, repo_type, repo_id, None)
            if method == "GET" and action == "revision" and revision:
                return self._repo_info(request, repo_type, repo_id, revision)
            if method == "GET" and action == "refs" and not args:
                return self._refs(request, repo_type, repo_id)
            if method == "GET" and action == "tree" and args:
                return self._tree(request, repo_type, repo_id, args[0], "/".join(args[1:]))
            if method == "POST" and action == "preupload" and revision:
                return self._preupload(request, repo_type, repo_id, revision)
            if method == "POST" and action == "commit" and revision:
                return self._commit(request, repo_type, repo_id, revision)
            if method == "POST" and action == "tag" and revision:
                return self._create_tag(request, repo_type, repo_id, revision)
            if method == "POST" and action == "branch" and revision:
                return self._create_branch(request, repo_type, repo_id, revision)
        raise HubError(404, f"Not found: {request.method} {request.path}")

    # -- auth and lookups ------------------------------------------------------------------------

    def _user(self, request: _Request, *, required: bool = True) -> str | None:
        """The user behind the bearer token; 401 when the token is unknown, or missing and `required`."""
        authorization = request.headers.get("authorization")
        if authorization is None:
            if required:
                raise HubError(401, "Authentication required: send 'Authorization: Bearer <token>'")
            return None
        scheme, _, token = authorization.partition(" ")
        user = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _can_write(self, user: str, namespace: str) -> bool:
        return namespace == user or namespace in self.orgs.get(user, [])

    def _readable_repo(self, user: str, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get(_repo_key(repo_id, repo_type))
        if repo is None or (repo.private and not self._can_write(user, repo.namespace)):
            raise HubError(404, f"Repository Not Found for url: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def _writable_repo(self, user: str, repo_type: str, repo_id: str) -> Repo:
        repo = self._readable_repo(user, repo_type, repo_id)
        if not self._can_write(user, repo.namespace):
            raise HubError(
                403, f"You don't have the rights to write to {repo_id}: '{user}' is not '{repo.namespace}' or in it"
            )
        return repo

    def _repo_url(self, request: _Request, repo: Repo) -> str:
        return f"{request.base_url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # -- E1, E2, E3 ------------------------------------------------------------------------------

    def _whoami(self, request: _Request) -> _Response:
        user = self._user(request)
        assert user is not None
        return _Response(
            200,
            {
                "type": "user",
                "name": user,
                "fullname": user.title(),
                "orgs": [{"name": org} for org in self.orgs.get(user, [])],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            },
        )

    def _create_repo(self, request: _Request) -> _Response:
        user = self._user(request)
        assert user is not None
        body = request.json_object()
        name, namespace = body.get("name"), body.get("organization") or user
        repo_type = body.get("type") or "model"
        if not isinstance(name, str) or not isinstance(namespace, str):
            raise HubError(400, "'name' and 'organization' must be strings")
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"Invalid repo type '{repo_type}'; expected one of model, dataset, space")
        for part in (namespace, name):
            problem = validate_repo_part(part)
            if problem is not None:
                raise HubError(400, f"Invalid repo id '{namespace}/{name}': {problem}")
        if not self._can_write(user, namespace):
            raise HubError(403, f"You don't have the rights to create a repo under '{namespace}'")
        visibility = body.get("visibility")
        if visibility not in (None, "private", "public"):
            raise HubError(400, f"Invalid visibility '{visibility}'; expected 'private' or 'public'")
        private = visibility == "private" or (visibility is None and bool(body.get("private")))
        repo_id = f"{namespace}/{name}"
        with self._lock:
            existing = self.repos.get(_repo_key(repo_id, repo_type))
            if existing is not None:
                raise HubError(
                    409, f"You already created this {repo_type} repo", url=self._repo_url(request, existing)
                )
            repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private)
            initial = _make_commit(
                repo, parent=None, ref="main", summary="initial commit", description="", files={},
                lfs_paths=frozenset(), pr=None,
            )
            repo.commits.append(initial)
            repo.branches["main"] = initial.oid
            self.repos[_repo_key(repo_id, repo_type)] = repo
            self._persist_repo(repo)
        url = self._repo_url(request, repo)
        return _Response(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, request: _Request) -> _Response:
        self._user(request, required=False)
        body = request.json_object()
        content = body.get("content")
        if not isinstance(content, str):
            raise HubError(400, "'content' must be the README text", errors=[{"message": "'content' is missing"}])
        try:
            has_block, metadata = _front_matter(content)
        except yaml.YAMLError as exc:
            message = f"Invalid YAML in README.md front matter: {exc}"
            raise HubError(400, message, errors=[{"message": message}], warnings=[]) from exc
        if has_block and metadata is not None and not isinstance(metadata, dict):
            message = f"README.md front matter must be a YAML mapping, got {type(metadata).__name__}"
            raise HubError(400, message, errors=[{"message": message}], warnings=[])
        return _Response(200, {"errors": [], "warnings": []})

    # -- E4 preupload ----------------------------------------------------------------------------

    def _preupload(self, request: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        user = self._user(request)
        assert user is not None
        body = request.json_object()
        entries = body.get("files")
        if not isinstance(entries, list):
            raise HubError(400, "'files' must be a list of {path, sample, size}")
        with self._lock:
            repo = self._writable_repo(user, repo_type, repo_id)
            oid = repo.resolve(revision)
            if oid is None:
                raise HubError(404, f"Revision Not Found: {revision}", "RevisionNotFound")
            current = repo.commit(oid)
        answers = []
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise HubError(400, f"Each file needs a 'path': {entry!r}")
            path, size = entry["path"], entry.get("size")
            if not isinstance(size, int) or size < 0:
                raise HubError(400, f"'size' of '{path}' must be a non-negative integer")
            try:
                sample = base64.b64decode(entry.get("sample") or "", validate=True)
            except ValueError as exc:
                raise HubError(400, f"'sample' of '{path}' is not base64: {exc}") from exc
            remote = current.files.get(path)
            remote_oid = None
            if remote is not None:
                remote_oid = sha256_hex(remote) if path in current.lfs_paths else git_blob_sha1(remote)
            answers.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if is_lfs_file(path, size, sample) else "regular",
                    "shouldIgnore": False,
                    "oid": remote_oid,
                }
            )
        return _Response(200, {"files": answers})

    # -- E5, E6, E7 LFS --------------------------------------------------------------------------

    def _lfs_batch(self, request: _Request, repo_segments: list[str]) -> _Response:
        user = self._user(request)
        assert user is not None
        repo_type = "model"
        if len(repo_segments) == 3 and repo_segments[0] in ("datasets", "spaces"):
            repo_type, repo_segments = _REPO_TYPES[repo_segments[0]], repo_segments[1:]
        if len(repo_segments) != 2 or not repo_segments[1].endswith(".git"):
            raise HubError(404, f"Not found: {request.method} {request.path}")
        repo_id = f"{repo_segments[0]}/{repo_segments[1][: -len('.git')]}"
        body = request.json_object()
        if body.get("operation") != "upload":
            raise HubError(422, f"Only the 'upload' operation is supported, got {body.get('operation')!r}")
        objects = body.get("objects")
        if not isinstance(objects, list):
            raise HubError(422, "'objects' must be a list of {oid, size}")
        with self._lock:
            self._writable_repo(user, repo_type, repo_id)
        answers = []
        for obj in objects:
            oid, size = (obj.get("oid"), obj.get("size")) if isinstance(obj, dict) else (None, None)
            if not isinstance(oid, str) or not _SHA256_HEX.fullmatch(oid) or not isinstance(size, int) or size < 0:
                answers.append(
                    {"oid": str(oid), "size": size if isinstance(size, int) else 0,
                     "error": {"code": 422, "message": "oid must be 64 lowercase hex digits and size an integer >= 0"}}
                )
                continue
            with self._lock:
                stored = self.lfs_objects.get(oid)
                if stored is not None and len(stored) == size:
                    answers.append({"oid": oid, "size": size})
                    continue
                multipart = size > self.multipart_threshold
                self._pending_uploads[oid] = _PendingUpload(size, self.chunk_size if multipart else None)
            upload: dict[str, Any] = {"href": f"{request.base_url}/lfs-storage/{oid}"}
            if multipart:
                num_parts = -(-size // self.chunk_size)
                upload["header"] = {"chunk_size": str(self.chunk_size)} | {
                    f"{part:05d}": f"{request.base_url}/lfs-storage/{oid}/{part}" for part in range(1, num_parts + 1)
                }
            answers.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {"upload": upload, "verify": {"href": f"{request.base_url}/lfs-verify/{oid}"}},
                }
            )
        return _Response(200, {"transfer": "basic", "objects": answers, "hash_algo": "sha256"})

    def _lfs_storage(self, request: _Request, args: list[str]) -> _Response:
        oid = args[0]
        with self._lock:
            pending = self._pending_uploads.get(oid)
        if pending is None:
            raise HubError(404, f"No upload was announced for LFS object {oid}; call the LFS batch API first")
        if request.method == "PUT" and len(args) == 1:
            if pending.chunk_size is not None:
                raise HubError(400, f"LFS object {oid} must be uploaded in parts of {pending.chunk_size} bytes")
            self._finish_upload(oid, pending, request.body)
            return _Response(200, {})
        if request.method == "PUT" and len(args) == 2 and args[1].isdigit() and pending.chunk_size is not None:
            part = int(args[1])
            num_parts = -(-pending.size // pending.chunk_size)
            if not 1 <= part <= num_parts:
                raise HubError(400, f"Part {part} is out of range 1..{num_parts} for LFS object {oid}")
            part_dir = self.storage_dir / "lfs-parts" / oid
            part_dir.mkdir(parents=True, exist_ok=True)
            (part_dir / f"{part:05d}").write_bytes(request.body)
            etag = f'"{hashlib.md5(request.body).hexdigest()}"'
            with self._lock:
                pending.part_etags[part] = etag
            return _Response(200, {}, headers={"ETag": etag})
        if request.method == "POST" and len(args) == 1 and pending.chunk_size is not None:
            return self._complete_multipart(request, oid, pending)
        raise HubError(405, f"{request.method} is not allowed on {request.path}")

    def _complete_multipart(self, request: _Request, oid: str, pending: _PendingUpload) -> _Response:
        body = request.json_object()
        parts = body.get("parts")
        if body.get("oid") != oid or not isinstance(parts, list):
            raise HubError(400, f"Multipart completion needs {{'oid': '{oid}', 'parts': [...]}}")
        assert pending.chunk_size is not None
        num_parts = -(-pending.size // pending.chunk_size)
        numbers = [part.get("partNumber") for part in parts if isinstance(part, dict)]
        if sorted(n for n in numbers if isinstance(n, int)) != list(range(1, num_parts + 1)):
            raise HubError(400, f"Multipart completion must list parts 1..{num_parts}, got {numbers}")
        with self._lock:
            etags = dict(pending.part_etags)
        for part in parts:
            if etags.get(part["partNumber"]) != part.get("etag"):
                raise HubError(400, f"Part {part['partNumber']} of {oid} was not uploaded or its ETag differs")
        part_dir = self.storage_dir / "lfs-parts" / oid
        data = b"".join((part_dir / f"{n:05d}").read_bytes() for n in range(1, num_parts + 1))
        self._finish_upload(oid, pending, data)
        for part_file in part_dir.iterdir():
            part_file.unlink()
        part_dir.rmdir()
        return _Response(200, {})

    def _finish_upload(self, oid: str, pending: _PendingUpload, data: bytes) -> None:
        if len(data) != pending.size or sha256_hex(data) != oid:
            raise HubError(
                400, f"Uploaded content does not match LFS object {oid} ({len(data)} bytes, expected {pending.size})"
            )
        self._store_lfs_object(oid, data)
        with self._lock:
            if self._pending_uploads.get(oid) is pending:
                del self._pending_uploads[oid]

    def _lfs_verify(self, request: _Request, oid: str) -> _Response:
        self._user(request)
        body = request.json_object()
        with self._lock:
            stored = self.lfs_objects.get(oid)
        if body.get("oid") != oid or stored is None or len(stored) != body.get("size"):
            raise HubError(404, f"LFS object {oid} of size {body.get('size')} is not stored")
        return _Response(200, {"oid": oid, "size": len(stored)})

    # -- E8 commit -------------------------------------------------------------------------------

    def _commit(self, request: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        user = self._user(request)
        assert user is not None
        create_pr = request.query.get("create_pr", "").lower() in ("1", "true")
        header, operations = _parse_ndjson_commit(request.body)
        summary = header.get("summary")
        if not isinstance(summary, str) or not summary.strip():
            raise HubError(400, "The commit header needs a non-empty 'summary'")
        description = header.get("description") or ""
        with self._lock:
            repo = self._writable_repo(user, repo_type, repo_id)
            pr_match = _PR_REF.fullmatch(revision)
            if revision in repo.branches:
                head = repo.branches[revision]
            elif pr_match and int(pr_match.group(1)) in repo.pull_requests and not create_pr:
                head = repo.pull_requests[int(pr_match.group(1))].head
            else:
                raise HubError(
                    404, f"Revision Not Found: '{revision}' is not a branch or an open PR ref", "RevisionNotFound"
                )
            parent_commit = header.get("parentCommit")
            if parent_commit is not None and parent_commit != head:
                raise HubError(
                    412,
                    f"A commit has happened since. Please refresh and try again: parentCommit {parent_commit} "
                    f"is not the head of '{revision}' ({head})",
                )
            base = repo.commit(head)
            files, lfs_paths = self._apply_operations(base, operations)
            if create_pr:
                pr_num = max([*repo.pull_requests, 0]) + 1
                ref, pr = f"refs/pr/{pr_num}", pr_num
            elif pr_match:
                ref, pr = revision, int(pr_match.group(1))
            else:
                ref, pr = revision, None
            commit = _make_commit(
                repo, parent=head, ref=ref, summary=summary, description=description, files=files,
                lfs_paths=lfs_paths, pr=pr,
            )
            repo.commits.append(commit)
            if create_pr:
                assert pr is not None
                repo.pull_requests[pr] = PullRequest(pr, target_branch=revision, head=commit.oid, title=summary)
            elif pr is not None:
                repo.pull_requests[pr].head = commit.oid
            else:
                repo.branches[revision] = commit.oid
            self._persist_repo(repo)
        repo_url = self._repo_url(request, repo)
        return _Response(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{repo_url}/commit/{commit.oid}",
                "pullRequestUrl": f"{repo_url}/discussions/{pr}" if create_pr else None,
            },
        )

    def _apply_operations(
        self, base: Commit, operations: list[tuple[str, dict[str, Any]]]
    ) -> tuple[dict[str, bytes], frozenset[str]]:
        """The tree after `operations`, computed on a copy so a bad operation leaves the repo untouched."""
        files = dict(base.files)
        lfs_paths = set(base.lfs_paths)
        for key, value in operations:
            path = _checked_path(value.get("path"), folder=key == "deletedFolder")
            if key == "file":
                if value.get("encoding", "base64") != "base64" or not isinstance(value.get("content"), str):
                    raise HubError(400, f"'file' operation for '{path}' needs base64 'content'")
                try:
                    files[path] = base64.b64decode(value["content"], validate=True)
                except ValueError as exc:
                    raise HubError(400, f"'content' of '{path}' is not base64: {exc}") from exc
                lfs_paths.discard(path)
            elif key == "lfsFile":
                oid = value.get("oid")
                with self._lock:
                    data = self.lfs_objects.get(oid) if isinstance(oid, str) else None
                if data is None or value.get("size") != len(data):
                    raise HubError(
                        422, f"LFS object {oid} for '{path}' is not stored; upload it with the LFS batch API first"
                    )
                files[path] = data
                lfs_paths.add(path)
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: '{path}'", "EntryNotFound")
                del files[path]
                lfs_paths.discard(path)
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                doomed = [existing for existing in files if existing.startswith(prefix)]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: '{path}'", "EntryNotFound")
                for existing in doomed:
                    del files[existing]
                    lfs_paths.discard(existing)
            else:
                raise HubError(400, f"Unknown commit operation key '{key}'")
        return files, frozenset(lfs_paths)

    # -- E9, E10, E11, E12 -----------------------------------------------------------------------

    def _create_tag(self, request: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        user = self._user(request)
        assert user is not None
        body = request.json_object()
        tag = body.get("tag")
        if not isinstance(tag, str) or not tag or tag.startswith("refs/") or " " in tag:
            raise HubError(400, f"Invalid tag name {tag!r}")
        with self._lock:
            repo = self._writable_repo(user, repo_type, repo_id)
            oid = repo.resolve(revision)
            if oid is None:
                raise HubError(404, f"Revision Not Found: {revision}", "RevisionNotFound")
            if tag in repo.tags:
                raise HubError(409, f"Tag '{tag}' already exists on {repo_id}")
            repo.tags[tag] = oid
            self._persist_repo(repo)
        return _Response(200, {"name": tag, "ref": f"refs/tags/{tag}", "targetCommit": oid})

    def _create_branch(self, request: _Request, repo_type: str, repo_id: str, branch: str) -> _Response:
        user = self._user(request)
        assert user is not None
        body = request.json_object()
        if branch.startswith("refs/") or " " in branch:
            raise HubError(400, f"Invalid branch name {branch!r}")
        with self._lock:
            repo = self._writable_repo(user, repo_type, repo_id)
            starting_point = body.get("startingPoint") or "main"
            oid = repo.resolve(starting_point)
            if oid is None:
                raise HubError(404, f"Revision Not Found: {starting_point}", "RevisionNotFound")
            if branch in repo.branches:
                raise HubError(409, f"Branch '{branch}' already exists on {repo_id}")
            repo.branches[branch] = oid
            self._persist_repo(repo)
        return _Response(200, {"name": branch, "ref": f"refs/heads/{branch}", "targetCommit": oid})

    def _repo_info(self, request: _Request, repo_type: str, repo_id: str, revision: str | None) -> _Response:
        user = self._user(request)
        assert user is not None
        with self._lock:
            repo = self._readable_repo(user, repo_type, repo_id)
            oid = repo.resolve(revision or "main")
            if oid is None:
                raise HubError(404, f"Revision Not Found: {revision}", "RevisionNotFound")
            commit = repo.commit(oid)
        with_blobs = request.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                data = commit.files[path]
                sibling["size"] = len(data)
                sibling["blobId"] = git_blob_sha1(data)
                if path in commit.lfs_paths:
                    sibling["lfs"] = {"size": len(data), "sha256": sha256_hex(data), "pointerSize": 134}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "id": repo_id,
            "sha": oid,
            "private": repo.private,
            "lastModified": commit.created_at,
            "createdAt": repo.commits[0].created_at,
            "siblings": siblings,
            "tags": [],
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        readme = commit.files.get("README.md")
        if readme is not None:
            try:
                _, metadata = _front_matter(readme.decode("utf-8", errors="replace"))
            except yaml.YAMLError:
                metadata = None
            if isinstance(metadata, dict):
                info["cardData"] = metadata
        return _Response(200, info)

    def _refs(self, request: _Request, repo_type: str, repo_id: str) -> _Response:
        user = self._user(request)
        assert user is not None
        with self._lock:
            repo = self._readable_repo(user, repo_type, repo_id)
            refs: dict[str, Any] = {
                "branches": [
                    {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
                    for name, oid in repo.branches.items()
                ],
                "converts": [],
                "tags": [
                    {"name": name, "ref": f"refs/tags/{name}", "targetCommit": oid} for name, oid in repo.tags.items()
                ],
            }
            if request.query.get("include_prs", "").lower() in ("1", "true"):
                refs["pullRequests"] = [
                    {"name": str(pr.num), "ref": pr.ref, "targetCommit": pr.head} for pr in repo.pull_requests.values()
                ]
        return _Response(200, refs)

    # -- downloads: tree listing and resolve -----------------------------------------------------

    def _commit_at(self, request: _Request, repo_type: str, repo_id: str, revision: str) -> Commit:
        user = self._user(request)
        assert user is not None
        with self._lock:
            repo = self._readable_repo(user, repo_type, repo_id)
            oid = repo.resolve(revision)
            if oid is None:
                raise HubError(404, f"Revision Not Found: {revision}", "RevisionNotFound")
            return repo.commit(oid)

    def _tree(self, request: _Request, repo_type: str, repo_id: str, revision: str, folder: str) -> _Response:
        """The files (with their LFS sha256) and folders under `folder`, all levels when `recursive`."""
        commit = self._commit_at(request, repo_type, repo_id, revision)
        recursive = request.query.get("recursive", "").lower() in ("1", "true")
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for path in sorted(commit.files):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for level in range(1, len(parts) if recursive else min(len(parts), 2)):
                subfolder = prefix + "/".join(parts[:level])
                # A folder's oid is its git tree id on the Hub; nothing here reads it, so any stable id will do.
                tree_id = hashlib.sha1(subfolder.encode()).hexdigest()
                entries.setdefault(subfolder, {"type": "directory", "oid": tree_id, "size": 0, "path": subfolder})
            if recursive or len(parts) == 1:
                data = commit.files[path]
                entry: dict[str, Any] = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
                if path in commit.lfs_paths:
                    entry["lfs"] = {"oid": sha256_hex(data), "size": len(data), "pointerSize": 134}
                entries[path] = entry
        if prefix and not entries:
            raise HubError(404, f"Entry Not Found: no folder '{folder}' at {commit.oid}", "EntryNotFound")
        return _Response(200, list(entries.values()))

    def _resolve_file(self, request: _Request, repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        """A file's bytes, with the headers `hf_hub_download` reads: X-Repo-Commit, ETag, X-Linked-* for LFS."""
        commit = self._commit_at(request, repo_type, repo_id, revision)
        data = commit.files.get(path)
        if data is None:
            raise HubError(404, f"Entry Not Found: '{path}' at {commit.oid}", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_sha1(data)}"'}
        if path in commit.lfs_paths:
            headers.update({"X-Linked-Etag": f'"{sha256_hex(data)}"', "X-Linked-Size": str(len(data))})
        return _Response(200, data, headers=headers)


def _resolve_target(segments: list[str]) -> tuple[str, str, str, str] | None:
    """(repo type, repo id, revision, file path) of a `[datasets/|spaces/]{ns}/{name}/resolve/{rev}/{path}` URL."""
    repo_type = "model"
    if segments[:1] in (["datasets"], ["spaces"]):
        repo_type, segments = _REPO_TYPES[segments[0]], segments[1:]
    if len(segments) < 5 or segments[2] != "resolve" or not all(segments[4:]):
        return None
    return repo_type, f"{segments[0]}/{segments[1]}", segments[3], "/".join(segments[4:])


def _make_commit(
    repo: Repo,
    *,
    parent: str | None,
    ref: str,
    summary: str,
    description: str,
    files: Mapping[str, bytes],
    lfs_paths: frozenset[str],
    pr: int | None,
) -> Commit:
    # The sequence number keeps two commits with the same tree on the same parent distinct.
    identity = {
        "repo": repo.repo_id,
        "seq": len(repo.commits),
        "parent": parent,
        "ref": ref,
        "summary": summary,
        "description": description,
        "files": {path: sha256_hex(data) for path, data in sorted(files.items())},
    }
    oid = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return Commit(oid, parent, ref, summary, description, dict(files), lfs_paths, pr, _now())


def _checked_path(path: object, *, folder: bool = False) -> str:
    if not isinstance(path, str) or not path.strip("/"):
        raise HubError(400, f"Invalid path in commit operation: {path!r}")
    cleaned = path.rstrip("/") if folder else path
    if cleaned.startswith("/") or any(part in ("", ".", "..") for part in cleaned.split("/")):
        raise HubError(400, f"Invalid path in commit operation: {path!r} (no leading '/', '.' or '..' segments)")
    return cleaned


def _parse_ndjson_commit(body: bytes) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    lines = [line for line in body.split(b"\n") if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise HubError(400, f"Commit payload line {number} is not JSON: {exc}") from exc
        if not isinstance(record, dict) or not isinstance(record.get("key"), str) or not isinstance(
            record.get("value"), dict
        ):
            raise HubError(400, f"Commit payload line {number} must be {{'key': str, 'value': object}}")
        records.append((record["key"], record["value"]))
    if not records or records[0][0] != "header":
        raise HubError(400, "The commit payload must start with a 'header' line")
    return records[0][1], records[1:]


@dataclass
class _Request:
    method: str
    target: str
    path: str
    segments: list[str]
    query: dict[str, str]
    headers: RecordedHeaders
    body: bytes
    base_url: str

    def json_object(self) -> dict[str, Any]:
        if not self.body.strip():
            return {}
        try:
            value = json.loads(self.body)
        except ValueError as exc:
            raise HubError(400, f"Request body is not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise HubError(400, "Request body must be a JSON object")
        return value


@dataclass
class _Response:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    error_code: str | None = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    timeout = IDLE_CONNECTION_SECONDS
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def _read_body(self) -> bytes | None:
        """The request body, or None when the client went away before sending all of it (e.g. it was killed)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size_line = self.rfile.readline()
                if not size_line:
                    return None
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                if len(chunks[-1]) < size:
                    return None
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        return body if len(body) == length else None

    def _dispatch(self) -> None:
        hub = self.server.hub
        body = self._read_body()
        if body is None:
            # A real Hub never acts on half a request: a commit cut short must not land as a smaller commit.
            self.close_connection = True
            return
        headers = RecordedHeaders(list(self.headers.items()))
        with hub._lock:
            hub.requests.append(RecordedRequest(self.command, self.path, headers))
            hub.request_bodies.append(body)
        split = urllib.parse.urlsplit(self.path)
        host = self.headers.get("Host") or f"127.0.0.1:{self.server.server_address[1]}"
        request = _Request(
            method=self.command,
            target=self.path,
            path=split.path,
            segments=[urllib.parse.unquote(segment) for segment in split.path.split("/")[1:]],
            query=dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True)),
            headers=headers,
            body=body,
            base_url=f"http://{host}",
        )
        try:
            response = hub._handle(request)
        except HubError as exc:
            response = _Response(exc.status, {"error": exc.message, **exc.extra}, error_code=exc.error_code)
        except Exception:
            trace = traceback.format_exc()
            with hub._lock:
                hub.errors.append(trace)
            response = _Response(500, {"error": f"Internal error in the test Hub:\n{trace}"})
        self._send(response)

    def _send(self, response: _Response) -> None:
        raw = isinstance(response.body, bytes)
        data = response.body if raw else json.dumps(response.body).encode()
        self.send_response(response.status)
        self.send_header("Content-Type", "application/octet-stream" if raw else "application/json")
        self.send_header("Content-Length", str(len(data)))
        if response.error_code is not None:
            self.send_header("X-Error-Code", response.error_code)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # stop() joins the handler threads itself, with a bound, after closing their sockets.
    block_on_close = False

    def __init__(self, hub: HubServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._handler_threads: set[threading.Thread] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            if len(self._connections) >= MAX_CONNECTIONS:
                self.shutdown_request(request)
                return
            self._connections.add(request)
        thread = threading.Thread(
            target=self._serve_connection, args=(request, client_address), name="hub-handler", daemon=True
        )
        with self._connections_lock:
            self._handler_threads.add(thread)
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.discard(request)
                self._handler_threads.discard(threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client closing its keep-alive connection is routine; anything else is kept for the test to see.
        if isinstance(sys.exc_info()[1], OSError):
            return
        self.hub.errors.append(traceback.format_exc())

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def join_handlers(self, timeout: float) -> None:
        with self._connections_lock:
            threads = list(self._handler_threads)
        for thread in threads:
            thread.join(timeout)


# -- client environment ------------------------------------------------------------------------


@contextmanager
def hub_environment(server: HubServer, home: Path, token: str | None) -> Iterator[None]:
    """Point huggingface_hub at `server` for the duration of the block, whether or not it is imported yet.

    Sets the environment variables the client reads per call (HF_TOKEN, proxies, …) and patches the
    `huggingface_hub.constants` values it read at import time (ENDPOINT, HF_HUB_OFFLINE, …), plus the
    module-level `HfApi` behind `upload_file` that `ModelCard.push_to_hub` uses. Everything is restored on
    exit, and the shared HTTP client is closed on entry and exit so no connection or proxy setting leaks.
    """
    import huggingface_hub.constants as constants
    import huggingface_hub.hf_api as hf_api
    from huggingface_hub.utils import _http

    # Not `huggingface_hub.utils.tqdm`: that name is the tqdm class the package re-exports.
    tqdm_module = importlib.import_module("huggingface_hub.utils.tqdm")
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)

    env: dict[str, str | None] = {
        "HF_HUB_DISABLE_XET": "1",
        "HF_ENDPOINT": server.url,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_TOKEN": token,
        "HF_HUB_OFFLINE": None,
        "TRANSFORMERS_OFFLINE": None,
        "HUGGING_FACE_HUB_TOKEN": None,
        "HF_TOKEN_PATH": None,
        "HF_OIDC_RESOURCE": None,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": None,
        "HUGGINGFACE_CO_STAGING": None,
        **{name: None for name in _PROXY_VARS},
    }
    patches: list[tuple[object, str, object]] = [
        (constants, "ENDPOINT", server.url),
        (constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"),
        (constants, "HF_HUB_OFFLINE", False),
        (constants, "HF_HUB_DISABLE_TELEMETRY", True),
        (constants, "HF_HUB_DISABLE_XET", True),
        (constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False),
        (constants, "HF_HUB_DISABLE_PROGRESS_BARS", True),
        (constants, "HF_HOME", str(home)),
        (constants, "HF_HUB_CACHE", str(home / "hub")),
        (constants, "HF_ASSETS_CACHE", str(home / "assets")),
        (constants, "HF_TOKEN_PATH", str(home / "token")),
        (constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens")),
        (constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json")),
        (hf_api.api, "endpoint", server.url),
        (tqdm_module, "HF_HUB_DISABLE_PROGRESS_BARS", True),
    ]

    saved_env = {name: os.environ.get(name) for name in env}
    saved_attrs = [(target, name, getattr(target, name)) for target, name, _ in patches]
    _http.close_session()
    try:
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for target, name, value in patches:
            setattr(target, name, value)
        yield
    finally:
        for target, name, value in reversed(saved_attrs):
            setattr(target, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _http.close_session()
