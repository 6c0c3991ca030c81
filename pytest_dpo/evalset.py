"""Preference eval sets: what a valid one is, its canonical hash, and TRL's prompt extraction.

Owns `EvalSet`, `load_eval_set` and every check a row must pass: the row
shape, the three TRL preference formats (standard, conversational, implicit
prompt), messages and roles, conversational rows' `tools` and
`chat_template_kwargs` (kept, as TRL passes them to the chat template, and
read as `datasets` reads them: `evalset_template_fields`), refusal of vision rows, and message lists
stored as text (a CSV export, JSON strings), read as conversations. Every
problem is an `EvalSetError` naming the file, the line or row, the field and
what to do. Also `canonical_sha256` and TRL's `extract_prompt`.

Must not read files (that is `evalset_files`, imported inside
`load_eval_set`, since it imports `EvalSetError` from here) nor tokenize
(that is `tokenization`); never imports trl, torch or transformers.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .spelling import option

HUB_PREFIX = "hub:"
MESSAGE_ROLES = ("system", "user", "assistant", "tool", "developer")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
TEMPLATE_FIELDS = ("tools", "chat_template_kwargs")
VISION_FIELDS = ("image", "images")
MESSAGES_AS_TEXT_NOTE = "prompt/chosen/rejected cells hold message lists as text; read as conversations"
_NOT_A_LITERAL = object()
_MAX_DEPTH = 100
_SURROGATE = re.compile("[\ud800-\udfff]")


class EvalSetError(ValueError):
    """The eval set cannot be used; the message names the file, the line or row, and the fix."""


@dataclass(frozen=True)
class EvalSet:
    """A validated preference eval set.

    Attributes:
        path (`str`): where it was loaded from (`"<memory>"` for rows given directly).
        rows (`list[dict]`): the rows, each with `chosen`, `rejected` and, unless
            the prompt is implicit, `prompt`. Conversational rows also keep `tools`
            (a list of tool objects; TRL's JSON-string form is parsed) and
            `chat_template_kwargs` where they have them, since TRL passes both to
            the chat template. Other columns are dropped.
        locations (`list[str]`): where each row is, e.g. `eval.jsonl:7`, for messages.
        conversational (`bool`): rows are lists of role/content messages.
        implicit_prompt (`bool`): rows have no `prompt`; TRL extracts it from the
            common beginning of `chosen` and `rejected`.
        sha256 (`str`): canonical content hash: the same rows in any file format
            and any key order hash the same.
        ignored_columns (`tuple[str, ...]`): the columns in the source that
            pytest-dpo does not use (e.g. `id`, `score_chosen`, and `tools` or
            `chat_template_kwargs` on standard-format rows, which TRL ignores), sorted.
        notes (`tuple[str, ...]`): how the source was read where it is not plain,
            e.g. `MESSAGES_AS_TEXT_NOTE` when message lists were stored as text.
        revision (`str`, *optional*): for an eval set read from the Hub, the commit sha it was read at.
        subsets (`tuple[str, ...]`, *optional*): each row's value of the subset column, as text, when
            `load_eval_set` was given `subset_column` and the set has that column; None otherwise.
    """

    path: str
    rows: list[dict[str, Any]]
    locations: list[str]
    conversational: bool
    implicit_prompt: bool
    sha256: str
    ignored_columns: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    revision: str | None = None
    subsets: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def format(self) -> str:
        """`standard` or `conversational`, with ` (implicit prompt)` when it applies."""
        kind = "conversational" if self.conversational else "standard"
        return f"{kind} (implicit prompt)" if self.implicit_prompt else kind

    def prompt_text(self, row: int) -> str:
        """A one-line text of the row's prompt (the last message's content for conversations)."""
        data = self.rows[row]
        prompt = data.get("prompt")
        if prompt is None:
            prompt = extract_prompt(data["chosen"], data["rejected"])[0]
        if isinstance(prompt, list):
            prompt = prompt[-1]["content"] if prompt else ""
        return " ".join(str(prompt).split())


def load_eval_set(source: str | Path | Sequence[dict[str, Any]], subset_column: str | None = None) -> EvalSet:
    """Load and validate a preference eval set.

    Args:
        source (`str`, `Path` or a list of row dicts): a `.jsonl`, `.json`,
            `.parquet` or `.csv` file, a folder written by `datasets`'
            `save_to_disk`, a Hub dataset as `hub:org/name[:split][@revision]`
            (read with `datasets`; see `evalset_hub`), or the rows themselves.
        subset_column (`str`, *optional*): a column that splits the rows into
            subsets (e.g. `subset`, `source`); a set without that column has no
            subsets, and in a set with it every row must have a value.

    Raises:
        EvalSetError: the file is missing, unreadable, not UTF-8 or empty, a row
            is malformed, or a row has images; the message names the file and
            line/row and the fix. No other exception escapes.

    Rows are read as written, whatever the format. Parquet and `save_to_disk`
    files store `chat_template_kwargs` and `tools` as Arrow structs that give
    every row every key any row has, filled with None; those None keys are
    dropped, as the same rows in `.jsonl` do not have them. TRL reading such a
    file through `datasets` passes them on (e.g. `enable_thinking=None`), which
    changes the tokens only where a chat template tells None from unset.

    Example:
        >>> eval_set = load_eval_set("fixtures/data/eval_standard.jsonl")
        >>> eval_set.format, len(eval_set)
        ('standard', 24)
    """
    from .evalset_files import (
        read_source,  # here: evalset_files imports EvalSetError from this module
    )

    revision = None
    if isinstance(source, str) and source.startswith(HUB_PREFIX):
        from .evalset_hub import read_hub_source

        name, raw_rows, locations, revision = read_hub_source(source)
    else:
        name, raw_rows, locations = read_source(source)
    if not raw_rows:
        raise EvalSetError(f"{name}: the eval set has no rows. Add preference rows with 'chosen' and 'rejected'.")
    _refuse_vision_rows(raw_rows, locations)
    raw_rows, notes = _read_messages_stored_as_text(raw_rows, locations)
    rows, conversational, implicit = _validate(raw_rows, locations)
    subsets = None if subset_column is None else _subset_labels(raw_rows, locations, subset_column)
    ignored = _ignored_columns(raw_rows, conversational)
    return EvalSet(
        path=name,
        rows=rows,
        locations=locations,
        conversational=conversational,
        implicit_prompt=implicit,
        sha256=canonical_sha256(rows),
        ignored_columns=ignored if subsets is None else tuple(column for column in ignored if column != subset_column),
        notes=notes,
        revision=revision,
        subsets=subsets,
    )


def _subset_labels(raw_rows: list[dict[str, Any]], locations: list[str], column: str) -> tuple[str, ...] | None:
    """Each row's value of the subset column as text, None for a set without the column; a row without a value
    is an error naming it."""
    if not any(column in raw for raw in raw_rows):
        return None
    labels = []
    for raw, location in zip(raw_rows, locations, strict=True):
        value = raw.get(column)
        if value is None or isinstance(value, (dict, list)) or str(value).strip() == "":
            raise EvalSetError(
                f"{location}: {column!r} is {'missing' if value is None else repr(value)}, but every row needs a "
                f"subset name (text or a number) in it. Fill it in, or drop {option('subset_column')}."
            )
        labels.append(str(value))
    return tuple(labels)


def canonical_sha256(rows: Sequence[dict[str, Any]]) -> str:
    """SHA-256 of the rows' content, independent of file format and key order.

    A row enters as compact, key-sorted JSON of its `prompt`, `chosen` and
    `rejected` and, for conversational rows, its `tools` and
    `chat_template_kwargs`. Those two change the tokens, but enter only when
    present, so rows without them hash as they always have.
    """
    digest = hashlib.sha256()
    for row in rows:
        canonical = {key: row[key] for key in PREFERENCE_FIELDS if key in row}
        if isinstance(row.get("chosen"), list):
            canonical.update({key: row[key] for key in TEMPLATE_FIELDS if row.get(key) is not None})
        digest.update(json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def is_message(value: Any) -> bool:
    """A dict with a `role`: one chat message."""
    return isinstance(value, dict) and "role" in value


def json_error_detail(error: Exception) -> str:
    """What is wrong with text `json.loads` refused, for an error message."""
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at column {error.colno}"
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error)  # e.g. an integer with more digits than Python converts


def _refuse_vision_rows(raw_rows: list[Any], locations: list[str]) -> None:
    for raw, location in zip(raw_rows, locations, strict=True):
        images = [key for key in VISION_FIELDS if isinstance(raw, dict) and raw.get(key) is not None]
        if images:
            raise EvalSetError(
                f"{location}: this row has '{images[0]}'. Vision DPO is not supported yet; "
                "use a text-only eval set (rows without images)."
            )


def _read_messages_stored_as_text(raw_rows: list[Any], locations: list[str]) -> tuple[list[Any], tuple[str, ...]]:
    """Parse prompt/chosen/rejected cells that hold message lists as text, when all of them do.

    A CSV export writes list cells as Python repr, and some JSON and parquet
    files store messages as JSON strings; read as-is they would be scored as
    plain text. A file where only some cells parse is refused rather than
    guessed at.
    """
    cells = {
        (index, key): _messages_from_text(raw[key])
        for index, raw in enumerate(raw_rows)
        if isinstance(raw, dict)
        for key in PREFERENCE_FIELDS
        if isinstance(raw.get(key), str) and raw[key]
    }
    parsed = [cell for cell, messages in cells.items() if messages]
    if not parsed:
        return raw_rows, ()
    plain = [cell for cell, messages in cells.items() if messages is None]
    if plain:
        (index, key), (first_index, first_key) = plain[0], parsed[0]
        raise EvalSetError(
            f"{locations[index]}: field '{key}' is plain text, but other cells hold message lists as text "
            f"(e.g. {locations[first_index]} field '{first_key}'). Save the eval set as .jsonl or .parquet with "
            "real lists of messages, with every prompt/chosen/rejected a message list."
        )
    rows = [
        _row_from_text(raw, {key: cells[index, key] for key in PREFERENCE_FIELDS if (index, key) in cells}, location)
        if isinstance(raw, dict)
        else raw
        for index, (raw, location) in enumerate(zip(raw_rows, locations, strict=True))
    ]
    return rows, (MESSAGES_AS_TEXT_NOTE,)


def _messages_from_text(text: str) -> list[dict[str, Any]] | None:
    """The message list a cell's text holds (`[]` for an empty list), or None when it holds none."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    value = _literal_from_text(text)
    if isinstance(value, list) and all(is_message(item) for item in value):
        return value
    return None


