"""Confidence bounds and paired regression tests on per-example results.

Pure functions on per-example arrays (torch tensors or sequences of floats): no
models, no pytest, no files. An eval set of 64 rows measures `rewards/accuracies`
to within roughly ±0.12, so a gate on the point estimate alone passes and fails
checkpoints by chance; the intervals here say how far the number can be trusted,
and `paired_comparison` says whether a candidate is worse than a baseline on the
same rows by more than chance.

Distributions come from `scipy.stats` (normal and Student t quantiles, the
exact binomial sign test), imported only when an interval or a test is
computed, so a run that computes none never loads scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .metric_table import INTERVAL_METHODS, PER_EXAMPLE_METRICS
from .results import PerExample

__all__ = [
    "LOWER_IS_BETTER_METRICS",
    "PER_EXAMPLE_METRICS",
    "Interval",
    "PairedComparison",
    "INTERVAL_METHODS",
    "accuracy_interval",
    "check_interval_method",
    "mean_interval",
    "metric_interval",
    "normal_quantile",
    "paired_comparison",
    "sign_test_p_value",
    "t_quantile",
    "wilson_interval",
]

# A regression is a move in the wrong direction: these metrics get worse as they grow.
LOWER_IS_BETTER_METRICS = ("loss", "rewards/rejected", "logps/rejected")

_METRIC_FIELDS = {
    "loss": "losses",
    "rewards/chosen": "chosen_rewards",
    "rewards/rejected": "rejected_rewards",
    "rewards/margins": "margins",
    "logps/chosen": "policy_chosen_logps",
    "logps/rejected": "policy_rejected_logps",
}
_TOKEN_WEIGHTED_METRICS = ("logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")
# Bootstrap resamples are drawn in chunks so that memory stays bounded (about 32 MiB of indices).
_BOOTSTRAP_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval.

    Attributes:
        estimate (`float`): the point estimate (`nan` when there is no data).
        low (`float`): the lower bound.
        high (`float`): the upper bound.
        confidence (`float`): the nominal coverage, e.g. `0.95`.
        method (`str`): how the bounds were computed, e.g. `Wilson`, `t`, `bootstrap`.

    Example:
        >>> interval = wilson_interval(20, 30)
        >>> str(interval)
        '0.6667 [0.4878, 0.8077] (95% Wilson)'
        >>> interval.contains(0.5)
        True
    """

    estimate: float
    low: float
    high: float
    confidence: float
    method: str

    def __post_init__(self) -> None:
        _check_confidence(self.confidence)
        if not self.low <= self.high:
            raise ValueError(f"Interval bounds are out of order: low={self.low} > high={self.high}. Swap them.")

    def __str__(self) -> str:
        return f"{self.estimate:.4f} [{self.low:.4f}, {self.high:.4f}] ({self.confidence * 100:g}% {self.method})"

    @property
    def width(self) -> float:
        """`high - low`."""
        return self.high - self.low

    def contains(self, value: float) -> bool:
        """Whether `low <= value <= high`.

        Args:
            value (`float`): the value to check.
        """
        return self.low <= value <= self.high


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


