"""Tests for `pytest_dpo.evalset` and `pytest_dpo.evalset_files`: loading every file format, validation messages,
the canonical hash, and parity of `extract_prompt` / `tokenization.common_prefix_length` with TRL 1.16's
`trl.data_utils`."""

from __future__ import annotations

import copy
import csv
import json
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from datasets import Dataset, DatasetDict
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pytest_dpo.evalset import EvalSet, EvalSetError, canonical_sha256, extract_prompt, load_eval_set
from pytest_dpo.tokenization import common_prefix_length

STANDARD_ROWS: list[dict[str, Any]] = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "id": 1},
    {"prompt": "Ünïcode ✓ and \"quotes\", commas", "chosen": "Yes, all fine.", "rejected": "No", "id": 2},
    {"prompt": "Two\nlines", "chosen": "multi\nline answer", "rejected": "\tleading tab", "id": 3},
    {"prompt": "", "chosen": "an empty prompt is allowed", "rejected": "really", "id": 4},
]
EXPECTED_STANDARD = [{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in STANDARD_ROWS]

CONVERSATIONAL_ROWS: list[dict[str, Any]] = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky colour?"}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Green, I think."}],
    },
    {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5 ✗"}],
    },
    {
        "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}],
        "chosen": [{"role": "assistant", "content": "Goodbye!"}],
        "rejected": [{"role": "assistant", "content": "..."}],
    },
]  # fmt: skip


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def write_all_formats(folder: Path, rows: list[dict[str, Any]], *, csv_too: bool) -> dict[str, Path]:
    """The same rows in every supported format; key order differs between formats on purpose."""
    paths = {"jsonl": write_jsonl(folder / "rows.jsonl", [dict(reversed(list(row.items()))) for row in rows])}
    paths["json_list"] = folder / "list.json"
    paths["json_list"].write_text(json.dumps(rows, indent=2), encoding="utf-8")
    paths["parquet"] = folder / "rows.parquet"
    pd.DataFrame(rows).to_parquet(paths["parquet"])
    paths["saved"] = folder / "saved"
    Dataset.from_list(rows).save_to_disk(str(paths["saved"]))
    if csv_too:
        paths["json_columns"] = folder / "columns.json"
        columns = {key: [row[key] for row in rows] for key in ("rejected", "id", "chosen", "prompt")}
        paths["json_columns"].write_text(json.dumps(columns), encoding="utf-8")
        paths["csv"] = folder / "rows.csv"
        with paths["csv"].open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["id", "chosen", "prompt", "rejected"])
            writer.writeheader()
            writer.writerows(rows)
    return paths


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def test_standard_rows_load_identically_from_every_format(tmp_path: Path) -> None:
    paths = write_all_formats(tmp_path, STANDARD_ROWS, csv_too=True)
    assert set(paths) == {"jsonl", "json_list", "json_columns", "parquet", "csv", "saved"}
    loaded = {name: load_eval_set(path) for name, path in paths.items()}
    in_memory = load_eval_set(copy.deepcopy(STANDARD_ROWS))
    for name, eval_set in loaded.items():
        assert eval_set.rows == EXPECTED_STANDARD, name
        assert eval_set.sha256 == in_memory.sha256, name
        assert eval_set.format == "standard", name
        assert len(eval_set) == len(STANDARD_ROWS)
        assert eval_set.path == str(paths[name])
        assert len(eval_set.locations) == len(STANDARD_ROWS)
    assert re.fullmatch(r"[0-9a-f]{64}", in_memory.sha256)
    assert loaded["jsonl"].locations[2] == f"{paths['jsonl']}:3"


def test_str_and_path_sources_are_equivalent(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "eval.jsonl", STANDARD_ROWS)
    assert load_eval_set(str(path)).rows == load_eval_set(path).rows == EXPECTED_STANDARD


def test_conversational_rows_load_identically_from_jsonl_parquet_and_saved_dataset(tmp_path: Path) -> None:
    paths = write_all_formats(tmp_path, CONVERSATIONAL_ROWS, csv_too=False)
    loaded = {name: load_eval_set(path) for name, path in paths.items()}
    reference = load_eval_set(copy.deepcopy(CONVERSATIONAL_ROWS))
    assert reference.rows == CONVERSATIONAL_ROWS
    for name, eval_set in loaded.items():
        assert eval_set.rows == CONVERSATIONAL_ROWS, name
        assert eval_set.sha256 == reference.sha256, name
        assert eval_set.format == "conversational", name


