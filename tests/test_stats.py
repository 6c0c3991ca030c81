"""Confidence bounds (`pytest_dpo.stats`) and paired regression tests (`pytest_dpo.paired`): pure math, no models.

Quantiles are checked against printed tables and closed forms (Cauchy for df = 1,
df = 2); interval coverage against simulated data from seeded generators, so the
simulations are the same on every run; sign-test p-values against sums done by hand.
"""

from __future__ import annotations

import doctest
import math
from collections.abc import Sequence
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_dpo import paired, stats
from pytest_dpo.metric_table import BY_NAME, INTERVAL_METRICS
from pytest_dpo.metrics import aggregate, build_per_example
from pytest_dpo.paired import paired_comparison, sign_test_p_value
from pytest_dpo.results import EvalResult, SequenceScores
from pytest_dpo.settings import DPOSettings
from pytest_dpo.stats import (
    Interval,
    accuracy_interval,
    mean_interval,
    metric_interval,
    normal_quantile,
    t_quantile,
    wilson_interval,
)

from .docstring_examples import docstring_tests
from .token_statistics import token_statistics

SHA = "a" * 64
FINITE = st.floats(min_value=-50.0, max_value=50.0, allow_nan=False, width=32)
# Monte Carlo error of a coverage estimate from 2000 sets is sqrt(0.95 * 0.05 / 2000) ≈ 0.005.
SIMULATED_SETS = 2000


def make_result(
    chosen_rewards: Sequence[float],
    rejected_rewards: Sequence[float] | None = None,
    *,
    rows: Sequence[int] | None = None,
    sha: str = SHA,
    checkpoint: str = "checkpoint-1",
) -> EvalResult:
    """A real `EvalResult` (sigmoid loss, beta 1, reference log-probs -12) with these rewards."""
    count = len(chosen_rewards)
    rejected_rewards = [0.0] * count if rejected_rewards is None else rejected_rewards
    settings_ = DPOSettings(beta=1.0)
    tokens = torch.full((count,), 4)
    zeros = torch.zeros(count)

    def scores(chosen: torch.Tensor, rejected: torch.Tensor) -> SequenceScores:
        return SequenceScores(chosen, rejected, **token_statistics(tokens, zeros))

    reference = torch.full((count,), -12.0)
    policy = scores(
        reference + torch.tensor(chosen_rewards, dtype=torch.float32),
        reference + torch.tensor(rejected_rewards, dtype=torch.float32),
    )
    row_indices = torch.tensor(list(rows) if rows is not None else list(range(count)), dtype=torch.int64)
    per_example = build_per_example(row_indices, policy, scores(reference, reference), settings_)
    return EvalResult(
        checkpoint=checkpoint,
        checkpoint_path=f"/runs/{checkpoint}",
        reference="base",
        metrics=aggregate(per_example),
        per_example=per_example,
        dropped_rows=[],
        eval_set_sha256=sha,
        settings=settings_.to_dict(),
    )


# ------------------------------------------------------------------------------------------
# Quantiles
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "expected"), [(0.5, 0.0), (0.975, 1.959964), (0.995, 2.575829), (0.95, 1.644854), (0.025, -1.959964)]
)
def test_normal_quantile_matches_the_table(p: float, expected: float) -> None:
    assert normal_quantile(p) == pytest.approx(expected, abs=1e-6)


# Student t table (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2), 4 decimals.
@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [
        (0.975, 1, 12.7062),
        (0.975, 2, 4.3027),
        (0.975, 5, 2.5706),
        (0.975, 10, 2.2281),
        (0.975, 30, 2.0423),
        (0.975, 100, 1.9840),
        (0.95, 10, 1.8125),
        (0.995, 5, 4.0321),
        (0.995, 1, 63.6567),
        (0.9995, 3, 12.9240),
        (0.90, 20, 1.3253),
    ],
)
def test_t_quantile_matches_the_table(p: float, df: int, expected: float) -> None:
    assert t_quantile(p, df) == pytest.approx(expected, abs=5e-5)


