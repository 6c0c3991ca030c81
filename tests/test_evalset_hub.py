"""Tests for `pytest_dpo.evalset_hub`: eval sets named `hub:org/name[:split][@revision]`.

The datasets live on the local Hub test server (`tests/hub_server.py`), written there with the real
huggingface_hub client; `load_eval_set` downloads them into a Hub cache under tmp_path, and the offline
tests read that cache with HF_HUB_OFFLINE=1. No internet is used.
"""

from __future__ import annotations

import doctest
import re
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, snapshot_download

from pytest_dpo import evalset_hub
from pytest_dpo.evalset import EvalSet, EvalSetError, load_eval_set
from pytest_dpo.evalset_hub import HubSource, parse_hub_source

from .fixture_paths import EVAL_CONVERSATIONAL, EVAL_STANDARD
from .hub_datasets import (  # noqa: F401 (hub: a fixture)
    REPO,
    hub,
    jsonl_bytes,
    offline,
    parquet_bytes,
    push_dataset,
    read_jsonl,
)
from .hub_server import DEFAULT_USER, HubServer

SOURCE = f"hub:{REPO}"
SHA = re.compile(r"[0-9a-f]{40}")

# huggingface_hub's uploads pass raw bytes as `data=`, which httpx2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


STANDARD_ROWS = read_jsonl(EVAL_STANDARD)
TRAIN_ROWS = STANDARD_ROWS[:5]


@pytest.fixture
def prefs(hub: HubServer) -> str:
    """`tester/prefs` with `test` (the standard fixture rows) and `train` splits; its commit sha."""
    return push_dataset({"data/test.jsonl": jsonl_bytes(STANDARD_ROWS), "data/train.jsonl": jsonl_bytes(TRAIN_ROWS)})


def _error(source: str) -> str:
    with pytest.raises(EvalSetError) as caught:
        load_eval_set(source)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{source}: ")
    assert caught.value.__cause__ is None
    return message


# -- reading ------------------------------------------------------------------------------------


def test_defaults_to_the_test_split_and_hashes_like_the_local_file(prefs: str) -> None:
    eval_set = load_eval_set(SOURCE)
    local = load_eval_set(EVAL_STANDARD)
    assert isinstance(eval_set, EvalSet)
    assert eval_set.sha256 == local.sha256
    assert eval_set.rows == local.rows
    assert eval_set.revision == prefs and SHA.fullmatch(eval_set.revision)
    assert eval_set.path == SOURCE
    assert eval_set.locations[7] == f"{SOURCE}:test row 7"
    assert eval_set.format == "standard"


def test_a_named_split_is_read(prefs: str, tmp_path: Path) -> None:
    local_train = tmp_path / "train.jsonl"
    local_train.write_bytes(jsonl_bytes(TRAIN_ROWS))
    eval_set = load_eval_set(f"{SOURCE}:train")
    assert eval_set.sha256 == load_eval_set(local_train).sha256
    assert len(eval_set) == len(TRAIN_ROWS)
    assert eval_set.locations[0] == f"{SOURCE}:train row 0"


def test_sha_pins_and_branches_and_tags_resolve_to_their_sha(prefs: str) -> None:
    api = HfApi()
    api.create_tag(REPO, tag="v1", revision=prefs, repo_type="dataset")
    api.create_branch(REPO, branch="frozen", revision=prefs, repo_type="dataset")
    later = push_dataset({"data/test.jsonl": jsonl_bytes(STANDARD_ROWS[:3])}, message="Trim the test split")
    original = load_eval_set(EVAL_STANDARD).sha256

    latest = load_eval_set(SOURCE)
    assert (latest.revision, len(latest)) == (later, 3)
    for revision in ("v1", "frozen", prefs):
        pinned = load_eval_set(f"{SOURCE}@{revision}")
        assert (pinned.revision, pinned.sha256, pinned.path) == (prefs, original, f"{SOURCE}@{revision}")
    assert load_eval_set(f"{SOURCE}:test@main").revision == later


