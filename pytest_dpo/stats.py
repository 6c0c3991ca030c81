"""Confidence intervals of metrics computed on per-example results.

Pure functions on per-example arrays (torch tensors or sequences of floats): no
models, no pytest, no files. An eval set of 64 rows measures `rewards/accuracies`
to within roughly ±0.12, so a gate on the point estimate alone passes and fails
checkpoints by chance; the intervals here say how far the number can be trusted.
Which metrics and diagnostics have an interval, and of which kind, is read from
`metric_table`; the paired regression test built on these pieces lives in `paired`.

Distributions come from `scipy.stats` (normal and Student t quantiles), imported
only when an interval is computed, so a run that computes none never loads scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .diagnostics import row_values
from .metric_table import (
    BY_NAME,
    DIAGNOSTICS_BY_NAME,
    INTERVAL_DIAGNOSTICS,
    INTERVAL_METRICS,
    Diagnostic,
    Metric,
    check_interval_method,
)
from .results import PerExample

__all__ = [
    "Interval",
    "accuracy_interval",
    "mean_interval",
    "metric_interval",
    "normal_quantile",
    "t_quantile",
    "wilson_interval",
]

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
        check_confidence(self.confidence)
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
    check_confidence(confidence)
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
    check_confidence(confidence)
    check_interval_method(method)
    check_resamples(resamples)
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
    low, high = percentile_bounds(bootstrap_means(data, resamples, seed), confidence)
    return Interval(estimate, low, high, confidence, "bootstrap")


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
    per_example = per_example_of(result)
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
    """Confidence interval of one of TRL's per-example metrics, or of a diagnostic, of a result.

    The kind of interval is the metric's in `metric_table`: `rewards/accuracies`
    gets the Wilson interval (`method` does not apply); the other per-example
    metrics are example means and get `mean_interval` of their per-example
    values. The token-weighted metrics (`logits/*`, `entropy`,
    `mean_token_accuracy`) and `aux_loss` have no per-example values and are refused.
    Diagnostics alike: a share of rows (`diagnostics/likelihood_displacement`,
    `diagnostics/tied_rewards`) gets the Wilson interval, a mean change the mean's
    interval of its per-row values (`diagnostics.row_values`); the rank correlation is refused.

    Args:
        result (`EvalResult` or `PerExample`): the evaluation, e.g. the `dpo_result` fixture.
        metric (`str`): a name from `metric_table.INTERVAL_METRICS`, with or without TRL's `eval_` prefix,
            or from `metric_table.INTERVAL_DIAGNOSTICS`.
        confidence (`float`, *optional*, defaults to `0.95`): the nominal coverage.
        method (`str`, *optional*, defaults to `"t"`): `"t"` or `"bootstrap"`, see `mean_interval`.
        resamples (`int`, *optional*, defaults to `2000`): bootstrap resamples.
        seed (`int`, *optional*, defaults to `0`): bootstrap seed.

    Raises:
        ValueError: `metric` has no per-example values or is unknown; the message lists the supported metrics.

    Example:
        ```py
        from pytest_dpo.stats import metric_interval


        def test_margin_is_positive_beyond_noise(dpo_result):
            assert metric_interval(dpo_result, "rewards/margins").low > 0
        ```
    """
    if metric in DIAGNOSTICS_BY_NAME:
        record = _interval_diagnostic(metric)
        values = row_values(per_example_of(result), metric)
        if record.interval == "wilson":
            check_finite(values, metric)
            return wilson_interval(int(values.sum()), len(values), confidence)
        return mean_interval(values, confidence, method=method, resamples=resamples, seed=seed)
    record = interval_metric(metric)
    if record.interval == "wilson":
        return accuracy_interval(result, confidence)
    return mean_interval(
        getattr(per_example_of(result), record.field), confidence, method=method, resamples=resamples, seed=seed
    )


def check_confidence(confidence: float) -> None:
    """Refuse a confidence level outside (0, 1)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence}.")


def check_resamples(resamples: int) -> None:
    """Refuse a bootstrap with no resamples."""
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1 (2000 is a good default), got {resamples}.")


def check_finite(values: torch.Tensor, what: str) -> None:
    """Refuse NaN or infinite values, naming `what` holds them and where the first one is."""
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
    check_finite(data, what)
    return data


def per_example_of(result: Any) -> PerExample:
    """The per-example arrays of an `EvalResult`, or the argument itself when it already is them."""
    return getattr(result, "per_example", result)


def interval_metric(metric: str) -> Metric:
    """The table's record of `metric` (an `eval_` prefix is dropped); refused unless it has a per-example interval."""
    name = metric.removeprefix("eval_")
    record = BY_NAME.get(name)
    if record is not None and record.has_interval:
        return record
    supported = ", ".join(INTERVAL_METRICS)
    if record is not None:
        raise ValueError(
            f"Metric '{metric}' is {record.kind_text} and has no per-example values; "
            f"confidence bounds are supported only for per-example metrics: {supported}."
        )
    raise ValueError(f"Unknown metric '{metric}'. Confidence bounds are supported for per-example metrics: {supported}.")


def _interval_diagnostic(diagnostic: str) -> Diagnostic:
    """The table's record of `diagnostic`; refused unless it has per-row values and so an interval."""
    record = DIAGNOSTICS_BY_NAME[diagnostic]
    if not record.has_interval:
        raise ValueError(
            f"Diagnostic '{diagnostic}' is {record.kind_text} and has no per-row values; confidence bounds are "
            f"supported for the diagnostics {', '.join(INTERVAL_DIAGNOSTICS)}."
        )
    return record


def bootstrap_means(values: torch.Tensor, resamples: int, seed: int) -> torch.Tensor:
    """Means of `resamples` resamples (with replacement) of `values`, drawn from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    n = len(values)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    means = []
    for start in range(0, resamples, chunk):
        indices = torch.randint(n, (min(chunk, resamples - start), n), generator=generator)
        means.append(values[indices].mean(dim=1))
    return torch.cat(means)


def percentile_bounds(samples: torch.Tensor, confidence: float) -> tuple[float, float]:
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
