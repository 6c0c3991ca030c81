"""Conversational rows' `tools` and `chat_template_kwargs`: checked, and read as `datasets` reads them for TRL.

Part of eval-set validation: `evalset._validate` calls `add_template_fields` for conversational rows.
"""

from __future__ import annotations

import json
from typing import Any

from .evalset import EvalSetError, check_json_value, json_error_detail

# Arguments TRL 1.16 gives apply_chat_template itself: the same key in chat_template_kwargs makes TRL fail.
_RESERVED_TEMPLATE_KWARGS = ("conversation", "tokenize", "return_dict", "add_generation_prompt")


def add_template_fields(rows: list[dict[str, Any]], raw_rows: list[dict[str, Any]], locations: list[str]) -> None:
    """Give each conversational row the `tools` and `chat_template_kwargs` TRL 1.16 passes to the chat template."""
    _check_chat_template_kwargs_everywhere(raw_rows, locations)
    readers = {"tools": _read_tools, "chat_template_kwargs": _read_chat_template_kwargs}
    for key, read in readers.items():
        column = [check_json_value(raw.get(key), f"{location}: field '{key}'") for raw, location in zip(raw_rows, locations)]
        for row, value, location in zip(rows, _as_datasets_reads(column), locations, strict=True):
            value = read(value, location)
            if value is not None:
                row[key] = value


def _check_chat_template_kwargs_everywhere(raw_rows: list[dict[str, Any]], locations: list[str]) -> None:
    """TRL 1.16 unpacks `chat_template_kwargs` with `**`: a null there (how `datasets` fills a row without it) fails."""
    if not any("chat_template_kwargs" in raw for raw in raw_rows):
        return
    for raw, location in zip(raw_rows, locations, strict=True):
        if raw.get("chat_template_kwargs") is None:
            raise EvalSetError(
                f"{location}: field 'chat_template_kwargs' is missing or null, but the eval set has that column. "
                "TRL 1.16 reads it as null for this row and fails unpacking it into the chat template. "
                'Give this row "chat_template_kwargs": {}, or remove the column from every row.'
            )


def _read_tools(value: Any, location: str) -> list[dict[str, Any]] | None:
    where = f"{location}: field 'tools'"
    if isinstance(value, str):
        value = check_json_value(_tools_from_json(value, where), where)
    if value is not None and not (isinstance(value, list) and all(isinstance(tool, dict) for tool in value)):
        raise EvalSetError(
            f"{where} must be a list of tool objects or a JSON string of one, got {_describe(value)}. "
            'Write the tools like [{"type": "function", "function": {"name": ..., "parameters": ...}}].'
        )
    return value


def _tools_from_json(text: str, where: str) -> Any:
    """TRL 1.16 json.loads text tools, the form that keeps tool schemas out of Arrow's struct typing."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise EvalSetError(
            f"{where} is text but not valid JSON ({json_error_detail(error)}). TRL 1.16 parses text tools "
            "as JSON: write them as a JSON list of tool objects."
        ) from None


def _read_chat_template_kwargs(value: Any, location: str) -> dict[str, Any] | None:
    where = f"{location}: field 'chat_template_kwargs'"
    if value is not None and not isinstance(value, dict):
        raise EvalSetError(
            f"{where} must be an object of chat template variables, got {_describe(value)}. "
            'Write it like {"enable_thinking": false}.'
        )
    reserved = [key for key in _RESERVED_TEMPLATE_KWARGS if value and key in value]
    if reserved:
        raise EvalSetError(
            f"{where} sets '{reserved[0]}', which TRL 1.16 passes to apply_chat_template itself, so TRL fails "
            "on this row. Remove that key."
        )
    return value


def _describe(value: Any) -> str:
    if isinstance(value, list):
        kinds = sorted({type(item).__name__ for item in value if not isinstance(item, dict)})
        return f"a list holding {', '.join(kinds)}" if kinds else "a list"
    return type(value).__name__


def _as_datasets_reads(column: list[Any]) -> list[Any]:
    """The column's values as `datasets`' JSON loader hands them to TRL.

    `datasets` types each column with Arrow, except for objects whose key sets
    differ between rows (and values whose types clash), which it keeps as
    written. Arrow-typed objects come back with their keys in the first row's
    order, and integers in a column that also holds floats come back as floats;
    both can change what a chat template renders (`tools | tojson`,
    `{{ budget }}`). Not reproduced: strings Arrow reads as timestamps.
    """
    present = [index for index, value in enumerate(column) if value is not None]
    values = [column[index] for index in present]
    if values and all(isinstance(value, dict) for value in values):
        values = _objects_as_datasets_reads(values)
    elif values and all(isinstance(value, list) for value in values):
        values = _lists_as_datasets_reads(values)
    elif values and all(_is_number(value) for value in values) and any(isinstance(value, float) for value in values):
        values = [float(value) for value in values]
    read = list(column)
    for index, value in zip(present, values, strict=True):
        read[index] = value
    return read


def _objects_as_datasets_reads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = list(objects[0])
    if not keys or any(set(item) != set(keys) for item in objects):
        return objects
    fields = {key: _as_datasets_reads([item[key] for item in objects]) for key in keys}
    return [{key: fields[key][index] for key in keys} for index in range(len(objects))]


def _lists_as_datasets_reads(lists: list[list[Any]]) -> list[list[Any]]:
    items = iter(_as_datasets_reads([item for value in lists for item in value]))
    return [[next(items) for _ in value] for value in lists]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
