"""Preference eval sets: loading, validation, canonical hash, TRL-identical tokenization.

Loads `.jsonl`, `.json`, `.parquet`, `.csv` files and `datasets` `save_to_disk`
folders in TRL's three preference formats (standard, conversational, implicit
prompt). Every problem, including a file that cannot be read or decoded, is
reported as an `EvalSetError` with the file, the line or row, the field and
what to do. Conversational rows keep their `tools` and `chat_template_kwargs`,
which TRL passes to the chat template. Message lists stored as text (a CSV
export, JSON strings) are read as conversations. Tokenization reproduces TRL
1.16 `DPOTrainer._prepare_dataset` step for step; this module never imports trl.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MESSAGE_ROLES = ("system", "user", "assistant", "tool", "developer")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
TEMPLATE_FIELDS = ("tools", "chat_template_kwargs")
VISION_FIELDS = ("image", "images")
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
MESSAGES_AS_TEXT_NOTE = "prompt/chosen/rejected cells hold message lists as text; read as conversations"
# Arguments TRL 1.16 gives apply_chat_template itself: the same key in chat_template_kwargs makes TRL fail.
_RESERVED_TEMPLATE_KWARGS = ("conversation", "tokenize", "return_dict", "add_generation_prompt")
_MAX_DEPTH = 100
_NOT_A_LITERAL = object()
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
    """

    path: str
    rows: list[dict[str, Any]]
    locations: list[str]
    conversational: bool
    implicit_prompt: bool
    sha256: str
    ignored_columns: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

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


@dataclass(frozen=True)
class TokenizedRow:
    """One eval-set row as TRL tokenizes it: the prompt and each completion, split at their common prefix."""

    row: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass(frozen=True)
class TokenizedEvalSet:
    """The rows to score (in eval-set order) and the rows TRL drops."""

    rows: list[TokenizedRow]
    dropped_rows: list[int]