@settings(deadline=None, max_examples=60)
@given(p=st.floats(min_value=1e-6, max_value=1 - 1e-6))
def test_t_quantile_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(p: float) -> None:
    # df = 1 is the Cauchy distribution; df = 2 has t = (2p - 1) / sqrt(2p(1 - p)).
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9, abs=1e-9)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9, abs=1e-9)


@settings(deadline=None, max_examples=40)
@given(p=st.floats(min_value=1e-4, max_value=1 - 1e-4), df=st.integers(min_value=1, max_value=500))
def test_t_quantile_is_antisymmetric_and_above_the_normal_quantile(p: float, df: int) -> None:
    assert t_quantile(1 - p, df) == pytest.approx(-t_quantile(p, df), rel=1e-9, abs=1e-12)
    if p > 0.5:
        assert t_quantile(p, df) > normal_quantile(p)
        assert t_quantile(p, df + 1) < t_quantile(p, df)


@pytest.mark.parametrize("p", [0.6, 0.975, 0.9995])
def test_t_quantile_stays_continuous_and_above_the_normal_for_large_df(p: float) -> None:
    assert t_quantile(p, 9999.999) == pytest.approx(t_quantile(p, 10_000), abs=1e-9)
    assert t_quantile(p, 10_000) > normal_quantile(p)


def test_quantiles_refuse_probabilities_outside_zero_one() -> None:
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="probability in \\(0, 1\\)"):
            normal_quantile(bad)
        with pytest.raises(ValueError, match="probability in \\(0, 1\\)"):
            t_quantile(bad, 5)
    with pytest.raises(ValueError, match="df > 0"):
        t_quantile(0.9, 0)


# ------------------------------------------------------------------------------------------
# Interval and Wilson
# ------------------------------------------------------------------------------------------


def test_interval_reads_well_and_checks_itself() -> None:
    interval = Interval(0.66666, 0.48804, 0.81, 0.95, "Wilson")
    assert str(interval) == "0.6667 [0.4880, 0.8100] (95% Wilson)"
    assert interval.contains(0.5) and interval.contains(0.81) and not interval.contains(0.82)
    assert interval.width == pytest.approx(0.81 - 0.48804)
    with pytest.raises(ValueError, match="out of order"):
        Interval(0.5, 0.6, 0.4, 0.95, "t")
    with pytest.raises(ValueError, match="confidence must be in"):
        Interval(0.5, 0.4, 0.6, 95, "t")


def test_wilson_interval_matches_the_formula_worked_by_hand() -> None:
    # 20 of 30, z = 1.959964: centre (2/3 + z²/60) / (1 + z²/30), half-width
    # z / (1 + z²/30) * sqrt((2/3)(1/3)/30 + z²/3600).
    interval = wilson_interval(20, 30)
    assert (interval.low, interval.high) == pytest.approx((0.48780, 0.80770), abs=1e-5)
    assert interval.estimate == pytest.approx(2 / 3)
    assert str(interval) == "0.6667 [0.4878, 0.8077] (95% Wilson)"
    assert wilson_interval(0, 10).low == 0.0 and wilson_interval(10, 10).high == 1.0
    assert wilson_interval(20, 30, 0.99).width > interval.width > wilson_interval(20, 30, 0.8).width


def test_wilson_interval_without_trials_is_uninformative() -> None:
    interval = wilson_interval(0, 0)
    assert math.isnan(interval.estimate) and (interval.low, interval.high) == (0.0, 1.0)


@pytest.mark.parametrize(("successes", "n"), [(-1, 5), (6, 5), (0, -1)])
def test_wilson_interval_refuses_impossible_counts(successes: int, n: int) -> None:
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        wilson_interval(successes, n)


