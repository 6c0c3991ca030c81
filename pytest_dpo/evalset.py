"""Preference eval sets: loading, validation, canonical hash, TRL-identical tokenization.

Loads `.jsonl`, `.json`, `.parquet`, `.csv` files and `datasets` `save_to_disk`
folders in TRL's three preference formats (standard, conversational, implicit
prompt). Every problem is reported with the file, the line or row, the field
and what to do. Tokenization reproduces TRL 1.16 `DPOTrainer._prepare_dataset`
step for step; this module never imports trl.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MESSAGE_ROLES = ("system", "user", "assistant", "tool", "developer")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class EvalSetError(ValueError):
    """The eval set cannot be used; the message names the file, the line or row, and the fix."""


@dataclass(frozen=True)
class EvalSet:
    """A validated preference eval set.

    Attributes:
        path (`str`): where it was loaded from (`"<memory>"` for rows given directly).
        rows (`list[dict]`): the rows, each with `chosen`, `rejected` and, unless
            the prompt is implicit, `prompt`; other columns are dropped.
        locations (`list[str]`): where each row is, e.g. `eval.jsonl:7`, for messages.
        conversational (`bool`): rows are lists of role/content messages.
        implicit_prompt (`bool`): rows have no `prompt`; TRL extracts it from the
            common beginning of `chosen` and `rejected`.
        sha256 (`str`): canonical content hash: the same rows in any file format
            and any key order hash the same.
    """

    path: str
    rows: list[dict[str, Any]]
    locations: list[str]
    conversational: bool
    implicit_prompt: bool
    sha256: str

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
        EvalSetError: the file is missing, unreadable or empty, or a row is
            malformed; the message names the file and line/row and the fix.

    Example:
        >>> eval_set = load_eval_set("fixtures/data/eval_standard.jsonl")
        >>> eval_set.format, len(eval_set)
        ('standard', 24)
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        raw_rows, locations = _read(path)
        name = str(path)
    else:
        raw_rows = list(source)
        locations = [f"<memory> row {index}" for index in range(len(raw_rows))]
        name = "<memory>"
    if not raw_rows:
        raise EvalSetError(f"{name}: the eval set has no rows. Add preference rows with 'chosen' and 'rejected'.")
    rows, conversational, implicit = _validate(raw_rows, locations)
    return EvalSet(
        path=name,
        rows=rows,
        locations=locations,
        conversational=conversational,
        implicit_prompt=implicit,
        sha256=canonical_sha256(rows),
    )


def canonical_sha256(rows: Sequence[dict[str, Any]]) -> str:
    """SHA-256 of the rows' preference fields, independent of file format and key order."""
    digest = hashlib.sha256()
    for row in rows:
        canonical = {key: row[key] for key in PREFERENCE_FIELDS if key in row}
        digest.update(json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _read(path: Path) -> tuple[list[Any], list[str]]:
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


def _read_jsonl(path: Path) -> tuple[list[Any], list[str]]:
    rows, locations = [], []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise EvalSetError(
                    f"{path}:{line_number}: not valid JSON ({error.msg} at column {error.colno}). "
                    "Each line must be one JSON object; fix or remove this line."
                ) from None
            locations.append(f"{path}:{line_number}")
    return rows, locations


def _read_json(path: Path) -> tuple[list[Any], list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise EvalSetError(
            f"{path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno}). "
            "A .json eval set is a list of row objects; for one object per line use .jsonl."
        ) from None
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
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            rows.append({key: value for key, value in row.items() if key is not None})
            locations.append(f"{path}:{reader.line_num}")
    return rows, locations


def _parquet_table(path: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as error:  # pyarrow raises several unrelated types for bad files
        raise EvalSetError(f"{path}: not a readable parquet file ({error}). Re-export the eval set.") from None


def _read_arrow_rows(path: Path, table: Any) -> tuple[list[Any], list[str]]:
    rows = [{key: _drop_null_message_keys(value) for key, value in row.items()} for row in table.to_pylist()]
    return rows, [f"{path} row {index}" for index in range(table.num_rows)]


def _is_message(value: Any) -> bool:
    return isinstance(value, dict) and "role" in value


def _drop_null_message_keys(value: Any) -> Any:
    """Arrow gives every message every key any message has, filling the missing ones with None; undo that."""
    if isinstance(value, list) and all(_is_message(item) for item in value):
        return [{key: item_value for key, item_value in item.items() if item_value is not None} for item in value]
    return value


def _read_saved_dataset(path: Path) -> tuple[list[Any], list[str]]:
    import pyarrow as pa

    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise EvalSetError(
            f"{path}: this is a DatasetDict with splits {splits}. Point at one split's folder, "
            f"e.g. {path / (splits[0] if splits else 'test')}."
        )
    state_file = path / "state.json"
    if not state_file.exists():
        raise EvalSetError(
            f"{path}: a folder, but not one written by datasets' save_to_disk (no state.json). "
            f"Point at a {', '.join(SUFFIXES)} file instead."
        )
    data_files = [path / entry["filename"] for entry in json.loads(state_file.read_text())["_data_files"]]
    tables = []
    for data_file in data_files:
        with pa.memory_map(str(data_file)) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return _read_arrow_rows(path, pa.concat_tables(tables) if tables else pa.table({}))


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
    return rows, conversational, implicit


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
    conversations); split at the common prefix of the tokenized prompt and
    both full sequences; drop rows whose prompt alone fills `max_length`
    (with `keep_start` truncation). Truncation of the remaining sequences
    happens when they are batched, as in TRL's collator. With `limit`, stop
    once that many rows are kept (the rest are not tokenized).
    """
    scored, dropped = [], []
    for index, row in enumerate(eval_set.rows):
        if limit is not None and len(scored) >= limit:
            break
        prompt_ids, chosen_ids, rejected_ids = _tokenize_row(row, tokenizer, eval_set.conversational)
        if max_length is not None and truncation_mode == "keep_start" and len(prompt_ids) >= max_length:
            dropped.append(index)
            continue
        scored.append(TokenizedRow(index, prompt_ids, chosen_ids, rejected_ids))
    return TokenizedEvalSet(rows=scored, dropped_rows=dropped)


def _tokenize_row(row: dict[str, Any], tokenizer: Any, conversational: bool) -> tuple[list[int], list[int], list[int]]:
    if "prompt" in row:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    else:
        prompt, chosen, rejected = extract_prompt(row["chosen"], row["rejected"])
    if conversational:
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
        prompt_chosen_ids = _chat_ids(tokenizer, prompt + chosen)
        prompt_rejected_ids = _chat_ids(tokenizer, prompt + rejected)
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
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, tools=None, **kwargs)["input_ids"]
