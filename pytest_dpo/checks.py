"""One check of a metric against a threshold, shared by the assertion helpers and the ini gates.

`check_metric` compares a result's metric or diagnostic (or, with a confidence
level, the bound of its interval) with a threshold. When the comparison fails it
writes the one failure message both faces show: the estimate, the threshold, the
interval and its bound, how many rows were scored, and the rows that rank
worst. No pytest; torch and scipy are imported only when an interval or a
diagnostic is computed.
"""

from __future__ import annotations

import math
import operator as operators
from collections.abc import Callable
from typing import TYPE_CHECKING

from .failure_text import distinct_numbers, example_lines, number, scored, unbroken
from .metric_table import (
    BY_NAME,
    DEFAULT_INTERVAL_METHOD,
    DIAGNOSTIC_NAMES,
    DIAGNOSTICS_BY_NAME,
    PER_EXAMPLE,
    Diagnostic,
    Metric,
    check_interval_method,
    non_finite_cause,
    non_finite_text,
)

if TYPE_CHECKING:
    from .results import EvalResult

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operators.ge,
    "<=": operators.le,
    "==": operators.eq,
    "!=": operators.ne,
    ">": operators.gt,
    "<": operators.lt,
}
# How a failure reads: "loss = 0.8 is not at most 0.75".
_RELATIONS = {">=": "at least", "<=": "at most", "==": "equal to", "!=": "different from", ">": "above", "<": "below"}
# With a confidence level, the bound that must clear the threshold.
_BOUND_SIDES = {">=": "lower", ">": "lower", "<=": "upper", "<": "upper"}
WORST_COUNT = 3
_NUMBER_WIDTH = 7
# Every listed row shows its rewards; a ranking by another per-example value comes first.
_ROW_COLUMNS = ("rewards/margins", "rewards/chosen", "rewards/rejected")
# What ranks the rows of a metric that has no per-example value of its own (the accuracy, a share
# of margins > 0; the token-weighted and whole-set metrics): the rows the policy separates worst.
_DEFAULT_RANKING = "rewards/margins"


def check_metric(
    result: EvalResult,
    metric: str,
    operator: str,
    threshold: float,
    *,
    confidence: float | None = None,
    method: str = DEFAULT_INTERVAL_METHOD,
) -> str | None:
    """Whether `metric operator threshold` holds for `result`: None when it does, the failure text otherwise.

    `metric` is one of TRL's metrics (`result.metrics`) or one of pytest-dpo's
    diagnostics (`result.diagnostics`, e.g. `diagnostics/likelihood_displacement`).
    Without `confidence` the metric's value is compared; with it, the bound of its
    confidence interval on the side the operator faces (the lower bound for `>` and
    `>=`, the upper one for `<` and `<=`). A NaN or infinite value or bound never
    passes. The failure text starts with the claim and `N` scored (and dropped)
    rows, e.g. `rewards/margins = -0.006148 is not above 0 (N=24 rows scored)`, and
    lists the 3 rows that rank worst by the metric's own per-example value (highest
    or lowest, whichever is worse), with their rewards and prompt snippets. Metrics
    without a per-example value of their own (`rewards/accuracies`, the
    token-weighted ones, `aux_loss`, the margin-length correlation) rank rows by
    margin; a diagnostic ranks them by its `ranked_by` (likelihood displacement:
    the chosen log-prob change). The caller puts the checkpoint, and for a gate
    `gate failed:`, in front.

    Args:
        result (`EvalResult`): the evaluation of one checkpoint.
        metric (`str`): a TRL metric name from `metric_table.METRIC_NAMES`, without `eval_`, or a
            diagnostic from `metric_table.DIAGNOSTIC_NAMES`.
        operator (`str`): one of `OPERATORS`: `>=`, `>`, `<=`, `<`, `==`, `!=`.
        threshold (`float`): the number the metric is compared with.
        confidence (`float`, *optional*): e.g. `0.95`: judge the interval's bound (see `stats.metric_interval`).
        method (`str`, *optional*, defaults to `"t"`): how a mean's interval is computed, `t` or `bootstrap`.

    Raises:
        KeyError: `result` has no `metric`.
        ValueError: an unknown operator or method, a confidence level with `==`/`!=`,
            or a confidence level for a metric without per-example values.

    Example:
        ```py
        from pytest_dpo.checks import check_metric


        def test_accuracy_is_above_chance_beyond_noise(dpo_result):
            failure = check_metric(dpo_result, "rewards/accuracies", ">", 0.5, confidence=0.95)
            assert failure is None, failure
        ```
    """
    if operator not in OPERATORS:
        raise ValueError(f"Unknown operator {operator!r}. Choose from: {', '.join(OPERATORS)}.")
    if confidence is not None and operator not in _BOUND_SIDES:
        raise ValueError(f"A confidence bound is compared with <, <=, > or >=, not {operator}.")
    check_interval_method(method)
    passes, relation = OPERATORS[operator], _RELATIONS[operator]
    value = _metric_value(result, metric)
    if not math.isfinite(value):
        claim = f"{metric} is {non_finite_text(value)}, not {relation} {number(threshold)}: {_cause(result, metric)}"
    elif confidence is not None:
        from .stats import metric_interval

        interval = metric_interval(result, metric, confidence, method)
        side = _BOUND_SIDES[operator]
        bound = interval.low if side == "lower" else interval.high
        if math.isfinite(bound) and passes(bound, threshold):
            return None
        shown_bound, shown_threshold = distinct_numbers(bound, threshold)
        claim = (
            f"{metric} = {number(value)}, but its {confidence * 100:g}% {side} bound {shown_bound} is not {relation} "
            f"{shown_threshold}; interval {interval}"
        )
    elif passes(value, threshold):
        return None
    else:
        shown_value, shown_threshold = distinct_numbers(value, threshold)
        claim = f"{metric} = {shown_value} is not {relation} {shown_threshold}"
    return "\n".join([f"{claim} ({scored(result)})", *_worst_lines(result, _ranking(metric))])