def normal_quantile(p: float) -> float:
    """The standard normal distribution's quantile (inverse CDF) at `p` (`scipy.stats.norm.ppf`).

    Args:
        p (`float`): a probability in (0, 1).

    Example:
        >>> round(normal_quantile(0.975), 4)
        1.96
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"normal_quantile needs a probability in (0, 1), got {p}.")
    from scipy import stats

    return float(stats.norm.ppf(p))


def t_quantile(p: float, df: float) -> float:
    """Student's t distribution's quantile (inverse CDF) at `p` with `df` degrees of freedom (`scipy.stats.t.ppf`).

    Args:
        p (`float`): a probability in (0, 1).
        df (`float`): degrees of freedom, > 0.

    Example:
        >>> round(t_quantile(0.975, 5), 4)
        2.5706
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs a probability in (0, 1), got {p}.")
    if not df > 0:
        raise ValueError(f"t_quantile needs df > 0 degrees of freedom, got {df}.")
    from scipy import stats

    return float(stats.t.ppf(p, df))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval of a proportion.

    Unlike the normal-approximation ("Wald") interval it stays inside [0, 1] and
    keeps close to nominal coverage near 0 and 1, where DPO accuracies live.

    Args:
        successes (`int`): how many of the `n` trials succeeded.
        n (`int`): how many trials; with `n = 0` the estimate is `nan` and the
            interval is [0, 1].
        confidence (`float`, *optional*, defaults to `0.95`): the nominal coverage.

    Example:
        >>> print(wilson_interval(20, 30))
        0.6667 [0.4878, 0.8077] (95% Wilson)
    """
    _check_confidence(confidence)
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n, got successes={successes}, n={n}.")
    if n == 0:
        return Interval(math.nan, 0.0, 1.0, confidence, "Wilson")
    z = normal_quantile(0.5 + confidence / 2)
    proportion = successes / n
    z2_n = z * z / n
    center = (proportion + z2_n / 2) / (1 + z2_n)
    half_width = z / (1 + z2_n) * math.sqrt(proportion * (1 - proportion) / n + z2_n / (4 * n))
    # At 0 and n successes the bounds are exactly 0 and 1; rounding must not push the estimate outside.
    low = 0.0 if successes == 0 else max(0.0, center - half_width)
    high = 1.0 if successes == n else min(1.0, center + half_width)
    return Interval(proportion, low, high, confidence, "Wilson")


def mean_interval(
    values: torch.Tensor | Sequence[float],
    confidence: float = 0.95,
    *,
    method: str = "t",
    resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Confidence interval of the mean of per-example values.

    `method="t"` (the default) is Student's t interval, `mean ± t · s / √n`. It is
    exact for normal data and, by the central limit theorem, close to nominal for
    the sums of log-probs, rewards and losses DPO produces once there are a few
    dozen rows; it is deterministic and costs nothing. `method="bootstrap"` is the
    percentile bootstrap: it makes no normality assumption, which helps with
    strongly skewed values (e.g. a loss dominated by a few rows), but it is
    somewhat narrower than nominal for small N and depends on the resamples; a
    fixed `seed` makes it reproducible.

    With no values the estimate is `nan`; with fewer than two the bounds are
    infinite, since one value says nothing about the spread.

    Args:
        values (`torch.Tensor` or a sequence of `float`): one value per example, 1-D.
        confidence (`float`, *optional*, defaults to `0.95`): the nominal coverage.
        method (`str`, *optional*, defaults to `"t"`): `"t"` or `"bootstrap"`.
        resamples (`int`, *optional*, defaults to `2000`): bootstrap resamples.
        seed (`int`, *optional*, defaults to `0`): seed of the bootstrap's `torch.Generator`.

    Raises:
        ValueError: `values` is not 1-D or holds non-finite values, or an argument is out of range.

    Example:
        >>> print(mean_interval([0.5, 1.0, 1.5, 2.0]))
        1.2500 [0.2229, 2.2771] (95% t)
    """
    _check_confidence(confidence)
    check_interval_method(method)
    _check_resamples(resamples)
    data = _as_values(values, "values")
    n = len(data)
    if n == 0:
        return Interval(math.nan, -math.inf, math.inf, confidence, method)
    estimate = float(data.mean())
    if n == 1:
        return Interval(estimate, -math.inf, math.inf, confidence, method)
    if method == "t":
        half_width = t_quantile(0.5 + confidence / 2, n - 1) * float(data.std(correction=1)) / math.sqrt(n)
        return Interval(estimate, estimate - half_width, estimate + half_width, confidence, "t")
    low, high = _percentile_bounds(_bootstrap_means(data, resamples, seed), confidence)
    return Interval(estimate, low, high, confidence, "bootstrap")


def check_interval_method(method: str) -> None:
    """Refuse an interval method that is not one of `INTERVAL_METHODS`, naming the choices."""
    if method not in INTERVAL_METHODS:
        raise ValueError(f"Unknown interval method {method!r}. Choose from: {', '.join(INTERVAL_METHODS)}.")