@settings(deadline=None, max_examples=100)
@given(data=st.data(), n=st.integers(min_value=1, max_value=500), confidence=st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_wilson_estimate_lies_inside_and_the_interval_shrinks_with_more_data(
    data: st.DataObject, n: int, confidence: float
) -> None:
    successes = data.draw(st.integers(min_value=0, max_value=n))
    interval = wilson_interval(successes, n, confidence)
    assert 0.0 <= interval.low <= interval.estimate <= interval.high <= 1.0
    factor = data.draw(st.integers(min_value=2, max_value=10))
    assert wilson_interval(successes * factor, n * factor, confidence).width < interval.width


# At n = 64 Wilson's exact coverage is 0.944, 0.960 and 0.947 at these p (it oscillates with p).
@pytest.mark.parametrize("p", [0.3, 0.6, 0.85])
def test_wilson_interval_covers_the_true_proportion_at_nominal_rate(p: float) -> None:
    n = 64
    exact = sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1) if wilson_interval(k, n).contains(p))
    assert exact == pytest.approx(0.95, abs=0.02)

    generator = torch.Generator().manual_seed(1234)
    successes = (torch.rand(SIMULATED_SETS, n, generator=generator) < p).sum(dim=1)
    covered = sum(wilson_interval(int(k), n).contains(p) for k in successes)
    assert covered / SIMULATED_SETS == pytest.approx(0.95, abs=0.02)


# ------------------------------------------------------------------------------------------
# Means: t and bootstrap
# ------------------------------------------------------------------------------------------


def test_t_interval_matches_the_formula_worked_by_hand() -> None:
    # mean 1.25, sample sd sqrt(1.25/3), t(0.975, 3) = 3.182446: half-width 3.182446 * 0.645497 / 2 = 1.027130.
    interval = mean_interval([0.5, 1.0, 1.5, 2.0])
    assert interval.estimate == 1.25
    assert (interval.low, interval.high) == pytest.approx((1.25 - 1.027130, 1.25 + 1.027130), abs=1e-6)
    assert interval.method == "t" and interval.confidence == 0.95
    assert mean_interval(torch.tensor([0.5, 1.0, 1.5, 2.0])) == interval


def test_mean_interval_of_too_few_values_is_unbounded() -> None:
    empty = mean_interval([])
    assert math.isnan(empty.estimate) and (empty.low, empty.high) == (-math.inf, math.inf)
    for method in ("t", "bootstrap"):
        single = mean_interval([3.0], method=method)
        assert single.estimate == 3.0 and (single.low, single.high) == (-math.inf, math.inf)


def test_mean_interval_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="non-finite values \\(first at position 1\\)"):
        mean_interval([1.0, math.nan, math.inf])
    with pytest.raises(ValueError, match="must be 1-D"):
        mean_interval(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="Unknown interval method 'normal'.*t, bootstrap"):
        mean_interval([1.0, 2.0], method="normal")
    with pytest.raises(ValueError, match="confidence must be in"):
        mean_interval([1.0, 2.0], confidence=1.0)
    with pytest.raises(ValueError, match="resamples must be at least 1"):
        mean_interval([1.0, 2.0], method="bootstrap", resamples=0)


def test_t_interval_covers_the_mean_of_normal_data_at_nominal_rate() -> None:
    # With n = 8 a normal-quantile interval covers only about 0.92, outside this tolerance.
    generator = torch.Generator().manual_seed(99)
    sets = 3.0 + 2.0 * torch.randn(SIMULATED_SETS, 8, generator=generator, dtype=torch.float64)
    covered = sum(mean_interval(values).contains(3.0) for values in sets)
    assert covered / SIMULATED_SETS == pytest.approx(0.95, abs=0.015)