def test_conversational_messages_with_different_keys_hash_the_same_in_every_format(tmp_path: Path) -> None:
    rows = copy.deepcopy(CONVERSATIONAL_ROWS)
    rows[0]["chosen"][0]["name"] = "helper"  # one message carries an extra key, the others do not
    paths = write_all_formats(tmp_path, rows, csv_too=False)
    hashes = {name: load_eval_set(path).sha256 for name, path in paths.items()}
    assert len(set(hashes.values())) == 1, hashes


def test_csv_with_utf8_byte_order_mark_keeps_its_first_column(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    pd.DataFrame(EXPECTED_STANDARD).to_csv(path, index=False, encoding="utf-8-sig")
    eval_set = load_eval_set(path)
    assert eval_set.format == "standard"
    assert eval_set.rows == EXPECTED_STANDARD


def test_saved_dataset_with_indices_and_shards(tmp_path: Path) -> None:
    dataset = Dataset.from_list(EXPECTED_STANDARD)
    dataset.select([3, 0, 2]).save_to_disk(str(tmp_path / "selected"))
    dataset.save_to_disk(str(tmp_path / "sharded"), num_shards=2)
    assert load_eval_set(tmp_path / "selected").rows == [EXPECTED_STANDARD[i] for i in (3, 0, 2)]
    assert load_eval_set(tmp_path / "sharded").rows == EXPECTED_STANDARD


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "gaps.jsonl"
    lines = [json.dumps(EXPECTED_STANDARD[0]), "", "   ", json.dumps(EXPECTED_STANDARD[1]), ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    eval_set = load_eval_set(path)
    assert eval_set.rows == EXPECTED_STANDARD[:2]
    assert eval_set.locations == [f"{path}:1", f"{path}:4"]


def test_null_prompt_means_implicit(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "implicit.jsonl", [{"prompt": None, "chosen": "Q? yes", "rejected": "Q? no"}])
    eval_set = load_eval_set(path)
    assert eval_set.implicit_prompt
    assert eval_set.rows == [{"chosen": "Q? yes", "rejected": "Q? no"}]


# --------------------------------------------------------------------------------------------
# format / conversational / implicit_prompt
# --------------------------------------------------------------------------------------------

IMPLICIT_STANDARD = [{"chosen": "Question: sky? Answer: blue", "rejected": "Question: sky? Answer: red"}]
IMPLICIT_CONVERSATIONAL = [
    {
        "chosen": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Red."}],
    }
]


@pytest.mark.parametrize(
    ("rows", "expected_format", "conversational", "implicit"),
    [
        (EXPECTED_STANDARD, "standard", False, False),
        (CONVERSATIONAL_ROWS, "conversational", True, False),
        (IMPLICIT_STANDARD, "standard (implicit prompt)", False, True),
        (IMPLICIT_CONVERSATIONAL, "conversational (implicit prompt)", True, True),
    ],
)
def test_format_flags(rows: list[dict[str, Any]], expected_format: str, conversational: bool, implicit: bool) -> None:
    eval_set = load_eval_set(copy.deepcopy(rows))
    assert isinstance(eval_set, EvalSet)
    assert eval_set.format == expected_format
    assert eval_set.conversational is conversational
    assert eval_set.implicit_prompt is implicit
    assert eval_set.path == "<memory>"
    assert all(("prompt" in row) is not implicit for row in eval_set.rows)


def test_prompt_text() -> None:
    assert load_eval_set(EXPECTED_STANDARD).prompt_text(2) == "Two lines"
    assert load_eval_set(CONVERSATIONAL_ROWS).prompt_text(2) == "Bye"
    assert load_eval_set(IMPLICIT_STANDARD).prompt_text(0) == "Question: sky? Answer:"
    assert load_eval_set(IMPLICIT_CONVERSATIONAL).prompt_text(0) == "Sky?"


# --------------------------------------------------------------------------------------------
# Canonical hash
# --------------------------------------------------------------------------------------------

text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": text})
messages = st.lists(message, min_size=1, max_size=3)
standard_row = st.fixed_dictionaries({"prompt": text, "chosen": text, "rejected": text})
conversational_row = st.fixed_dictionaries({"prompt": messages, "chosen": messages, "rejected": messages})
row_lists = st.one_of(st.lists(standard_row, min_size=1, max_size=5), st.lists(conversational_row, min_size=1, max_size=5))


def shuffle_keys(value: Any, rng: random.Random) -> Any:
    """The same value with the keys of every dict (rows and messages) in a random order."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {key: shuffle_keys(item, rng) for key, item in items}
    if isinstance(value, list):
        return [shuffle_keys(item, rng) for item in value]
    return value


def text_slots(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Every (container path, string) in the rows, so one character of any string can be changed."""
    slots = []
    for r, row in enumerate(rows):
        for key, value in row.items():
            if isinstance(value, str):
                slots.append(((r, key), value))
            else:
                for m, msg in enumerate(value):
                    for field, field_value in msg.items():
                        slots.append(((r, key, m, field), field_value))
    return slots


def set_slot(rows: list[dict[str, Any]], path: tuple[Any, ...], new: str) -> None:
    if len(path) == 2:
        rows[path[0]][path[1]] = new
    else:
        rows[path[0]][path[1]][path[2]][path[3]] = new


@settings(max_examples=150, deadline=None)
@given(rows=row_lists, seed=st.integers(0, 2**32 - 1))
def test_hash_ignores_key_order_and_non_preference_columns(rows: list[dict[str, Any]], seed: int) -> None:
    rng = random.Random(seed)
    shuffled = [shuffle_keys(row, rng) for row in rows]
    with_extras = [{**row, "id": index, "source": "x"} for index, row in enumerate(shuffled)]
    assert canonical_sha256(shuffled) == canonical_sha256(rows) == canonical_sha256(with_extras)
    if all(row["chosen"] != "" for row in rows):
        assert load_eval_set(with_extras).sha256 == canonical_sha256(rows)


@settings(max_examples=150, deadline=None)
@given(rows=row_lists, data=st.data())
def test_hash_changes_with_any_single_character(rows: list[dict[str, Any]], data: st.DataObject) -> None:
    slots = text_slots(rows)
    path, old = data.draw(st.sampled_from(slots))
    position = data.draw(st.integers(0, len(old) - 1))
    replacement = data.draw(st.characters(codec="utf-8", exclude_categories=("Cs",)).filter(lambda c: c != old[position]))
    changed = copy.deepcopy(rows)
    set_slot(changed, path, old[:position] + replacement + old[position + 1 :])
    assert canonical_sha256(changed) != canonical_sha256(rows)


@settings(max_examples=100, deadline=None)
@given(rows=row_lists, data=st.data())
def test_hash_changes_when_rows_are_reordered_added_or_removed(rows: list[dict[str, Any]], data: st.DataObject) -> None:
    order = data.draw(st.permutations(range(len(rows))))
    reordered = [rows[i] for i in order]
    if reordered != rows:
        assert canonical_sha256(reordered) != canonical_sha256(rows)
    assert canonical_sha256(rows + rows[:1]) != canonical_sha256(rows)
    if len(rows) > 1:
        assert canonical_sha256(rows[1:]) != canonical_sha256(rows)


def test_hash_distinguishes_text_moved_between_fields_and_prompt_presence() -> None:
    base = canonical_sha256([{"prompt": "ab", "chosen": "c", "rejected": "d"}])
    assert canonical_sha256([{"prompt": "a", "chosen": "bc", "rejected": "d"}]) != base
    assert canonical_sha256([{"prompt": "", "chosen": "abc", "rejected": "abd"}]) != canonical_sha256(
        [{"chosen": "abc", "rejected": "abd"}]
    )


def test_hash_value_is_stable() -> None:
    """Hashes are stored next to results and baselines, so the canonical form must not change silently."""
    rows = [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"chosen": [{"role": "assistant", "content": "Ünï ✓"}], "rejected": [{"content": "x", "role": "user"}]},
    ]
    assert canonical_sha256(rows) == "bbf19a266b92295d78f400fe3b857bfafb72a19acc40aaadd39461558ac7e995"


# --------------------------------------------------------------------------------------------
# Bad input: every message names the file, the line/row, and what to do
# --------------------------------------------------------------------------------------------

GOOD = {"prompt": "p", "chosen": "c", "rejected": "r"}


def assert_load_error(path: Path, *patterns: str) -> str:
    with pytest.raises(EvalSetError) as info:
        load_eval_set(path)
    message = str(info.value)
    assert path.name in message, message
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    return message


def test_missing_file(tmp_path: Path) -> None:
    assert_load_error(tmp_path / "nope.jsonl", "not found", "Check the path")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_empty_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"empty{suffix}"
    path.touch()
    assert_load_error(path, "empty", "Add preference rows")


def test_only_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "blank.jsonl"
    path.write_text("\n   \n\t\n\n", encoding="utf-8")
    assert_load_error(path, "no rows", "Add preference rows")


@pytest.mark.parametrize("bad_line", [2, 4])
def test_non_json_line(tmp_path: Path, bad_line: int) -> None:
    lines = [json.dumps(GOOD)] * 4
    lines[bad_line - 1] = '{"prompt": "p", "chosen": oops}'
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    message = assert_load_error(path, rf":{bad_line}:", "not valid JSON", "fix or remove this line")
    assert f"{path}:{bad_line}:" in message


def test_invalid_json_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n{"prompt": "p",\n "chosen": }\n]', encoding="utf-8")
    assert_load_error(path, r":3:", "not valid JSON", r"\.jsonl")


