"""The hypothesis strategies of `pytest_dpo.strategies` produce what the package accepts.

Rows go through `load_eval_set`, log-probs through `build_per_example`, results are
checked against `aggregate` and the DPO identities; the examples in the strategies'
docstrings are run as the tests they show.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_dpo import strategies
from pytest_dpo.evalset import MESSAGE_ROLES, extract_prompt, load_eval_set
from pytest_dpo.metrics import aggregate, build_per_example
from pytest_dpo.results import EvalResult, SequenceScores
from pytest_dpo.settings import DPOSettings, SettingsError
from pytest_dpo.strategies import eval_results, per_example_logps, preference_rows

from .docstring_examples import docstring_tests
from .token_statistics import token_statistics

FAST = settings(deadline=None, max_examples=40)


# ------------------------------------------------------------------------------------------
# preference_rows
# ------------------------------------------------------------------------------------------


@FAST
@given(rows=preference_rows("standard", min_size=2, max_size=6))
def test_standard_rows_load_as_a_standard_eval_set(rows: list[dict]) -> None:
    eval_set = load_eval_set(rows)
    assert eval_set.format == "standard"
    assert 2 <= len(eval_set) <= 6 and eval_set.rows == rows
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["chosen"] and row["rejected"] and row["chosen"] != row["rejected"]
        assert max(len(text) for text in row.values()) <= 60


@FAST
@given(rows=preference_rows("conversational", max_size=6))
def test_conversational_rows_load_as_a_conversational_eval_set(rows: list[dict]) -> None:
    eval_set = load_eval_set(rows)
    assert eval_set.format == "conversational"
    for row in rows:
        assert [message["role"] for message in row["prompt"]][-1] == "user"
        for key in ("chosen", "rejected"):
            assert [message["role"] for message in row[key]] == ["assistant"]
            assert row[key][0]["content"]
        assert all(message["role"] in MESSAGE_ROLES for message in row["prompt"])
        assert row["chosen"] != row["rejected"]


@FAST
@given(rows=preference_rows("implicit", max_size=6))
def test_implicit_rows_share_a_prompt_and_load_as_implicit(rows: list[dict]) -> None:
    eval_set = load_eval_set(rows)
    assert eval_set.format == "standard (implicit prompt)"
    for row in rows:
        assert "prompt" not in row
        prompt, chosen, rejected = extract_prompt(row["chosen"], row["rejected"])
        assert prompt and chosen and rejected and chosen != rejected


@FAST
@given(data=st.data(), size=st.integers(min_value=1, max_value=8))
def test_row_counts_respect_the_bounds(data: st.DataObject, size: int) -> None:
    rows = data.draw(preference_rows(data.draw(st.sampled_from(strategies.ROW_FORMATS)), min_size=size, max_size=size))
    assert len(rows) == size


def test_preference_rows_refuse_bad_arguments() -> None:
    with pytest.raises(ValueError, match="Unknown format 'chat'.*standard, conversational, implicit"):
        preference_rows("chat")
    with pytest.raises(ValueError, match="1 <= min_size <= max_size"):
        preference_rows(min_size=0)
    with pytest.raises(ValueError, match="1 <= min_size <= max_size"):
        preference_rows(min_size=5, max_size=2)


# ------------------------------------------------------------------------------------------
# per_example_logps
# ------------------------------------------------------------------------------------------


@FAST
@given(logps=per_example_logps(n=7))
def test_logps_are_float32_arrays_of_one_length_in_range(logps: dict[str, torch.Tensor]) -> None:
    assert set(logps) == set(strategies.LOGP_KEYS)
    for values in logps.values():
        assert values.dtype == torch.float32 and values.shape == (7,)
        assert bool(((values >= -200.0) & (values <= -0.01)).all())


@FAST
@given(logps=per_example_logps(min_value=-5.0, max_value=-1.0))
def test_logps_feed_build_per_example(logps: dict[str, torch.Tensor]) -> None:
    size = len(logps["policy_chosen_logps"])
    assert 1 <= size <= 64
    assert bool(((logps["reference_rejected_logps"] >= -5.0) & (logps["reference_rejected_logps"] <= -1.0)).all())
    tokens, zeros = torch.full((size,), 3), torch.zeros(size)

    def scores(prefix: str) -> SequenceScores:
        chosen, rejected = logps[f"{prefix}_chosen_logps"], logps[f"{prefix}_rejected_logps"]
        return SequenceScores(chosen, rejected, **token_statistics(tokens, zeros))

    per_example = build_per_example(torch.arange(size), scores("policy"), scores("reference"), DPOSettings(beta=0.5))
    torch.testing.assert_close(per_example.margins, per_example.chosen_rewards - per_example.rejected_rewards)
    assert math.isfinite(aggregate(per_example)["loss"])


def test_per_example_logps_refuse_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n >= 1"):
        per_example_logps(n=0)
    with pytest.raises(ValueError, match="min_value <= max_value <= 0"):
        per_example_logps(max_value=0.5)
    with pytest.raises(ValueError, match="min_value <= max_value <= 0"):
        per_example_logps(min_value=-1.0, max_value=-2.0)


# ------------------------------------------------------------------------------------------
# eval_results
# ------------------------------------------------------------------------------------------


@FAST
@given(result=eval_results(max_size=24))
def test_results_are_consistent_with_the_package_math(result: EvalResult) -> None:
    per_example = result.per_example
    assert isinstance(result, EvalResult) and 1 <= result.num_examples <= 24
    assert result.metrics == aggregate(per_example)
    torch.testing.assert_close(per_example.margins, per_example.chosen_rewards - per_example.rejected_rewards)
    assert result.metrics["rewards/margins"] == pytest.approx(
        result.metrics["rewards/chosen"] - result.metrics["rewards/rejected"], rel=1e-5, abs=1e-4
    )
    assert 0.0 <= result.metrics["rewards/accuracies"] <= 1.0
    assert 0.0 <= result.metrics["mean_token_accuracy"] <= 1.0
    assert all(math.isfinite(value) for value in result.metrics.values())
    beta = result.settings["beta"]
    torch.testing.assert_close(
        per_example.chosen_rewards, beta * (per_example.policy_chosen_logps - per_example.reference_chosen_logps)
    )
    assert EvalResult.from_dict(result.to_dict()).metrics == result.metrics


@FAST
@given(result=eval_results(max_size=24))
def test_results_have_plausible_rows_tokens_and_prompts(result: EvalResult) -> None:
    per_example = result.per_example
    rows = per_example.rows.tolist()
    assert rows == sorted(set(rows)) and not set(rows) & set(result.dropped_rows)
    assert sorted(rows + result.dropped_rows) == list(range(len(result.prompts)))
    assert all(prompt.strip() for prompt in result.prompts)
    assert re.fullmatch(r"[0-9a-f]{64}", result.eval_set_sha256)
    assert re.fullmatch(r"checkpoint-\d+", result.checkpoint)
    for kind in ("chosen", "rejected"):
        tokens = getattr(per_example, f"{kind}_tokens")
        assert tokens.dtype == torch.int64 and bool(((tokens >= 1) & (tokens <= 64)).all())
        assert torch.equal(getattr(per_example, f"{kind}_scored_tokens"), tokens)
        assert bool((getattr(per_example, f"policy_{kind}_logps") < 0).all())
        assert bool((getattr(per_example, f"reference_{kind}_logps") < 0).all())
    assert bool(((per_example.chosen_top1 >= 0) & (per_example.chosen_top1 <= per_example.chosen_scored_tokens)).all())


@FAST
@given(result=eval_results(min_size=3, max_size=5, beta=0.25, loss_type="ipo,exo_pair"))
def test_results_follow_the_requested_settings(result: EvalResult) -> None:
    assert 3 <= result.num_examples <= 5
    assert result.settings["beta"] == 0.25
    assert result.settings["loss_type"] == ["ipo", "exo_pair"]
    assert result.settings["label_smoothing"] > 0
    assert math.isfinite(result.metrics["loss"])


def test_eval_results_refuse_bad_arguments_when_defined() -> None:
    with pytest.raises(SettingsError, match="Unknown loss_type 'sigmoidal'"):
        eval_results(loss_type="sigmoidal")
    with pytest.raises(SettingsError, match="beta must be > 0"):
        eval_results(beta=0.0)
    with pytest.raises(ValueError, match="1 <= min_size <= max_size"):
        eval_results(min_size=10, max_size=3)


# ------------------------------------------------------------------------------------------
# Docstring examples and the import guard
# ------------------------------------------------------------------------------------------




@pytest.mark.parametrize("strategy", [preference_rows, per_example_logps, eval_results], ids=lambda s: s.__name__)
def test_docstring_examples_run_as_tests(strategy: Callable) -> None:
    for example in docstring_tests(strategy):
        settings(deadline=None, max_examples=20)(example)()


def test_importing_without_hypothesis_says_how_to_install_it() -> None:
    code = "import sys; sys.modules['hypothesis'] = None; import pytest_dpo.strategies"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0
    assert "pytest_dpo.strategies needs hypothesis" in completed.stderr
    assert "pip install hypothesis" in completed.stderr
