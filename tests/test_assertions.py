"""The assertion helpers of `pytest_dpo.assertions` on real `EvalResult`s built without models.

Results come from the package's own pipeline (`SequenceScores` → `build_per_example`
→ `aggregate`) fed with chosen log-probs, so every metric and per-example array is
what a real evaluation would hold for those scores.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pytest_dpo.assertions import (
    assert_accuracy_above,
    assert_chosen_reward_above,
    assert_loss_below,
    assert_margin_positive,
    assert_metrics_finite,
    assert_rejected_reward_below,
)
from pytest_dpo.metrics import aggregate, build_per_example
from pytest_dpo.results import EvalResult, SequenceScores
from pytest_dpo.settings import DPOSettings

from .token_statistics import token_statistics

pytest_plugins = ["pytester"]


def make_result(
    chosen_rewards: Sequence[float],
    rejected_rewards: Sequence[float],
    *,
    rows: Sequence[int] | None = None,
    dropped_rows: Sequence[int] = (),
    prompts: Sequence[str] = (),
    loss_type: str = "sigmoid",
    checkpoint: str = "checkpoint-6",
) -> EvalResult:
    """An `EvalResult` whose examples have these rewards (beta 1, reference log-probs -12)."""
    settings = DPOSettings(beta=1.0, loss_type=loss_type)
    count = len(chosen_rewards)
    tokens = torch.full((count,), 5)
    zeros = torch.zeros(count)

    def scores(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> SequenceScores:
        return SequenceScores(chosen_logps, rejected_logps, **token_statistics(tokens, zeros))

    reference_logps = torch.full((count,), -12.0)
    policy = scores(
        reference_logps + torch.tensor(chosen_rewards, dtype=torch.float32),
        reference_logps + torch.tensor(rejected_rewards, dtype=torch.float32),
    )
    row_indices = torch.tensor(list(rows) if rows is not None else list(range(count)))
    per_example = build_per_example(row_indices, policy, scores(reference_logps, reference_logps), settings)
    return EvalResult(
        checkpoint=checkpoint,
        checkpoint_path=f"/runs/dpo/{checkpoint}",
        reference="base",
        metrics=aggregate(per_example),
        per_example=per_example,
        dropped_rows=list(dropped_rows),
        eval_set_sha256="0" * 64,
        settings=settings.to_dict(),
        prompts=list(prompts),
    )


# Eval set of 8 rows; rows 2 and 5 are dropped. Each helper ranks these examples in a
# different order (sppo_hard's loss is not a function of the margin alone, so the loss
# ranking differs from the margin ranking):
#   row      0     1     3     4     6     7
#   chosen   0.5  -1    -2     1    -0.5   3
#   rejected -0.5  0    -1.5   2.5   1.25  1
#   margin   1    -1    -0.5  -1.5  -1.75  2
#   loss     0     2.5   7.25  9.25  4.0625  8.5     ((c - 0.5)^2 + (r + 0.5)^2)
BAD_ROWS = [0, 1, 3, 4, 6, 7]
BAD_CHOSEN = [0.5, -1.0, -2.0, 1.0, -0.5, 3.0]
BAD_REJECTED = [-0.5, 0.0, -1.5, 2.5, 1.25, 1.0]
PROMPTS = [f"Prompt of row {row}: summarise the following article about the Roman Empire." for row in range(8)]


@pytest.fixture
def bad_result() -> EvalResult:
    return make_result(
        BAD_CHOSEN, BAD_REJECTED, rows=BAD_ROWS, dropped_rows=[2, 5], prompts=PROMPTS, loss_type="sppo_hard"
    )


@pytest.fixture
def good_result() -> EvalResult:
    return make_result(
        [1.0, 0.75, 1.25, 0.5], [-1.0, -0.75, -0.5, -1.25], prompts=PROMPTS[:4], loss_type="sppo_hard"
    )


class Case(NamedTuple):
    check: Callable[[EvalResult, float], None]
    metric: str
    threshold: float  # passed by good_result, failed by bad_result
    worst_rows: list[int]  # of bad_result, worst first
    next_row: int  # the 4th worst, which must not be listed
    ranking: str  # the end and metric whose per-example values rank the rows

    def __str__(self) -> str:
        return self.metric


CASES = [
    Case(
        lambda result, t: assert_margin_positive(result, at_least=t),
        "rewards/margins", 0.0, [6, 4, 1], 3, "lowest rewards/margins",
    ),
    Case(assert_accuracy_above, "rewards/accuracies", 0.5, [6, 4, 1], 3, "lowest rewards/margins"),
    Case(assert_loss_below, "loss", 1.0, [4, 7, 3], 6, "highest loss"),
    Case(assert_chosen_reward_above, "rewards/chosen", 0.5, [3, 1, 6], 0, "lowest rewards/chosen"),
    Case(assert_rejected_reward_below, "rewards/rejected", 0.0, [4, 6, 7], 1, "highest rewards/rejected"),
]
parametrize_cases = pytest.mark.parametrize("case", CASES, ids=str)


def failure_message(check: Callable[[], None]) -> str:
    with pytest.raises(AssertionError) as excinfo:
        check()
    assert excinfo.type is AssertionError
    return str(excinfo.value)


def listed_rows(message: str) -> list[int]:
    return [int(row) for row in re.findall(r"^  row +(\d+)  ", message, flags=re.MULTILINE)]


@parametrize_cases
def test_helper_passes_on_a_good_result(case: Case, good_result: EvalResult) -> None:
    case.check(good_result, case.threshold)


@parametrize_cases
def test_failure_names_metric_value_threshold_size_and_checkpoint(case: Case, bad_result: EvalResult) -> None:
    message = failure_message(lambda: case.check(bad_result, case.threshold))
    value = bad_result.metrics[case.metric]
    relation = "below" if case.metric in ("loss", "rewards/rejected") else "above"
    headline = message.splitlines()[0]
    assert headline.startswith("checkpoint-6: ")
    assert f"{case.metric} = {value:.4g} is not {relation} {case.threshold:.4g}" in headline
    assert "(N=6 rows scored, 2 dropped)" in headline
    assert all(len(line) <= 72 for line in message.splitlines()[1:]), "pytest indents each line by 8"


@parametrize_cases
def test_failure_lists_exactly_the_three_worst_rows_in_order(case: Case, bad_result: EvalResult) -> None:
    message = failure_message(lambda: case.check(bad_result, case.threshold))
    assert message.splitlines()[1] == f"worst 3 of 6 by {case.ranking}:"
    assert listed_rows(message) == case.worst_rows
    assert f"row {case.next_row} " not in message
    position = BAD_ROWS.index(case.worst_rows[0])
    chosen, rejected = BAD_CHOSEN[position], BAD_REJECTED[position]
    pattern = rf"margins +{chosen - rejected:.4g}  chosen +{chosen:.4g}  rejected +{rejected:.4g}$"
    assert re.search(pattern, message.splitlines()[2])


def test_failure_shows_truncated_prompt_snippets_of_the_listed_rows(bad_result: EvalResult) -> None:
    message = failure_message(lambda: assert_margin_positive(bad_result))
    snippets = re.findall(r'^ +"(.*)"$', message, flags=re.MULTILINE)
    assert len(snippets) == 3
    for snippet, row in zip(snippets, [6, 4, 1]):
        assert snippet.endswith("…") and len(snippet) <= 50
        assert PROMPTS[row].startswith(snippet[:-1])
    assert PROMPTS[6] not in message


def test_failure_without_prompts_lists_rows_without_snippets() -> None:
    result = make_result([-1.0, -2.0], [0.0, 0.0])
    message = failure_message(lambda: assert_margin_positive(result))
    assert listed_rows(message) == [1, 0]
    assert '"' not in message
    assert "(N=2 rows scored)" in message and "dropped" not in message


def test_ranking_puts_nan_examples_first() -> None:
    result = make_result([-3.0, math.nan, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0])
    message = failure_message(lambda: assert_margin_positive(result))
    assert listed_rows(message) == [1, 0, 2]


@parametrize_cases
def test_nan_metric_fails_and_says_nan(case: Case, good_result: EvalResult) -> None:
    result = dataclasses.replace(good_result, metrics={**good_result.metrics, case.metric: math.nan})
    message = failure_message(lambda: case.check(result, case.threshold))
    assert f"{case.metric} is NaN" in message.splitlines()[0]


@parametrize_cases
def test_value_equal_to_threshold_fails(case: Case, good_result: EvalResult) -> None:
    value = good_result.metrics[case.metric]
    message = failure_message(lambda: case.check(good_result, value))
    assert f"{case.metric} = {value:.4g} is not" in message


def test_nearly_equal_value_and_threshold_are_shown_in_full(good_result: EvalResult) -> None:
    value = good_result.metrics["loss"]
    threshold = value - 1e-9
    message = failure_message(lambda: assert_loss_below(good_result, threshold))
    assert f"loss = {value!r} is not below {threshold!r}" in message


def test_nan_loss_from_a_nan_log_prob_fails_loss_and_finite_checks() -> None:
    result = make_result([0.5, math.nan, 0.25], [-0.5, -0.5, -0.5], prompts=PROMPTS[:3])
    assert math.isnan(result.metrics["loss"])
    assert "loss is NaN, not below 1" in failure_message(lambda: assert_loss_below(result, 1.0))
    message = failure_message(lambda: assert_metrics_finite(result))
    assert "loss = nan" in message and listed_rows(message) == [1]


def test_metrics_finite_passes_on_a_good_result(good_result: EvalResult) -> None:
    assert_metrics_finite(good_result)


def test_metrics_finite_names_non_finite_metrics_and_rows() -> None:
    rejected = list(BAD_REJECTED)
    rejected[BAD_ROWS.index(4)] = -math.inf
    result = make_result(BAD_CHOSEN, rejected, rows=BAD_ROWS, dropped_rows=[2, 5], prompts=PROMPTS)
    message = failure_message(lambda: assert_metrics_finite(result))
    assert message.splitlines()[0] == "checkpoint-6: 3 metrics and 1 row are not finite (N=6 rows scored, 2 dropped)"
    for metric in ("rewards/rejected = -inf", "rewards/margins = inf", "logps/rejected = -inf"):
        assert metric in message
    assert listed_rows(message) == [4]
    assert "rejected_rewards=-inf" in message and "margins=inf" in message
    assert '"Prompt of row 4:' in message


def test_metrics_finite_checks_per_example_arrays_even_when_metrics_are_finite(good_result: EvalResult) -> None:
    per_example = dataclasses.replace(
        good_result.per_example, reference_chosen_logps=torch.tensor([-12.0, -12.0, math.inf, -12.0])
    )
    result = dataclasses.replace(good_result, per_example=per_example)
    message = failure_message(lambda: assert_metrics_finite(result))
    assert message.splitlines()[0].startswith("checkpoint-6: 1 row is not finite")
    assert listed_rows(message) == [2] and "reference_chosen_logps=inf" in message


@given(
    pairs=st.lists(
        st.tuples(st.integers(-(2**20), 2**20), st.integers(-(2**20), 2**20)), min_size=1, max_size=20
    )
)
@example(pairs=[(0, 0)])
@example(pairs=[(1, 0), (0, 1)])
@settings(max_examples=100, deadline=None)
def test_margin_positive_passes_iff_mean_margin_is_positive(pairs: list[tuple[int, int]]) -> None:
    # Rewards on a 2**-10 grid are exact in float32, so the sign of the mean margin is the
    # sign of the integer sum below.
    chosen = [c / 1024 for c, _ in pairs]
    rejected = [r / 1024 for _, r in pairs]
    result = make_result(chosen, rejected)
    if sum(c - r for c, r in pairs) > 0:
        assert_margin_positive(result)
    else:
        with pytest.raises(AssertionError):
            assert_margin_positive(result)


def test_pytest_shows_the_message_unchanged_and_hides_the_helper_frames(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Keep installed plugins (pytest_dpo's own among them) out of the inner session.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    header = (
        "from __future__ import annotations\n"
        "from collections.abc import Sequence\n"
        "import torch\n"
        "from pytest_dpo.assertions import assert_accuracy_above\n"
        "from pytest_dpo.metrics import aggregate, build_per_example\n"
        "from pytest_dpo.results import EvalResult, SequenceScores\n"
        "from pytest_dpo.settings import DPOSettings\n"
    )
    test = (
        f"BAD_ROWS, BAD_CHOSEN, BAD_REJECTED, PROMPTS = {BAD_ROWS!r}, {BAD_CHOSEN!r}, {BAD_REJECTED!r}, {PROMPTS!r}\n"
        "def test_checkpoint_ranks_pairs():\n"
        "    result = make_result(BAD_CHOSEN, BAD_REJECTED, rows=BAD_ROWS, dropped_rows=[2, 5], prompts=PROMPTS)\n"
        "    assert_accuracy_above(result, 0.9)\n"
    )
    source = inspect.getsource(token_statistics) + inspect.getsource(make_result)
    pytester.makepyfile(test_checkpoint=header + source + test)
    bad = make_result(BAD_CHOSEN, BAD_REJECTED, rows=BAD_ROWS, dropped_rows=[2, 5], prompts=PROMPTS)
    expected = failure_message(lambda: assert_accuracy_above(bad, 0.9)).splitlines()

    outcome = pytester.runpytest_subprocess("-p", "no:cacheprovider")

    outcome.assert_outcomes(failed=1)
    assert expected[0] == (
        "checkpoint-6: rewards/accuracies = 0.3333 is not above 0.9 (N=6 rows scored, 2 dropped)"
    )
    assert expected[1] == "worst 3 of 6 by lowest rewards/margins:"
    error_line = next(line for line in outcome.stdout.lines if "AssertionError: " in line)
    indent = error_line[: error_line.index("AssertionError: ")]
    assert indent.strip() == "E"
    outcome.stdout.fnmatch_lines(
        [
            ">*assert_accuracy_above(result, 0.9)",
            f"{indent}AssertionError: {expected[0]}",
            *(f"{indent}{line}" for line in expected[1:]),
        ],
        consecutive=True,
    )
    output = outcome.stdout.str()
    for internal in ("raise AssertionError", "__tracebackhide__", "_assert_metric", "pytest_dpo/assertions.py"):
        assert internal not in output