@pytest.mark.parametrize("missing", ["chosen", "rejected"])
def test_row_missing_field(tmp_path: Path, missing: str) -> None:
    bad = {key: value for key, value in GOOD.items() if key != missing}
    path = write_jsonl(tmp_path / "missing.jsonl", [GOOD, GOOD, bad])
    assert_load_error(path, r":3: ", f"missing field '{missing}'", "Every row needs 'chosen' and 'rejected'")


def test_row_missing_field_in_json_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "missing.json"
    path.write_text(json.dumps([GOOD, {"prompt": "p", "rejected": "r"}]), encoding="utf-8")
    assert_load_error(path, r"row 1", "missing field 'chosen'")


def test_row_is_a_list(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "list.jsonl", [GOOD, ["p", "c", "r"]])
    assert_load_error(path, r":2: ", "expected a row object with 'chosen' and 'rejected', got list")


def test_chosen_of_wrong_type(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "int.jsonl", [GOOD, {**GOOD, "chosen": 7}])
    assert_load_error(path, r":2: ", "field 'chosen' is a int", "standard format", "Use one format")


def test_empty_chosen(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "empty_chosen.jsonl", [GOOD, GOOD, {**GOOD, "chosen": ""}])
    assert_load_error(path, r":3: ", "field 'chosen' is empty", "fill it or remove the row")