def load_eval_set(source: str | Path | Sequence[dict[str, Any]]) -> EvalSet:
    """Load and validate a preference eval set.

    Args:
        source (`str`, `Path` or a list of row dicts): a `.jsonl`, `.json`,
            `.parquet` or `.csv` file, a folder written by `datasets`'
            `save_to_disk`, or the rows themselves.

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
    name, raw_rows, locations = _read_source(source)
    if not raw_rows:
        raise EvalSetError(f"{name}: the eval set has no rows. Add preference rows with 'chosen' and 'rejected'.")
    _refuse_vision_rows(raw_rows, locations)
    raw_rows, notes = _read_messages_stored_as_text(raw_rows, locations)
    rows, conversational, implicit = _validate(raw_rows, locations)
    return EvalSet(
        path=name,
        rows=rows,
        locations=locations,
        conversational=conversational,
        implicit_prompt=implicit,
        sha256=canonical_sha256(rows),
        ignored_columns=_ignored_columns(raw_rows, conversational),
        notes=notes,
    )


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


def _read_source(source: Any) -> tuple[str, list[Any], list[str]]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        rows, locations = _read(path)
        return str(path), rows, locations
    try:
        rows = list(source)
    except TypeError:
        raise EvalSetError(
            f"<memory>: expected a path or a list of row dicts, got {type(source).__name__}. "
            "Pass the eval set's file or folder, or its rows."
        ) from None
    return "<memory>", rows, [f"<memory> row {index}" for index in range(len(rows))]


def _read(path: Path) -> tuple[list[Any], list[str]]:
    try:
        return _read_path(path)
    except OSError as error:
        raise EvalSetError(
            f"{path}: cannot be read ({error.strerror or error}: {error.filename or path}). "
            "Check that it is a file or save_to_disk folder you have permission to read."
        ) from None


def _read_path(path: Path) -> tuple[list[Any], list[str]]:
    if not path.exists():
        raise EvalSetError(f"{path}: eval set not found. Check the path (it is resolved from {Path.cwd()}).")
    if path.is_dir():
        return _read_saved_dataset(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise EvalSetError(
            f"{path}: unsupported eval set format '{suffix}'. Use one of {', '.join(SUFFIXES)} "
            "or a folder written by datasets' save_to_disk."
        )
    if path.stat().st_size == 0:
        raise EvalSetError(f"{path}: the file is empty. Add preference rows with 'chosen' and 'rejected'.")
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    return _read_arrow_rows(path, _parquet_table(path))


def _read_text(path: Path, encoding: str = "utf-8", fix: str = "Save the file as UTF-8.") -> str:
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise EvalSetError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x} at byte offset {error.start}). {fix}"
        ) from None


def _parse_json(text: str, where: str, fix: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        line = f":{error.lineno}" if isinstance(error, json.JSONDecodeError) else ""
        raise EvalSetError(f"{where}{line}: not valid JSON ({_json_error_detail(error)}). {fix}") from None


def _json_error_detail(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at column {error.colno}"
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error)  # e.g. an integer with more digits than Python converts


def _read_jsonl(path: Path) -> tuple[list[Any], list[str]]:
    rows, locations = [], []
    # newline=None splits lines as reading the file in text mode does.
    for line_number, line in enumerate(io.StringIO(_read_text(path), newline=None), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except (ValueError, RecursionError) as error:
            raise EvalSetError(
                f"{path}:{line_number}: not valid JSON ({_json_error_detail(error)}). "
                "Each line must be one JSON object; fix or remove this line."
            ) from None
        locations.append(f"{path}:{line_number}")
    return rows, locations


def _read_json(path: Path) -> tuple[list[Any], list[str]]:
    text = io.StringIO(_read_text(path), newline=None).read()
    data = _parse_json(
        text, str(path), "A .json eval set is a list of row objects; for one object per line use .jsonl."
    )
    if isinstance(data, dict) and any(_is_message(item) for value in data.values() if isinstance(value, list) for item in value):
        raise EvalSetError(
            f"{path}: holds a single row object. A .json eval set is a list of rows: wrap it in [ ... ], "
            "or use .jsonl with one row per line."
        )
    if isinstance(data, dict) and data and all(isinstance(column, list) for column in data.values()):
        lengths = {len(column) for column in data.values()}
        if len(lengths) != 1:
            raise EvalSetError(f"{path}: the columns have different lengths {sorted(lengths)}. Give every column one value per row.")
        data = [dict(zip(data, values)) for values in zip(*data.values())]
    if not isinstance(data, list):
        raise EvalSetError(
            f"{path}: expected a JSON list of row objects (or an object of equal-length columns), "
            f"got {type(data).__name__}."
        )
    return data, [f"{path} row {index}" for index in range(len(data))]


def _read_csv(path: Path) -> tuple[list[Any], list[str]]:
    rows, locations = [], []
    # utf-8-sig: spreadsheet exports start with a byte-order mark that would otherwise rename the first column.
    reader = csv.DictReader(io.StringIO(_read_text(path, "utf-8-sig"), newline=""))
    try:
        for row in reader:
            rows.append({key: value for key, value in row.items() if key is not None})
            locations.append(f"{path}:{reader.line_num}")
    except csv.Error as error:
        # DictReader.line_num is only updated after a whole row is read; the inner reader's is current.
        raise EvalSetError(
            f"{path}:{reader.reader.line_num}: not readable as CSV ({error}). Fix this line, or save the eval set as .jsonl."
        ) from None
    return rows, locations


def _parquet_table(path: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as error:  # pyarrow raises several unrelated types for bad files
        raise EvalSetError(f"{path}: not a readable parquet file ({error}). Re-export the eval set.") from None


def _read_arrow_rows(path: Path, table: Any) -> tuple[list[Any], list[str]]:
    try:
        records = table.to_pylist()
    except Exception as error:  # as above: pyarrow's conversion errors have no common base
        raise EvalSetError(
            f"{path}: its columns cannot be read as Python values ({error}). "
            "Re-export the eval set with text and list columns."
        ) from None
    rows = [{key: _undo_arrow_nulls(key, value) for key, value in row.items()} for row in records]
    return rows, [f"{path} row {index}" for index in range(table.num_rows)]


def _is_message(value: Any) -> bool:
    return isinstance(value, dict) and "role" in value


def _undo_arrow_nulls(key: str, value: Any) -> Any:
    """Arrow gives every struct every key any row's struct has, filling the missing ones with None; undo that.

    The rows then read as written, as from .jsonl (see `load_eval_set` for what TRL sees instead).
    """
    if key in TEMPLATE_FIELDS:
        return _drop_none_values(value)
    return _drop_null_message_keys(value)


def _drop_null_message_keys(value: Any) -> Any:
    if isinstance(value, list) and all(_is_message(item) for item in value):
        return [{key: item_value for key, item_value in item.items() if item_value is not None} for item in value]
    return value


def _drop_none_values(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _drop_none_values(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_drop_none_values(item) for item in value]
    return value


def _read_saved_dataset(path: Path) -> tuple[list[Any], list[str]]:
    import pyarrow as pa

    resave = "The folder is damaged: save the dataset again with save_to_disk."
    if (path / "dataset_dict.json").exists():
        index = _parse_json(_read_text(path / "dataset_dict.json", fix=resave), str(path / "dataset_dict.json"), resave)
        splits = index.get("splits", []) if isinstance(index, dict) else []
        raise EvalSetError(
            f"{path}: this is a DatasetDict with splits {splits}. Point at one split's folder, "
            f"e.g. {path / (splits[0] if splits and isinstance(splits[0], str) else 'test')}."
        )
    state_file = path / "state.json"
    if not state_file.exists():
        raise EvalSetError(
            f"{path}: a folder, but not one written by datasets' save_to_disk (no state.json). "
            f"Point at a {', '.join(SUFFIXES)} file instead."
        )
    state = _parse_json(_read_text(state_file, fix=resave), str(state_file), resave)
    tables = [_arrow_file_table(data_file, resave) for data_file in _saved_data_files(path, state, state_file, resave)]
    try:
        table = pa.concat_tables(tables) if tables else pa.table({})
    except Exception as error:  # pyarrow raises several unrelated types for mismatched files
        raise EvalSetError(f"{path}: its data files do not fit together ({error}). {resave}") from None
    return _read_arrow_rows(path, table)


def _saved_data_files(path: Path, state: Any, state_file: Path, resave: str) -> list[Path]:
    try:
        return [path / entry["filename"] for entry in state["_data_files"]]
    except (KeyError, TypeError):
        raise EvalSetError(f"{state_file}: no '_data_files' list naming the .arrow files. {resave}") from None


def _arrow_file_table(data_file: Path, resave: str) -> Any:
    import pyarrow as pa

    if not data_file.is_file():
        raise EvalSetError(f"{data_file}: listed in state.json but missing. {resave}")
    try:
        with pa.memory_map(str(data_file)) as source:
            return pa.ipc.open_stream(source).read_all()
    except Exception as error:  # pyarrow raises several unrelated types for bad files
        raise EvalSetError(f"{data_file}: not a readable Arrow file ({error}). {resave}") from None


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
    if isinstance(value, list) and all(_is_message(item) for item in value):
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
        _add_template_fields(rows, raw_rows, locations)
    return rows, conversational, implicit


def _add_template_fields(rows: list[dict[str, Any]], raw_rows: list[dict[str, Any]], locations: list[str]) -> None:
    """Give each conversational row the `tools` and `chat_template_kwargs` TRL 1.16 passes to the chat template."""
    _check_chat_template_kwargs_everywhere(raw_rows, locations)
    readers = {"tools": _read_tools, "chat_template_kwargs": _read_chat_template_kwargs}
    for key, read in readers.items():
        column = [_check_json_value(raw.get(key), f"{location}: field '{key}'") for raw, location in zip(raw_rows, locations)]
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
        value = _check_json_value(_tools_from_json(value, where), where)
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
            f"{where} is text but not valid JSON ({_json_error_detail(error)}). TRL 1.16 parses text tools "
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


def _check_json_value(value: Any, where: str, depth: int = 0) -> Any:
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
            _check_json_value(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_value(item, f"{where}[{index}]", depth + 1)
    elif value is not None and not isinstance(value, (bool, int, float)):
        raise EvalSetError(
            f"{where}: holds a {type(value).__name__}, which is not JSON data. "
            "Use text, numbers, true/false/null, lists and objects only."
        )
    return value


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
    _check_json_value(value, f"{location}: field '{key}'")
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


def common_prefix_length(ids: Sequence[int], other_ids: Sequence[int]) -> int:
    """Number of leading tokens two id lists share."""
    length = 0
    for token, other_token in zip(ids, other_ids):
        if token != other_token:
            break
        length += 1
    return length


def check_tokenizer(tokenizer: Any, eval_set: EvalSet, tokenizer_source: str) -> None:
    """Refuse a tokenizer that cannot tokenize this eval set the way TRL does."""
    if not eval_set.conversational and tokenizer.eos_token is None:
        raise EvalSetError(
            f"The tokenizer from {tokenizer_source} has no EOS token, but TRL appends it to every standard-format "
            "completion. Set `eos_token` in its tokenizer_config.json (the token the model ends answers with)."
        )
    if eval_set.conversational and not getattr(tokenizer, "chat_template", None):
        raise EvalSetError(
            f"{eval_set.path}: conversational rows need a chat template, but the tokenizer from {tokenizer_source} "
            "has none. Save the tokenizer with its chat template, or convert the rows to standard format."
        )


def tokenize_eval_set(
    eval_set: EvalSet, tokenizer: Any, max_length: int | None, truncation_mode: str, limit: int | None = None
) -> TokenizedEvalSet:
    """Tokenize every row exactly as TRL 1.16 `DPOTrainer._prepare_dataset` does.

    Steps: extract implicit prompts; append the EOS string to standard-format
    completions that do not already end with it; tokenize prompt,
    prompt+chosen and prompt+rejected (through the chat template for
    conversations, with the row's `tools` and `chat_template_kwargs`); split at the common prefix of the tokenized prompt and
    both full sequences; drop rows whose prompt alone fills `max_length`
    (with `keep_start` truncation). Truncation of the remaining sequences
    happens when they are batched, as in TRL's collator. With `limit`, stop
    once that many rows are kept (the rest are not tokenized).
    """
    scored, dropped = [], []
    for index, row in enumerate(eval_set.rows):
        if limit is not None and len(scored) >= limit:
            break
        prompt_ids, chosen_ids, rejected_ids = _tokenized_or_refused(eval_set, index, tokenizer)
        if max_length is not None and truncation_mode == "keep_start" and len(prompt_ids) >= max_length:
            dropped.append(index)
            continue
        scored.append(TokenizedRow(index, prompt_ids, chosen_ids, rejected_ids))
    return TokenizedEvalSet(rows=scored, dropped_rows=dropped)


def _tokenized_or_refused(eval_set: EvalSet, index: int, tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
    """The row's tokens; a chat template that fails on the row (as TRL's would) is an error naming the row."""
    try:
        return _tokenize_row(eval_set.rows[index], tokenizer, eval_set.conversational)
    except Exception as error:  # jinja2 raises TemplateError, templates raise whatever their code meets
        if not eval_set.conversational:
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EvalSetError(
            f"{eval_set.locations[index]}: the tokenizer's chat template fails on this row ({reason}), as it "
            "would in TRL. Fix the row (a role order, system message or tools the template does not accept), "
            "remove it, or use the tokenizer the model was trained with."
        ) from None


def _tokenize_row(row: dict[str, Any], tokenizer: Any, conversational: bool) -> tuple[list[int], list[int], list[int]]:
    if "prompt" in row:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    else:
        prompt, chosen, rejected = extract_prompt(row["chosen"], row["rejected"])
    if conversational:
        template_kwargs = {"tools": row.get("tools"), **row.get("chat_template_kwargs", {})}
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True, **template_kwargs)
        prompt_chosen_ids = _chat_ids(tokenizer, prompt + chosen, **template_kwargs)
        prompt_rejected_ids = _chat_ids(tokenizer, prompt + rejected, **template_kwargs)
    else:
        eos = tokenizer.eos_token
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = tokenizer(text=prompt)["input_ids"]
        prompt_chosen_ids = tokenizer(text=prompt + chosen)["input_ids"]
        prompt_rejected_ids = tokenizer(text=prompt + rejected)["input_ids"]
    prompt_length = min(
        common_prefix_length(prompt_ids, prompt_chosen_ids),
        common_prefix_length(prompt_ids, prompt_rejected_ids),
    )
    return (
        list(prompt_ids[:prompt_length]),
        list(prompt_chosen_ids[prompt_length:]),
        list(prompt_rejected_ids[prompt_length:]),
    )


def _chat_ids(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]