def accuracy_interval(result: Any, confidence: float = 0.95) -> Interval:
    """Wilson interval of `rewards/accuracies`: the share of rows whose chosen reward beats the rejected one.

    Args:
        result (`EvalResult` or `PerExample`): the evaluation, e.g. the `dpo_result` fixture.
        confidence (`float`, *optional*, defaults to `0.95`): the nominal coverage.

    Example:
        ```py
        from pytest_dpo.stats import accuracy_interval


        def test_accuracy_is_clearly_above_chance(dpo_result):
            assert accuracy_interval(dpo_result).low > 0.5
        ```
    """
    per_example = _per_example(result)
    correct = per_example.chosen_rewards > per_example.rejected_rewards
    return wilson_interval(int(correct.sum()), len(correct), confidence)


def metric_interval(
    result: Any,
    metric: str,
    confidence: float = 0.95,
    method: str = "t",
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Confidence interval of one of TRL's per-example metrics of a result.

    `rewards/accuracies` gets the Wilson interval (`method` does not apply);
    the other metrics in `PER_EXAMPLE_METRICS` are example means and get
    `mean_interval` of their per-example values. The token-weighted metrics
    (`logits/*`, `entropy`, `mean_token_accuracy`) have no per-example values
    and are refused.

    Args:
        result (`EvalResult` or `PerExample`): the evaluation, e.g. the `dpo_result` fixture.
        metric (`str`): a name from `PER_EXAMPLE_METRICS`, with or without TRL's `eval_` prefix.
        confidence (`float`, *optional*, defaults to `0.95`): the nominal coverage.
        method (`str`, *optional*, defaults to `"t"`): `"t"` or `"bootstrap"`, see `mean_interval`.
        resamples (`int`, *optional*, defaults to `2000`): bootstrap resamples.
        seed (`int`, *optional*, defaults to `0`): bootstrap seed.

    Raises:
        ValueError: `metric` is token-weighted or unknown; the message lists the supported metrics.

    Example:
        ```py
        from pytest_dpo.stats import metric_interval


        def test_margin_is_positive_beyond_noise(dpo_result):
            assert metric_interval(dpo_result, "rewards/margins").low > 0
        ```
    """
    metric = _canonical_metric(metric)
    if metric == "rewards/accuracies":
        return accuracy_interval(result, confidence)
    return mean_interval(
        getattr(_per_example(result), _METRIC_FIELDS[metric]), confidence, method=method, resamples=resamples, seed=seed
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
            `PER_EXAMPLE_METRICS`. For `loss`, `rewards/rejected` and
            `logps/rejected` lower is better; for the others higher is better.
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
        from pytest_dpo.stats import paired_comparison


        def test_no_regression_against_release(dpo_result, released_result):
            comparison = paired_comparison(dpo_result, released_result, "rewards/accuracies", tolerance=0.02)
            assert not comparison.regressed, str(comparison)
        ```
    """
    _check_confidence(confidence)
    _check_resamples(resamples)
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0 (how much worse the candidate may be), got {tolerance}.")
    metric = _canonical_metric(metric)
    candidate_sha = getattr(candidate, "eval_set_sha256", None)
    baseline_sha = getattr(baseline, "eval_set_sha256", None)
    if candidate_sha is not None and baseline_sha is not None and candidate_sha != baseline_sha:
        raise ValueError(
            f"The eval sets differ (candidate sha256 {candidate_sha[:12]}…, baseline {baseline_sha[:12]}…); "
            "a regression test needs both results on the same eval set. Evaluate the baseline on the candidate's eval set."
        )
    candidate_rows, baseline_rows = _per_example(candidate), _per_example(baseline)
    common, candidate_index, baseline_index = _align(candidate_rows.rows, baseline_rows.rows)

    candidate_right = candidate_rows.margins[candidate_index] > 0
    baseline_right = baseline_rows.margins[baseline_index] > 0
    flipped_to_wrong = common[baseline_right & ~candidate_right].tolist()
    flipped_to_right = common[candidate_right & ~baseline_right].tolist()

    if metric == "rewards/accuracies":
        candidate_values, baseline_values = candidate_right.double(), baseline_right.double()
    else:
        name = _METRIC_FIELDS[metric]
        candidate_values = getattr(candidate_rows, name)[candidate_index].double()
        baseline_values = getattr(baseline_rows, name)[baseline_index].double()
    _check_finite(candidate_values, f"the candidate's {metric}")
    _check_finite(baseline_values, f"the baseline's {metric}")
    candidate_value, baseline_value = float(candidate_values.mean()), float(baseline_values.mean())
    difference = candidate_value - baseline_value

    n = len(common)
    if n < 2:
        interval = Interval(difference, -math.inf, math.inf, confidence, "paired bootstrap")
        bootstrap_p = 1.0
    else:
        means = _bootstrap_means(candidate_values - baseline_values, resamples, seed)
        low, high = _percentile_bounds(means, confidence)
        interval = Interval(difference, low, high, confidence, "paired bootstrap")
        at_most_zero, at_least_zero = int((means <= 0).sum()), int((means >= 0).sum())
        bootstrap_p = min(1.0, 2 * (min(at_most_zero, at_least_zero) + 1) / (resamples + 1))
    if metric == "rewards/accuracies":
        p_value = sign_test_p_value(len(flipped_to_right), len(flipped_to_wrong))
    else:
        p_value = bootstrap_p

    higher_is_better = metric not in LOWER_IS_BETTER_METRICS
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


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence}.")