def test_empty_rejected_messages(tmp_path: Path) -> None:
    row = copy.deepcopy(CONVERSATIONAL_ROWS[0])
    row["rejected"] = []
    path = write_jsonl(tmp_path / "empty_rejected.jsonl", [CONVERSATIONAL_ROWS[1], row])
    assert_load_error(path, r":2: ", "field 'rejected' is empty")


def test_unknown_role(tmp_path: Path) -> None:
    row = copy.deepcopy(CONVERSATIONAL_ROWS[0])
    row["prompt"][1]["role"] = "robot"
    path = write_jsonl(tmp_path / "robot.jsonl", [CONVERSATIONAL_ROWS[1], row])
    assert_load_error(path, r":2: ", "field 'prompt' message 1", "role 'robot' is not one of", "Fix the role")


def test_message_without_content(tmp_path: Path) -> None:
    row = copy.deepcopy(CONVERSATIONAL_ROWS[1])
    del row["chosen"][0]["content"]
    path = write_jsonl(tmp_path / "no_content.jsonl", [row])
    assert_load_error(path, r":1: ", "field 'chosen' message 0", "'content'", "Every message needs its text")


def test_message_not_an_object(tmp_path: Path) -> None:
    row = copy.deepcopy(CONVERSATIONAL_ROWS[1])
    row["rejected"] = ["just text"]
    path = write_jsonl(tmp_path / "str_message.jsonl", [row])
    assert_load_error(path, r":1: ", "field 'rejected' message 0", "expected an object with 'role' and 'content'")


