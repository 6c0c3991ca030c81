"""Tests for `pytest_dpo.lock`: the eval-set lock file, drift counts and messages, the tokenizer fingerprint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pytest_dpo.evalset import PREFERENCE_FIELDS, load_eval_set
from pytest_dpo.lock import (
    EvalSetLock,
    LockDrift,
    LockError,
    SetDrift,
    build_lock,
    check_locks,
    locks_from_json,
    locks_to_json,
    row_drift,
    row_hashes,
    tokenizer_fingerprint,
)

from .fixture_paths import DATA, EVAL_STANDARD, ROOT

ROWS: list[dict[str, Any]] = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "id": 1},
    {"prompt": "Ünïcode ✓ and \"quotes\"", "chosen": "Yes, fine.", "rejected": "No", "id": 2},
    {"prompt": "Two\nlines", "chosen": "multi\nline", "rejected": "\ttab", "id": 3},
    {"prompt": "", "chosen": "empty prompt", "rejected": "really", "id": 4},
]
EXTRA_ROWS: list[dict[str, Any]] = [
    {"prompt": "Water boils at", "chosen": " 100 °C.", "rejected": " 50 °C."},
    {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Paris is in", "chosen": " France.", "rejected": " Spain."},
]
FIX = "--dpo-update-lock"


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "model_max_length": 128}, indent=2))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}}))
    (folder / "config.json").write_text(json.dumps({"hidden_size": 8}))
    return folder


@pytest.fixture
def lock_path(tmp_path: Path) -> Path:
    return tmp_path / "dpo.lock"


def lock_of(rows: list[dict[str, Any]], tokenizer: Path | None = None) -> EvalSetLock:
    return build_lock(load_eval_set(rows), tokenizer)


def drift(lock_path: Path, current: EvalSetLock) -> LockDrift:
    with pytest.raises(LockDrift) as raised:
        check_locks(lock_path, {"default": current}, update=False)
    return raised.value


def only(error: LockDrift) -> SetDrift:
    (one,) = error.drifts
    return one


def locked(path: Path) -> dict[str, EvalSetLock]:
    return locks_from_json(path.read_text(encoding="utf-8"), path)


def canonical_line(row: dict[str, Any]) -> bytes:
    canonical = {key: row[key] for key in PREFERENCE_FIELDS if key in row}
    return json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


# Row hashes


def test_row_hashes_use_the_eval_set_canonical_json_and_combine_to_its_sha256() -> None:
    eval_set = load_eval_set(ROWS)
    hashes = row_hashes(eval_set)
    assert hashes == [hashlib.sha256(canonical_line(row)).hexdigest() for row in ROWS]
    assert hashlib.sha256(b"".join(canonical_line(row) for row in ROWS)).hexdigest() == eval_set.sha256
    lock = build_lock(eval_set, None)
    assert (lock.eval_set_sha256, lock.row_hashes, lock.rows) == (eval_set.sha256, tuple(hashes), len(ROWS))


def test_same_rows_give_the_same_hashes_and_reordered_rows_the_same_multiset() -> None:
    eval_set = load_eval_set(ROWS)
    assert row_hashes(load_eval_set([dict(row) for row in ROWS])) == row_hashes(eval_set)
    reordered = load_eval_set(ROWS[::-1])
    assert Counter(row_hashes(reordered)) == Counter(row_hashes(eval_set))
    assert row_hashes(reordered) == row_hashes(eval_set)[::-1]
    assert reordered.sha256 != eval_set.sha256


# The lock workflow


def test_a_missing_lock_is_created_then_unchanged(lock_path: Path, tokenizer_dir: Path) -> None:
    current = lock_of(ROWS, tokenizer_dir)
    assert check_locks(lock_path, {"default": current}, update=False) == "created"
    assert locked(lock_path) == {"default": current}
    written = lock_path.read_bytes()
    assert check_locks(lock_path, {"default": lock_of(ROWS, tokenizer_dir)}, update=False) == "unchanged"
    assert lock_path.read_bytes() == written


def test_an_edited_row_is_one_changed_row_and_the_message_names_the_file_counts_and_fix(lock_path: Path) -> None:
    check_locks(lock_path, {"default": lock_of(ROWS)}, update=False)
    edited = [dict(row) for row in ROWS]
    edited[2]["chosen"] = "an edited answer"
    current = lock_of(edited)
    error = drift(lock_path, current)
    assert (*only(error).row_counts, only(error).tokenizer_changed) == (0, 0, 1, False)
    assert str(error) == (
        f"{lock_path}: the eval set drifted from the lock (1 row changed) — <memory> sha256 "
        f"{current.eval_set_sha256[:12]}, locked {lock_of(ROWS).eval_set_sha256[:12]}. "
        f"If the change is intended, run again with {FIX} to accept it."
    )


def test_appended_rows_are_added(lock_path: Path) -> None:
    check_locks(lock_path, {"default": lock_of(ROWS)}, update=False)
    error = drift(lock_path, lock_of(ROWS + EXTRA_ROWS))
    assert only(error).row_counts == (3, 0, 0)
    assert "(3 rows added)" in str(error)


def test_removed_rows_are_removed(lock_path: Path) -> None:
    check_locks(lock_path, {"default": lock_of(ROWS)}, update=False)
    error = drift(lock_path, lock_of(ROWS[:2]))
    assert only(error).row_counts == (0, 2, 0)
    assert "(2 rows removed)" in str(error)


def test_rows_and_tokenizer_changed_together_are_all_in_the_message(lock_path: Path, tokenizer_dir: Path) -> None:
    check_locks(lock_path, {"default": lock_of(ROWS, tokenizer_dir)}, update=False)
    edited = [dict(row) for row in ROWS] + EXTRA_ROWS[:2]
    edited[0]["rejected"] = " red."
    (tokenizer_dir / "chat_template.jinja").write_text("{{ messages }}")
    error = drift(lock_path, lock_of(edited, tokenizer_dir))
    assert (*only(error).row_counts, only(error).tokenizer_changed) == (2, 0, 1, True)
    assert "(2 rows added, 1 changed; tokenizer changed)" in str(error)


def test_the_same_rows_as_jsonl_and_parquet_are_unchanged(tmp_path: Path, lock_path: Path) -> None:
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ROWS), encoding="utf-8")
    parquet = tmp_path / "eval.parquet"
    pd.DataFrame(ROWS).to_parquet(parquet)
    assert check_locks(lock_path, {"default": build_lock(load_eval_set(jsonl), None)}, update=False) == "created"
    written = lock_path.read_bytes()
    assert check_locks(lock_path, {"default": build_lock(load_eval_set(parquet), None)}, update=False) == "unchanged"
    assert lock_path.read_bytes() == written


def test_key_order_and_extra_columns_do_not_count(lock_path: Path) -> None:
    check_locks(lock_path, {"default": lock_of(ROWS)}, update=False)
    shuffled = [{"rejected": row["rejected"], "note": "x", "chosen": row["chosen"], "prompt": row["prompt"]} for row in ROWS]
    assert check_locks(lock_path, {"default": lock_of(shuffled)}, update=False) == "unchanged"


def test_a_moved_eval_set_is_named_with_where_it_was_locked_from(tmp_path: Path, lock_path: Path) -> None:
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    new = tmp_path / "new.jsonl"
    new.write_text("".join(json.dumps(row) + "\n" for row in ROWS[:3]))
    check_locks(lock_path, {"default": build_lock(load_eval_set(old), None)}, update=False)
    message = str(drift(lock_path, build_lock(load_eval_set(new), None)))
    assert f"— {new} sha256 " in message
    assert f"(locked from {old})" in message


def test_update_rewrites_the_lock_and_the_next_run_is_unchanged(lock_path: Path) -> None:
    check_locks(lock_path, {"default": lock_of(ROWS)}, update=False)
    current = lock_of(ROWS[1:])
    assert check_locks(lock_path, {"default": current}, update=True) == "updated"
    assert locked(lock_path) == {"default": current}
    assert check_locks(lock_path, {"default": current}, update=False) == "unchanged"
    assert check_locks(lock_path, {"default": current}, update=True) == "unchanged"


def test_a_lock_in_a_missing_folder_is_created(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "nested" / "dpo.lock"
    assert check_locks(path, {"default": lock_of(ROWS)}, update=False) == "created"
    assert path.is_file()


# The tokenizer fingerprint


def test_a_changed_tokenizer_file_says_the_tokenization_changed(lock_path: Path, tokenizer_dir: Path) -> None:
    check_locks(lock_path, {"default": lock_of(ROWS, tokenizer_dir)}, update=False)
    (tokenizer_dir / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "c": 1}}}))
    error = drift(lock_path, lock_of(ROWS, tokenizer_dir))
    assert (*only(error).row_counts, only(error).tokenizer_changed) == (0, 0, 0, True)
    message = str(error)
    assert message.startswith(f"{lock_path}: the tokenization changed since the lock (tokenizer files differ")
    assert message.endswith(f"run again with {FIX} to accept it.")


def test_whitespace_and_key_order_in_tokenizer_json_files_are_not_a_change(lock_path: Path, tokenizer_dir: Path) -> None:
    before = tokenizer_fingerprint(tokenizer_dir)
    check_locks(lock_path, {"default": lock_of(ROWS, tokenizer_dir)}, update=False)
    config = tokenizer_dir / "tokenizer_config.json"
    data = json.loads(config.read_text())
    members = ",\n    ".join(f"{json.dumps(key)} :  {json.dumps(data[key])}" for key in reversed(data))
    config.write_text("{\n\n    " + members + "\n}\n")
    assert config.read_text() != json.dumps(data, indent=2)
    assert tokenizer_fingerprint(tokenizer_dir) == before
    assert check_locks(lock_path, {"default": lock_of(ROWS, tokenizer_dir)}, update=False) == "unchanged"


def test_files_other_than_tokenizer_files_do_not_count(tokenizer_dir: Path) -> None:
    before = tokenizer_fingerprint(tokenizer_dir)
    (tokenizer_dir / "config.json").write_text(json.dumps({"hidden_size": 16}))
    (tokenizer_dir / "model.safetensors").write_bytes(b"weights")
    assert tokenizer_fingerprint(tokenizer_dir) == before


def test_an_added_tokenizer_file_and_a_non_json_byte_change_count(tokenizer_dir: Path) -> None:
    before = tokenizer_fingerprint(tokenizer_dir)
    (tokenizer_dir / "merges.txt").write_text("a b\n")
    with_merges = tokenizer_fingerprint(tokenizer_dir)
    (tokenizer_dir / "merges.txt").write_text("a b \n")
    assert len({before, with_merges, tokenizer_fingerprint(tokenizer_dir)}) == 3


def test_an_unparsable_json_tokenizer_file_is_hashed_as_bytes(tokenizer_dir: Path) -> None:
    (tokenizer_dir / "special_tokens_map.json").write_text("{not json")
    first = tokenizer_fingerprint(tokenizer_dir)
    (tokenizer_dir / "special_tokens_map.json").write_text("{not json!")
    assert tokenizer_fingerprint(tokenizer_dir) != first


def test_no_tokenizer_folder_fingerprints_as_none() -> None:
    assert tokenizer_fingerprint(None) == "none"
    assert lock_of(ROWS).tokenizer_fingerprint == "none"


def test_a_missing_or_empty_tokenizer_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(LockError, match=f"{tmp_path / 'absent'}: tokenizer folder not found"):
        tokenizer_fingerprint(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LockError, match=f"{empty}: holds none of the tokenizer files"):
        tokenizer_fingerprint(empty)


# The lock file


def test_the_lock_json_is_stable_sorted_and_ends_with_a_newline(tmp_path: Path, tokenizer_dir: Path) -> None:
    first, second = tmp_path / "first.lock", tmp_path / "second.lock"
    check_locks(first, {"default": lock_of(ROWS, tokenizer_dir)}, update=False)
    check_locks(second, {"default": lock_of([dict(reversed(row.items())) for row in ROWS], tokenizer_dir)}, update=False)
    assert first.read_bytes() == second.read_bytes()
    text = first.read_text(encoding="utf-8")
    assert text.endswith("}\n")
    data = json.loads(text)
    assert list(data) == ["eval_sets", "version"]
    assert data["version"] == 2
    entry = data["eval_sets"]["default"]
    assert list(entry) == sorted(entry)
    assert entry["rows"] == len(entry["row_hashes"]) == len(ROWS)
    assert entry["revision"] is None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{ not json", "not valid JSON"),
        (b"[]", "expected a JSON object, got list"),
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00", "not UTF-8 text"),
        (b'{"version": 3}', "lock format version 3, this pytest-dpo reads versions 1 and 2"),
        (b'{"version": true}', "lock format version True, this pytest-dpo reads versions 1 and 2"),
        (b'{"version": 2}', "field 'eval_sets' is missing or not an object"),
        (b'{"version": 2, "eval_sets": []}', "field 'eval_sets' is missing or not an object"),
        (b'{"rows": 0}', "no 'version' field"),
        (b'{"version": 1, "rows": 0}', "field 'eval_set_sha256' is missing"),
    ],
)
def test_an_unreadable_lock_is_an_error_naming_the_file_and_the_fix(lock_path: Path, content: bytes, reason: str) -> None:
    lock_path.write_bytes(content)
    with pytest.raises(LockError) as raised:
        check_locks(lock_path, {"default": lock_of(ROWS)}, update=False)
    assert not isinstance(raised.value, LockDrift)
    message = str(raised.value)
    assert message.startswith(f"{lock_path}: not a readable eval-set lock (")
    assert reason in message
    assert "Delete it" in message and FIX in message
    assert lock_path.read_bytes() == content


def tampered(**changes: Any) -> str:
    data = json.loads(locks_to_json({"default": lock_of(ROWS)}))
    data["eval_sets"]["default"].update(changes)
    return json.dumps(data)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (tampered(rows=3), "'rows' is 3 but 'row_hashes' has 4 entries"),
        (tampered(rows=True), "field 'rows' is missing or not an integer"),
        (tampered(row_hashes=["x"] * 4), "'row_hashes' entry 0 is not a SHA-256 hex digest"),
        (tampered(row_hashes=[1, 2, 3, 4]), "must be a list of strings"),
        (tampered(eval_set_sha256="abc"), "'eval_set_sha256' is not a SHA-256 hex digest"),
        (tampered(tokenizer_fingerprint="tok"), "'tokenizer_fingerprint' is neither"),
        (tampered(revision=7), "field 'revision' is not a string or null"),
    ],
)
def test_a_malformed_lock_names_the_field(lock_path: Path, text: str, reason: str) -> None:
    with pytest.raises(LockError) as raised:
        locks_from_json(text, lock_path)
    assert str(raised.value).startswith(f"{lock_path}: not a readable eval-set lock (eval set 'default': ")
    assert reason in str(raised.value)


def test_update_rewrites_an_unreadable_lock(lock_path: Path) -> None:
    lock_path.write_text("garbage")
    current = lock_of(ROWS)
    assert check_locks(lock_path, {"default": current}, update=True) == "updated"
    assert check_locks(lock_path, {"default": current}, update=False) == "unchanged"


def test_no_temporary_files_are_left_behind(tmp_path: Path, lock_path: Path) -> None:
    check_locks(lock_path, {"default": lock_of(ROWS)}, update=False)
    check_locks(lock_path, {"default": lock_of(ROWS[:1])}, update=True)
    lock_path.write_text("garbage")
    check_locks(lock_path, {"default": lock_of(ROWS)}, update=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dpo.lock"]


def test_a_failed_write_leaves_the_old_lock_and_no_temporary_file(
    tmp_path: Path, lock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_locks(lock_path, {"default": lock_of(ROWS)}, update=False)
    written = lock_path.read_bytes()

    def failing_replace(source: Any, destination: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(LockError, match=f"{lock_path}: cannot write the eval-set lock \\(No space left on device\\)"):
        check_locks(lock_path, {"default": lock_of(ROWS[:2])}, update=True)
    assert lock_path.read_bytes() == written
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dpo.lock"]


def test_lock_drift_survives_pickling(lock_path: Path) -> None:
    one = SetDrift("default", lock_of(ROWS), lock_of(ROWS + EXTRA_ROWS[:1]))
    for error in (
        LockDrift(lock_path, [one], named=False),
        LockDrift(lock_path, [one, SetDrift("safety", lock_of(ROWS), lock_of(ROWS[:1]))], named=True),
    ):
        copy = pickle.loads(pickle.dumps(error))
        assert (str(copy), copy.path, copy.drifts, copy.named) == (str(error), error.path, error.drifts, error.named)
        assert copy.drifts[0].row_counts == (1, 0, 0)


def test_row_drift_rule_examples() -> None:
    assert row_drift(["a", "b"], ["a", "x", "c"]) == (1, 0, 1)
    assert row_drift(["a", "b", "c"], ["b", "c"]) == (0, 1, 2)
    assert row_drift(["a", "b"], ["b", "a"]) == (0, 0, 2)
    assert row_drift([], ["a"]) == (1, 0, 0)


# Several named eval sets and Hub revisions

REVISION, MOVED_REVISION = "a1" * 20, "b2" * 20


def hub_lock(rows: list[dict[str, Any]], revision: str | None) -> EvalSetLock:
    return build_lock(dataclasses.replace(load_eval_set(rows), revision=revision), None)


def version_1_text(lock: EvalSetLock) -> str:
    """The lock file as format version 1 wrote it: one set's fields at top level, no revision."""
    fields = {key: value for key, value in dataclasses.asdict(lock).items() if key != "revision"}
    return json.dumps({**fields, "version": 1}, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_a_version_1_lock_reads_as_default_and_an_unchanged_run_leaves_it_untouched(
    lock_path: Path, tokenizer_dir: Path
) -> None:
    current = lock_of(ROWS, tokenizer_dir)
    lock_path.write_text(version_1_text(current), encoding="utf-8")
    written = lock_path.read_bytes()
    assert locked(lock_path) == {"default": current}
    assert check_locks(lock_path, {"default": lock_of(ROWS, tokenizer_dir)}, update=False) == "unchanged"
    assert lock_path.read_bytes() == written


def test_the_bundled_example_lock_holds_both_eval_sets() -> None:
    bundled = locked(ROOT / "examples" / "dpo.lock")
    assert sorted(bundled) == ["helpful", "topics"]
    assert bundled["helpful"].eval_set_sha256 == load_eval_set(EVAL_STANDARD).sha256
    assert bundled["topics"].eval_set_sha256 == load_eval_set(DATA / "eval_topics.jsonl").sha256


def test_a_version_1_lock_drifts_with_todays_message_and_is_rewritten_as_version_2(lock_path: Path) -> None:
    lock_path.write_text(version_1_text(lock_of(ROWS)), encoding="utf-8")
    assert str(drift(lock_path, lock_of(ROWS[:3]))).startswith(f"{lock_path}: the eval set drifted from the lock (1 row removed)")
    assert check_locks(lock_path, {"default": lock_of(ROWS), "safety": lock_of(EXTRA_ROWS)}, update=False) == "added safety"
    assert json.loads(lock_path.read_text(encoding="utf-8"))["version"] == 2
    assert locked(lock_path) == {"default": lock_of(ROWS), "safety": lock_of(EXTRA_ROWS)}


def test_several_sets_are_written_by_name_and_read_back(lock_path: Path, tokenizer_dir: Path) -> None:
    current = {"safety": lock_of(EXTRA_ROWS, tokenizer_dir), "helpful": hub_lock(ROWS, REVISION)}
    assert check_locks(lock_path, current, update=False) == "created"
    text = lock_path.read_text(encoding="utf-8")
    assert text == locks_to_json(current) and text.endswith("}\n")
    assert list(json.loads(text)["eval_sets"]) == ["helpful", "safety"]
    assert json.loads(text)["eval_sets"]["helpful"]["revision"] == REVISION
    assert locked(lock_path) == current
    assert check_locks(lock_path, dict(reversed(current.items())), update=False) == "unchanged"
    assert lock_path.read_text(encoding="utf-8") == text


def test_a_set_new_to_the_lock_is_added_without_update_and_the_others_are_kept(lock_path: Path) -> None:
    check_locks(lock_path, {"default": lock_of(ROWS)}, update=False)
    current = {"default": lock_of(ROWS), "safety": lock_of(EXTRA_ROWS), "helpful": lock_of(ROWS[:2])}
    assert check_locks(lock_path, current, update=False) == "added helpful, safety"
    assert locked(lock_path) == current
    assert check_locks(lock_path, {"zeta": lock_of(ROWS[:1])}, update=False) == "added zeta"
    assert check_locks(lock_path, current, update=False) == "unchanged"


def test_a_set_this_run_does_not_score_keeps_its_entry(lock_path: Path) -> None:
    check_locks(lock_path, {"helpful": lock_of(ROWS), "safety": lock_of(EXTRA_ROWS)}, update=False)
    written = lock_path.read_bytes()
    assert check_locks(lock_path, {"safety": lock_of(EXTRA_ROWS)}, update=False) == "unchanged"
    assert lock_path.read_bytes() == written


def test_update_rewrites_the_drifted_set_and_keeps_the_others(lock_path: Path) -> None:
    check_locks(lock_path, {"helpful": lock_of(ROWS), "safety": lock_of(EXTRA_ROWS)}, update=False)
    assert check_locks(lock_path, {"safety": lock_of(EXTRA_ROWS[:1])}, update=True) == "updated"
    assert locked(lock_path) == {"helpful": lock_of(ROWS), "safety": lock_of(EXTRA_ROWS[:1])}


def test_drift_names_the_set_and_nothing_is_written(lock_path: Path) -> None:
    check_locks(lock_path, {"helpful": lock_of(ROWS), "safety": lock_of(ROWS)}, update=False)
    written = lock_path.read_bytes()
    edited = [dict(row) for row in ROWS] + EXTRA_ROWS[:2]
    edited[1]["chosen"] = "an edited answer"
    current = lock_of(edited)
    with pytest.raises(LockDrift) as raised:
        check_locks(lock_path, {"safety": current, "new": lock_of(ROWS)}, update=False)
    assert str(raised.value) == (
        f"{lock_path}: eval set 'safety' drifted from the lock (2 rows added, 1 changed) — <memory> sha256 "
        f"{current.eval_set_sha256[:12]}, locked {lock_of(ROWS).eval_set_sha256[:12]}. "
        f"If the change is intended, run again with {FIX} to accept it."
    )
    assert only(raised.value).name == "safety"
    assert lock_path.read_bytes() == written


def test_a_lone_set_with_its_own_name_is_named(lock_path: Path, tokenizer_dir: Path) -> None:
    check_locks(lock_path, {"safety": lock_of(ROWS, tokenizer_dir)}, update=False)
    (tokenizer_dir / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(LockDrift) as raised:
        check_locks(lock_path, {"safety": lock_of(ROWS, tokenizer_dir)}, update=False)
    assert str(raised.value).startswith(
        f"{lock_path}: the tokenization of eval set 'safety' changed since the lock (tokenizer files differ: fingerprint "
    )
    assert str(raised.value).endswith(f"; the eval set <memory> is unchanged. If the change is intended, run again with {FIX} to accept it.")


def test_several_drifted_sets_are_one_error_with_a_line_each(lock_path: Path) -> None:
    check_locks(lock_path, {"helpful": lock_of(ROWS), "safety": lock_of(ROWS), "ok": lock_of(EXTRA_ROWS)}, update=False)
    helpful, safety = lock_of(ROWS[:3]), lock_of(ROWS + EXTRA_ROWS[:1])
    with pytest.raises(LockDrift) as raised:
        check_locks(lock_path, {"safety": safety, "ok": lock_of(EXTRA_ROWS), "helpful": helpful}, update=False)
    base = lock_of(ROWS).eval_set_sha256[:12]
    assert str(raised.value) == "\n".join(
        [
            f"{lock_path}: 2 eval sets drifted from the lock:",
            f"  eval set 'helpful' drifted from the lock (1 row removed) — <memory> sha256 {helpful.eval_set_sha256[:12]}, locked {base}.",
            f"  eval set 'safety' drifted from the lock (1 row added) — <memory> sha256 {safety.eval_set_sha256[:12]}, locked {base}.",
            f"If the change is intended, run again with {FIX} to accept it.",
        ]
    )
    assert [one.name for one in raised.value.drifts] == ["helpful", "safety"]


def test_a_moved_hub_revision_is_drift_even_with_the_same_content(lock_path: Path) -> None:
    assert hub_lock(ROWS, REVISION).revision == REVISION
    check_locks(lock_path, {"default": hub_lock(ROWS, REVISION)}, update=False)
    moved = hub_lock(ROWS, MOVED_REVISION)
    error = drift(lock_path, moved)
    assert (*only(error).row_counts, only(error).tokenizer_changed, only(error).revision_changed) == (0, 0, 0, False, True)
    sha = moved.eval_set_sha256[:12]
    assert str(error) == (
        f"{lock_path}: the eval set drifted from the lock (content unchanged; revision {MOVED_REVISION[:12]}, "
        f"locked {REVISION[:12]}) — <memory> sha256 {sha}, locked {sha}. If the change is intended, run again with {FIX} to accept it."
    )
    assert "(1 row added; revision none, locked a1a1a1a1a1a1)" in str(drift(lock_path, hub_lock(ROWS + EXTRA_ROWS[:1], None)))
    assert check_locks(lock_path, {"default": moved}, update=True) == "updated"
    assert check_locks(lock_path, {"default": moved}, update=False) == "unchanged"


def test_a_malformed_version_2_entry_names_the_set(lock_path: Path) -> None:
    data = json.loads(locks_to_json({"helpful": lock_of(ROWS), "safety": lock_of(EXTRA_ROWS)}))
    del data["eval_sets"]["safety"]["row_hashes"]
    lock_path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(LockError) as raised:
        check_locks(lock_path, {"helpful": lock_of(ROWS)}, update=False)
    assert str(raised.value) == (
        f"{lock_path}: not a readable eval-set lock (eval set 'safety': field 'row_hashes' is missing or not a list). "
        f"Delete it to lock the current eval set again, or run with {FIX} to rewrite it."
    )
    data["eval_sets"]["safety"] = ["not", "an", "entry"]
    with pytest.raises(LockError, match=r"\(eval set 'safety': expected a JSON object, got list\)"):
        locks_from_json(json.dumps(data), lock_path)


# Property: drift counts follow the documented index-aligned rule

ROW = st.fixed_dictionaries(
    {
        "prompt": st.text(alphabet="ab ", max_size=2),
        "chosen": st.text(alphabet="xy", min_size=1, max_size=2),
        "rejected": st.text(alphabet="xy", min_size=1, max_size=2),
    }
)


@st.composite
def rows_and_single_edit(draw: st.DrawFn) -> tuple[list[dict[str, str]], list[dict[str, str]], str]:
    rows = draw(st.lists(ROW, min_size=1, max_size=6))
    kind = draw(st.sampled_from(["edit", "append", "insert", "delete"] if len(rows) > 1 else ["edit", "append", "insert"]))
    edited = list(rows)
    if kind == "edit":
        index = draw(st.integers(0, len(rows) - 1))
        edited[index] = draw(ROW)
        assume(edited[index] != rows[index])
    elif kind == "append":
        edited += draw(st.lists(ROW, min_size=1, max_size=3))
    elif kind == "insert":
        edited.insert(draw(st.integers(0, len(rows))), draw(ROW))
    else:
        del edited[draw(st.integers(0, len(rows) - 1))]
    return rows, edited, kind


@settings(max_examples=150, deadline=None)
@given(rows_and_single_edit())
def test_drift_counts_follow_the_index_aligned_rule(case: tuple[list[dict[str, str]], list[dict[str, str]], str]) -> None:
    rows, edited, kind = case
    expected_added = max(len(edited) - len(rows), 0)
    expected_removed = max(len(rows) - len(edited), 0)
    expected_changed = sum(1 for old, new in zip(rows, edited) if old != new)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dpo.lock"
        check_locks(path, {"default": lock_of(rows)}, update=False)
        with pytest.raises(LockDrift) as raised:
            check_locks(path, {"default": lock_of(edited)}, update=False)
    one = only(raised.value)
    added, removed, changed = one.row_counts
    assert (added, removed, changed) == (expected_added, expected_removed, expected_changed)
    assert not one.tokenizer_changed
    if kind == "edit":
        assert (added, removed, changed) == (0, 0, 1)
    if kind == "append":
        assert (removed, changed) == (0, 0)
    if kind in ("insert", "delete"):
        assert added + removed == 1


# Property: the whole lock file round-trips exactly

SHA256 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)


@st.composite
def set_locks(draw: st.DrawFn) -> EvalSetLock:
    hashes = draw(st.lists(SHA256, max_size=4))
    return EvalSetLock(
        eval_set_sha256=draw(SHA256),
        rows=len(hashes),
        row_hashes=tuple(hashes),
        tokenizer_fingerprint=draw(st.one_of(st.just("none"), SHA256)),
        eval_set_path=draw(st.text(max_size=20)),
        revision=draw(st.one_of(st.none(), st.text(min_size=1, max_size=40))),
    )


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12), set_locks(), max_size=5))
def test_the_lock_file_round_trips_exactly(locks: dict[str, EvalSetLock]) -> None:
    text = locks_to_json(locks)
    assert locks_from_json(text, "dpo.lock") == locks
    assert locks_to_json(locks_from_json(text, "dpo.lock")) == text
    assert locks_to_json(dict(reversed(locks.items()))) == text
    assert list(json.loads(text)["eval_sets"]) == sorted(locks)
