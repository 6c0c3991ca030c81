"""Every metric pytest-dpo reports, once: TRL's name, how it is computed, which way is better, how it is shown.

Aggregation (`metrics.aggregate`), intervals (`stats`), regressions (`paired`), the
threshold check and its worst-row ranking (`checks`), gates, reports and the model
card all read this table. pytest-dpo's own failure-mode diagnostics have a table of
their own (`DIAGNOSTICS`, computed by `diagnostics`), so their names never mix with TRL's.
Importable without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .spelling import option

# How a metric is computed from the per-example arrays.
PER_EXAMPLE = "per_example"  # the mean of one value per example: has a confidence interval
TOKEN_WEIGHTED = "token_weighted"  # a ratio of token sums: no per-example value, no interval
WHOLE_SET = "whole_set"  # one value over the whole eval set (MoE aux_loss)
_KIND_TEXTS = {
    PER_EXAMPLE: "a mean over the examples",
    TOKEN_WEIGHTED: "token-weighted (a ratio of sums over all completion tokens)",
    WHOLE_SET: "one value over the eval set",
}

# How the confidence interval of a mean is computed; `rewards/accuracies` always gets Wilson's.
INTERVAL_METHODS = ("t", "bootstrap")
DEFAULT_INTERVAL_METHOD = "t"
DEFAULT_CONFIDENCE = 0.95


class _Measure:
    """What a metric and a diagnostic share: a kind, a direction, an interval or none."""

    kind: str
    higher_is_better: bool
    interval: Literal["wilson", "mean"] | None

    @property
    def has_interval(self) -> bool:
        return self.interval is not None

    @property
    def worst_is_highest(self) -> bool:
        return not self.higher_is_better

    @property
    def kind_text(self) -> str:
        """How the value is computed, in words: `token-weighted (…)`, `one value over the eval set`."""
        return _KIND_TEXTS[self.kind]


@dataclass(frozen=True)
class Metric(_Measure):
    """One of TRL's DPO eval metrics (named without the `eval_` prefix).

    Attributes:
        name (`str`): TRL's name, e.g. `rewards/margins`.
        kind (`str`): `per_example`, `token_weighted` or `whole_set`.
        field (`str`, *optional*): the `PerExample` array whose mean this is (per-example metrics
            other than the accuracy, which is the share of rows whose chosen reward beats the rejected one).
        higher_is_better (`bool`): the direction of an improvement; a regression moves the other way.
        interval (`str`, *optional*): `wilson` (a share), `mean` (t or bootstrap), None (no interval).
        label (`str`): a short column heading.
        summary (`bool`): shown in the terminal verdict table, the Markdown table and the plot.
    """

    name: str
    kind: str
    field: str | None
    higher_is_better: bool
    interval: Literal["wilson", "mean"] | None
    label: str
    summary: bool = False


METRICS = (
    Metric("loss", PER_EXAMPLE, "losses", False, "mean", "loss", summary=True),
    Metric("rewards/chosen", PER_EXAMPLE, "chosen_rewards", True, "mean", "chosen", summary=True),
    Metric("rewards/rejected", PER_EXAMPLE, "rejected_rewards", False, "mean", "rejected", summary=True),
    Metric("rewards/margins", PER_EXAMPLE, "margins", True, "mean", "margins", summary=True),
    Metric("rewards/accuracies", PER_EXAMPLE, None, True, "wilson", "accuracy", summary=True),
    Metric("logps/chosen", PER_EXAMPLE, "policy_chosen_logps", True, "mean", "logps chosen"),
    Metric("logps/rejected", PER_EXAMPLE, "policy_rejected_logps", False, "mean", "logps rejected"),
    Metric("logits/chosen", TOKEN_WEIGHTED, None, True, None, "logits chosen"),
    Metric("logits/rejected", TOKEN_WEIGHTED, None, False, None, "logits rejected"),
    Metric("entropy", TOKEN_WEIGHTED, None, False, None, "entropy"),
    Metric("mean_token_accuracy", TOKEN_WEIGHTED, None, True, None, "token accuracy"),
    # Reported, as TRL logs it, only for a mixture-of-experts policy whose load-balancing loss is enabled.
    Metric("aux_loss", WHOLE_SET, None, False, None, "aux loss"),
)
BY_NAME = {metric.name: metric for metric in METRICS}
METRIC_NAMES = tuple(metric.name for metric in METRICS)
PER_EXAMPLE_METRICS = tuple(metric.name for metric in METRICS if metric.kind == PER_EXAMPLE)
INTERVAL_METRICS = tuple(metric.name for metric in METRICS if metric.has_interval)
MOE_METRICS = tuple(metric.name for metric in METRICS if metric.kind == WHOLE_SET)
SUMMARY_METRICS = tuple(metric for metric in METRICS if metric.summary)

DIAGNOSTIC_PREFIX = "diagnostics/"


@dataclass(frozen=True)
class Diagnostic(_Measure):
    """One of pytest-dpo's own DPO failure-mode diagnostics: named under `diagnostics/`, never one of TRL's metrics.

    `diagnostics.diagnose` computes them from the per-example arrays (`EvalResult.diagnostics`, apart from
    `EvalResult.metrics`); gates and `checks.check_metric` judge them as they judge TRL's metrics.

    Attributes:
        name (`str`): e.g. `diagnostics/likelihood_displacement`.
        kind (`str`): `per_example` (the mean of one value per row, `diagnostics.row_values`: a share of rows
            or a mean change) or `whole_set` (a rank correlation over the rows).
        higher_is_better (`bool`): the direction of an improvement.
        interval (`str`, *optional*): `wilson` (a share), `mean` (t or bootstrap), None (no interval).
        label (`str`): a short heading of its per-row values in a failure's list of worst rows.
        definition (`str`): one line, as the README gives it.
        ranked_by (`str`, *optional*): the diagnostic whose per-row values rank the rows a failure lists;
            by default its own, or the margins for a diagnostic without per-row values.
    """

    name: str
    kind: str
    higher_is_better: bool
    interval: Literal["wilson", "mean"] | None
    label: str
    definition: str
    ranked_by: str | None = None


DIAGNOSTICS = (
    Diagnostic(
        "diagnostics/likelihood_displacement", PER_EXAMPLE, False, "wilson", "displaced",
        "the share of rows whose chosen log-prob under the policy fell below the reference's",
        ranked_by="diagnostics/chosen_logps_change",
    ),
    Diagnostic(
        "diagnostics/chosen_logps_change", PER_EXAMPLE, True, "mean", "chosen change",
        "the mean over rows of the policy's chosen log-prob minus the reference's",
    ),
    Diagnostic(
        "diagnostics/rejected_logps_change", PER_EXAMPLE, False, "mean", "rejected change",
        "the mean over rows of the policy's rejected log-prob minus the reference's",
    ),
    # Lower is better: a positive correlation means the margin grows with the chosen completion's extra length.
    Diagnostic(
        "diagnostics/margin_length_correlation", WHOLE_SET, False, None, "margin-length",
        "Spearman's rank correlation between the reward margin and the chosen-minus-rejected completion length "
        "in tokens",
    ),
    Diagnostic(
        "diagnostics/tied_rewards", PER_EXAMPLE, False, "wilson", "tied",
        "the share of rows whose chosen and rejected rewards are equal",
    ),
)
DIAGNOSTICS_BY_NAME = {diagnostic.name: diagnostic for diagnostic in DIAGNOSTICS}
DIAGNOSTIC_NAMES = tuple(diagnostic.name for diagnostic in DIAGNOSTICS)
INTERVAL_DIAGNOSTICS = tuple(diagnostic.name for diagnostic in DIAGNOSTICS if diagnostic.has_interval)


def check_interval_method(method: str) -> None:
    """Refuse an interval method that is not one of `INTERVAL_METHODS`, naming the choices."""
    if method not in INTERVAL_METHODS:
        raise ValueError(f"Unknown interval method {method!r}. Choose from: {', '.join(INTERVAL_METHODS)}.")


def non_finite_cause() -> str:
    """Why a metric is NaN or infinite, and what to do: said by every gate and helper that meets one."""
    return (
        "the checkpoint's weights or logits contain NaN/inf. Check its weights (assert_metrics_finite lists the "
        f"rows), or evaluate in float32 ({option('dtype')} float32) if float16 overflowed"
    )


def non_finite_text(value: float) -> str:
    """`NaN`, `inf` or `-inf`."""
    return "NaN" if math.isnan(value) else str(value)
