"""Tests for the columns beyond prompt/chosen/rejected: per-row `tools` and `chat_template_kwargs`,
vision rows, message lists stored as text, and `EvalSet.ignored_columns`."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from datasets import Dataset

from pytest_dpo.evalset import (
    MESSAGES_AS_TEXT_NOTE,
    EvalSetError,
    canonical_sha256,
    load_eval_set,
)
from pytest_dpo.tokenization import tokenize_eval_set
from tests.fixture_paths import FIXTURES

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
OTHER_TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]


def conversation(user: str, chosen: str, rejected: str, **columns: Any) -> dict[str, Any]:
    return {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        **columns,
    }


PLAIN = [conversation("Sky?", "Blue.", "Green."), conversation("2+2?", "4", "5")]
WITH_TOOLS = [
    conversation("Weather in Paris?", "Let me check.", "Sunny.", tools=TOOLS, chat_template_kwargs={"enable_thinking": False}),
    conversation("1+2?", "3", "4", tools=OTHER_TOOLS, chat_template_kwargs={"enable_thinking": True, "budget": 2}),
    conversation("Hi", "Hello!", "Go away.", chat_template_kwargs={}),
]
STANDARD = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def load_error(source: Any, *patterns: str) -> str:
    with pytest.raises(EvalSetError) as info:
        load_eval_set(source)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    return message


# --------------------------------------------------------------------------------------------
# tools and chat_template_kwargs
# --------------------------------------------------------------------------------------------


def test_conversational_rows_keep_tools_and_chat_template_kwargs(tmp_path: Path) -> None:
    eval_set = load_eval_set(write_jsonl(tmp_path / "tools.jsonl", WITH_TOOLS))
    assert eval_set.rows == [{key: row[key] for key in row} for row in WITH_TOOLS]
    assert "tools" not in eval_set.rows[2]
    assert eval_set.ignored_columns == ()


def test_tools_as_a_json_string_are_parsed_like_trl_does(tmp_path: Path) -> None:
    rows = copy.deepcopy(WITH_TOOLS)
    rows[0]["tools"] = json.dumps(TOOLS)
    eval_set = load_eval_set(write_jsonl(tmp_path / "text_tools.jsonl", rows))
    assert eval_set.rows[0]["tools"] == TOOLS
    assert eval_set.sha256 == load_eval_set(WITH_TOOLS).sha256


def test_null_tools_are_no_tools() -> None:
    rows = [conversation("a", "b", "c", tools=None), conversation("d", "e", "f", tools="null"), conversation("g", "h", "i", tools=TOOLS)]
    eval_set = load_eval_set(rows)
    assert [row.get("tools") for row in eval_set.rows] == [None, None, TOOLS]
    assert "tools" not in eval_set.rows[0] and "tools" not in eval_set.rows[1]
    assert eval_set.sha256 == load_eval_set([conversation("a", "b", "c"), conversation("d", "e", "f"), rows[2]]).sha256


def qwen_style_tokenizer() -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(FIXTURES / "tokenizer"))
    tokenizer.chat_template = (
        "{%- for tool in tools or [] %}{{ '<tool>' + tool.function.name + '</tool>\\n' }}{%- endfor %}"
        "{%- for message in messages %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{%- if enable_thinking is defined and not enable_thinking %}{{ '<think></think>' }}{%- endif %}{%- endif %}"
    )
    return tokenizer


def test_tools_and_chat_template_kwargs_reach_the_chat_template() -> None:
    tokenizer = qwen_style_tokenizer()
    tokenized = tokenize_eval_set(load_eval_set(WITH_TOOLS), tokenizer, None, "keep_start")
    prompts = [tokenizer.decode(row.prompt_ids) for row in tokenized.rows]
    assert "<tool>get_weather</tool>" in prompts[0] and "<tool>add</tool>" in prompts[1]
    assert "<tool>" not in prompts[2]
    # enable_thinking=False adds a block after the generation prompt only, so the completions start at the divergence
    first = tokenized.rows[0]
    expected = tokenizer.apply_chat_template(
        WITH_TOOLS[0]["prompt"] + WITH_TOOLS[0]["chosen"], tools=TOOLS, enable_thinking=False, tokenize=True, return_dict=True
    )["input_ids"]
    assert first.prompt_ids + first.chosen_ids == expected
    without = tokenize_eval_set(load_eval_set(PLAIN[:1]), tokenizer, None, "keep_start").rows[0]
    assert "<tool>" not in tokenizer.decode(without.prompt_ids)


def test_parquet_and_saved_dataset_match_jsonl_despite_arrow_filling_missing_keys(tmp_path: Path) -> None:
    """Arrow gives every row's chat_template_kwargs and tools every key any row has, filled with None."""
    reference = load_eval_set(write_jsonl(tmp_path / "tools.jsonl", WITH_TOOLS))
    pd.DataFrame(WITH_TOOLS).to_parquet(tmp_path / "tools.parquet")
    Dataset.from_list(WITH_TOOLS).save_to_disk(str(tmp_path / "saved"))
    import pyarrow.parquet as pq

    filled = pq.read_table(tmp_path / "tools.parquet").to_pylist()
    assert filled[0]["chat_template_kwargs"] == {"enable_thinking": False, "budget": None}  # what TRL would get
    for source in (tmp_path / "tools.parquet", tmp_path / "saved"):
        eval_set = load_eval_set(source)
        assert eval_set.rows[0]["chat_template_kwargs"] == {"enable_thinking": False}, source
        assert eval_set.rows[1]["tools"] == OTHER_TOOLS, source
        assert eval_set.rows == reference.rows, source
        assert eval_set.sha256 == reference.sha256, source


