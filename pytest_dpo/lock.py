"""The eval-set lock: frozen eval sets and tokenization, like a snapshot baseline.

On first use each named eval set's canonical content hash, one hash per row, its
Hub revision (none for a local file) and a fingerprint of the tokenizer files are
written to a lock file (`dpo.lock`, JSON, one entry per set). Later runs compare
each set they score with its entry and fail with the number of rows added,
removed and changed (and whether the tokenizer or the revision changed) until
the change is accepted with `--dpo-update-lock`, as `--force-regen` does in
pytest-regressions. A set the file lacks is added; a set the run does not score
keeps its entry. Content hashes, not file bytes, are compared: the same rows as
`.jsonl` or `.parquet`, in any key order, are the same eval set.

Files are written as format version 2, `{"version": 2, "eval_sets": {name: entry}}`;
a version 1 file (one entry, its fields at top level) reads as the set `default`.

Pure standard library; the plugin decides where the lock lives and when to check it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .checkpoints import TOKENIZER_FILES
from .eval_sets import DEFAULT_EVAL_SET
from .evalset import EvalSet, canonical_sha256
from .spelling import option

LOCK_VERSION = 2
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
    """What a lock file records about one eval set and the tokenizer.

    Attributes:
        eval_set_sha256 (`str`): `EvalSet.sha256`, the canonical content hash of all rows in order.
        rows (`int`): the number of rows.
        row_hashes (`tuple[str, ...]`): `row_hashes(eval_set)`, to count what changed.
        tokenizer_fingerprint (`str`): `tokenizer_fingerprint(folder)`, or `"none"`.
        eval_set_path (`str`): where the eval set was loaded from; informational, never compared.
        revision (`str`, *optional*): `EvalSet.revision`, the Hub commit the set was read at; None for
            a local file. Compared: a dataset branch that moved is drift even with the same content.

    Example:
        >>> lock = build_lock(load_eval_set("eval.jsonl"), Path("checkpoint-4"))
        >>> locks_from_json(locks_to_json({"default": lock}), "dpo.lock") == {"default": lock}
        True
    """

    eval_set_sha256: str
    rows: int
    row_hashes: tuple[str, ...]
    tokenizer_fingerprint: str
    eval_set_path: str
    revision: str | None = None

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

    def matches(self, other: EvalSetLock) -> bool:
        """Whether `other` locks the same content, tokenizer and revision (paths are not compared)."""
        return self._compared() == other._compared()

    def _compared(self) -> tuple[str, str, str | None]:
        return self.eval_set_sha256, self.tokenizer_fingerprint, self.revision


def locks_to_json(locks: Mapping[str, EvalSetLock]) -> str:
    """The lock file's text (format version 2): indented JSON, sets by name, sorted keys, a final newline.

    The same locks always give the same text: `{"version": 2, "eval_sets": {"<name>": {entry fields}, ...}}`.

    Args:
        locks (`Mapping[str, EvalSetLock]`): each eval set's lock by the set's name.

    Example:
        >>> json.loads(locks_to_json({"safety": lock}))["eval_sets"]["safety"]["rows"] == lock.rows
        True
    """
    eval_sets = {name: asdict(lock) for name, lock in locks.items()}
    return json.dumps({"version": LOCK_VERSION, "eval_sets": eval_sets}, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def locks_from_json(text: str, path: str | Path) -> dict[str, EvalSetLock]:
    """Read each eval set's lock, by name, from the text of the lock file at `path`.

    A version 1 file (one set, its fields at top level) is the set named `default`.

    Args:
        text (`str`): the file's content.
        path (`str` or `Path`): the file, named in errors.

    Raises:
        LockError: the text is not JSON, misses or mistypes a field (the message names the
            eval set when the file holds sets by name), or was written in another lock format
            version; the message names the file and the fix.

    Example:
        >>> list(locks_from_json(Path("examples/dpo.lock").read_text(), "examples/dpo.lock"))  # a version 1 file
        ['default']
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise _unreadable(path, f"not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    if not isinstance(data, dict):
        raise _unreadable(path, f"expected a JSON object, got {type(data).__name__}")
    if "version" not in data:
        raise _unreadable(path, "no 'version' field")
    version = data["version"]
    if isinstance(version, bool) or version not in (1, LOCK_VERSION):
        raise _unreadable(path, f"lock format version {version!r}, this pytest-dpo reads versions 1 and {LOCK_VERSION}")
    if version == 1:
        return {DEFAULT_EVAL_SET: _entry_from_json(data, path, where="")}
    eval_sets = data.get("eval_sets")
    if not isinstance(eval_sets, dict):
        raise _unreadable(path, "field 'eval_sets' is missing or not an object")
    return {name: _entry_from_json(entry, path, where=f"eval set {name!r}: ") for name, entry in eval_sets.items()}


_ENTRY_FIELDS: dict[str, tuple[type, str]] = {
    "eval_set_sha256": (str, "a string"),
    "rows": (int, "an integer"),
    "row_hashes": (list, "a list"),
    "tokenizer_fingerprint": (str, "a string"),
    "eval_set_path": (str, "a string"),
}


def _entry_from_json(data: Any, path: str | Path, where: str) -> EvalSetLock:
    """One set's lock from its JSON object; `where` (`eval set 'safety': ` or empty) starts every reason."""
    if not isinstance(data, dict):
        raise _unreadable(path, f"{where}expected a JSON object, got {type(data).__name__}")
    for key, (kind, kind_name) in _ENTRY_FIELDS.items():
        value = data.get(key)
        # bool is an int subclass; a count of True rows is malformed, not 1.
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _unreadable(path, f"{where}field '{key}' is missing or not {kind_name}")
    if not all(isinstance(row_hash, str) for row_hash in data["row_hashes"]):
        raise _unreadable(path, f"{where}field 'row_hashes' must be a list of strings")
    revision = data.get("revision")
    if revision is not None and not isinstance(revision, str):
        raise _unreadable(path, f"{where}field 'revision' is not a string or null")
    try:
        return EvalSetLock(
            eval_set_sha256=data["eval_set_sha256"],
            rows=data["rows"],
            row_hashes=tuple(data["row_hashes"]),
            tokenizer_fingerprint=data["tokenizer_fingerprint"],
            eval_set_path=data["eval_set_path"],
            revision=revision,
        )
    except LockError as error:
        raise _unreadable(path, where + str(error).rstrip(".")) from None


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


@dataclass(frozen=True)
class SetDrift:
    """How one eval set differs from its entry in the lock file.

    Attributes:
        name (`str`): the eval set's name.
        locked (`EvalSetLock`): what the file records.
        current (`EvalSetLock`): what this run sees.
    """

    name: str
    locked: EvalSetLock
    current: EvalSetLock

    @property
    def row_counts(self) -> tuple[int, int, int]:
        """`(added, removed, changed)` rows by `row_drift`'s rule."""
        return row_drift(self.locked.row_hashes, self.current.row_hashes)

    @property
    def tokenizer_changed(self) -> bool:
        return self.locked.tokenizer_fingerprint != self.current.tokenizer_fingerprint

    @property
    def revision_changed(self) -> bool:
        return self.locked.revision != self.current.revision

    def describe(self, named: bool) -> str:
        """The drift in words, without the lock file or the fix; `named` names the set (`eval set 'safety'`)."""
        locked, current = self.locked, self.current
        if locked.eval_set_sha256 == current.eval_set_sha256 and not self.revision_changed:
            tokenizer = f"fingerprint {current.tokenizer_fingerprint[:_SHORT]}, locked {locked.tokenizer_fingerprint[:_SHORT]}"
            of_set = f" of eval set {self.name!r}" if named else ""
            return (
                f"the tokenization{of_set} changed since the lock (tokenizer files differ: {tokenizer}); "
                f"the eval set {current.eval_set_path} is unchanged"
            )
        details = [self._rows_text()]
        if self.tokenizer_changed:
            details.append("tokenizer changed")
        if self.revision_changed:
            details.append(f"revision {_short(current.revision)}, locked {_short(locked.revision)}")
        subject = f"eval set {self.name!r}" if named else "the eval set"
        moved = f" (locked from {locked.eval_set_path})" if locked.eval_set_path != current.eval_set_path else ""
        return (
            f"{subject} drifted from the lock ({'; '.join(details)}) — {current.eval_set_path} "
            f"sha256 {current.eval_set_sha256[:_SHORT]}, locked {locked.eval_set_sha256[:_SHORT]}{moved}"
        )

    def _rows_text(self) -> str:
        if self.locked.eval_set_sha256 == self.current.eval_set_sha256:
            return "content unchanged"
        tallies = [(count, kind) for count, kind in zip(self.row_counts, ("added", "removed", "changed")) if count]
        if not tallies:
            return "content changed"
        counts = [f"{count} {kind}" for count, kind in tallies]
        first_count, first_kind = tallies[0]
        counts[0] = f"{first_count} {'row' if first_count == 1 else 'rows'} {first_kind}"
        return ", ".join(counts)


def _short(revision: str | None) -> str:
    return "none" if revision is None else revision[:_SHORT]


class LockDrift(LockError):
    """Eval sets, the tokenizer or a Hub revision differ from the lock file.

    Attributes:
        path (`Path`): the lock file.
        drifts (`tuple[SetDrift, ...]`): each drifted eval set, by name.
        named (`bool`): the message names the sets (false only when the run and the file know
            no set but `default`).
    """

    def __init__(self, path: str | Path, drifts: Sequence[SetDrift], named: bool) -> None:
        self.path = Path(path)
        self.drifts = tuple(drifts)
        self.named = named
        super().__init__(self._message())

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.path, self.drifts, self.named)

    def _message(self) -> str:
        if len(self.drifts) == 1:
            return f"{self.path}: {self.drifts[0].describe(self.named)}. {_fix()}"
        lines = [f"  {drift.describe(self.named)}." for drift in self.drifts]
        return "\n".join([f"{self.path}: {len(self.drifts)} eval sets drifted from the lock:", *lines, _fix()])