def test_offline_reads_the_prefetched_cache(prefs: str, hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot_download(REPO, repo_type="dataset")  # what `hf download --repo-type dataset tester/prefs` does
    snapshot_download(REPO, repo_type="dataset", revision=prefs)
    with offline(monkeypatch):
        requests_before = len(hub.requests)
        eval_set = load_eval_set(SOURCE)
        train = load_eval_set(f"{SOURCE}:train@{prefs}")
        assert len(hub.requests) == requests_before
    assert (eval_set.sha256, eval_set.revision) == (load_eval_set(EVAL_STANDARD).sha256, prefs)
    assert (len(train), train.revision) == (len(TRAIN_ROWS), prefs)


def test_the_only_split_is_the_default(hub: HubServer) -> None:
    push_dataset({"train.jsonl": jsonl_bytes(TRAIN_ROWS)})
    eval_set = load_eval_set(SOURCE)
    assert len(eval_set) == len(TRAIN_ROWS)
    assert eval_set.locations[0] == f"{SOURCE}:train row 0"


def test_a_conversational_parquet_dataset_reads_as_conversational(hub: HubServer, tmp_path: Path) -> None:
    rows = read_jsonl(EVAL_CONVERSATIONAL)
    # Different keys per row: Arrow fills each row's struct with the others' keys as None, which must not count.
    for row in rows:
        row["chat_template_kwargs"] = {}
    rows[0]["chat_template_kwargs"] = {"enable_thinking": False}
    rows[1]["chat_template_kwargs"] = {"reasoning_effort": "low"}
    push_dataset({"data/test-00000-of-00001.parquet": parquet_bytes(rows)})
    local = tmp_path / "conversational.jsonl"
    local.write_bytes(jsonl_bytes(rows))

    eval_set = load_eval_set(SOURCE)
    assert eval_set.conversational and eval_set.format == "conversational"
    assert eval_set.sha256 == load_eval_set(local).sha256
    assert eval_set.rows[1]["chat_template_kwargs"] == {"reasoning_effort": "low"}


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("hub:", "names no dataset"),
        ("hub:@main", "names no dataset"),
        ("hub::test", "names no dataset"),
        ("hub:org/ds:", "split after ':' is empty"),
        ("hub:org/ds:@main", "split after ':' is empty"),
        ("hub:org/ds@", "revision after '@' is empty"),
        ("hub:org/ds:te:st", "the split 'te:st'"),
        ("hub:org/ds:test/prefs", "the split 'test/prefs'"),
        ("hub:a/b/c", "more than one '/'"),
        ("hub:org/", "'' in the dataset name"),
        ("hub:/ds", "'' in the dataset name"),
        ("hub:org/d$", "'d$' in the dataset name"),
        ("hub:örg/ds", "'örg' in the dataset name"),
        ("hub:org/d--s", "must not hold '--'"),
        ("hub:org/-ds", "must not hold '--'"),
        ("hub:org/ds@my branch", "contains whitespace"),
    ],
)
def test_malformed_sources_name_the_form(source: str, problem: str) -> None:
    message = _error(source)
    assert problem in message
    assert "Write it as hub:org/name[:split][@revision]" in message


def test_an_unknown_split_lists_the_splits(prefs: str) -> None:
    message = _error(f"{SOURCE}:validation")
    assert "has no split 'validation'" in message
    assert "train" in message and "test" in message


def test_several_splits_without_test_must_be_named(hub: HubServer) -> None:
    push_dataset({"train.jsonl": jsonl_bytes(TRAIN_ROWS), "validation.jsonl": jsonl_bytes(TRAIN_ROWS)})
    message = _error(SOURCE)
    assert "has no 'test' split but several others" in message
    assert "train" in message and "validation" in message


@pytest.mark.parametrize("revision", ["no-such-branch", "0" * 40])
def test_an_unknown_revision_is_named(prefs: str, revision: str) -> None:
    message = _error(f"{SOURCE}@{revision}")
    assert f"has no revision '{revision}'" in message
    assert "branches, tags or commit shas" in message


def test_an_unknown_dataset_is_named(hub: HubServer) -> None:
    message = _error(f"hub:{DEFAULT_USER}/absent")
    assert f"dataset {DEFAULT_USER}/absent not found on the Hub" in message


def test_a_hub_failure_is_wrapped_with_its_type(prefs: str, hub: HubServer) -> None:
    hub.fail_next("GET", rf"/api/datasets/{REPO}/revision/", status=500)
    message = _error(SOURCE)
    assert "the Hub cannot be reached and the dataset is not in the local cache (LocalEntryNotFoundError: " in message
    assert "Injected fault: 500" in message


def test_a_dataset_that_datasets_cannot_read_is_wrapped_with_its_type(hub: HubServer) -> None:
    commit = push_dataset({"data/test.parquet": b"not parquet"})
    message = _error(SOURCE)
    assert f"datasets cannot read {REPO} at commit {commit} (" in message
    assert f"Check that datasets.load_dataset('{REPO}', revision='{commit}') loads it." in message


def test_offline_a_dataset_not_in_the_cache_says_how_to_prefetch(
    hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with offline(monkeypatch):
        message = _error(SOURCE)
    assert f"dataset {REPO} is not (fully) in the local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert f"`hf download --repo-type dataset {REPO}`" in message


def test_offline_a_revision_not_in_the_cache_says_how_to_prefetch(prefs: str, monkeypatch: pytest.MonkeyPatch) -> None:
    load_eval_set(SOURCE)
    with offline(monkeypatch):
        message = _error(f"{SOURCE}@v2")
    assert f"revision 'v2' of dataset {REPO} is not (fully) in the local Hugging Face cache" in message
    assert f"`hf download --repo-type dataset {REPO} --revision v2`" in message


def test_without_datasets_the_message_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert 'pip install "pytest-dpo[hub]"' in _error(SOURCE)


# -- parsing ------------------------------------------------------------------------------------


def test_parse_hub_source() -> None:
    assert parse_hub_source("hub:imdb") == HubSource("imdb", None, "main")
    assert parse_hub_source("hub:org/ds.v2:test_prefs@refs/pr/1") == HubSource("org/ds.v2", "test_prefs", "refs/pr/1")
    assert parse_hub_source("hub:org/ds@v1:rc") == HubSource("org/ds", None, "v1:rc")


def test_parse_hub_source_docstring_example_runs() -> None:
    failed, attempted = doctest.testmod(evalset_hub)
    assert (failed, attempted > 0) == (0, True)
