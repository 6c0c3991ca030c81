"""One eval set's or subset's numbers as the JSON report records them, and finding them again in a report.

`scope_record` turns an `EvalResult` into `metrics`, `diagnostics`, their intervals and row counts, with
its subsets; `scoped` finds such a record in a report's checkpoint entry by eval set and subset. No
models, no files; torch is touched only through the results handed in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .metric_table import (
    BY_NAME,
    DEFAULT_CONFIDENCE,
    DEFAULT_INTERVAL_METHOD,
    INTERVAL_DIAGNOSTICS,
    PER_EXAMPLE_METRICS,
)

if TYPE_CHECKING:
    from .results import EvalResult
    from .stats import Interval


def scope_record(result: EvalResult) -> dict[str, Any]:
    """One eval set's (or subset's) numbers as `ReportEntry.eval_sets` holds them: `metrics`, `diagnostics`,
    `intervals`, `diagnostic_intervals`, `num_examples`, `dropped_rows`, and, for a set split by a subset
    column, `subsets` (subset name → the same record without `subsets`).

    A subset whose rows TRL all drops has empty numbers and `num_examples` 0.
    """
    record: dict[str, Any] = {
        "metrics": dict(result.metrics),
        "diagnostics": dict(result.diagnostics),
        "intervals": metric_intervals(result),
        "diagnostic_intervals": diagnostic_intervals(result),
        "num_examples": result.num_examples,
        "dropped_rows": list(result.dropped_rows),
    }
    if result.subset_labels is not None and result.subset_name is None:
        record["subsets"] = {
            name: scope_record(subset) if subset is not None else _unscored(result, name)
            for name, subset in subset_results(result).items()
        }
    return record


def _unscored(result: EvalResult, subset: str) -> dict[str, Any]:
    """The record of a subset whose rows are all dropped: no numbers, its dropped rows."""
    dropped = [row for row in result.dropped_rows if (result.subset_labels or [])[row] == subset]
    empty: dict[str, Any] = {"metrics": {}, "diagnostics": {}, "intervals": {}, "diagnostic_intervals": {}}
    return empty | {"num_examples": 0, "dropped_rows": dropped}


def metric_intervals(
    result: EvalResult, confidence: float = DEFAULT_CONFIDENCE, method: str = DEFAULT_INTERVAL_METHOD
) -> dict[str, dict[str, Any]]:
    """The confidence interval of each per-example metric of a result, as `ReportEntry.intervals` holds them.

    A metric with a NaN or infinite per-example value has no interval (its value is NaN or infinite
    too). With fewer than two rows a mean's bounds are infinite, which the JSON report writes as null.

    Args:
        result (`EvalResult`): the evaluation.
        confidence (`float`, *optional*, defaults to `0.95`): the nominal coverage.
        method (`str`, *optional*, defaults to `"t"`): `"t"` or `"bootstrap"` for the means;
            `rewards/accuracies` always gets Wilson's interval.
    """
    from .stats import metric_interval

    intervals = {}
    for name in (name for name in PER_EXAMPLE_METRICS if name in result.metrics):
        values_field = BY_NAME[name].field
        if values_field is not None and not bool(getattr(result.per_example, values_field).isfinite().all()):
            continue
        intervals[name] = _interval_record(metric_interval(result, name, confidence, method))
    return intervals


def diagnostic_intervals(
    result: EvalResult, confidence: float = DEFAULT_CONFIDENCE, method: str = DEFAULT_INTERVAL_METHOD
) -> dict[str, dict[str, Any]]:
    """The confidence interval of each diagnostic that has one (`metric_table.INTERVAL_DIAGNOSTICS`), as
    `ReportEntry.diagnostic_intervals` holds them: Wilson for the shares, `method` for the mean changes.

    A NaN or infinite diagnostic has no interval; with fewer than two rows a mean's bounds are infinite.
    """
    from .stats import metric_interval

    return {
        name: _interval_record(metric_interval(result, name, confidence, method))
        for name in INTERVAL_DIAGNOSTICS
        if math.isfinite(result.diagnostics[name])
    }


def _interval_record(interval: Interval) -> dict[str, Any]:
    return {"low": interval.low, "high": interval.high, "confidence": interval.confidence, "method": interval.method}


def scoped(checkpoint: Mapping[str, Any], eval_set: str | None, subset: str | None = None) -> Mapping[str, Any] | None:
    """The part of a report's checkpoint record that holds one eval set's (or subset's) numbers, under the same
    keys (`metrics`, `intervals`, `diagnostics`, `diagnostic_intervals`): the record itself for `eval_set=None`
    (the default set); None when the report has no numbers for it (an older report, a failed evaluation).
    """
    if eval_set is None:
        return checkpoint
    record = checkpoint.get("eval_sets", {}).get(eval_set)
    if record is None or subset is None:
        return record
    return record.get("subsets", {}).get(subset)


def subset_results(result: EvalResult) -> dict[str, EvalResult | None]:
    """Each subset's result by name, in order of first appearance (empty without a subset column); None for
    a subset whose rows TRL all drops, so nothing of it was scored."""
    subsets: dict[str, EvalResult | None] = {}
    for name in result.subsets:
        try:
            subsets[name] = result.subset(name)
        except ValueError:
            subsets[name] = None
    return subsets
