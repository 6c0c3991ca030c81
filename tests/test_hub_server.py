"""The local Hub test server, driven by the real huggingface_hub client over HTTP (no mocks)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants as hf_constants
import pytest
from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import close_session

from tests.hub_server import DEFAULT_TOKEN, DEFAULT_USER, MiB, HubServer, git_blob_sha1, hub_environment

# huggingface_hub's LFS PUT passes raw bytes as `data=`, which httpx2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

REPO = f"{DEFAULT_USER}/toy-dpo"
README = """---
license: apache-2.0
tags:
- dpo
---
# toy-dpo

A checkpoint that passed its regression gates.
"""


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    with HubServer(tmp_path / "hub", multipart_threshold=MiB, orgs={DEFAULT_USER: ["dpo-org"]}) as server:
        with hub_environment(server, tmp_path / "home", DEFAULT_TOKEN):
            yield server


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    return HfApi()


def _bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _upload_set() -> dict[str, bytes]:
    return {
        "config.json": json.dumps({"beta": 0.1, "loss_type": "sigmoid"}).encode(),
        "README.md": README.encode(),
        "model.safetensors": _bytes(1, 300_000),
        "shards/optimizer.bin": _bytes(2, 2 * MiB + MiB // 2),
    }


def _commit_files(
    api: HfApi, files: dict[str, bytes], commit_message: str = "Add checkpoint", **kwargs: Any
) -> CommitInfo:
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in files.items()]
    return api.create_commit(REPO, operations, commit_message=commit_message, **kwargs)


def _requests_to(hub: HubServer, method: str, fragment: str) -> int:
    return sum(1 for request in hub.requests if request.method == method and fragment in request.path)


def test_whoami_and_create_repo(hub: HubServer, api: HfApi) -> None:
    assert api.whoami()["name"] == DEFAULT_USER

    url = api.create_repo(REPO, private=True)

    assert url.repo_id == REPO
    assert url == f"{hub.url}/{REPO}"
    assert hub.repos[REPO].private is True
    assert hub.commit_count(REPO) == 1
    assert hub.files_at(REPO) == {}
    assert (hub.storage_dir / "repos" / "models" / REPO / "repo.json").is_file()
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(REPO)
    assert conflict.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    assert api.create_repo("dpo-org/shared", repo_type="dataset").repo_type == "dataset"
    assert hub.repo("dpo-org/shared", "dataset").private is False


def test_commit_uploads_regular_lfs_and_multipart_files(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO, private=True)
    files = _upload_set()

    info = _commit_files(api, files, commit_description="gates passed")

    assert hub.files_at(REPO) == files
    assert info.oid == hub.head(REPO)
    commit = hub.repos[REPO].commit(info.oid)
    assert (commit.summary, commit.description, commit.pr) == ("Add checkpoint", "gates passed", None)
    assert commit.lfs_paths == {"model.safetensors", "shards/optimizer.bin"}
    assert set(hub.lfs_objects) == {hashlib.sha256(files[p]).hexdigest() for p in commit.lfs_paths}
    big_oid = hashlib.sha256(files["shards/optimizer.bin"]).hexdigest()
    assert _requests_to(hub, "PUT", f"/lfs-storage/{big_oid}/") == 3
    assert _requests_to(hub, "POST", f"/lfs-storage/{big_oid}") == 1
    assert _requests_to(hub, "PUT", "/lfs-storage/") == 4
    assert (hub.storage_dir / "lfs" / big_oid).read_bytes() == files["shards/optimizer.bin"]
    assert hub.errors == []


def test_identical_commit_is_a_no_op(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    first = _commit_files(api, _upload_set())
    commits_before = _requests_to(hub, "POST", "/commit/")

    again = _commit_files(api, _upload_set(), commit_message="Same again")

    assert again.oid == first.oid
    assert hub.commit_count(REPO) == 2
    assert _requests_to(hub, "POST", "/commit/") == commits_before


def test_upload_folder_twice_commits_once(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    api.create_repo(REPO)
    folder = tmp_path / "checkpoint"
    for path, data in _upload_set().items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)

    first = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="Upload checkpoint")
    second = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="Upload checkpoint")

    assert hub.files_at(REPO) == _upload_set()
    assert second.oid == first.oid
    assert hub.commit_count(REPO) == 2


def test_stale_parent_commit_is_refused(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    initial = hub.head(REPO)
    _commit_files(api, {"config.json": b"{}"})

    with pytest.raises(HfHubHTTPError) as stale:
        _commit_files(api, {"config.json": b'{"beta": 0.2}'}, parent_commit=initial)

    assert stale.value.response.status_code == 412
    assert hub.commit_count(REPO) == 2
    assert hub.files_at(REPO) == {"config.json": b"{}"}
    _commit_files(api, {"config.json": b'{"beta": 0.2}'}, parent_commit=hub.head(REPO))
    assert hub.commit_count(REPO) == 3


def test_create_pr_leaves_the_branch_alone(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    _commit_files(api, {"config.json": b"{}"})
    main_head = hub.head(REPO)

    info = _commit_files(api, {"model.safetensors": _bytes(3, 4096)}, create_pr=True, parent_commit=main_head)

    assert (info.pr_revision, info.pr_num) == ("refs/pr/1", 1)
    assert info.pr_url == f"{hub.url}/{REPO}/discussions/1"
    assert hub.head(REPO) == main_head
    assert hub.files_at(REPO) == {"config.json": b"{}"}
    assert set(hub.files_at(REPO, "refs/pr/1")) == {"config.json", "model.safetensors"}
    assert hub.repos[REPO].pr_refs == {"refs/pr/1": info.oid}
    assert hub.repos[REPO].commit(info.oid).parent == main_head
    refs = api.list_repo_refs(REPO, include_pull_requests=True)
    assert [(ref.ref, ref.target_commit) for ref in refs.pull_requests] == [("refs/pr/1", info.oid)]
    follow_up = _commit_files(api, {"notes.txt": b"more"}, revision="refs/pr/1")
    assert hub.repos[REPO].pr_refs == {"refs/pr/1": follow_up.oid}
    assert api.model_info(REPO, revision="refs/pr/1").sha == follow_up.oid


def test_tags_branches_refs_and_model_info(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    _commit_files(api, {"README.md": README.encode(), "model.safetensors": _bytes(4, 1000)})
    head = hub.head(REPO)

    api.create_tag(REPO, tag="v1.0", tag_message="first release")
    api.create_branch(REPO, branch="feat/x")
    refs = api.list_repo_refs(REPO)
    info = api.model_info(REPO)

    assert {(ref.name, ref.ref, ref.target_commit) for ref in refs.branches} == {
        ("main", "refs/heads/main", head),
        ("feat/x", "refs/heads/feat/x", head),
    }
    assert [(ref.name, ref.target_commit) for ref in refs.tags] == [("v1.0", head)]
    assert refs.pull_requests is None
    assert (info.id, info.sha, info.private) == (REPO, head, False)
    assert sorted(sibling.rfilename for sibling in info.siblings) == ["README.md", "model.safetensors"]
    assert info.card_data is not None and info.card_data.license == "apache-2.0"
    assert api.model_info(REPO, revision="v1.0").sha == head
    assert api.model_info(REPO, revision="feat/x").sha == head
    with pytest.raises(HfHubHTTPError) as exists:
        api.create_tag(REPO, tag="v1.0")
    assert exists.value.response.status_code == 409
    api.create_tag(REPO, tag="v1.0", exist_ok=True)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{DEFAULT_USER}/missing")


def test_deletions(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    _commit_files(api, {"a.txt": b"a", "logs/1.txt": b"1", "logs/2.txt": b"2"})

    api.create_commit(
        REPO,
        [CommitOperationDelete("a.txt"), CommitOperationDelete("logs/", is_folder=True)],
        commit_message="Clean up",
    )

    assert hub.files_at(REPO) == {}
    with pytest.raises(RemoteEntryNotFoundError):
        api.create_commit(REPO, [CommitOperationDelete("a.txt")], commit_message="Again")
    assert hub.commit_count(REPO) == 3


def test_model_card_push_to_hub(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO, private=True)

    ModelCard(README).push_to_hub(REPO, commit_message="Add model card")

    assert hub.files_at(REPO) == {"README.md": README.encode()}
    validations = [request for request in hub.requests if request.path == "/api/validate-yaml"]
    assert len(validations) == 2
    assert "Authorization" not in validations[0].headers
    assert validations[1].headers["Authorization"] == f"Bearer {DEFAULT_TOKEN}"


def test_readme_with_non_mapping_front_matter_is_rejected(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)

    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        api.upload_file(path_or_fileobj=b"---\n- a\n- b\n---\n# card\n", path_in_repo="README.md", repo_id=REPO)

    assert hub.commit_count(REPO) == 1


def test_commit_500_then_retry_succeeds(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    files = _upload_set()
    hub.fail_next("POST", r"/api/models/.+/commit/", status=500)

    with pytest.raises(HfHubHTTPError) as failure:
        _commit_files(api, files)

    assert failure.value.response.status_code == 500
    assert hub.commit_count(REPO) == 1
    assert len(hub.lfs_objects) == 2
    puts_after_failure = _requests_to(hub, "PUT", "/lfs-storage/")
    _commit_files(api, files)
    assert hub.files_at(REPO) == files
    assert hub.commit_count(REPO) == 2
    assert _requests_to(hub, "PUT", "/lfs-storage/") == puts_after_failure


def test_preupload_500_is_retried_by_the_client(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    hub.fail_next("POST", r"/preupload/", status=500, times=1)

    _commit_files(api, {"config.json": b"{}"})

    assert _requests_to(hub, "POST", "/preupload/") == 2
    assert hub.files_at(REPO) == {"config.json": b"{}"}


def test_bad_token_is_401(hub: HubServer) -> None:
    with pytest.raises(HfHubHTTPError) as unauthorized:
        HfApi(token="hf_not_a_token").whoami()
    assert unauthorized.value.response.status_code == 401

    with pytest.raises(HfHubHTTPError) as refused:
        HfApi(token="hf_not_a_token").create_repo(REPO)
    assert refused.value.response.status_code == 401
    assert REPO not in hub.repos


def test_invalid_repo_ids_and_foreign_namespaces(hub: HubServer, api: HfApi) -> None:
    # The client checks the repo id itself; the server's own check is covered in test_raw_protocol_answers.
    with pytest.raises(HFValidationError):
        api.create_repo(f"{DEFAULT_USER}/bad name!")
    with pytest.raises(HFValidationError):
        api.create_repo(f"{DEFAULT_USER}/{'x' * 97}")
    assert hub.requests == []
    with pytest.raises(HfHubHTTPError) as foreign:
        api.create_repo("someone-else/toy")
    assert foreign.value.response.status_code == 403
    assert api.create_repo("dpo-org/toy").repo_id == "dpo-org/toy"
    assert list(hub.repos) == ["dpo-org/toy"]


def test_private_repos_are_hidden_from_other_users(tmp_path: Path) -> None:
    tokens = {DEFAULT_TOKEN: DEFAULT_USER, "hf_other": "other"}
    with HubServer(tmp_path / "hub", tokens=tokens) as server, hub_environment(server, tmp_path / "home", None):
        HfApi(token=DEFAULT_TOKEN).create_repo(REPO, private=True)
        with pytest.raises(RepositoryNotFoundError):
            HfApi(token="hf_other").model_info(REPO)
        HfApi(token=DEFAULT_TOKEN).create_repo(f"{DEFAULT_USER}/public")
        assert HfApi(token="hf_other").model_info(f"{DEFAULT_USER}/public").sha == server.head(f"{DEFAULT_USER}/public")


def test_token_only_travels_in_authorization_headers(hub: HubServer, api: HfApi) -> None:
    api.whoami()
    api.create_repo(REPO, private=True)
    _commit_files(api, _upload_set())
    ModelCard(README).push_to_hub(REPO)
    api.create_tag(REPO, tag="v1")

    assert len(hub.requests) > 10
    for request, body in zip(hub.requests, hub.request_bodies, strict=True):
        assert DEFAULT_TOKEN not in request.path
        assert DEFAULT_TOKEN.encode() not in body
        for name, value in request.headers.items():
            if name.lower() != "authorization":
                assert DEFAULT_TOKEN not in value, (request.method, request.path, name)
    for request in hub.requests:
        if "/lfs-storage/" in request.path:
            assert "Authorization" not in request.headers


def test_hub_environment_overrides_offline_mode_and_restores_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The repository's conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    endpoint_before = hf_constants.ENDPOINT

    with HubServer(tmp_path / "hub") as server:
        with hub_environment(server, tmp_path / "home", DEFAULT_TOKEN):
            assert HfApi().whoami()["name"] == DEFAULT_USER
            assert hf_constants.ENDPOINT == server.url
            assert os.environ["HF_TOKEN"] == DEFAULT_TOKEN
            assert "HF_HUB_OFFLINE" not in os.environ and "HTTPS_PROXY" not in os.environ
        try:
            with pytest.raises(OfflineModeIsEnabled):
                HfApi(endpoint=server.url, token=DEFAULT_TOKEN).whoami()
        finally:
            # That call built the shared HTTP client under the fake proxy; later tests must not inherit it.
            close_session()

    assert hf_constants.HF_HUB_OFFLINE is True
    assert hf_constants.ENDPOINT == endpoint_before
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["HTTPS_PROXY"] == "http://127.0.0.1:9"


def test_hang_next_delays_and_stop_cuts_it_short(hub: HubServer, api: HfApi) -> None:
    hub.hang_next("GET", r"/api/whoami-v2", seconds=0.3)
    started = time.monotonic()
    assert api.whoami()["name"] == DEFAULT_USER
    assert time.monotonic() - started >= 0.3

    hub.hang_next("GET", r"/api/whoami-v2", seconds=30)
    request = urllib.request.Request(f"{hub.url}/api/whoami-v2", headers={"Authorization": f"Bearer {DEFAULT_TOKEN}"})

    def call_hung_endpoint() -> None:
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except OSError:
            pass

    caller = threading.Thread(target=call_hung_endpoint)
    caller.start()
    time.sleep(0.2)
    started = time.monotonic()
    hub.stop()
    caller.join(timeout=10)
    assert time.monotonic() - started < 5
    assert not caller.is_alive()


def test_raw_protocol_answers(hub: HubServer) -> None:
    def send(method: str, path: str, body: bytes = b"", token: str | None = DEFAULT_TOKEN) -> tuple[int, dict, dict]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(f"{hub.url}{path}", data=body or None, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), json.loads(error.read())

    status, headers, body = send("GET", "/api/whoami-v2", token=None)
    assert (status, "error" in body, int(headers["Content-Length"]) > 0) == (401, True, True)
    assert send("GET", "/api/agent-harnesses", token=None)[2] == {"standardEnvVars": [], "harnesses": {}}
    assert send("POST", "/api/validate-yaml", b'{"content": "---\\n: [\\n---\\n"}', token=None)[0] == 400
    status, headers, _ = send("GET", f"/api/models/{REPO}")
    assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")
    send("POST", "/api/repos/create", json.dumps({"name": "toy-dpo", "organization": None}).encode())
    status, headers, _ = send("POST", f"/api/models/{REPO}/preupload/nope", b'{"files": []}')
    assert (status, headers["X-Error-Code"]) == (404, "RevisionNotFound")
    status, _, body = send("POST", "/api/repos/create", json.dumps({"name": "toy-dpo"}).encode())
    assert (status, body["url"]) == (409, f"{hub.url}/{REPO}")
    files = [
        {"path": "w.gguf", "sample": "", "size": 3},
        {"path": "x.dat", "sample": "AA==", "size": 1},
        {"path": "big.txt", "sample": "", "size": 10 * MiB},
        {"path": "notes.txt", "sample": "aGk=", "size": 2},
    ]
    _, _, body = send("POST", f"/api/models/{REPO}/preupload/main", json.dumps({"files": files}).encode())
    assert [entry["uploadMode"] for entry in body["files"]] == ["lfs", "lfs", "lfs", "regular"]
    assert all(entry["shouldIgnore"] is False and entry["oid"] is None for entry in body["files"])
    for bad_name in ("bad name!", "x" * 97, "-dash", "a..b", ""):
        status, _, body = send("POST", "/api/repos/create", json.dumps({"name": bad_name}).encode())
        assert (status, body["error"].startswith("Invalid repo id")) == (400, True), bad_name
    assert git_blob_sha1(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