def _check_resamples(resamples: int) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1 (2000 is a good default), got {resamples}.")


def _check_finite(values: torch.Tensor, what: str) -> None:
    bad = (~torch.isfinite(values)).nonzero().flatten()
    if len(bad):
        raise ValueError(
            f"{what} holds {len(bad)} non-finite values (first at position {int(bad[0])}); "
            "confidence bounds need finite values. Check the evaluation for overflow or NaN log-probs."
        )


def _as_values(values: torch.Tensor | Sequence[float], what: str) -> torch.Tensor:
    data = values.detach().to("cpu", torch.float64) if isinstance(values, torch.Tensor) else torch.as_tensor(
        values, dtype=torch.float64
    )
    if data.dim() != 1:
        raise ValueError(f"{what} must be 1-D (one value per example), got shape {tuple(data.shape)}.")
    _check_finite(data, what)
    return data


def _per_example(result: Any) -> PerExample:
    """The per-example arrays of an `EvalResult`, or the argument itself when it already is them."""
    return getattr(result, "per_example", result)


def _canonical_metric(metric: str) -> str:
    name = metric.removeprefix("eval_")
    if name in PER_EXAMPLE_METRICS:
        return name
    supported = ", ".join(PER_EXAMPLE_METRICS)
    if name in _TOKEN_WEIGHTED_METRICS:
        raise ValueError(
            f"Metric '{metric}' is a token-weighted mean over all completion tokens and has no per-example values; "
            f"confidence bounds are supported only for per-example metrics: {supported}."
        )
    raise ValueError(f"Unknown metric '{metric}'. Confidence bounds are supported for per-example metrics: {supported}.")


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


def _bootstrap_means(values: torch.Tensor, resamples: int, seed: int) -> torch.Tensor:
    """Means of `resamples` resamples (with replacement) of `values`, drawn from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    n = len(values)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    means = []
    for start in range(0, resamples, chunk):
        indices = torch.randint(n, (min(chunk, resamples - start), n), generator=generator)
        means.append(values[indices].mean(dim=1))
    return torch.cat(means)


def _percentile_bounds(samples: torch.Tensor, confidence: float) -> tuple[float, float]:
    """The (1 - confidence)/2 and (1 + confidence)/2 percentiles, linearly interpolated.

    The upper bound is read from the top with the same offset as the lower one from
    the bottom, so negating the samples exactly negates and swaps the bounds.
    """
    ordered = samples.sort().values
    offset = (1 - confidence) / 2 * (len(ordered) - 1)
    return _interpolate(ordered, offset), -_interpolate(-ordered.flip(0), offset)


def _interpolate(ordered: torch.Tensor, position: float) -> float:
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    weight = position - below
    return float(ordered[below]) + weight * (float(ordered[above]) - float(ordered[below]))