@pytest.mark.parametrize("missing", ["absent", "null"])
def test_chat_template_kwargs_missing_from_some_rows_is_refused(tmp_path: Path, missing: str) -> None:
    rows = copy.deepcopy(WITH_TOOLS)
    if missing == "absent":
        del rows[1]["chat_template_kwargs"]
    else:
        rows[1]["chat_template_kwargs"] = None
    path = write_jsonl(tmp_path / "kwargs.jsonl", rows)
    load_error(path, r"kwargs\.jsonl:2: ", "'chat_template_kwargs' is missing or null", "TRL 1.16", r'"chat_template_kwargs": \{\}')


def test_chat_template_kwargs_missing_from_a_parquet_row_is_refused(tmp_path: Path) -> None:
    rows = copy.deepcopy(WITH_TOOLS)
    del rows[2]["chat_template_kwargs"]
    pd.DataFrame(rows).to_parquet(tmp_path / "kwargs.parquet")
    load_error(tmp_path / "kwargs.parquet", r"kwargs\.parquet row 2: ", "'chat_template_kwargs' is missing or null")


@pytest.mark.parametrize(
    ("columns", "patterns"),
    [
        ({"tools": {"type": "function"}}, ["field 'tools' must be a list of tool objects", "got dict", r"\[\{\"type\": \"function\""]),
        ({"tools": ["get_weather"]}, ["field 'tools' must be a list of tool objects", "a list holding str"]),
        ({"tools": "[{'type': 'function'}]"}, ["field 'tools' is text but not valid JSON", "JSON list of tool objects"]),
        ({"tools": '{"type": "function"}'}, ["field 'tools' must be a list", "got dict"]),
        ({"chat_template_kwargs": "enable_thinking=False"}, ["field 'chat_template_kwargs' must be an object", "got str", "enable_thinking"]),
        ({"chat_template_kwargs": [1]}, ["field 'chat_template_kwargs' must be an object", "a list holding int"]),
        ({"chat_template_kwargs": {"add_generation_prompt": True}}, ["sets 'add_generation_prompt'", "TRL 1.16 passes to apply_chat_template itself", "Remove that key"]),
        ({"chat_template_kwargs": {"tokenize": False}}, ["sets 'tokenize'"]),
    ],
)  # fmt: skip
def test_bad_tools_and_chat_template_kwargs(tmp_path: Path, columns: dict[str, Any], patterns: list[str]) -> None:
    rows = [conversation("a", "b", "c"), conversation("d", "e", "f", **columns)]
    if "chat_template_kwargs" in columns:
        rows[0]["chat_template_kwargs"] = {}
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    load_error(path, r"bad\.jsonl:2: ", *patterns)