def test_bootstrap_interval_covers_the_mean_roughly_at_nominal_rate() -> None:
    # The percentile bootstrap runs a little narrow for small n, hence the looser, lower-skewed band.
    generator = torch.Generator().manual_seed(7)
    sets = -torch.log(torch.rand(400, 40, generator=generator, dtype=torch.float64))  # Exponential(1), mean 1
    covered = sum(
        mean_interval(values, method="bootstrap", resamples=1000, seed=index).contains(1.0)
        for index, values in enumerate(sets)
    )
    assert 0.88 <= covered / len(sets) <= 0.98


def test_bootstrap_is_reproducible_with_its_seed() -> None:
    values = torch.linspace(-3, 5, 50) ** 2
    first = mean_interval(values, method="bootstrap", seed=3)
    assert mean_interval(values.tolist(), method="bootstrap", seed=3) == first
    assert mean_interval(values, method="bootstrap", seed=4) != first
    assert first.method == "bootstrap"
    # Percentile bounds of a large resample sit close to the t interval for a smooth statistic.
    assert first.low == pytest.approx(mean_interval(values).low, rel=0.1)


@settings(deadline=None, max_examples=60)
@given(
    values=st.lists(FINITE, min_size=2, max_size=40).filter(lambda v: max(v) - min(v) > 1e-3),
    factor=st.integers(min_value=2, max_value=6),
    method=st.sampled_from(["t", "bootstrap"]),
)
def test_mean_interval_holds_the_estimate_and_shrinks_with_more_data(
    values: list[float], factor: int, method: str
) -> None:
    interval = mean_interval(values, method=method, resamples=500)
    slack = 1e-9 * (1 + abs(interval.estimate))  # bootstrap means may round differently in the last digit
    assert interval.low - slack <= interval.estimate <= interval.high + slack
    # The same values seen `factor` times: same mean, less uncertainty.
    repeated = mean_interval(values * factor, method=method, resamples=500)
    assert repeated.estimate == pytest.approx(interval.estimate, rel=1e-9, abs=1e-9)
    if method == "t":
        assert repeated.width < interval.width
    else:
        # Bootstrap widths carry resampling noise of a few percent.
        assert repeated.width < interval.width * 1.1


# ------------------------------------------------------------------------------------------
# Metric intervals on results
# ------------------------------------------------------------------------------------------


ARRAYS = {
    "loss": "losses",
    "rewards/chosen": "chosen_rewards",
    "rewards/rejected": "rejected_rewards",
    "rewards/margins": "margins",
    "logps/chosen": "policy_chosen_logps",
    "logps/rejected": "policy_rejected_logps",
}


@pytest.mark.parametrize("metric", sorted(ARRAYS))
@pytest.mark.parametrize("method", ["t", "bootstrap"])
def test_metric_interval_uses_the_metrics_per_example_values(metric: str, method: str) -> None:
    result = make_result([0.5, -1.0, 2.0, 1.5, 0.25], [0.0, 0.5, -0.75, 1.0, -2.0])
    interval = metric_interval(result, metric, method=method)
    expected = mean_interval(getattr(result.per_example, ARRAYS[metric]), method=method)
    assert interval == expected
    assert interval.estimate == pytest.approx(result.metrics[metric], rel=1e-6)
    assert metric_interval(result.per_example, f"eval_{metric}", method=method) == expected


def test_accuracy_interval_is_wilson_on_the_rows_ranked_right() -> None:
    result = make_result([1.0, 2.0, -1.0, 0.5, 0.0, 3.0], [0.0, 0.0, 0.0, 1.0, 0.0, 2.0])
    # Right: rows 0, 1, 5 (row 4 is a tie, not right).
    assert accuracy_interval(result) == wilson_interval(3, 6)
    assert accuracy_interval(result.per_example, 0.8) == wilson_interval(3, 6, 0.8)
    assert metric_interval(result, "rewards/accuracies", method="bootstrap") == wilson_interval(3, 6)
    assert accuracy_interval(result).estimate == result.metrics["rewards/accuracies"]


