"""Reading an eval set's source into raw rows and their locations, before any validation.

Owns the file formats: `.jsonl`, `.json`, `.csv`, `.parquet` and `datasets`
`save_to_disk` folders (`SUFFIXES`); a file or folder that is missing,
unreadable, not UTF-8 or not parseable is an `EvalSetError` naming the file,
the line or row, and the fix. Undoes Arrow's null filling so parquet and
`save_to_disk` rows read as the same rows written to `.jsonl`.

Must not validate rows or decide their format (that is `evalset`, whose
`load_eval_set` is the only caller), and must not tokenize. Imports
`EvalSetError` from `evalset`, so `evalset` imports this module lazily.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from .evalset import TEMPLATE_FIELDS, EvalSetError, is_message, json_error_detail

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def read_source(source: Any) -> tuple[str, list[Any], list[str]]:
    """The source's name, its raw rows as read, and where each row is (e.g. `eval.jsonl:7`)."""
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
    return read_arrow_rows(path, _parquet_table(path))


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
        raise EvalSetError(f"{where}{line}: not valid JSON ({json_error_detail(error)}). {fix}") from None


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
                f"{path}:{line_number}: not valid JSON ({json_error_detail(error)}). "
                "Each line must be one JSON object; fix or remove this line."
            ) from None
        locations.append(f"{path}:{line_number}")
    return rows, locations


def _read_json(path: Path) -> tuple[list[Any], list[str]]:
    text = io.StringIO(_read_text(path), newline=None).read()
    data = _parse_json(
        text, str(path), "A .json eval set is a list of row objects; for one object per line use .jsonl."
    )
    if isinstance(data, dict) and any(is_message(item) for value in data.values() if isinstance(value, list) for item in value):
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


def read_arrow_rows(path: str | Path, table: Any) -> tuple[list[Any], list[str]]:
    """A pyarrow table's rows with Arrow's null filling undone, each located as `{path} row {index}`."""
    try:
        records = table.to_pylist()
    except Exception as error:  # as above: pyarrow's conversion errors have no common base
        raise EvalSetError(
            f"{path}: its columns cannot be read as Python values ({error}). "
            "Re-export the eval set with text and list columns."
        ) from None
    rows = [{key: _undo_arrow_nulls(key, value) for key, value in row.items()} for row in records]
    return rows, [f"{path} row {index}" for index in range(table.num_rows)]


def _undo_arrow_nulls(key: str, value: Any) -> Any:
    """Arrow gives every struct every key any row's struct has, filling the missing ones with None; undo that.

    The rows then read as written, as from .jsonl (see `load_eval_set` for what TRL sees instead).
    """
    if key in TEMPLATE_FIELDS:
        return _drop_none_values(value)
    return _drop_null_message_keys(value)


def _drop_null_message_keys(value: Any) -> Any:
    if isinstance(value, list) and all(is_message(item) for item in value):
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
    return read_arrow_rows(path, table)


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