def test_standard_rows_ignore_tools_and_chat_template_kwargs(tmp_path: Path) -> None:
    rows = [{**STANDARD[0], "tools": "not even json", "chat_template_kwargs": "ignored"}]
    eval_set = load_eval_set(write_jsonl(tmp_path / "standard.jsonl", rows))
    assert eval_set.rows == STANDARD
    assert eval_set.ignored_columns == ("chat_template_kwargs", "tools")
    assert eval_set.sha256 == load_eval_set(STANDARD).sha256 == canonical_sha256(rows)


def test_hash_includes_tools_and_chat_template_kwargs_only_when_present() -> None:
    plain = load_eval_set(PLAIN).sha256
    assert canonical_sha256(PLAIN) == plain
    assert canonical_sha256([{**row, "tools": None} for row in PLAIN]) == plain
    with_tools = canonical_sha256([{**PLAIN[0], "tools": TOOLS}, PLAIN[1]])
    with_other_tools = canonical_sha256([{**PLAIN[0], "tools": OTHER_TOOLS}, PLAIN[1]])
    with_kwargs = canonical_sha256([{**PLAIN[0], "chat_template_kwargs": {"enable_thinking": False}}, PLAIN[1]])
    assert len({plain, with_tools, with_other_tools, with_kwargs}) == 4
    reordered = [{**PLAIN[0], "tools": [{"function": TOOLS[0]["function"], "type": "function"}]}, PLAIN[1]]
    assert canonical_sha256(reordered) == with_tools


# --------------------------------------------------------------------------------------------
# Vision rows
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["images", "image"])
def test_rows_with_images_are_refused(tmp_path: Path, key: str) -> None:
    rows = [dict(STANDARD[0]), dict(STANDARD[0]), {**STANDARD[0], key: ["cat.png"]}, {**STANDARD[0], key: ["dog.png"]}]
    path = write_jsonl(tmp_path / "vision.jsonl", rows)
    load_error(path, r"vision\.jsonl:3: ", f"'{key}'", "Vision DPO is not supported yet", "text-only eval set")


def test_vision_rows_in_parquet_name_the_first_row_with_an_image(tmp_path: Path) -> None:
    rows = [{**STANDARD[0], "images": None}, {**STANDARD[0], "images": [{"path": "cat.png"}]}]
    pd.DataFrame(rows).to_parquet(tmp_path / "vision.parquet")
    load_error(tmp_path / "vision.parquet", r"vision\.parquet row 1: ", "Vision DPO is not supported yet")


def test_an_image_column_without_images_is_ignored() -> None:
    eval_set = load_eval_set([{**STANDARD[0], "image": None}])
    assert eval_set.rows == STANDARD
    assert eval_set.ignored_columns == ("image",)


# --------------------------------------------------------------------------------------------
# Message lists stored as text
# --------------------------------------------------------------------------------------------


def test_conversational_csv_is_read_as_conversations(tmp_path: Path) -> None:
    tricky = conversation('Two\nlines, "double" and \'single\' quotes, ✓ 🙂', "a, b", "[not a list]", chat_template_kwargs={})
    rows = [{**row, "id": index, "score_chosen": 0.5} for index, row in enumerate(WITH_TOOLS + [tricky])]
    pd.DataFrame(rows).to_csv(tmp_path / "chat.csv", index=False)
    assert "[{'role': 'system'" in (tmp_path / "chat.csv").read_text(encoding="utf-8")  # Python repr, not JSON
    eval_set = load_eval_set(tmp_path / "chat.csv")
    from_jsonl = load_eval_set(write_jsonl(tmp_path / "chat.jsonl", rows))
    assert eval_set.conversational and eval_set.format == "conversational"
    assert eval_set.notes == (MESSAGES_AS_TEXT_NOTE,)
    assert from_jsonl.notes == ()
    assert eval_set.rows == from_jsonl.rows
    assert eval_set.sha256 == from_jsonl.sha256
    assert eval_set.ignored_columns == from_jsonl.ignored_columns == ("id", "score_chosen")
    assert eval_set.locations[1] == f"{tmp_path / 'chat.csv'}:3"


