"""Content-addressed cache of per-example scores, in memory and (optionally) on disk.

A key covers everything that changes a model's per-example log-probs: the
model's weights fingerprint, dtype and device type, and the exact token ids
of the eval set with the truncation settings (so any change to an eval row,
the tokenizer, the chat template or `max_length` is a different key). DPO's
`beta`, loss type, f-divergence, `ld_alpha`, `use_weighting` and
`router_aux_loss_coef` only enter later, in `metrics.py`, so the cached
scores serve all of them: an entry holds the sums they are computed from
(LD-DPO's shared-length sums depend on each row pair's lengths, which the
token ids in the key fix). The one exception is WPO's log sum p^2, a pass
over the vocabulary computed only for a policy evaluated with
`use_weighting`: an entry without it is a miss for such a run, which scores
the model again and stores the entry with it.

The tokenized eval set is kept too (`tokenization_key`: eval-set content,
tokenizer files, transformers' version, truncation), so a run whose scores
are all cached needs no tokenizer. Score entries are safetensors files (no pickle), written to a temporary file and
renamed into place, so a crash never leaves a half-written entry under its
name; an entry that cannot be read or does not fit is removed and recomputed.
`CACHE_FORMAT` is part of the key and of each entry, so entries written
before a change of what an entry holds are misses, never misread.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .atomic import write_atomic, write_atomic_with
from .results import ROUTER_FIELDS, WPO_FIELDS, SequenceScores
from .tokenization import TokenizedEvalSet, TokenizedRow

# 2: entries hold the log sum p^2 and LD-DPO shared-length sums, and top-1 hits break ties as TRL does.
# 3: entries of mixture-of-experts models hold their router sums (a format-2 entry of one would lack them).
#    Since: log sum p^2 only where it was asked for (a format-3 entry that has it is read as before).
CACHE_FORMAT = 3


def tokens_digest(tokenized: TokenizedEvalSet, max_length: int | None, truncation_mode: str) -> str:
    """SHA-256 of the token ids that will be scored, with the truncation that applies to them."""
    digest = hashlib.sha256(f"{max_length}|{truncation_mode}|".encode())
    for row in tokenized.rows:
        digest.update(json.dumps([row.row, row.prompt_ids, row.chosen_ids, row.rejected_ids]).encode())
    return digest.hexdigest()


def tokenization_key(eval_set_sha256: str, tokenizer_fingerprint: str, max_length: int | None, truncation_mode: str) -> str:
    """The key of an eval set's tokenized rows: its content, the tokenizer's files, transformers' version (which
    tokenizes) and the truncation that decides which rows TRL drops."""
    from importlib.metadata import version

    parts = [CACHE_FORMAT, eval_set_sha256, tokenizer_fingerprint, version("transformers"), max_length, truncation_mode]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def cache_key(model_fingerprint: str, dtype: str, device: str, tokens: str) -> str:
    """The key of one model's scores on one tokenized eval set."""
    device_type = device.split(":")[0]
    text = json.dumps([CACHE_FORMAT, model_fingerprint, dtype, device_type, tokens])
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    rebuilt: int = 0


class ScoreCache:
    """Scores by key: always in memory for the session, and on disk when `directory` is given.

    Args:
        directory (`Path`, *optional*): where entries are kept across runs; None keeps them in memory only.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.stats = CacheStats()
        self._memory: dict[str, SequenceScores] = {}

    def get(self, key: str, rows: int, required: Sequence[str] = ()) -> SequenceScores | None:
        """The cached scores of `rows` rows under `key`, or None (a miss): also when an entry lacks one of the
        optional fields `required` (`results.WPO_FIELDS` for a policy evaluated with `use_weighting`)."""
        scores = self._memory.get(key) or self._read(key, rows)
        if scores is None or any(getattr(scores, name) is None for name in required):
            self.stats.misses += 1
            return None
        self._memory[key] = scores
        self.stats.hits += 1
        return scores

    def put(self, key: str, scores: SequenceScores) -> None:
        self._memory[key] = scores
        if self.directory is None:
            return
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: values.contiguous() for name, values in _present(scores).items()}
        write_atomic_with(self._path(key), lambda path: save_file(tensors, path, metadata={"format": str(CACHE_FORMAT)}))

    def get_tokens(self, key: str) -> TokenizedEvalSet | None:
        """The tokenized eval set stored under `key` (see `tokenization_key`), or None.

        So a run whose scores are all cached loads no tokenizer, hence neither transformers nor peft.
        """
        path = self._tokens_path(key)
        if path is None or not path.exists():
            return None
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            rows = [TokenizedRow(*row) for row in stored["rows"]]
            return TokenizedEvalSet(rows=rows, dropped_rows=list(stored["dropped_rows"]))
        except (ValueError, KeyError, TypeError):  # unreadable: tokenized again and rewritten
            self.stats.rebuilt += 1
            path.unlink(missing_ok=True)
            return None

    def put_tokens(self, key: str, tokenized: TokenizedEvalSet) -> None:
        path = self._tokens_path(key)
        if path is None:
            return
        rows = [[row.row, row.prompt_ids, row.chosen_ids, row.rejected_ids] for row in tokenized.rows]
        text = json.dumps({"rows": rows, "dropped_rows": tokenized.dropped_rows}, separators=(",", ":"))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text.encode("utf-8"))

    def _tokens_path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"tokens-{key}.json"

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{key}.safetensors"

    def _read(self, key: str, rows: int) -> SequenceScores | None:
        if self.directory is None or not self._path(key).exists():
            return None
        try:
            scores = _load(self._path(key))
            if len(scores) != rows or any(len(values) != rows for values in _present(scores).values()):
                raise ValueError("row count does not match")
            return scores
        except Exception:  # any unreadable entry is rebuilt, never trusted
            self.stats.rebuilt += 1
            self._path(key).unlink(missing_ok=True)
            return None


def _present(scores: SequenceScores) -> dict[str, Any]:
    """The fields that hold values (a model without router logits has no router sums)."""
    return {f.name: getattr(scores, f.name) for f in fields(scores) if getattr(scores, f.name) is not None}


def _load(path: Path) -> SequenceScores:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        if handle.metadata().get("format") != str(CACHE_FORMAT):
            raise ValueError("other cache format")
        stored = set(handle.keys())
        for optional in (ROUTER_FIELDS, WPO_FIELDS):
            if stored & set(optional) not in (set(), set(optional)):
                raise ValueError(f"some of {optional} missing")
        # Every other field must be there: `get_tensor` raises for a missing one.
        names = [f.name for f in fields(SequenceScores) if f.name in stored or f.name not in ROUTER_FIELDS + WPO_FIELDS]
        values: dict[str, Any] = {name: handle.get_tensor(name) for name in names}
    return SequenceScores(**values)
