"""Paired regression tests: a candidate checkpoint against a baseline on the same eval-set rows.

Pure functions on per-example results: no models, no pytest, no files.
`paired_comparison` says whether a candidate is worse than a baseline on the
same rows by more than chance; which direction is worse, and which per-example
array a metric averages, are read from `metric_table`. The exact binomial sign
test comes from `scipy.stats`, imported only when it is computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .stats import (
    Interval,
    bootstrap_means,
    check_confidence,
    check_finite,
    check_resamples,
    interval_metric,
    per_example_of,
    percentile_bounds,
)

__all__ = ["PairedComparison", "paired_comparison", "sign_test_p_value"]


@dataclass(frozen=True)
class PairedComparison:
    """A candidate checkpoint against a baseline on the same eval-set rows.

    Attributes:
        metric (`str`): the TRL metric compared, e.g. `rewards/margins`.
        candidate_value (`float`): the candidate's metric over the rows both results scored.
        baseline_value (`float`): the baseline's metric over the same rows.
        difference (`float`): `candidate_value - baseline_value`.
        interval (`Interval`): confidence interval of the difference (paired bootstrap).
        p_value (`float`): two-sided p-value of "no difference": the exact sign test on
            the discordant rows for `rewards/accuracies`, the bootstrap p-value of the
            mean difference otherwise.
        regressed (`bool`): the candidate is worse by more than `tolerance` with the
            interval's confidence: the interval's upper bound is below `-tolerance`
            (lower bound above `+tolerance` for metrics where lower is better).
        flipped_to_wrong (`list[int]`): eval-set rows the baseline ranks right
            (margin > 0) and the candidate does not.
        flipped_to_right (`list[int]`): eval-set rows the candidate ranks right and
            the baseline does not.
        n (`int`): how many rows both results scored.
        higher_is_better (`bool`): the direction that counts as better for `metric`.
        tolerance (`float`): how much worse the candidate may be before it counts as a regression.
    """

    metric: str
    candidate_value: float
    baseline_value: float
    difference: float
    interval: Interval
    p_value: float
    regressed: bool
    flipped_to_wrong: list[int]
    flipped_to_right: list[int]
    n: int
    higher_is_better: bool
    tolerance: float

    def __str__(self) -> str:
        verdict = "regressed" if self.regressed else "no regression"
        return (
            f"{self.metric}: candidate {self.candidate_value:.4f} vs baseline {self.baseline_value:.4f}, "
            f"difference {self.interval}, p={self.p_value:.3g}, N={self.n}, "
            f"{len(self.flipped_to_wrong)} rows flipped to wrong, {len(self.flipped_to_right)} to right: {verdict}"
        )


def sign_test_p_value(positives: int, negatives: int) -> float:
    """Exact two-sided sign test: the p-value of `positives` vs `negatives` under a fair coin.

    On the discordant rows of two classifiers on the same items this is McNemar's
    exact test. Ties (rows that did not change) are left out by the caller.

    Args:
        positives (`int`): how many pairs moved one way (e.g. wrong → right).
        negatives (`int`): how many moved the other way (e.g. right → wrong).

    Example:
        >>> sign_test_p_value(0, 10) == 2 * 0.5**10
        True
    """
    if positives < 0 or negatives < 0:
        raise ValueError(f"sign_test_p_value needs counts >= 0, got {positives} and {negatives}.")
    if positives + negatives == 0:
        return 1.0
    from scipy import stats

    return float(stats.binomtest(positives, positives + negatives, 0.5).pvalue)


def paired_comparison(
    candidate: Any,
    baseline: Any,
    metric: str = "rewards/margins",
    *,
    confidence: float = 0.95,
    tolerance: float = 0.0,
    resamples: int = 2000,
    seed: int = 0,
) -> PairedComparison:
    """Whether `candidate` is worse than `baseline` on the same eval set, beyond chance.

    The two results are aligned on the eval-set rows both scored. The interval
    of the difference (candidate − baseline) is a paired percentile bootstrap of
    the mean per-row difference: rows are resampled together, so the
    row-to-row variation both checkpoints share cancels and a small but
    consistent drop is detected. For `rewards/accuracies` the per-row
    difference is that of the correctness (margin > 0) and the p-value is the
    exact sign test (McNemar's exact test) on the rows that flipped. For the
    other metrics the p-value is the bootstrap p-value of the same resamples,
    `2 · min(share ≤ 0, share ≥ 0)` (with the usual +1 correction), which
    agrees with the interval: it is below `1 - confidence` exactly when the
    interval excludes 0, up to one resample. The same `seed` draws the same
    rows whichever result is the candidate, so swapping the two negates the
    difference and its interval and swaps the flip lists.

    Args:
        candidate (`EvalResult` or `PerExample`): the checkpoint under test.
        baseline (`EvalResult` or `PerExample`): what it must not be worse than,
            e.g. the released model, evaluated on the same eval set.
        metric (`str`, *optional*, defaults to `"rewards/margins"`): a name from
            `metric_table.INTERVAL_METRICS`. Its direction is the table's `higher_is_better`:
            for `loss`, `rewards/rejected` and `logps/rejected` lower is better.
        confidence (`float`, *optional*, defaults to `0.95`): coverage of the interval.
        tolerance (`float`, *optional*, defaults to `0.0`): how much worse the
            candidate may be (in the metric's units) before it counts as regressed.
        resamples (`int`, *optional*, defaults to `2000`): bootstrap resamples.
        seed (`int`, *optional*, defaults to `0`): bootstrap seed.

    Raises:
        ValueError: the results come from different eval sets, share no rows, or
            `metric` has no per-example values.

    Example:
        ```py
        from pytest_dpo.paired import paired_comparison


        def test_no_regression_against_release(dpo_result, released_result):
            comparison = paired_comparison(dpo_result, released_result, "rewards/accuracies", tolerance=0.02)
            assert not comparison.regressed, str(comparison)
        ```
    """
    check_confidence(confidence)
    check_resamples(resamples)
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0 (how much worse the candidate may be), got {tolerance}.")
    record = interval_metric(metric)
    metric = record.name
    candidate_sha = getattr(candidate, "eval_set_sha256", None)
    baseline_sha = getattr(baseline, "eval_set_sha256", None)
    if candidate_sha is not None and baseline_sha is not None and candidate_sha != baseline_sha:
        raise ValueError(
            f"The eval sets differ (candidate sha256 {candidate_sha[:12]}…, baseline {baseline_sha[:12]}…); "
            "a regression test needs both results on the same eval set. Evaluate the baseline on the candidate's eval set."
        )
    candidate_rows, baseline_rows = per_example_of(candidate), per_example_of(baseline)
    common, candidate_index, baseline_index = _align(candidate_rows.rows, baseline_rows.rows)

    candidate_right = candidate_rows.margins[candidate_index] > 0
    baseline_right = baseline_rows.margins[baseline_index] > 0
    flipped_to_wrong = common[baseline_right & ~candidate_right].tolist()
    flipped_to_right = common[candidate_right & ~baseline_right].tolist()

    is_share = record.interval == "wilson"  # the accuracy: the share of rows ranked right
    if is_share:
        candidate_values, baseline_values = candidate_right.double(), baseline_right.double()
    else:
        candidate_values = getattr(candidate_rows, record.field)[candidate_index].double()
        baseline_values = getattr(baseline_rows, record.field)[baseline_index].double()
    check_finite(candidate_values, f"the candidate's {metric}")
    check_finite(baseline_values, f"the baseline's {metric}")
    candidate_value, baseline_value = float(candidate_values.mean()), float(baseline_values.mean())
    difference = candidate_value - baseline_value

    n = len(common)
    if n < 2:
        interval = Interval(difference, -math.inf, math.inf, confidence, "paired bootstrap")
        bootstrap_p = 1.0
    else:
        means = bootstrap_means(candidate_values - baseline_values, resamples, seed)
        low, high = percentile_bounds(means, confidence)
        interval = Interval(difference, low, high, confidence, "paired bootstrap")
        at_most_zero, at_least_zero = int((means <= 0).sum()), int((means >= 0).sum())
        bootstrap_p = min(1.0, 2 * (min(at_most_zero, at_least_zero) + 1) / (resamples + 1))
    if is_share:
        p_value = sign_test_p_value(len(flipped_to_right), len(flipped_to_wrong))
    else:
        p_value = bootstrap_p

    higher_is_better = record.higher_is_better
    regressed = interval.high < -tolerance if higher_is_better else interval.low > tolerance
    return PairedComparison(
        metric=metric,
        candidate_value=candidate_value,
        baseline_value=baseline_value,
        difference=difference,
        interval=interval,
        p_value=p_value,
        regressed=regressed,
        flipped_to_wrong=flipped_to_wrong,
        flipped_to_right=flipped_to_right,
        n=n,
        higher_is_better=higher_is_better,
        tolerance=tolerance,
    )


def _align(candidate_rows: torch.Tensor, baseline_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows both results scored (ascending), and where each sits in the candidate's and the baseline's arrays."""
    positions = []
    for rows, who in ((candidate_rows, "candidate"), (baseline_rows, "baseline")):
        row_list = [int(row) for row in rows]
        if len(set(row_list)) != len(row_list):
            raise ValueError(f"The {who}'s per-example rows repeat a row index; each eval-set row is scored once.")
        positions.append({row: index for index, row in enumerate(row_list)})
    common = sorted(positions[0].keys() & positions[1].keys())
    if not common:
        raise ValueError(
            "The candidate and the baseline share no scored rows. Evaluate both on the same eval set "
            "with settings that keep the same rows."
        )
    return (
        torch.tensor(common, dtype=torch.int64),
        torch.tensor([positions[0][row] for row in common], dtype=torch.int64),
        torch.tensor([positions[1][row] for row in common], dtype=torch.int64),
    )