def test_implicit_conversational_csv_with_an_empty_prompt_list(tmp_path: Path) -> None:
    implicit = [{"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]} for row in PLAIN]
    pd.DataFrame(implicit).to_csv(tmp_path / "implicit.csv", index=False)
    eval_set = load_eval_set(tmp_path / "implicit.csv")
    assert eval_set.format == "conversational (implicit prompt)"
    assert eval_set.sha256 == load_eval_set(implicit).sha256
    empty_prompt = [{**PLAIN[0], "prompt": []}]
    pd.DataFrame(empty_prompt).to_csv(tmp_path / "empty_prompt.csv", index=False)
    assert load_eval_set(tmp_path / "empty_prompt.csv").rows == empty_prompt


def test_json_and_parquet_with_message_lists_as_json_strings(tmp_path: Path) -> None:
    as_text = [{key: json.dumps(value) if key in ("prompt", "chosen", "rejected") else value for key, value in row.items()} for row in WITH_TOOLS]
    (tmp_path / "text.json").write_text(json.dumps(as_text), encoding="utf-8")
    pd.DataFrame([{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in as_text]).to_parquet(tmp_path / "text.parquet")
    reference = load_eval_set(WITH_TOOLS)
    from_json = load_eval_set(tmp_path / "text.json")
    assert (from_json.rows, from_json.sha256, from_json.notes) == (reference.rows, reference.sha256, (MESSAGES_AS_TEXT_NOTE,))
    assert load_eval_set(tmp_path / "text.parquet").sha256 == load_eval_set([{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in WITH_TOOLS]).sha256  # fmt: skip


def test_some_cells_holding_message_lists_as_text_is_refused(tmp_path: Path) -> None:
    rows = [{key: json.dumps(value) for key, value in row.items()} for row in PLAIN]
    rows[1]["chosen"] = "4"
    path = write_jsonl(tmp_path / "half.jsonl", rows)
    load_error(
        path,
        r"half\.jsonl:2: field 'chosen' is plain text",
        r"other cells hold message lists as text \(e\.g\. .*half\.jsonl:1 field 'prompt'\)",
        r"\.jsonl or \.parquet with real lists",
    )


def test_standard_text_that_merely_looks_like_a_list_stays_text() -> None:
    rows = [{"prompt": "List: [1, 2]", "chosen": "[1, 2, 3]", "rejected": "[{'a': 1}]"}]
    eval_set = load_eval_set(rows)
    assert (eval_set.rows, eval_set.notes, eval_set.format) == (rows, (), "standard")


def test_bad_tools_text_in_a_csv_names_the_line(tmp_path: Path) -> None:
    rows = [{key: repr(value) for key, value in row.items()} for row in PLAIN]
    rows[1]["tools"] = "[{'type': 'function'"
    pd.DataFrame(rows).to_csv(tmp_path / "tools.csv", index=False)
    load_error(tmp_path / "tools.csv", r"tools\.csv:3: field 'tools' is text that is neither JSON nor a Python literal", "Write it as JSON")


# --------------------------------------------------------------------------------------------
# Ignored columns
# --------------------------------------------------------------------------------------------


def test_ignored_columns_are_every_unused_column_sorted_once(tmp_path: Path) -> None:
    rows = [
        {**STANDARD[0], "source": "web", "score_chosen": 9.0, "id": 1},
        {**STANDARD[0], "score_rejected": 1.0, "id": 2, "tools": []},
    ]
    eval_set = load_eval_set(write_jsonl(tmp_path / "extra.jsonl", rows))
    assert eval_set.ignored_columns == ("id", "score_chosen", "score_rejected", "source", "tools")
    assert load_eval_set(rows).ignored_columns == eval_set.ignored_columns
    pd.DataFrame(rows).to_csv(tmp_path / "extra.csv", index=False)
    assert load_eval_set(tmp_path / "extra.csv").ignored_columns == eval_set.ignored_columns
    assert load_eval_set(STANDARD).ignored_columns == ()


def test_conversational_sets_use_tools_and_chat_template_kwargs() -> None:
    rows = [{**row, "source": "x"} for row in WITH_TOOLS]
    assert load_eval_set(rows).ignored_columns == ("source",)
