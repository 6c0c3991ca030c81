"""The JSON report of a session, as a plain dict: one entry per checkpoint, built from what the session holds.

A checkpoint's own numbers are the default eval set's; with several eval sets (or a subset column) each
set's and subset's are under its `eval_sets` (recorded by `report_scopes`), and the report lists the sets.
No models, no evaluation, no files: `report_files` writes and reads the report,
`report_markdown` and `report_plot` render it, `report_terminal` prints the tables.
The schema is `schemas/dpo_report.schema.json`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .metric_table import DIAGNOSTIC_NAMES, METRIC_NAMES, SUMMARY_METRICS, Metric
from .report_scopes import diagnostic_intervals, metric_intervals, scope_record

if TYPE_CHECKING:
    from .checkpoints import Checkpoint
    from .eval_sets import EvalSetSpec
    from .evalset import EvalSet
    from .results import EvalResult
    from .verdicts import CheckpointVerdict

# Raised only when readers must refuse older reports; optional additions (the verdict's `gates`) keep it.
REPORT_SCHEMA_VERSION = 1
KINDS = ("model", "adapter")
TEST_OUTCOMES = ("passed", "failed", "error", "skipped", "not_run")
EVAL_SET_KEYS = ("path", "name", "sha256", "rows", "format")
# A named eval set of the run (`eval_sets`): `name` is the set's name there, `file` what `name` is in `EVAL_SET_KEYS`.
NAMED_EVAL_SET_KEYS = ("name", "path", "file", "sha256", "rows", "format", "revision", "options")
# Tables lead with the loss and what gates usually check; the other summary metrics follow in the table's order.
_LEADING_COLUMNS = ("loss", "rewards/margins", "rewards/accuracies")


def _column_rank(metric: Metric) -> int:
    return _LEADING_COLUMNS.index(metric.name) if metric.name in _LEADING_COLUMNS else len(_LEADING_COLUMNS)


# `metric_table.SUMMARY_METRICS` in the order the terminal and Markdown tables show them.
SUMMARY_COLUMNS: tuple[Metric, ...] = tuple(sorted(SUMMARY_METRICS, key=_column_rank))


@dataclass(frozen=True)
class ReportEntry:
    """What the report says about one checkpoint.

    Attributes:
        id (`str`): the checkpoint's name, e.g. `checkpoint-500`.
        path (`str`): where it was loaded from.
        step (`int | None`): its training step, None when unknown (e.g. a final model).
        kind (`str`): `"model"` or `"adapter"`.
        verdict (`Mapping`): `{"passed": bool, "summary": str, "tests": {"passed": [...], "failed": [...],
            "error": [...], "skipped": [...], "not_run": [...]}, "gates": {nodeid: gate text}}`,
            see `verdict_record`; `gates` may be left out.
        metrics (`Mapping[str, float | None]`): TRL's eval metrics; empty when the evaluation failed.
        scored_rows (`int`): how many eval-set rows were scored.
        dropped_rows (`Sequence[int]`, *optional*): eval-set rows TRL drops, never scored.
        evaluate_seconds (`float | None`, *optional*): how long the evaluation took.
        intervals (`Mapping`, *optional*): confidence intervals by metric name,
            each `{"low": float, "high": float, "confidence": float, "method": str}` (see `metric_intervals`).
        samples (`Sequence[Mapping]`, *optional*): sample completions,
            each `{"row": int, "prompt": str, "policy": str, "reference": str}`.
        per_example (`Mapping[str, list]`, *optional*): the per-example arrays
            (`PerExample.to_dict()`); written to `dpo_per_example.json`, not to the main report.
        settings (`Mapping`, *optional*): where each setting came from and the training settings not
            reproduced (`CheckpointSettings.to_dict()`).
        non_finite_rows (`int`, *optional*): scored rows whose loss is NaN or infinite; as in TRL, they make
            `loss` and the other means over rows NaN.
        diagnostics (`Mapping[str, float | None]`, *optional*): pytest-dpo's failure-mode diagnostics
            (`EvalResult.diagnostics`); empty when the evaluation failed.
        diagnostic_intervals (`Mapping`, *optional*): confidence intervals of the diagnostics that have one,
            shaped as `intervals` (see `diagnostic_intervals`).
        eval_sets (`Mapping[str, Mapping]`, *optional*): every eval set's record by set name, in run order,
            the default set's among them (see `scope_record`); empty when the evaluation failed.
        set_per_example (`Mapping[str, Mapping[str, list]]`, *optional*): the per-example arrays of every
            eval set but the default one (whose arrays are `per_example`), by set name.
    """

    id: str
    path: str
    step: int | None
    kind: str
    verdict: Mapping[str, Any]
    metrics: Mapping[str, float | None]
    scored_rows: int
    dropped_rows: Sequence[int] = ()
    evaluate_seconds: float | None = None
    intervals: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    samples: Sequence[Mapping[str, Any]] = ()
    per_example: Mapping[str, list] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    non_finite_rows: int = 0
    diagnostics: Mapping[str, float | None] = field(default_factory=dict)
    diagnostic_intervals: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    eval_sets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    set_per_example: Mapping[str, Mapping[str, list]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ReportEntry {self.id}: kind {self.kind!r} is neither of {', '.join(KINDS)}.")
        missing = [key for key in ("passed", "summary", "tests") if key not in self.verdict]
        if missing:
            raise ValueError(
                f"ReportEntry {self.id}: verdict lacks {', '.join(missing)}; build it with `verdict_record(verdict)`."
            )
        for row, sample in enumerate(self.samples):
            absent = [key for key in ("row", "prompt", "policy", "reference") if key not in sample]
            if absent:
                raise ValueError(f"ReportEntry {self.id}: sample {row} lacks {', '.join(absent)}.")
        for metric, interval in [*self.intervals.items(), *self.diagnostic_intervals.items()]:
            absent = [key for key in ("low", "high", "confidence", "method") if key not in interval]
            if absent:
                raise ValueError(f"ReportEntry {self.id}: interval of {metric} lacks {', '.join(absent)}.")


def report_entry(
    checkpoint: Checkpoint,
    verdict: CheckpointVerdict,
    result: EvalResult | None,
    *,
    evaluate_seconds: float | None = None,
    samples: Sequence[Mapping[str, Any]] = (),
    checkpoint_id: str | None = None,
    settings: Mapping[str, Any] | None = None,
    results: Mapping[str, EvalResult] | None = None,
) -> ReportEntry:
    """The report entry of a checkpoint from what a session holds; `result` is None when its evaluation failed.

    `result` is the default eval set's; `results` every set's by name (the default's among them), in run
    order, each recorded with its subsets (`scope_record`). `checkpoint_id` is the checkpoint's unique id in
    the session (default: its folder name). The entry's intervals are `metric_intervals(result)`: 95%, t
    (Wilson for the accuracy); its diagnostics' are `diagnostic_intervals(result)`.
    """
    by_set = dict(results or {}) if result else {}
    return ReportEntry(
        id=checkpoint_id or checkpoint.name,
        path=str(checkpoint.path),
        step=checkpoint.step,
        kind=checkpoint.kind,
        verdict=verdict_record(verdict),
        metrics=dict(result.metrics) if result else {},
        scored_rows=result.num_examples if result else 0,
        dropped_rows=list(result.dropped_rows) if result else [],
        evaluate_seconds=evaluate_seconds,
        intervals=metric_intervals(result) if result else {},
        samples=tuple(samples),
        per_example=result.per_example.to_dict() if result else {},
        settings=dict(settings or {}),
        non_finite_rows=int((~result.per_example.losses.isfinite()).sum()) if result else 0,
        diagnostics=dict(result.diagnostics) if result else {},
        diagnostic_intervals=diagnostic_intervals(result) if result else {},
        eval_sets={name: scope_record(one) for name, one in by_set.items()},
        set_per_example={
            name: one.per_example.to_dict() for name, one in by_set.items() if name != result.eval_set_name
        },
    )


def verdict_record(verdict: CheckpointVerdict) -> dict[str, Any]:
    """A checkpoint's verdict as the report stores it (what `ReportEntry.verdict` expects)."""
    tests = {outcome: verdict.tests(outcome) for outcome in TEST_OUTCOMES if outcome != "not_run"}
    return {
        "passed": verdict.passed,
        "summary": verdict.summary,
        "tests": tests | {"not_run": verdict.not_run},
        "gates": dict(sorted(verdict.gates.items())),
    }


def eval_set_record(eval_set: EvalSet) -> dict[str, Any]:
    """An eval set as the report describes it (what `build_report(eval_set=...)` expects)."""
    return {
        "path": eval_set.path,
        "name": Path(eval_set.path).name,
        "sha256": eval_set.sha256,
        "rows": len(eval_set),
        "format": eval_set.format,
    }


def named_eval_set_records(eval_sets: Mapping[str, EvalSet], specs: Mapping[str, EvalSetSpec]) -> list[dict[str, Any]]:
    """A run's eval sets in run order as the report lists them (`build_report(eval_sets=...)`): each with the
    keys `NAMED_EVAL_SET_KEYS`; `revision` is the Hub commit (None for files), `options` the set's own settings."""
    return [
        {
            "name": name,
            "path": eval_set.path,
            "file": Path(eval_set.path).name,
            "sha256": eval_set.sha256,
            "rows": len(eval_set),
            "format": eval_set.format,
            "revision": eval_set.revision,
            "options": dict(specs[name].options),
        }
        for name, eval_set in eval_sets.items()
    ]


def build_report(
    entries: Sequence[ReportEntry],
    *,
    eval_set: Mapping[str, Any],
    gates: Sequence[str],
    settings: Mapping[str, Any],
    versions: Mapping[str, str],
    created: datetime | None = None,
    eval_sets: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The JSON report (schema `REPORT_SCHEMA_VERSION`, see `report_files.REPORT_SCHEMA_PATH`) of one session.

    Args:
        entries (`Sequence[ReportEntry]`): one per checkpoint, in checkpoint order.
        eval_set (`Mapping`): the default eval set: `path`, `name`, `sha256`, `rows`, `format`
            (see `eval_set_record`).
        gates (`Sequence[str]`): the gates, e.g. `["rewards/accuracies >= 0.6"]` (`Gate` objects are accepted).
        settings (`Mapping`): the `DPOSettings` used, as plain values.
        versions (`Mapping[str, str]`): installed package versions (e.g. `model_card.versions()`).
        created (`datetime`, *optional*): when the report was made; now by default.
        eval_sets (`Sequence[Mapping]`, *optional*): every eval set of the run, in run order
            (see `named_eval_set_records`); left out of the report when empty.

    NaN and infinite numbers become `null`, so the result dumps as strict JSON.

    Example:
        >>> report = build_report(entries, eval_set=eval_set_record(eval_set), gates=["rewards/margins > 0"],
        ...                       settings=result.settings, versions=versions())
    """
    ids = [entry.id for entry in entries]
    duplicates = sorted({name for name in ids if ids.count(name) > 1})
    if duplicates:
        raise ValueError(f"checkpoint ids must be unique in a report; repeated: {', '.join(duplicates)}.")
    missing = [key for key in EVAL_SET_KEYS if key not in eval_set]
    if missing:
        raise ValueError(f"eval_set lacks {', '.join(missing)}; build it with `eval_set_record(eval_set)`.")
    for record in eval_sets:
        missing = [key for key in NAMED_EVAL_SET_KEYS if key not in record]
        if missing:
            raise ValueError(f"an eval_sets record lacks {', '.join(missing)}; build them with `named_eval_set_records`.")
    moment = (created or datetime.now(timezone.utc)).astimezone(timezone.utc)
    named = [{key: record[key] for key in NAMED_EVAL_SET_KEYS} for record in eval_sets]
    return {
        "schema": REPORT_SCHEMA_VERSION,
        "created": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "eval_set": strict_json_values({key: eval_set[key] for key in EVAL_SET_KEYS}),
        **({"eval_sets": strict_json_values(named)} if named else {}),
        "settings": strict_json_values(dict(settings)),
        "gates": [str(gate) for gate in gates],
        "versions": {str(name): str(number) for name, number in versions.items()},
        "checkpoints": [_checkpoint_record(entry) for entry in entries],
    }


def _checkpoint_record(entry: ReportEntry) -> dict[str, Any]:
    tests = entry.verdict["tests"]
    return strict_json_values(
        {
            "id": entry.id,
            "path": str(entry.path),
            "step": None if entry.step is None else int(entry.step),
            "kind": entry.kind,
            "verdict": {
                "passed": bool(entry.verdict["passed"]),
                "summary": str(entry.verdict["summary"]),
                "tests": {outcome: [str(nodeid) for nodeid in tests.get(outcome, ())] for outcome in TEST_OUTCOMES},
                "gates": {str(nodeid): str(gate) for nodeid, gate in entry.verdict.get("gates", {}).items()},
            },
            "metrics": _metrics(entry.metrics),
            "scored_rows": entry.scored_rows,
            "dropped_rows": [int(row) for row in entry.dropped_rows],
            "non_finite_rows": entry.non_finite_rows,
            "timings": {"evaluate_seconds": entry.evaluate_seconds},
            "intervals": {metric: dict(interval) for metric, interval in entry.intervals.items()},
            "diagnostics": _diagnostics(entry.diagnostics),
            "diagnostic_intervals": {name: dict(interval) for name, interval in entry.diagnostic_intervals.items()},
            "samples": [
                {"row": int(s["row"]), "prompt": str(s["prompt"]), "policy": str(s["policy"]),
                 "reference": str(s["reference"])}
                for s in entry.samples
            ],
        }
        | ({"settings": dict(entry.settings)} if entry.settings else {})
        | ({"eval_sets": {name: _scope(record) for name, record in entry.eval_sets.items()}} if entry.eval_sets else {})
    )


def _scope(record: Mapping[str, Any]) -> dict[str, Any]:
    """A `scope_record` with its metrics and diagnostics in the report's order."""
    subsets = record.get("subsets")
    return strict_json_values(
        {
            "metrics": _metrics(record["metrics"]),
            "diagnostics": _diagnostics(record["diagnostics"]),
            "intervals": {name: dict(interval) for name, interval in record["intervals"].items()},
            "diagnostic_intervals": {name: dict(interval) for name, interval in record["diagnostic_intervals"].items()},
            "num_examples": int(record["num_examples"]),
            "dropped_rows": [int(row) for row in record["dropped_rows"]],
        }
        | ({"subsets": {name: _scope(subset) for name, subset in subsets.items()}} if subsets is not None else {})
    )


def _metrics(metrics: Mapping[str, float | None]) -> dict[str, float | None]:
    """TRL's metrics in `METRIC_NAMES` order, any others after them by name."""
    known = [name for name in METRIC_NAMES if name in metrics]
    others = sorted(name for name in metrics if name not in METRIC_NAMES)
    return {name: _float(metrics[name]) for name in known + others}


def _diagnostics(diagnostics: Mapping[str, float | None]) -> dict[str, float | None]:
    return {name: _float(diagnostics[name]) for name in DIAGNOSTIC_NAMES if name in diagnostics}


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def strict_json_values(value: Any) -> Any:
    """`value` with NaN and infinities as None and tuples as lists: dumpable with `allow_nan=False`."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): strict_json_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_values(item) for item in value]
    return value


def per_example_of(entries: Sequence[ReportEntry]) -> dict[str, dict[str, Any]]:
    """The per-example arrays of the entries that have them, by checkpoint id (what `write_report` expects).

    The default eval set's arrays are the checkpoint's; the other sets' are under its `eval_sets` key, by set
    name (no `PerExample` field is called that).
    """
    return {
        entry.id: dict(entry.per_example)
        | ({"eval_sets": {name: dict(arrays) for name, arrays in entry.set_per_example.items()}} if entry.set_per_example else {})
        for entry in entries
        if entry.per_example
    }