@pytest.mark.parametrize("metric", ["logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"])
def test_token_weighted_metrics_are_refused_with_the_supported_list(metric: str) -> None:
    result = make_result([1.0, 2.0])
    with pytest.raises(ValueError, match=f"'{metric}'.*supported only for per-example metrics") as error:
        metric_interval(result, metric)
    assert all(name in str(error.value) for name in INTERVAL_METRICS)
    with pytest.raises(ValueError, match="per-example metrics"):
        paired_comparison(result, result, metric)


def test_unknown_metric_is_refused() -> None:
    with pytest.raises(ValueError, match="Unknown metric 'rewards/margin'.*rewards/margins"):
        metric_interval(make_result([1.0, 2.0]), "rewards/margin")


# ------------------------------------------------------------------------------------------
# Sign test
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("positives", "negatives", "expected"),
    [
        (0, 10, 2 * 0.5**10),
        (10, 0, 2 * 0.5**10),
        (1, 9, 2 * (1 + 10) / 2**10),
        (2, 8, 2 * (1 + 10 + 45) / 2**10),
        (3, 12, 2 * (1 + 15 + 105 + 455) / 2**15),
        (5, 5, 1.0),
        (4, 5, 1.0),
        (0, 1, 1.0),
        (0, 0, 1.0),
    ],
)
def test_sign_test_p_value_matches_hand_computed_values(positives: int, negatives: int, expected: float) -> None:
    assert sign_test_p_value(positives, negatives) == pytest.approx(expected, rel=1e-12)


@settings(deadline=None, max_examples=60)
@given(positives=st.integers(0, 300), negatives=st.integers(0, 300))
def test_sign_test_p_value_is_the_exact_binomial_tail(positives: int, negatives: int) -> None:
    total, smaller = positives + negatives, min(positives, negatives)
    tail = sum(Fraction(math.comb(total, k), 2**total) for k in range(smaller + 1))
    assert sign_test_p_value(positives, negatives) == pytest.approx(float(min(1, 2 * tail)), rel=1e-12)
    assert sign_test_p_value(positives, negatives) == sign_test_p_value(negatives, positives)


def test_sign_test_refuses_negative_counts() -> None:
    with pytest.raises(ValueError, match="counts >= 0"):
        sign_test_p_value(-1, 3)


# ------------------------------------------------------------------------------------------
# Paired comparison
# ------------------------------------------------------------------------------------------


def test_flip_lists_name_the_rows_that_changed_sides() -> None:
    # Eval-set rows 0..9; the candidate dropped row 8, the baseline row 3: they share 0,1,2,4,5,6,7,9.
    candidate = make_result(
        [1.0, -1.0, 2.0, 0.5, -0.5, 0.0, 3.0, 1.0, -2.0], rows=[0, 1, 2, 3, 4, 5, 6, 7, 9]
    )  # right on 0, 2, 3, 6, 7
    baseline = make_result(
        [-1.0, 1.0, 2.0, 1.5, 0.5, -3.0, 1.0, 1.0, 2.0], rows=[0, 1, 2, 4, 5, 6, 7, 8, 9]
    )  # right on 1, 2, 4, 5, 7, 8, 9
    comparison = paired_comparison(candidate, baseline, "rewards/accuracies")
    assert comparison.n == 8
    assert comparison.flipped_to_wrong == [1, 4, 5, 9]
    assert comparison.flipped_to_right == [0, 6]
    # Shared rows: candidate right on 0, 2, 6, 7 (4/8); baseline on 1, 2, 4, 5, 7, 9 (6/8).
    assert (comparison.candidate_value, comparison.baseline_value) == (0.5, 0.75)
    assert comparison.difference == -0.25
    assert comparison.p_value == sign_test_p_value(2, 4)


