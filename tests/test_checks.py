"""`pytest_dpo.checks.check_metric`: the one metric-vs-threshold check behind the helpers and the gates.

Property tests compare it with a direct comparison of the estimate (or the interval's
bound) on real `EvalResult`s from `pytest_dpo.strategies`; a pytester run shows that a
failed ini gate prints the same message as a helper, worst rows included.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
import textwrap

import huggingface_hub  # noqa: F401
import peft  # noqa: F401
import pyarrow  # noqa: F401
import pytest
import torch
import transformers  # noqa: F401
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_dpo.checks import OPERATORS, check_metric
from pytest_dpo.failure_text import scored
from pytest_dpo.metric_table import BY_NAME, METRIC_NAMES, MOE_METRICS, non_finite_cause
from pytest_dpo.metrics import aggregate, build_per_example
from pytest_dpo.results import EvalResult, SequenceScores
from pytest_dpo.settings import DPOSettings
from pytest_dpo.stats import metric_interval
from pytest_dpo.strategies import eval_results

from .docstring_examples import docstring_tests
from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN
from .token_statistics import token_statistics

pytest_plugins = ["pytester"]
# The heavy libraries above are imported before the in-process pytester run: pytester removes modules first
# imported during a run, and importing torch's C extensions a second time crashes the interpreter.

DIRECT = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq, "!=": operator.ne}
DENSE_METRICS = tuple(name for name in METRIC_NAMES if name not in MOE_METRICS)
BOUND_OPERATORS = (">=", ">", "<=", "<")
ROW_LINE = re.compile(r"^  row +(\d+)  ")


def make_example(chosen: list[float], rejected: list[float], rows: list[int] | None = None) -> EvalResult:
    """A real `EvalResult` (sigmoid loss, beta 1, reference log-probs -12) with these rewards."""
    count = len(chosen)
    tokens, zeros = torch.full((count,), 5), torch.zeros(count)

    def scores(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> SequenceScores:
        return SequenceScores(chosen_logps, rejected_logps, **token_statistics(tokens, zeros))

    reference = torch.full((count,), -12.0)
    policy = scores(reference + torch.tensor(chosen), reference + torch.tensor(rejected))
    row_indices = torch.tensor(rows if rows is not None else list(range(count)))
    per_example = build_per_example(row_indices, policy, scores(reference, reference), DPOSettings(beta=1.0))
    return EvalResult(
        checkpoint="checkpoint-3",
        checkpoint_path="/runs/dpo/checkpoint-3",
        reference="base",
        metrics=aggregate(per_example),
        per_example=per_example,
        dropped_rows=[2] if rows is not None else [],
        eval_set_sha256="0" * 64,
        settings=DPOSettings(beta=1.0).to_dict(),
        prompts=[f"Prompt of row {row}" for row in range(max(row_indices.tolist()) + 1)],
    )


# Rows 0, 1, 3 (row 2 dropped) with margins 1, 2, -1.5.
EXAMPLE = make_example([0.5, 1.0, -1.0], [-0.5, -1.0, 0.5], rows=[0, 1, 3])


def listed_positions(result: EvalResult, failure: str) -> list[int]:
    """Where the rows a failure lists sit in `result.per_example`."""
    positions = {int(row): index for index, row in enumerate(result.per_example.rows.tolist())}
    return [positions[int(match.group(1))] for match in map(ROW_LINE.match, failure.splitlines()) if match]


@st.composite
def checks(draw: st.DrawFn) -> tuple[EvalResult, str, str, float, float | None]:
    """A result (its metric sometimes replaced by NaN or ±inf), a metric, an operator, a threshold, a confidence."""
    result = draw(eval_results(max_size=24))
    metric = draw(st.sampled_from(DENSE_METRICS))
    confidence = None
    if BY_NAME[metric].has_interval:
        confidence = draw(st.none() | st.sampled_from((0.8, 0.95)))
    op = draw(st.sampled_from(BOUND_OPERATORS if confidence is not None else tuple(DIRECT)))
    replacement = draw(st.none() | st.sampled_from((math.nan, math.inf, -math.inf)))
    if replacement is not None:
        result = dataclasses.replace(result, metrics={**result.metrics, metric: replacement})
    compared = result.metrics[metric]
    if confidence is not None:
        interval = metric_interval(result, metric, confidence)
        compared = interval.low if op.startswith(">") else interval.high
    near = [value for value in (compared, result.metrics[metric]) if math.isfinite(value)]
    threshold = draw(st.sampled_from(near) | st.floats(-100, 100) if near else st.floats(-100, 100))
    return result, metric, op, threshold, confidence


@given(case=checks())
@settings(max_examples=300, deadline=None)
def test_check_holds_iff_the_estimate_or_its_bound_satisfies_the_operator_and_is_finite(
    case: tuple[EvalResult, str, str, float, float | None],
) -> None:
    result, metric, op, threshold, confidence = case
    value = result.metrics[metric]
    compared = value
    if confidence is not None:
        interval = metric_interval(result, metric, confidence)
        compared = interval.low if op in (">", ">=") else interval.high
    holds = math.isfinite(value) and math.isfinite(compared) and DIRECT[op](compared, threshold)

    failure = check_metric(result, metric, op, threshold, confidence=confidence)

    assert (failure is None) == holds
    if failure is None:
        return
    headline, heading = failure.splitlines()[:2]
    assert headline.startswith(metric) and headline.endswith(f" ({scored(result)})")
    if not math.isfinite(value):
        assert non_finite_cause() in headline
    elif confidence is not None:
        side = "lower" if op.startswith(">") else "upper"
        assert f"but its {confidence * 100:g}% {side} bound " in headline and f"; interval {interval}" in headline
    else:
        assert " is not " in headline
    shown = min(3, len(result.per_example))
    assert heading.startswith(f"worst {shown} of {len(result.per_example)} by ")
    assert len(listed_positions(result, failure)) == shown


@given(result=eval_results(max_size=24), metric=st.sampled_from(DENSE_METRICS))
@settings(max_examples=100, deadline=None)
def test_failure_lists_the_rows_worst_by_the_metrics_own_per_example_values(result: EvalResult, metric: str) -> None:
    record = BY_NAME[metric]
    # Accuracy, token-weighted metrics: no per-example value of their own, so the rows rank by margin.
    ranking = record if record.field is not None else BY_NAME["rewards/margins"]
    worst_first = "highest" if ranking.worst_is_highest else "lowest"
    op = "<" if record.higher_is_better else ">"
    failure = check_metric(result, metric, op, -math.inf if op == "<" else math.inf)
    assert failure is not None
    assert failure.splitlines()[1] == f"worst {min(3, len(result.per_example))} of {len(result.per_example)} by {worst_first} {ranking.name}:"
    values = getattr(result.per_example, ranking.field).tolist()
    listed = [values[position] for position in listed_positions(result, failure)]
    ordered = sorted(values, reverse=ranking.worst_is_highest)
    assert sorted(listed, reverse=ranking.worst_is_highest) == ordered[: len(listed)]


def test_a_failure_reads_as_the_claim_and_the_worst_rows() -> None:
    failure = check_metric(EXAMPLE, "rewards/margins", ">=", 0.75)
    assert failure is not None
    lines = failure.splitlines()
    assert lines[0] == "rewards/margins = 0.5 is not at least 0.75 (N=3 rows scored, 1 dropped)"
    assert lines[1] == "worst 3 of 3 by lowest rewards/margins:"
    assert [int(match.group(1)) for match in map(ROW_LINE.match, lines) if match] == [3, 0, 1]
    assert lines[3] == '         "Prompt of row 3"'


def test_a_confidence_bound_that_looks_equal_to_the_threshold_is_shown_in_full() -> None:
    interval = metric_interval(EXAMPLE, "rewards/chosen", 0.9)
    threshold = interval.high - 1e-12
    failure = check_metric(EXAMPLE, "rewards/chosen", "<", threshold, confidence=0.9)
    assert failure is not None
    assert f"90% upper bound {interval.high!r} is not below {threshold!r}" in failure


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("loss", "=>", 1.0, {}), "Unknown operator '=>'. Choose from: >=, <=, ==, !=, >, <"),
        (("loss", "==", 1.0, {"confidence": 0.95}), "compared with <, <=, > or >=, not =="),
        (("loss", "<", 1.0, {"method": "wald"}), "Unknown interval method 'wald'"),
        (("entropy", "<", 1.0, {"confidence": 0.95}), "'entropy' is token-weighted"),
    ],
)
def test_an_unusable_check_is_refused(arguments: tuple, message: str) -> None:
    metric, op, threshold, options = arguments
    with pytest.raises(ValueError, match=re.escape(message)):
        check_metric(EXAMPLE, metric, op, threshold, **options)


def test_a_metric_the_result_lacks_is_named_with_those_it_has() -> None:
    with pytest.raises(KeyError, match="checkpoint-3 has no metric 'aux_loss'"):
        check_metric(EXAMPLE, "aux_loss", "<", 1.0)


def test_every_operator_can_be_checked() -> None:
    assert set(OPERATORS) == set(DIRECT)


def test_docstring_example_passes_on_a_good_result_and_fails_on_a_bad_one() -> None:
    (example,) = docstring_tests(check_metric)
    example(make_example([2.0] * 40, [-1.0] * 40))
    with pytest.raises(AssertionError, match="rewards/accuracies = 0, but its 95% lower bound 0 is not above 0.5"):
        example(make_example([-1.0] * 40, [2.0] * 40))


def test_a_failed_gate_shows_the_same_message_as_a_helper_with_the_worst_rows(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        textwrap.dedent(
            """
            [pytest]
            dpo_gates =
                rewards/margins > 0
                rewards/accuracies >= 0.9 @95%
                entropy < 0.5
            """
        )
    )
    pytester.makepyfile(
        test_helper=textwrap.dedent(
            """
            from pytest_dpo import assert_margin_positive

            def test_margin(dpo_result):
                assert_margin_positive(dpo_result)
            """
        )
    )
    result = pytester.runpytest(
        f"--dpo-checkpoint={FULL_RUN / 'checkpoint-2'}", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}"
    )
    result.assert_outcomes(failed=4)
    margin_rows = [
        "worst 3 of 24 by lowest rewards/margins:",
        "  row 4  margins  -3.346  chosen  -3.837  rejected -0.4917",
        '         "Q: What is 7 plus 5? A:"',
        "  row 2  margins  -0.621  chosen -0.9419  rejected -0.3208",
        '         "Q: What is the capital of France? A:"',
        "  row 5  margins -0.4936  chosen   -1.36  rejected  -0.866",
        '         "We plan a family trip to Peru. Q: What is the cap…"',
    ]
    gate_failures = [
        "checkpoint-2: gate failed: rewards/margins = -0.006148 is not above 0 (N=24 rows scored)",
        (
            "checkpoint-2: gate failed: rewards/accuracies = 0.5833, but its 95% lower bound 0.3883 is not at least "
            "0.9; interval 0.5833 [[]0.3883, 0.7553[]] (95% Wilson) (N=24 rows scored)"
        ),
        # A token-weighted metric has no per-example value: its rows rank by margin.
        "checkpoint-2: gate failed: entropy = 1.063 is not below 0.5 (N=24 rows scored)",
    ]
    for headline in gate_failures:
        result.stdout.fnmatch_lines([headline, *margin_rows], consecutive=True)
    result.stdout.fnmatch_lines(
        [
            "E       AssertionError: checkpoint-2: rewards/margins = -0.006148 is not above 0 (N=24 rows scored)",
            *(f"E       {line}" for line in margin_rows),
        ],
        consecutive=True,
    )
