"""Gates and helpers that know their uncertainty, and regressions judged pair by pair against a baseline."""

from __future__ import annotations

import textwrap

import huggingface_hub  # noqa: F401
import peft  # noqa: F401
import pytest
import torch  # noqa: F401
import transformers  # noqa: F401

from pytest_dpo import assert_accuracy_above, assert_no_regression, evaluate
from pytest_dpo.stats import accuracy_interval

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN

pytest_plugins = ["pytester"]
OPTIONS = [f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}"]


def test_confidence_gate_passes_on_the_estimate_but_fails_on_its_bound(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ndpo_gates =\n    rewards/accuracies >= 0.6\n    rewards/accuracies >= 0.6 @95%\n")
    result = pytester.runpytest("-v", f"--dpo-checkpoint={FULL_RUN}/checkpoint-4", *OPTIONS)
    result.stdout.fnmatch_lines(
        [
            "dpo-gate[[]checkpoint-4: rewards/accuracies >= 0.6[]] PASSED*",
            "dpo-gate[[]checkpoint-4: rewards/accuracies >= 0.6 @95%[]] FAILED*",
            (
                "checkpoint-4: gate failed: rewards/accuracies = 0.6667, but its 95% lower bound 0.4* is not at least "
                "0.6; interval 0.6667 [[]0.4*, 0.8*[]] (95% Wilson) (N=24 rows scored)"
            ),
        ]
    )


def test_confidence_gate_on_a_token_weighted_metric_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ndpo_gates =\n    entropy < 2 @90%\n")
    result = pytester.runpytest(f"--dpo-checkpoint={FULL_RUN}/checkpoint-4", *OPTIONS)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: dpo_gates line 1: entropy is token-weighted*"])


def test_helper_with_confidence_judges_the_lower_bound() -> None:
    result = evaluate(FULL_RUN / "checkpoint-4", EVAL_STANDARD, reference=BASE)
    assert_accuracy_above(result, 0.6)
    interval = accuracy_interval(result, 0.95)
    assert interval.low < 0.6 < interval.estimate
    with pytest.raises(AssertionError, match=r"rewards/accuracies = 0\.6667, but its 95% lower bound 0\.4\d* is not above 0\.6"):
        assert_accuracy_above(result, 0.6, confidence=0.95)
    assert_accuracy_above(result, 0.4, confidence=0.95)


def test_regression_against_a_baseline_checkpoint_is_caught(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_regression=textwrap.dedent(
            """
            from pytest_dpo import assert_no_regression

            def test_no_regression(dpo_result, dpo_baseline):
                assert_no_regression(dpo_result, dpo_baseline, "rewards/margins")
            """
        )
    )
    worse = pytester.runpytest(f"--dpo-checkpoint={FULL_RUN}/checkpoint-2", f"--dpo-baseline={FULL_RUN}/checkpoint-6", *OPTIONS)
    worse.assert_outcomes(failed=1)
    worse.stdout.fnmatch_lines(
        [
            "E   *checkpoint-2: rewards/margins regressed against checkpoint-6: 0.587* -> -0.00* (difference *",
            "E   *rows flipped from right to wrong*",
        ]
    )
    better = pytester.runpytest(f"--dpo-checkpoint={FULL_RUN}/checkpoint-6", f"--dpo-baseline={FULL_RUN}/checkpoint-2", *OPTIONS)
    better.assert_outcomes(passed=1)


def test_baseline_from_a_saved_report(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_m="def test_m(dpo_metrics):\n    assert dpo_metrics['rewards/margins'] > 0\n")
    pytester.runpytest(f"--dpo-checkpoint={FULL_RUN}/checkpoint-6", "--dpo-report=release", *OPTIONS)
    pytester.makepyfile(
        test_m="from pytest_dpo import assert_no_regression\n\n"
        "def test_m(dpo_result, dpo_baseline):\n"
        "    assert dpo_baseline.checkpoint == 'checkpoint-6'\n"
        "    assert_no_regression(dpo_result, dpo_baseline)\n"
    )
    result = pytester.runpytest(f"--dpo-checkpoint={FULL_RUN}/checkpoint-2", "--dpo-baseline=release", *OPTIONS)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E   *checkpoint-2: rewards/margins regressed against checkpoint-6*"])


def test_without_a_baseline_the_regression_test_is_skipped_with_the_reason(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_m="def test_m(dpo_result, dpo_baseline):\n    pass\n")
    result = pytester.runpytest("-rs", f"--dpo-checkpoint={FULL_RUN}/checkpoint-6", *OPTIONS)
    result.stdout.fnmatch_lines(["*no baseline: pass --dpo-baseline*"])


def test_results_from_different_eval_sets_are_not_compared(tmp_path) -> None:
    rows = [line for line in EVAL_STANDARD.read_text().splitlines()][:12]
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(rows) + "\n")
    candidate = evaluate(FULL_RUN / "checkpoint-6", EVAL_STANDARD, reference=BASE)
    baseline = evaluate(FULL_RUN / "checkpoint-4", other, reference=BASE)
    with pytest.raises(ValueError, match="eval sets differ"):
        assert_no_regression(candidate, baseline)