def test_margins_are_compared_over_the_shared_rows_only() -> None:
    candidate = make_result([1.0, 2.0, 3.0, 100.0], rows=[0, 1, 2, 3])
    baseline = make_result([0.0, 1.0, 2.0, -100.0], rows=[1, 2, 3, 4])
    comparison = paired_comparison(candidate, baseline)
    # Shared rows 1, 2, 3: candidate 2, 3, 100; baseline 0, 1, 2.
    assert comparison.candidate_value == pytest.approx(35.0)
    assert comparison.baseline_value == pytest.approx(1.0)
    assert comparison.n == 3


def test_a_clearly_worse_candidate_is_a_regression() -> None:
    generator = torch.Generator().manual_seed(0)
    baseline_margins = 1.0 + torch.randn(200, generator=generator)
    candidate_margins = baseline_margins - 0.3 + 0.2 * torch.randn(200, generator=generator)
    baseline, candidate = make_result(baseline_margins.tolist()), make_result(candidate_margins.tolist())

    comparison = paired_comparison(candidate, baseline)
    assert comparison.regressed and comparison.higher_is_better
    assert comparison.interval.high < 0 and comparison.interval.contains(comparison.difference)
    assert comparison.difference == pytest.approx(-0.3, abs=0.05)
    assert comparison.p_value < 0.01
    assert "regressed" in str(comparison)

    # Lower loss is better: the worse candidate's loss rises.
    loss = paired_comparison(candidate, baseline, "loss")
    assert not BY_NAME["loss"].higher_is_better
    assert loss.regressed and not loss.higher_is_better and loss.interval.low > 0
    # The other way round the candidate improved: no regression in either metric.
    assert not paired_comparison(baseline, candidate).regressed
    assert not paired_comparison(baseline, candidate, "loss").regressed


def test_a_tiny_shift_is_not_a_regression_in_a_noisy_comparison() -> None:
    generator = torch.Generator().manual_seed(1)
    baseline_margins = torch.randn(50, generator=generator)
    candidate_margins = baseline_margins - 0.01 + torch.randn(50, generator=generator)
    comparison = paired_comparison(make_result(candidate_margins.tolist()), make_result(baseline_margins.tolist()))
    assert comparison.interval.low < 0 < comparison.interval.high
    assert not comparison.regressed and comparison.p_value > 0.05


@pytest.mark.parametrize("metric", INTERVAL_METRICS)
def test_identical_results_are_not_a_regression(metric: str) -> None:
    result = make_result([1.0, -0.5, 2.0, 0.25, -1.5, 3.0], [0.5, 0.0, -1.0, 1.0, -0.5, 0.0])
    twin = make_result([1.0, -0.5, 2.0, 0.25, -1.5, 3.0], [0.5, 0.0, -1.0, 1.0, -0.5, 0.0], checkpoint="checkpoint-2")
    comparison = paired_comparison(twin, result, metric)
    assert comparison.difference == 0.0
    assert (comparison.interval.low, comparison.interval.high) == (0.0, 0.0)
    assert comparison.p_value == 1.0
    assert not comparison.regressed
    assert comparison.flipped_to_wrong == [] and comparison.flipped_to_right == []


def test_tolerance_decides_how_much_worse_is_allowed() -> None:
    # Every margin drops by exactly 0.25: the difference is certain, its interval a point.
    margins = [1.0, 2.0, -0.5, 0.75, 1.5, 3.0]
    baseline, candidate = make_result(margins), make_result([m - 0.25 for m in margins])
    assert paired_comparison(candidate, baseline).interval.high == pytest.approx(-0.25)
    assert paired_comparison(candidate, baseline).regressed
    assert paired_comparison(candidate, baseline, tolerance=0.2).regressed
    assert not paired_comparison(candidate, baseline, tolerance=0.3).regressed
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        paired_comparison(candidate, baseline, tolerance=-0.1)


