"""The metric table agrees with what the package computes: `aggregate`'s keys, means and intervals."""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_dpo.metric_table import (
    INTERVAL_METRICS,
    METRIC_NAMES,
    METRICS,
    MOE_METRICS,
    PER_EXAMPLE,
    PER_EXAMPLE_METRICS,
)
from pytest_dpo.metrics import aggregate
from pytest_dpo.results import EvalResult
from pytest_dpo.stats import mean_interval, metric_interval, wilson_interval
from pytest_dpo.strategies import eval_results


@given(result=eval_results(max_size=16), aux_loss=st.floats(0.0, 10.0))
@settings(max_examples=50, deadline=None)
def test_aggregate_reports_the_metrics_of_the_table_in_its_order(result: EvalResult, aux_loss: float) -> None:
    dense = tuple(name for name in METRIC_NAMES if name not in MOE_METRICS)
    assert tuple(aggregate(result.per_example)) == dense
    assert tuple(aggregate(result.per_example, aux_loss)) == METRIC_NAMES
    assert tuple(result.metrics) == dense


@given(result=eval_results(max_size=16))
@settings(max_examples=50, deadline=None)
def test_each_per_example_metric_is_the_mean_of_its_field(result: EvalResult) -> None:
    per_example = result.per_example
    for metric in METRICS:
        if metric.field is not None:
            assert metric.kind == PER_EXAMPLE
            expected = statistics.fmean(getattr(per_example, metric.field).tolist())
            assert math.isclose(result.metrics[metric.name], expected, rel_tol=1e-9, abs_tol=1e-12), metric.name
    right = (per_example.chosen_rewards > per_example.rejected_rewards).tolist()
    assert result.metrics["rewards/accuracies"] == statistics.fmean(right)


@given(result=eval_results(min_size=2, max_size=16), method=st.sampled_from(("t", "bootstrap")))
@settings(max_examples=30, deadline=None)
def test_the_interval_of_each_metric_is_of_the_kind_the_table_names(result: EvalResult, method: str) -> None:
    per_example = result.per_example
    for metric in METRICS:
        if metric.interval is None:
            with pytest.raises(ValueError, match="has no per-example values"):
                metric_interval(result, metric.name, 0.9, method)
            continue
        interval = metric_interval(result, metric.name, 0.9, method)
        assert math.isclose(interval.estimate, result.metrics[metric.name], rel_tol=1e-9, abs_tol=1e-12)
        if metric.interval == "wilson":
            right = int((per_example.chosen_rewards > per_example.rejected_rewards).sum())
            assert interval == wilson_interval(right, len(per_example), 0.9)
        else:
            assert interval == mean_interval(getattr(per_example, metric.field), 0.9, method=method)


def test_the_per_example_metrics_are_exactly_those_with_an_interval() -> None:
    assert INTERVAL_METRICS == PER_EXAMPLE_METRICS
    assert all(metric.field is not None or metric.interval == "wilson" for metric in METRICS if metric.has_interval)