def test_mixed_formats(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD, CONVERSATIONAL_ROWS[0]])
    assert_load_error(path, r":2: ", "field 'prompt' is a list", "first row is in standard format", "one format")


def test_mixed_formats_conversational_first(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [CONVERSATIONAL_ROWS[0], GOOD])
    assert_load_error(path, r":2: ", "field 'prompt' is a str", "first row is conversational")


def test_prompt_in_first_row_only(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "prompts.jsonl", [GOOD, GOOD, {"chosen": "c", "rejected": "r"}])
    assert_load_error(path, r":3: ", "has no 'prompt'", rf"first row \({re.escape(str(path))}:1\) has one", "give every row a prompt, or none")


def test_prompt_only_in_later_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"chosen": "a b", "rejected": "a c"}, GOOD])
    assert_load_error(path, r":2: ", "has 'prompt'", "has none")


@pytest.mark.parametrize("rows", [[{"chosen": "same", "rejected": "same"}], IMPLICIT_CONVERSATIONAL + [{"chosen": IMPLICIT_CONVERSATIONAL[0]["chosen"], "rejected": IMPLICIT_CONVERSATIONAL[0]["chosen"]}]])  # fmt: skip
def test_implicit_row_with_identical_chosen_and_rejected(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    path = write_jsonl(tmp_path / "same.jsonl", rows)
    assert_load_error(path, rf":{len(rows)}: ", "identical", "Fix or remove the row")


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "eval.txt"
    path.write_text(json.dumps(GOOD), encoding="utf-8")
    assert_load_error(path, r"unsupported eval set format '\.txt'", r"\.jsonl", "save_to_disk")


def test_dataset_dict_folder(tmp_path: Path) -> None:
    folder = tmp_path / "dsdict"
    DatasetDict({"train": Dataset.from_list([GOOD]), "test": Dataset.from_list([GOOD])}).save_to_disk(str(folder))
    message = assert_load_error(folder, "DatasetDict", "train", "test", "Point at one split's folder")
    assert str(folder / "train") in message or str(folder / "test") in message


def test_folder_that_is_not_a_saved_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "plain_folder"
    folder.mkdir()
    (folder / "rows.jsonl").write_text(json.dumps(GOOD), encoding="utf-8")
    assert_load_error(folder, "not one written by datasets' save_to_disk", r"\.jsonl")


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"definitely not parquet")
    assert_load_error(path, "not a readable parquet file", "Re-export")


def test_json_columns_of_different_lengths(tmp_path: Path) -> None:
    path = tmp_path / "columns.json"
    path.write_text(json.dumps({"prompt": ["a", "b"], "chosen": ["c"], "rejected": ["d", "e"]}), encoding="utf-8")
    assert_load_error(path, "different lengths", "one value per row")


def test_json_scalar(tmp_path: Path) -> None:
    path = tmp_path / "scalar.json"
    path.write_text("42", encoding="utf-8")
    assert_load_error(path, "expected a JSON list of row objects", "got int")


def test_in_memory_errors_name_the_row() -> None:
    with pytest.raises(EvalSetError, match=r"<memory> row 1: missing field 'rejected'"):
        load_eval_set([GOOD, {"prompt": "p", "chosen": "c"}])
    with pytest.raises(EvalSetError, match=r"<memory>: the eval set has no rows"):
        load_eval_set([])


def test_eval_set_error_is_a_value_error() -> None:
    assert issubclass(EvalSetError, ValueError)


# --------------------------------------------------------------------------------------------
# Parity with trl.data_utils
# --------------------------------------------------------------------------------------------

piece = st.text(alphabet="ab .\n", max_size=6)


@st.composite
def string_pairs(draw: st.DrawFn) -> tuple[str, str]:
    prefix = draw(piece)
    chosen, rejected = prefix + draw(piece), prefix + draw(piece)
    assume(chosen and rejected)
    return chosen, rejected