def test_accuracy_regression_uses_the_sign_test_on_flipped_rows() -> None:
    # 40 rows: baseline right on all; the candidate ranks 10 of them wrong and none newly right.
    baseline = make_result([1.0] * 40)
    candidate = make_result([-1.0] * 10 + [1.0] * 30)
    comparison = paired_comparison(candidate, baseline, "rewards/accuracies", tolerance=0.05)
    assert comparison.p_value == 2 * 0.5**10
    assert comparison.flipped_to_wrong == list(range(10)) and comparison.flipped_to_right == []
    assert comparison.difference == -0.25 and comparison.regressed
    assert not paired_comparison(candidate, baseline, "rewards/accuracies", tolerance=0.5).regressed


def test_different_eval_sets_are_refused() -> None:
    candidate = make_result([1.0, 2.0], sha="a" * 64)
    baseline = make_result([1.0, 2.0], sha="b" * 64)
    with pytest.raises(ValueError, match="eval sets differ.*same eval set"):
        paired_comparison(candidate, baseline)
    # Bare per-example arrays carry no hash and are compared on their rows.
    assert paired_comparison(candidate.per_example, baseline.per_example).difference == 0.0


def test_results_without_shared_rows_are_refused() -> None:
    with pytest.raises(ValueError, match="share no scored rows"):
        paired_comparison(make_result([1.0, 2.0], rows=[0, 1]), make_result([1.0, 2.0], rows=[2, 3]))
    with pytest.raises(ValueError, match="repeat a row index"):
        paired_comparison(make_result([1.0, 2.0], rows=[0, 0]), make_result([1.0, 2.0]))


def test_a_single_shared_row_cannot_show_a_regression() -> None:
    comparison = paired_comparison(make_result([-5.0]), make_result([5.0]))
    assert comparison.difference == -10.0
    assert (comparison.interval.low, comparison.interval.high) == (-math.inf, math.inf)
    assert not comparison.regressed


@settings(deadline=None, max_examples=60)
@given(
    pairs=st.lists(st.tuples(FINITE, FINITE, FINITE, FINITE), min_size=1, max_size=30),
    metric=st.sampled_from(INTERVAL_METRICS),
    seed=st.integers(0, 2**31),
)
def test_swapping_candidate_and_baseline_mirrors_the_comparison(
    pairs: list[tuple[float, float, float, float]], metric: str, seed: int
) -> None:
    first = make_result([p[0] for p in pairs], [p[1] for p in pairs])
    second = make_result([p[2] for p in pairs], [p[3] for p in pairs])
    forward = paired_comparison(first, second, metric, resamples=300, seed=seed)
    backward = paired_comparison(second, first, metric, resamples=300, seed=seed)
    assert backward.difference == -forward.difference
    assert (backward.candidate_value, backward.baseline_value) == (forward.baseline_value, forward.candidate_value)
    assert (backward.interval.low, backward.interval.high) == (-forward.interval.high, -forward.interval.low)
    assert backward.flipped_to_wrong == forward.flipped_to_right
    assert backward.flipped_to_right == forward.flipped_to_wrong
    assert backward.p_value == forward.p_value and backward.n == forward.n == len(pairs)


# ------------------------------------------------------------------------------------------
# Docstring examples
# ------------------------------------------------------------------------------------------


def test_docstring_doctests_hold() -> None:
    outcomes = [doctest.testmod(module, raise_on_error=False, report=False) for module in (stats, paired)]
    assert sum(outcome.attempted for outcome in outcomes) >= 8
    assert all(outcome.failed == 0 for outcome in outcomes)


def test_docstring_examples_pass_on_a_good_result_and_fail_on_a_bad_one() -> None:
    good = make_result([1.0 + 0.1 * (row % 7) for row in range(60)])
    bad = make_result([-1.0 + 0.1 * (row % 7) for row in range(60)])
    for function in (stats.accuracy_interval, stats.metric_interval):
        (example,) = docstring_tests(function)
        example(good)
        with pytest.raises(AssertionError):
            example(bad)
    (example,) = docstring_tests(paired.paired_comparison)
    example(good, bad)
    with pytest.raises(AssertionError, match="regressed"):
        example(bad, good)