def _metric_value(result: EvalResult, metric: str) -> float:
    if metric in DIAGNOSTICS_BY_NAME:
        return float(result.diagnostics[metric])
    try:
        return float(result.metrics[metric])
    except KeyError:
        raise KeyError(
            f"{result.scope} has no metric '{metric}' (it has: {', '.join(result.metrics)}; "
            f"and the diagnostics {', '.join(DIAGNOSTIC_NAMES)}). "
            "Build the result with `pytest_dpo.evaluate` so it carries all of TRL's metrics."
        ) from None


def _cause(result: EvalResult, metric: str) -> str:
    """Why `metric` is NaN or infinite: an undefined diagnostic says why, anything else blames the scores."""
    if metric in DIAGNOSTICS_BY_NAME:
        from .diagnostics import undefined_cause

        cause = undefined_cause(result.per_example, metric)
        if cause is not None:
            return cause
    return non_finite_cause()


def _ranking(metric: str) -> Metric | Diagnostic:
    """The metric or diagnostic whose per-example values rank the rows of a failure of `metric`."""
    diagnostic = DIAGNOSTICS_BY_NAME.get(metric)
    if diagnostic is not None and diagnostic.ranked_by is not None:
        return DIAGNOSTICS_BY_NAME[diagnostic.ranked_by]
    if diagnostic is not None and diagnostic.kind == PER_EXAMPLE:
        return diagnostic
    record = BY_NAME.get(metric)
    return record if record is not None and record.field is not None else BY_NAME[_DEFAULT_RANKING]


def _values(result: EvalResult, record: Metric | Diagnostic) -> list[float]:
    """One value per scored row: a metric's per-example array, a diagnostic's per-row values."""
    if isinstance(record, Diagnostic):
        from .diagnostics import row_values

        return row_values(result.per_example, record.name).tolist()
    return getattr(result.per_example, record.field).tolist()


def _worst_lines(result: EvalResult, ranking: Metric | Diagnostic) -> list[str]:
    """The heading and lines of the examples that rank worst, NaN values first."""
    total = len(result.per_example)
    if total == 0:
        return ["no rows were scored"]
    values = _values(result, ranking)
    sign = -1.0 if ranking.worst_is_highest else 1.0
    worst = sorted(range(total), key=lambda i: (not math.isnan(values[i]), sign * values[i]))[:WORST_COUNT]
    columns: list[Metric | Diagnostic] = [BY_NAME[name] for name in _ROW_COLUMNS]
    if ranking not in columns:
        columns.insert(0, ranking)
    arrays = [(column.label, _values(result, column)) for column in columns]

    def ranked_values(position: int) -> str:
        return "  ".join(unbroken(f"{label} {number(array[position]):>{_NUMBER_WIDTH}}") for label, array in arrays)

    end = "highest" if ranking.worst_is_highest else "lowest"
    return [f"worst {len(worst)} of {total} by {end} {ranking.name}:", *example_lines(result, worst, ranked_values)]