@st.composite
def message_list_pairs(draw: st.DrawFn) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    small_message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant"]), "content": st.sampled_from(["a", "b", " ", "a b"])}
    )
    prefix = draw(st.lists(small_message, max_size=3))
    chosen = prefix + draw(st.lists(small_message, max_size=2))
    rejected = copy.deepcopy(prefix) + draw(st.lists(small_message, max_size=2))
    assume(chosen and rejected)
    return chosen, rejected


def trl_extract(chosen: Any, rejected: Any) -> tuple[Any, Any, Any] | None:
    """TRL's answer, or None where TRL itself raises (e.g. its loop index is unbound for an empty side)."""
    from trl.data_utils import extract_prompt as trl_extract_prompt

    try:
        out = trl_extract_prompt({"chosen": chosen, "rejected": rejected})
    except Exception:
        return None
    return out["prompt"], out["chosen"], out["rejected"]


@settings(max_examples=400, deadline=None)
@given(pair=string_pairs())
def test_extract_prompt_matches_trl_on_strings(pair: tuple[str, str]) -> None:
    chosen, rejected = pair
    expected = trl_extract(chosen, rejected)
    assume(expected is not None)
    assert extract_prompt(chosen, rejected) == expected


@settings(max_examples=300, deadline=None)
@given(pair=message_list_pairs())
def test_extract_prompt_matches_trl_on_messages(pair: tuple[list[dict[str, str]], list[dict[str, str]]]) -> None:
    chosen, rejected = pair
    expected = trl_extract(copy.deepcopy(chosen), copy.deepcopy(rejected))
    assume(expected is not None)
    assert extract_prompt(chosen, rejected) == expected


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        # the space before the first difference moves to the completions
        ("The sky is blue", "The sky is green", ("The sky is", " blue", " green")),
        # no space: the split is right at the difference
        ("Answer:A", "Answer:B", ("Answer:", "A", "B")),
        # one string is a prefix of the other: the split is one character before the shorter one's end
        ("abc", "abcd", ("ab", "c", "cd")),
        ("abcd", "abc", ("ab", "cd", "c")),
        # identical strings: the same, the last character is the completion
        ("same", "same", ("sam", "e", "e")),
        # difference at the very first character with chosen ending in a space: index -1
        ("x end ", "y end ", ("x end", " ", " ")),
        ("x", "y", ("", "x", "y")),
    ],
)
def test_extract_prompt_trl_quirks(chosen: str, rejected: str, expected: tuple[str, str, str]) -> None:
    assert trl_extract(chosen, rejected) == expected  # these really are TRL's answers
    assert extract_prompt(chosen, rejected) == expected


def test_extract_prompt_on_messages_fixed() -> None:
    chosen, rejected = IMPLICIT_CONVERSATIONAL[0]["chosen"], IMPLICIT_CONVERSATIONAL[0]["rejected"]
    expected = ([chosen[0]], [chosen[1]], [rejected[1]])
    assert trl_extract(chosen, rejected) == expected
    assert extract_prompt(chosen, rejected) == expected


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.lists(st.integers(0, 3), max_size=6),
    tail=st.lists(st.integers(0, 3), max_size=6),
    other_tail=st.lists(st.integers(0, 3), max_size=6),
)
def test_common_prefix_length_matches_trl(prefix: list[int], tail: list[int], other_tail: list[int]) -> None:
    from trl.data_utils import common_prefix_length as trl_common_prefix_length

    ids, other_ids = prefix + tail, prefix + other_tail
    expected = trl_common_prefix_length(ids, other_ids)
    assert common_prefix_length(ids, other_ids) == expected
    assert common_prefix_length(other_ids, ids) == expected
    assert expected >= len(prefix)
    # independent check: the longest k with equal leading slices
    assert expected == max(k for k in range(min(len(ids), len(other_ids)) + 1) if ids[:k] == other_ids[:k])