def _literal_from_text(text: str) -> Any:
    """JSON, or else a Python literal (how pandas writes list and dict cells to CSV); `_NOT_A_LITERAL` when neither."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_A_LITERAL


def _row_from_text(raw: dict[str, Any], messages: dict[str, list[Any]], location: str) -> dict[str, Any]:
    """The row as it was before its lists were written as text: an empty cell was a missing value."""
    text_fields = PREFERENCE_FIELDS + TEMPLATE_FIELDS
    row = {key: value for key, value in raw.items() if not (key in text_fields and isinstance(value, str) and not value)}
    row.update(messages)
    for key in TEMPLATE_FIELDS:
        if isinstance(row.get(key), str):
            row[key] = _template_value_from_text(row[key], key, location)
    return row


def _template_value_from_text(text: str, key: str, location: str) -> Any:
    value = _literal_from_text(text)
    if value is _NOT_A_LITERAL:
        raise EvalSetError(
            f"{location}: field '{key}' is text that is neither JSON nor a Python literal. "
            'Write it as JSON, e.g. [{"type": "function", "function": {...}}] for tools or '
            '{"enable_thinking": false} for chat_template_kwargs.'
        )
    return value


def _validate(raw_rows: list[Any], locations: list[str]) -> tuple[list[dict[str, Any]], bool, bool]:
    first = raw_rows[0]
    _check_row_shape(first, locations[0])
    conversational = isinstance(first["chosen"], list)
    implicit = "prompt" not in first or first["prompt"] is None
    rows = []
    for raw, location in zip(raw_rows, locations, strict=True):
        _check_row_shape(raw, location)
        has_prompt = raw.get("prompt") is not None
        if has_prompt == implicit:
            raise EvalSetError(
                f"{location}: this row {'has' if has_prompt else 'has no'} 'prompt' but the first row "
                f"({locations[0]}) {'has none' if implicit else 'has one'}. TRL decides the format from the first "
                "row; give every row a prompt, or none."
            )
        row = {"chosen": raw["chosen"], "rejected": raw["rejected"]}
        if has_prompt:
            row = {"prompt": raw["prompt"], **row}
        for key, value in row.items():
            _check_field(value, key, conversational, location, allow_empty=key == "prompt")
        if implicit and row["chosen"] == row["rejected"]:
            raise EvalSetError(
                f"{location}: 'chosen' and 'rejected' are identical, so there is no preference to score. "
                "Fix or remove the row."
            )
        rows.append(row)
    if conversational:
        from .evalset_template_fields import add_template_fields

        add_template_fields(rows, raw_rows, locations)
    return rows, conversational, implicit


def check_json_value(value: Any, where: str, depth: int = 0) -> Any:
    """Return `value` if it is JSON data (as the hash and the chat template need); refuse anything else."""
    if depth > _MAX_DEPTH:
        raise EvalSetError(f"{where}: nested more than {_MAX_DEPTH} levels deep. Flatten it.")
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise EvalSetError(
                f"{where}: holds an unpaired surrogate (e.g. a lone \\ud800 escape), which is not text. Fix the text."
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise EvalSetError(f"{where}: has a key {key!r} that is not text. JSON object keys are strings; fix the key.")
            check_json_value(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_json_value(item, f"{where}[{index}]", depth + 1)
    elif value is not None and not isinstance(value, (bool, int, float)):
        raise EvalSetError(
            f"{where}: holds a {type(value).__name__}, which is not JSON data. "
            "Use text, numbers, true/false/null, lists and objects only."
        )
    return value


def _ignored_columns(raw_rows: list[dict[str, Any]], conversational: bool) -> tuple[str, ...]:
    used = set(PREFERENCE_FIELDS) | (set(TEMPLATE_FIELDS) if conversational else set())
    return tuple(sorted({str(key) for raw in raw_rows for key in raw} - used))


def _check_row_shape(raw: Any, location: str) -> None:
    if not isinstance(raw, dict):
        raise EvalSetError(f"{location}: expected a row object with 'chosen' and 'rejected', got {type(raw).__name__}.")
    for key in ("chosen", "rejected"):
        if raw.get(key) is None:
            raise EvalSetError(
                f"{location}: missing field '{key}'. Every row needs 'chosen' and 'rejected' "
                "(and 'prompt', unless the prompt is implicit in both)."
            )


def _check_field(value: Any, key: str, conversational: bool, location: str, *, allow_empty: bool) -> None:
    if conversational:
        if not isinstance(value, list):
            raise EvalSetError(
                f"{location}: field '{key}' is a {type(value).__name__}, but the first row is conversational "
                "(lists of role/content messages). Use one format for the whole file."
            )
        for index, message in enumerate(value):
            _check_message(message, f"{location}: field '{key}' message {index}")
    elif not isinstance(value, str):
        raise EvalSetError(
            f"{location}: field '{key}' is a {type(value).__name__}, but the first row is in standard format "
            "(strings). Use one format for the whole file."
        )
    check_json_value(value, f"{location}: field '{key}'")
    if not value and not allow_empty:
        raise EvalSetError(
            f"{location}: field '{key}' is empty. DPO scores a non-empty chosen and rejected completion; "
            "fill it or remove the row."
        )


def _check_message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise EvalSetError(f"{where}: expected an object with 'role' and 'content', got {type(message).__name__}.")
    role = message.get("role")
    if role not in MESSAGE_ROLES:
        raise EvalSetError(f"{where}: role {role!r} is not one of {', '.join(MESSAGE_ROLES)}. Fix the role.")
    if not isinstance(message.get("content"), str):
        raise EvalSetError(f"{where}: missing or non-string 'content'. Every message needs its text in 'content'.")


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """TRL's `extract_prompt`, quirks included: the shared beginning of `chosen` and `rejected`.

    Works on strings and on message lists. When the two differ, a space just
    before the first difference goes to the completions. When one is a prefix
    of the other, the loop ends without a difference and the split falls one
    element before the shorter one's end, as in TRL.
    """
    index = 0
    for index in range(min(len(chosen), len(rejected))):
        if chosen[index] != rejected[index]:
            if chosen[index - 1] == " ":
                index -= 1
            break
    return chosen[:index], chosen[index:], rejected[index:]
