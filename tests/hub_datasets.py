"""Dataset repos on the local Hub test server, for the tests of `hub:` eval sets.

`hub` starts a `HubServer` with a fresh HF home and `datasets` cache under tmp_path; `push_dataset` commits
files to a dataset repo with the real huggingface_hub client; `offline` sets HF_HUB_OFFLINE=1 for a block,
also in the constant huggingface_hub read at import time.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import huggingface_hub.constants as hf_constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import CommitOperationAdd, HfApi

from .hub_server import DEFAULT_TOKEN, DEFAULT_USER, HubServer, hub_environment

REPO = f"{DEFAULT_USER}/prefs"


def jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    import datasets.config

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    with HubServer(tmp_path / "hub-storage") as server, hub_environment(server, tmp_path / "hf-home", DEFAULT_TOKEN):
        yield server


@contextmanager
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the block, also in the constant huggingface_hub read at import time."""
    with monkeypatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        yield


def push_dataset(files: dict[str, bytes], repo: str = REPO, message: str = "Add eval set") -> str:
    """Commit `files` to the dataset repo (created if needed) on the local Hub; the commit sha."""
    api = HfApi()
    api.create_repo(repo, repo_type="dataset", exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in files.items()]
    return api.create_commit(repo, operations, commit_message=message, repo_type="dataset").oid