def test_a_single_row_object_in_json_says_to_wrap_it_in_a_list(tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    path.write_text(json.dumps(CONVERSATIONAL_ROWS[0]))
    with pytest.raises(EvalSetError, match=r"one.json: holds a single row object.*wrap it in \[ ... \]"):
        load_eval_set(path)


# --------------------------------------------------------------------------------------------
# Files that cannot be read: an EvalSetError naming the file, the line and the fix, never a crash
# --------------------------------------------------------------------------------------------


def test_latin1_csv_names_the_line_and_says_save_as_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("prompt,chosen,rejected\nSky?,Blue,Green\nCafé?,Oui,Non\n".encode("latin-1"))
    assert_load_error(path, r"latin1\.csv:3: ", "not UTF-8", r"byte 0xe9", "Save the file as UTF-8")


def test_latin1_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps(GOOD), json.dumps(GOOD), json.dumps({**GOOD, "prompt": "Café"}, ensure_ascii=False)]
    path.write_bytes("\n".join(lines).encode("latin-1"))
    assert_load_error(path, r"latin1\.jsonl:3: ", "not UTF-8", "Save the file as UTF-8")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_binary_file_with_a_text_suffix(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"binary{suffix}"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00")
    assert_load_error(path, r"binary\.\w+:1: ", "not UTF-8", "Save the file as UTF-8")


def test_csv_that_the_csv_module_rejects_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "huge.csv"
    path.write_text("prompt,chosen,rejected\np,c,r\np," + "x" * 200_000 + ",r\n", encoding="utf-8")
    assert_load_error(path, r"huge\.csv:3: ", "not readable as CSV", r"\.jsonl")


def test_truncated_parquet(tmp_path: Path) -> None:
    path = tmp_path / "truncated.parquet"
    pd.DataFrame(EXPECTED_STANDARD).to_parquet(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_load_error(path, "not a readable parquet file", "Re-export")


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    folder = tmp_path / "saved"
    Dataset.from_list(EXPECTED_STANDARD).save_to_disk(str(folder))
    return folder


def arrow_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.arrow"))


def test_saved_dataset_with_a_missing_arrow_file(saved: Path) -> None:
    missing = arrow_files(saved)[0]
    missing.unlink()
    message = assert_load_error(saved, "listed in state.json but missing", "save the dataset again with save_to_disk")
    assert missing.name in message


def test_saved_dataset_with_a_corrupt_arrow_file(saved: Path) -> None:
    corrupt = arrow_files(saved)[0]
    corrupt.write_bytes(b"not arrow at all" * 4)
    message = assert_load_error(saved, "not a readable Arrow file", "save the dataset again")
    assert corrupt.name in message


@pytest.mark.parametrize(
    ("state", "patterns"),
    [
        ('{\n  "_data_files": [\n    {"filename": }\n  ]\n}', [r"state\.json:3: not valid JSON", "save the dataset again"]),
        ('{"_data_files": "data.arrow"}', [r"state\.json: no '_data_files' list", "save the dataset again"]),
        ("[]", [r"state\.json: no '_data_files' list"]),
    ],
)
def test_saved_dataset_with_a_corrupt_state_json(saved: Path, state: str, patterns: list[str]) -> None:
    (saved / "state.json").write_text(state, encoding="utf-8")
    assert_load_error(saved, *patterns)


def test_corrupt_dataset_dict_json(tmp_path: Path) -> None:
    folder = tmp_path / "dsdict"
    folder.mkdir()
    (folder / "dataset_dict.json").write_bytes(b"\x00garbage")
    assert_load_error(folder, r"dataset_dict\.json:1: not valid JSON", "save the dataset again")
    (folder / "dataset_dict.json").write_bytes(b"\xff\xfe")
    assert_load_error(folder, r"dataset_dict\.json:1: not UTF-8", "save the dataset again")


def test_directory_with_a_file_suffix(tmp_path: Path) -> None:
    folder = tmp_path / "eval.jsonl"
    folder.mkdir()
    assert_load_error(folder, "not one written by datasets' save_to_disk")


def test_os_errors_become_eval_set_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the OS refuses (permissions, I/O errors) ends as an EvalSetError (simulated: root reads any file)."""
    path = write_jsonl(tmp_path / "unreadable.jsonl", [GOOD])

    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    assert_load_error(path, "cannot be read", "Permission denied", "permission to read")


@pytest.mark.parametrize(
    ("content", "patterns"),
    [
        ("[" * 100_000 + "]" * 100_000, ["not valid JSON", "nested too deeply"]),
        ('{"prompt": "p", "chosen": "c", "rejected": ' + "1" * 5_000 + "}", ["not valid JSON", "digits"]),
        (json.dumps({**GOOD, "chosen": "\ud800"}), [r":1: field 'chosen'", "unpaired surrogate", "Fix the text"]),
    ],
)
def test_json_lines_python_cannot_use(tmp_path: Path, content: str, patterns: list[str]) -> None:
    path = tmp_path / "odd.jsonl"
    path.write_text(content + "\n", encoding="utf-8")
    assert_load_error(path, *patterns)


def test_values_that_are_not_json_data_are_refused() -> None:
    row = copy.deepcopy(CONVERSATIONAL_ROWS[1])
    row["chosen"][0]["meta"] = {1, 2}
    with pytest.raises(EvalSetError, match=r"<memory> row 0: field 'chosen'\[0\]\.meta: holds a set.*JSON"):
        load_eval_set([row])
    deep: Any = "x"
    for _ in range(200):
        deep = [deep]
    row["chosen"][0]["meta"] = deep
    with pytest.raises(EvalSetError, match="nested more than 100 levels deep"):
        load_eval_set([row])


def test_a_source_that_is_not_rows() -> None:
    with pytest.raises(EvalSetError, match=r"expected a path or a list of row dicts, got int"):
        load_eval_set(42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Property: any bytes, JSON or rows in any file format give an EvalSet or an EvalSetError
# --------------------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8),
    st.sampled_from(["user", "assistant", "[]", "[{'role': 'user', 'content': 'hi'}]", '[{"role": "user"}]']),
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from(["role", "content", "type", "name", "x"]), children, max_size=3),
    ),
    max_leaves=12,
)
COLUMNS = ["prompt", "chosen", "rejected", "tools", "chat_template_kwargs", "images", "id"]
random_row = st.dictionaries(st.sampled_from(COLUMNS), json_values, max_size=6)
extra_columns = st.dictionaries(st.sampled_from(["tools", "chat_template_kwargs", "id"]), json_values, max_size=2)
# Valid rows with random tools, chat_template_kwargs and ids: the paths past the first row checks.
nearly_valid_row = st.tuples(st.one_of(standard_row, conversational_row), extra_columns).map(lambda pair: {**pair[0], **pair[1]})
garbage = st.one_of(
    st.binary(max_size=64).map(lambda data: ("bytes", data)),
    json_values.map(lambda value: ("json", value)),
    st.lists(random_row, min_size=1, max_size=4).map(lambda rows: ("rows", rows)),
    st.lists(nearly_valid_row, min_size=1, max_size=4).map(lambda rows: ("rows", rows)),
)


def write_garbage(path: Path, kind: str, content: Any) -> bool:
    """Write `content` in the file's format; False where that format cannot hold it (e.g. parquet of mixed types)."""
    if kind == "bytes":
        path.write_bytes(content)
        return True
    rows = content if kind == "rows" else content if isinstance(content, list) else [content]
    if path.suffix == ".json":
        path.write_text(json.dumps(content), encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif not all(isinstance(row, dict) for row in rows):
        return False
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        try:
            pd.DataFrame(rows).to_parquet(path)
        except Exception:  # pyarrow refuses mixed or empty types: such a parquet file cannot exist
            return False
    return True


@settings(max_examples=300, deadline=None)
@given(content=garbage, suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
def test_anything_in_any_format_loads_or_raises_eval_set_error(content: tuple[str, Any], suffix: str) -> None:
    kind, value = content
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"garbage{suffix}"
        assume(write_garbage(path, kind, value))
        try:
            eval_set = load_eval_set(path)
        except EvalSetError as error:
            assert str(error) and path.name in str(error)
        else:
            assert len(eval_set) >= 1 and len(eval_set.sha256) == 64
    if kind == "rows":
        try:
            load_eval_set(value)
        except EvalSetError as error:
            assert "<memory>" in str(error)
