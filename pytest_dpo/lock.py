"""The eval-set lock: a frozen eval set and tokenization, like a snapshot baseline.

On first use the eval set's canonical content hash, one hash per row and a
fingerprint of the tokenizer files are written to a lock file (`dpo.lock`,
JSON). Later runs compare against it and fail with the number of rows added,
removed and changed (and whether the tokenizer changed) until the change is
accepted with `--dpo-update-lock`, as `--force-regen` does in
pytest-regressions. Content hashes, not file bytes, are compared: the same
rows as `.jsonl` or `.parquet`, in any key order, are the same eval set.

Pure standard library; the plugin decides where the lock lives and when to check it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .checkpoints import TOKENIZER_FILES
from .evalset import EvalSet, canonical_sha256
from .spelling import option

LOCK_VERSION = 1
NO_TOKENIZER = "none"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHORT = 12


class LockError(ValueError):
    """The lock file cannot be used; the message names the file and the fix."""


def row_hashes(eval_set: EvalSet) -> list[str]:
    """The canonical SHA-256 of each row, in eval-set order.

    A row's hash is `canonical_sha256([row])`: the row's `prompt`/`chosen`/`rejected`
    (and a conversational row's `tools`/`chat_template_kwargs`, when it has them)
    as compact, key-sorted JSON, exactly as the eval set's own `sha256` sees it,
    so the same row in any file format or key order has the same hash.

    Args:
        eval_set (`EvalSet`): a loaded eval set.

    Example:
        >>> eval_set = load_eval_set([{"prompt": "Hi", "chosen": " there", "rejected": " no"}])
        >>> len(row_hashes(eval_set)[0])
        64
    """
    return [canonical_sha256([row]) for row in eval_set.rows]


def tokenizer_fingerprint(tokenizer_dir: Path | None) -> str:
    """SHA-256 over the tokenizer files in a folder, or `"none"` when there is no local folder.

    Every file of `checkpoints.TOKENIZER_FILES` present in the folder enters the hash
    in name order, as its name and its content. JSON files are canonicalised
    first (parsed and dumped with sorted keys), so re-saving a tokenizer with
    other indentation or key order is not a change; a JSON file that does not
    parse enters as its raw bytes.

    Args:
        tokenizer_dir (`Path`, *optional*): the folder the tokenizer is loaded from;
            None when it comes from the Hub by name.

    Raises:
        LockError: the folder does not exist or holds none of the tokenizer files.

    Example:
        >>> tokenizer_fingerprint(None)
        'none'
    """
    if tokenizer_dir is None:
        return NO_TOKENIZER
    folder = Path(tokenizer_dir)
    if not folder.is_dir():
        raise LockError(f"{folder}: tokenizer folder not found. Point at the folder the tokenizer is loaded from.")
    names = sorted(name for name in TOKENIZER_FILES if (folder / name).is_file())
    if not names:
        raise LockError(
            f"{folder}: holds none of the tokenizer files ({', '.join(TOKENIZER_FILES)}). "
            "Point at the folder the tokenizer is loaded from, or save it there (tokenizer.save_pretrained)."
        )
    digest = hashlib.sha256()
    for name in names:
        content = _canonical_file(folder / name)
        # Name and length prefix every file, so no two different folders can feed the same byte stream.
        digest.update(f"{name}\n{len(content)}\n".encode())
        digest.update(content)
    return digest.hexdigest()


def _canonical_file(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix != ".json":
        return data
    try:
        return json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()
    except (UnicodeDecodeError, json.JSONDecodeError):
        return data


@dataclass(frozen=True)
class EvalSetLock:
    """What a lock file records about the eval set and the tokenizer.

    Attributes:
        eval_set_sha256 (`str`): `EvalSet.sha256`, the canonical content hash of all rows in order.
        rows (`int`): the number of rows.
        row_hashes (`tuple[str, ...]`): `row_hashes(eval_set)`, to count what changed.
        tokenizer_fingerprint (`str`): `tokenizer_fingerprint(folder)`, or `"none"`.
        eval_set_path (`str`): where the eval set was loaded from; informational, never compared.
        version (`int`, *optional*, defaults to 1): the lock file format.

    Example:
        >>> lock = build_lock(load_eval_set("eval.jsonl"), Path("checkpoint-4"))
        >>> EvalSetLock.from_json(lock.to_json(), "dpo.lock") == lock
        True
    """

    eval_set_sha256: str
    rows: int
    row_hashes: tuple[str, ...]
    tokenizer_fingerprint: str
    eval_set_path: str
    version: int = LOCK_VERSION

    def __post_init__(self) -> None:
        if not _SHA256.match(self.eval_set_sha256):
            raise LockError(f"'eval_set_sha256' is not a SHA-256 hex digest: {self.eval_set_sha256!r}.")
        if self.rows != len(self.row_hashes):
            raise LockError(f"'rows' is {self.rows} but 'row_hashes' has {len(self.row_hashes)} entries.")
        for index, row_hash in enumerate(self.row_hashes):
            if not _SHA256.match(row_hash):
                raise LockError(f"'row_hashes' entry {index} is not a SHA-256 hex digest: {row_hash!r}.")
        if self.tokenizer_fingerprint != NO_TOKENIZER and not _SHA256.match(self.tokenizer_fingerprint):
            raise LockError(
                f"'tokenizer_fingerprint' is neither a SHA-256 hex digest nor {NO_TOKENIZER!r}: "
                f"{self.tokenizer_fingerprint!r}."
            )

    def to_json(self) -> str:
        """The lock file's text: indented JSON with sorted keys and a final newline, the same for the same lock."""
        return json.dumps(asdict(self), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, path: str | Path) -> EvalSetLock:
        """Read a lock from the text of the lock file at `path`.

        Args:
            text (`str`): the file's content.
            path (`str` or `Path`): the file, named in errors.

        Raises:
            LockError: the text is not JSON, misses or mistypes a field, or was written
                in another lock format version; the message names the file and the fix.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise _unreadable(path, f"not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
        if not isinstance(data, dict):
            raise _unreadable(path, f"expected a JSON object, got {type(data).__name__}")
        if "version" not in data:
            raise _unreadable(path, "no 'version' field")
        if data["version"] != LOCK_VERSION:
            raise _unreadable(path, f"lock format version {data['version']!r}, this pytest-dpo reads version {LOCK_VERSION}")
        expected: dict[str, tuple[type, str]] = {
            "eval_set_sha256": (str, "a string"),
            "rows": (int, "an integer"),
            "row_hashes": (list, "a list"),
            "tokenizer_fingerprint": (str, "a string"),
            "eval_set_path": (str, "a string"),
        }
        for key, (kind, kind_name) in expected.items():
            value = data.get(key)
            # bool is an int subclass; a count of True rows is malformed, not 1.
            if not isinstance(value, kind) or isinstance(value, bool):
                raise _unreadable(path, f"field '{key}' is missing or not {kind_name}")
        if not all(isinstance(row_hash, str) for row_hash in data["row_hashes"]):
            raise _unreadable(path, "field 'row_hashes' must be a list of strings")
        try:
            return cls(
                eval_set_sha256=data["eval_set_sha256"],
                rows=data["rows"],
                row_hashes=tuple(data["row_hashes"]),
                tokenizer_fingerprint=data["tokenizer_fingerprint"],
                eval_set_path=data["eval_set_path"],
                version=data["version"],
            )
        except LockError as error:
            raise _unreadable(path, str(error).rstrip(".")) from None

    def matches(self, other: EvalSetLock) -> bool:
        """Whether `other` locks the same eval-set content and the same tokenizer (paths are not compared)."""
        return (self.eval_set_sha256, self.tokenizer_fingerprint) == (other.eval_set_sha256, other.tokenizer_fingerprint)


def _fix() -> str:
    return f"If the change is intended, run again with {option('update_lock')} to accept it."


def _unreadable(path: str | Path, reason: str) -> LockError:
    return LockError(
        f"{path}: not a readable eval-set lock ({reason}). Delete it to lock the current eval set again, "
        f"or run with {option('update_lock')} to rewrite it."
    )


def row_drift(locked: Sequence[str], current: Sequence[str]) -> tuple[int, int, int]:
    """Count rows `(added, removed, changed)` between two lists of row hashes.

    The rule: rows are aligned by index. Over the first `min(len(locked), len(current))`
    indices, each index whose hashes differ is one changed row; the rows past the
    shorter list are added (the current list is longer) or removed (it is shorter).
    So reordering rows changes them, and a row inserted or deleted in the middle also
    counts every later row whose neighbour moved into its place as changed.

    Example:
        >>> row_drift(["a", "b"], ["a", "x", "c"])
        (1, 0, 1)
    """
    changed = sum(1 for old, new in zip(locked, current) if old != new)
    return max(len(current) - len(locked), 0), max(len(locked) - len(current), 0), changed


class LockDrift(LockError):
    """The eval set or the tokenizer differs from the lock file.

    Attributes:
        path (`Path`): the lock file.
        locked (`EvalSetLock`): what the file records.
        current (`EvalSetLock`): what this run sees.
        added (`int`), removed (`int`), changed (`int`): row counts by `row_drift`'s rule.
        tokenizer_changed (`bool`): the tokenizer fingerprint differs.
    """

    def __init__(self, path: str | Path, locked: EvalSetLock, current: EvalSetLock) -> None:
        self.path = Path(path)
        self.locked = locked
        self.current = current
        self.added, self.removed, self.changed = row_drift(locked.row_hashes, current.row_hashes)
        self.tokenizer_changed = locked.tokenizer_fingerprint != current.tokenizer_fingerprint
        super().__init__(self._message())

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.path, self.locked, self.current)

    def _message(self) -> str:
        locked, current = self.locked, self.current
        tokenizer = f"fingerprint {current.tokenizer_fingerprint[:_SHORT]}, locked {locked.tokenizer_fingerprint[:_SHORT]}"
        if locked.eval_set_sha256 == current.eval_set_sha256:
            return (
                f"{self.path}: the tokenization changed since the lock (tokenizer files differ: {tokenizer}); "
                f"the eval set {current.eval_set_path} is unchanged. {_fix()}"
            )
        tallies = ((self.added, "added"), (self.removed, "removed"), (self.changed, "changed"))
        counts = [f"{count} {kind}" for count, kind in tallies if count]
        if counts:
            first_count = self.added or self.removed or self.changed
            counts[0] = counts[0].replace(" ", " row " if first_count == 1 else " rows ", 1)
        else:
            counts = ["content changed"]
        details = ", ".join(counts) + ("; tokenizer changed" if self.tokenizer_changed else "")
        moved = f" (locked from {locked.eval_set_path})" if locked.eval_set_path != current.eval_set_path else ""
        return (
            f"{self.path}: the eval set drifted from the lock ({details}) — {current.eval_set_path} "
            f"sha256 {current.eval_set_sha256[:_SHORT]}, locked {locked.eval_set_sha256[:_SHORT]}{moved}. {_fix()}"
        )


def build_lock(eval_set: EvalSet, tokenizer_dir: Path | None) -> EvalSetLock:
    """The lock of an eval set and the tokenizer in `tokenizer_dir`.

    Args:
        eval_set (`EvalSet`): a loaded eval set.
        tokenizer_dir (`Path`, *optional*): the local tokenizer folder; None when the
            tokenizer comes from the Hub by name (fingerprint `"none"`).

    Example:
        >>> lock = build_lock(load_eval_set("eval.jsonl"), Path("checkpoint-4"))
        >>> lock.rows == len(lock.row_hashes)
        True
    """
    return EvalSetLock(
        eval_set_sha256=eval_set.sha256,
        rows=len(eval_set),
        row_hashes=tuple(row_hashes(eval_set)),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer_dir),
        eval_set_path=eval_set.path,
    )


def check_lock(path: Path, current: EvalSetLock, *, update: bool) -> str:
    """Compare `current` with the lock file at `path`, writing it when missing or accepted.

    Args:
        path (`Path`): the lock file, e.g. `dpo.lock`.
        current (`EvalSetLock`): the lock of this run's eval set and tokenizer.
        update (`bool`): accept a difference (and rewrite an unreadable file), as `--dpo-update-lock` does.

    Returns:
        `str`: `"created"` (no file yet, written now), `"unchanged"` (same eval-set
        content and tokenizer; the file is left untouched), or `"updated"` (rewritten
        because `update` was given).

    Raises:
        LockDrift: the eval set or the tokenizer differs and `update` is False.
        LockError: the file cannot be read or parsed and `update` is False, or it cannot be written.

    Example:
        >>> check_lock(Path("dpo.lock"), build_lock(eval_set, tokenizer_dir), update=False)
        'created'
    """
    path = Path(path)
    if not path.exists():
        _write_atomic(path, current.to_json())
        return "created"
    try:
        locked = EvalSetLock.from_json(_read(path), path)
    except LockError:
        if not update:
            raise
        _write_atomic(path, current.to_json())
        return "updated"
    if locked.matches(current):
        return "unchanged"
    if not update:
        raise LockDrift(path, locked, current)
    _write_atomic(path, current.to_json())
    return "updated"


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _unreadable(path, "not UTF-8 text") from None
    except OSError as error:
        raise _unreadable(path, error.strerror or type(error).__name__) from None


def _write_atomic(path: Path, text: str) -> None:
    """Write the lock atomically: a crash never leaves half a lock."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text.encode("utf-8"))
    except OSError as error:
        raise LockError(f"{path}: cannot write the eval-set lock ({error.strerror}). Make its folder writable.") from None