def build_lock(eval_set: EvalSet, tokenizer_dir: Path | None) -> EvalSetLock:
    """The lock of an eval set (with its Hub revision, if any) and the tokenizer in `tokenizer_dir`.

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
        revision=eval_set.revision,
    )


def check_locks(path: Path, current: Mapping[str, EvalSetLock], *, update: bool) -> str:
    """Compare this run's eval sets with the lock file at `path`, writing it when missing, grown or accepted.

    A set the file does not hold yet is added (it has nothing to drift from); a set the file
    holds but this run does not score keeps its entry. The file is rewritten only when
    something changed, always as format version 2.

    Args:
        path (`Path`): the lock file, e.g. `dpo.lock`.
        current (`Mapping[str, EvalSetLock]`): the lock of each eval set this run scores, by name.
        update (`bool`): accept differences (and rewrite an unreadable file), as `--dpo-update-lock` does.

    Returns:
        `str`: `"created"` (no file yet, written now), `"unchanged"` (every set matches its
        entry; the file is left untouched), `"added safety"` / `"added helpful, safety"` (new
        sets written beside the others), or `"updated"` (rewritten because `update` was given).

    Raises:
        LockDrift: a set's content, tokenizer or revision differs and `update` is False; one
            error lists every drifted set. Nothing is written then.
        LockError: the file cannot be read or parsed and `update` is False, or it cannot be written.

    Example:
        >>> check_locks(Path("dpo.lock"), {"default": build_lock(eval_set, tokenizer_dir)}, update=False)
        'created'
    """
    path = Path(path)
    if not path.exists():
        _write_atomic(path, locks_to_json(current))
        return "created"
    try:
        locked = locks_from_json(_read(path), path)
    except LockError:
        if not update:
            raise
        _write_atomic(path, locks_to_json(current))
        return "updated"
    drifts = [
        SetDrift(name, locked[name], lock)
        for name, lock in sorted(current.items())
        if name in locked and not locked[name].matches(lock)
    ]
    if drifts and not update:
        raise LockDrift(path, drifts, named=set(locked) | set(current) != {DEFAULT_EVAL_SET})
    added = sorted(name for name in current if name not in locked)
    if not drifts and not added:
        return "unchanged"
    _write_atomic(path, locks_to_json({**locked, **current}))
    return "updated" if drifts else "added " + ", ".join(added)


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
