"""Assertion helpers for a team's pytest tests on an `EvalResult`, e.g. the `dpo_result` fixture.

A failing helper raises a plain `AssertionError` that reads well in an 80-column
terminal: the metric, its value against the threshold, how many rows were scored,
and the examples that pulled the metric the wrong way, so the failure says which
rows to read. Each helper hides its own frames from pytest's traceback, which
points at the test's line instead. No models are loaded here.

The threshold helpers (`assert_margin_positive`, `assert_accuracy_above`,
`assert_loss_below`, `assert_chosen_reward_above`, `assert_rejected_reward_below`)
take `result`, one checkpoint's `EvalResult` (e.g. the `dpo_result` fixture), and
a threshold the metric must strictly clear; a NaN or infinite metric never does.

Confidence bounds: every threshold helper takes `confidence` (e.g. `0.95`) and
`method` (default `"t"`). With a `confidence`, the bound of the metric's confidence
interval on the threshold's side must clear the threshold, not just the point
estimate. The interval of `rewards/accuracies` is Wilson's; that of a mean is
Student t (`method="t"`) or a seeded percentile bootstrap (`method="bootstrap"`);
see `pytest_dpo.stats`.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import fields

import torch

from .checks import WORST_COUNT, check_metric
from .failure_text import WIDTH, count, example_lines, number, scored
from .results import EvalResult, PerExample

__all__ = [
    "assert_accuracy_above",
    "assert_chosen_reward_above",
    "assert_loss_below",
    "assert_margin_positive",
    "assert_metrics_finite",
    "assert_no_regression",
    "assert_rejected_reward_below",
]

_MAX_LISTED_ROWS = 10


def assert_margin_positive(
    result: EvalResult, *, at_least: float = 0.0, confidence: float | None = None, method: str = "t"
) -> None:
    """Assert that the mean reward margin `rewards/margins` is strictly above `at_least`, e.g.
    `assert_margin_positive(dpo_result, at_least=0.1)`.

    A failure lists the 3 rows with the lowest margin.
    """
    __tracebackhide__ = True
    _assert_metric(result, "rewards/margins", ">", at_least, confidence, method)


def assert_accuracy_above(result: EvalResult, threshold: float, *, confidence: float | None = None, method: str = "t") -> None:
    """Assert that the reward accuracy `rewards/accuracies` is strictly above `threshold`, e.g.
    `assert_accuracy_above(dpo_result, 0.6)`.

    The accuracy is the share of rows whose chosen reward beats the rejected one; a failure
    lists the 3 rows with the lowest margin.
    """
    __tracebackhide__ = True
    _assert_metric(result, "rewards/accuracies", ">", threshold, confidence, method)


def assert_loss_below(result: EvalResult, threshold: float, *, confidence: float | None = None, method: str = "t") -> None:
    """Assert that the eval `loss` is strictly below `threshold`, e.g. `assert_loss_below(dpo_result, 0.65)`.

    A failure lists the 3 rows with the highest loss.
    """
    __tracebackhide__ = True
    _assert_metric(result, "loss", "<", threshold, confidence, method)


def assert_chosen_reward_above(result: EvalResult, threshold: float, *, confidence: float | None = None, method: str = "t") -> None:
    """Assert that the mean chosen reward `rewards/chosen` is strictly above `threshold`, e.g.
    `assert_chosen_reward_above(dpo_result, 0.0)`: the chosen answers did not lose probability.

    A failure lists the 3 rows whose chosen reward is lowest.
    """
    __tracebackhide__ = True
    _assert_metric(result, "rewards/chosen", ">", threshold, confidence, method)


def assert_rejected_reward_below(result: EvalResult, threshold: float, *, confidence: float | None = None, method: str = "t") -> None:
    """Assert that the mean rejected reward `rewards/rejected` is strictly below `threshold`, e.g.
    `assert_rejected_reward_below(dpo_result, 0.0)`: the rejected answers lost probability.

    Failing, it shows the 3 rows with the highest rejected reward.
    """
    __tracebackhide__ = True
    _assert_metric(result, "rewards/rejected", "<", threshold, confidence, method)


def assert_metrics_finite(result: EvalResult) -> None:
    """Assert that every metric and every floating-point per-example value is finite.

    The per-example arrays checked are all float arrays of `result.per_example`: the
    policy and reference log-probs, the rewards, margins and losses, and the logit and
    entropy sums.

    Args:
        result (`EvalResult`):
            The evaluation of one checkpoint, e.g. the `dpo_result` fixture.

    Raises:
        `AssertionError`: if any value is NaN or infinite; the message lists the
            non-finite metrics and the rows holding non-finite values.

    Example:

    ```py
    >>> def test_no_nan_or_inf(dpo_result):
    ...     assert_metrics_finite(dpo_result)
    ```
    """
    __tracebackhide__ = True
    bad_metrics = {name: value for name, value in result.metrics.items() if not math.isfinite(value)}
    arrays = _float_arrays(result.per_example)
    bad_mask = torch.zeros(len(result.per_example), dtype=torch.bool)
    for values in arrays.values():
        bad_mask |= ~torch.isfinite(values)
    bad_positions = bad_mask.nonzero().flatten().tolist()
    if not bad_metrics and not bad_positions:
        return

    def non_finite_values(position: int) -> str:
        return ", ".join(
            f"{name}={number(values[position].item())}"
            for name, values in arrays.items()
            if not math.isfinite(values[position].item())
        )

    counted = [count(n, noun) for n, noun in ((len(bad_metrics), "metric"), (len(bad_positions), "row")) if n]
    verb = "is" if len(bad_metrics) + len(bad_positions) == 1 else "are"
    lines = [f"{result.scope}: {' and '.join(counted)} {verb} not finite ({scored(result)})"]
    if bad_metrics:
        listed = ", ".join(f"{name} = {number(value)}" for name, value in bad_metrics.items())
        lines += textwrap.wrap(listed, WIDTH, initial_indent="metrics: ", subsequent_indent="  ")
    if bad_positions:
        lines.append("rows:")
        lines += example_lines(result, bad_positions[:_MAX_LISTED_ROWS], non_finite_values)
        if len(bad_positions) > _MAX_LISTED_ROWS:
            lines.append(f"  … and {count(len(bad_positions) - _MAX_LISTED_ROWS, 'more row')}")
    raise AssertionError("\n".join(lines))


def assert_no_regression(
    result: EvalResult, baseline: EvalResult, metric: str = "rewards/margins", *, tolerance: float = 0.0, confidence: float = 0.95
) -> None:
    """Assert that `result` did not regress against `baseline` on `metric`, judged pair by pair.

    A paired test on the rows both scored (paired bootstrap of the mean
    difference; exact sign test for `rewards/accuracies`) decides: the check
    fails only when the whole confidence interval of the difference lies beyond
    `tolerance` in the wrong direction. Results from different eval sets are refused.

    Args:
        result (`EvalResult`):
            The checkpoint under test, e.g. the `dpo_result` fixture.
        baseline (`EvalResult`):
            The last release, e.g. the `dpo_baseline` fixture.
        metric (`str`, *optional*, defaults to `"rewards/margins"`):
            A metric with per-example values (see `pytest_dpo.metric_table.INTERVAL_METRICS`).
        tolerance (`float`, *optional*, defaults to `0.0`):
            How far the metric may move the wrong way before it counts as a regression.
        confidence (`float`, *optional*, defaults to `0.95`):
            Confidence level of the interval of the difference.

    Raises:
        `AssertionError`: on a regression; the message shows both values, the interval,
            and the rows that flipped from right (chosen preferred) to wrong.
        `ValueError`: the two results come from different eval sets.

    Example:

    ```py
    >>> def test_no_regression(dpo_result, dpo_baseline):
    ...     assert_no_regression(dpo_result, dpo_baseline, "rewards/accuracies", tolerance=0.02)
    ```
    """
    __tracebackhide__ = True
    from .paired import paired_comparison

    comparison = paired_comparison(result, baseline, metric, confidence=confidence, tolerance=tolerance)
    if not comparison.regressed:
        return
    headline = (
        f"{result.scope}: {metric} regressed against {baseline.checkpoint}: "
        f"{number(comparison.baseline_value)} -> {number(comparison.candidate_value)} "
        f"(difference {comparison.interval}, tolerance {number(tolerance)}, N={comparison.n} paired rows)"
    )
    flips = (
        f"{len(comparison.flipped_to_wrong)} rows flipped from right to wrong, "
        f"{len(comparison.flipped_to_right)} from wrong to right"
    )
    lines = [headline, flips]
    positions = {int(row): index for index, row in enumerate(result.per_example.rows.tolist())}
    flipped = [positions[row] for row in comparison.flipped_to_wrong[:WORST_COUNT] if row in positions]
    margins = result.per_example.margins
    lines += example_lines(result, flipped, lambda position: f"margin {number(margins[position].item())} (was right)")
    raise AssertionError("\n".join(lines))


def _assert_metric(
    result: EvalResult, metric: str, operator: str, threshold: float, confidence: float | None, method: str
) -> None:
    __tracebackhide__ = True
    failure = check_metric(result, metric, operator, threshold, confidence=confidence, method=method)
    if failure is not None:
        raise AssertionError(f"{result.scope}: {failure}")


def _float_arrays(per_example: PerExample) -> dict[str, torch.Tensor]:
    arrays = {f.name: getattr(per_example, f.name) for f in fields(per_example)}
    return {name: values for name, values in arrays.items() if values.is_floating_point()}
