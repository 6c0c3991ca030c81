"""The mistakes a new user makes first, each reproduced as they typed it: one clear message, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import huggingface_hub  # noqa: F401
import peft  # noqa: F401
import pytest
import torch
import transformers  # noqa: F401

from pytest_dpo import assert_margin_positive, assert_no_regression, evaluate
from pytest_dpo.loading import check_device
from pytest_dpo.settings import SettingsError

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN, ROOT

pytest_plugins = ["pytester"]

GATES_INI = f"""
[pytest]
dpo_eval_set = {EVAL_STANDARD}
dpo_reference = {BASE}
dpo_gates =
    rewards/margins > 0
"""
MARGIN_TEST = "def test_margin(dpo_metrics):\n    assert dpo_metrics['rewards/margins'] > 0\n"


def test_a_regression_with_no_row_flipped_fails_with_its_message() -> None:
    result = evaluate(FULL_RUN / "checkpoint-4", EVAL_STANDARD, reference=BASE)
    baseline = evaluate(FULL_RUN / "checkpoint-6", EVAL_STANDARD, reference=BASE)
    with pytest.raises(AssertionError) as excinfo:
        assert_no_regression(result, baseline, "rewards/margins", tolerance=0.0, confidence=0.95)
    message = str(excinfo.value)
    assert "checkpoint-4: rewards/margins regressed against checkpoint-6: 0.587" in message
    assert "0 rows flipped from right to wrong" in message


@pytest.mark.parametrize("dist", [[], ["-n", "2"]])
def test_a_mistyped_option_is_named_with_the_closest_one_instead_of_taken_for_a_test_path(
    pytester: pytest.Pytester, dist: list[str]
) -> None:
    pytester.makepyfile(test_release=MARGIN_TEST)
    result = pytester.runpytest_subprocess(f"--dpo-checkpoint={FULL_RUN}", "--dpo-gates=loss < 1", *dist)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--dpo-gates: no such pytest-dpo option. Did you mean --dpo-gate?" in result.stderr.str()
    assert "file or directory not found" not in result.stderr.str() + result.stdout.str()


def test_checkpoint_path_after_a_space_reads_the_projects_ini(pytester: pytest.Pytester) -> None:
    """`pytest --dpo-checkpoint /data/runs/dpo` from a project whose pytest.ini holds the eval set and the gates."""
    (pytester.path / "pytest.ini").write_text(GATES_INI)
    pytester.makepyfile(test_release=MARGIN_TEST)
    result = pytester.runpytest("-v", "--dpo-checkpoint", str(FULL_RUN))
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "configfile: pytest.ini",
            "dpo-gate[[]checkpoint-2: rewards/margins > 0[]] FAILED*",
            "dpo-gate[[]checkpoint-6: rewards/margins > 0[]] PASSED*",
        ]
    )
    assert f"rootdir: {pytester.path}" in result.stdout.str()


def test_test_path_and_checkpoint_after_a_space_read_the_test_folders_ini(pytester: pytest.Pytester) -> None:
    """`pytest examples --dpo-checkpoint runs/dpo` from a root whose own ini is not the release gate's."""
    pytester.makepyprojecttoml("[tool.pytest.ini_options]\nmarkers = ['root: the root folder ini']\n")
    examples = pytester.mkdir("examples")
    (examples / "pytest.ini").write_text(GATES_INI)
    (examples / "test_release.py").write_text(MARGIN_TEST)
    (pytester.path / "runs").symlink_to(FULL_RUN.parent)
    result = pytester.runpytest("-v", "examples", "--dpo-checkpoint", "runs/dpo-full")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.stdout.fnmatch_lines(["configfile: pytest.ini", "*dpo-gate[[]checkpoint-2: rewards/margins > 0[]] FAILED*"])
    assert f"rootdir: {examples}" in result.stdout.str()


def test_when_the_ini_cannot_be_switched_the_error_names_both_files_and_the_fix(pytester: pytest.Pytester) -> None:
    run = pytester.mkdir("run")
    (run / "pytest.ini").write_text("[pytest]\npythonpath = .\n")
    (run / "checkpoint-4").symlink_to(FULL_RUN / "checkpoint-4")
    (pytester.path / "pytest.ini").write_text(GATES_INI)
    pytester.makepyfile(test_release=MARGIN_TEST)
    result = pytester.runpytest("--dpo-checkpoint", "run/checkpoint-4")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"ERROR: pytest read {run / 'pytest.ini'}, not {pytester.path / 'pytest.ini'}: *--dpo-checkpoint=PATH*-c *"]
    )
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_a_baseline_that_does_not_exist_is_one_usage_error_naming_the_option(pytester: pytest.Pytester) -> None:
    pytester.makeini(GATES_INI)
    pytester.makepyfile(test_r="def test_r(dpo_result, dpo_baseline):\n    pass\n")
    result = pytester.runpytest(f"--dpo-checkpoint={FULL_RUN / 'checkpoint-4'}", "--dpo-baseline=releases/last")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --dpo-baseline / dpo_baseline: releases/last: not found *checkpoint folder*"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_a_cuda_device_on_a_machine_without_one_is_one_usage_error(pytester: pytest.Pytester, device: str) -> None:
    pytester.makeini(GATES_INI)
    pytester.makepyfile(test_release=MARGIN_TEST)
    result = pytester.runpytest(f"--dpo-checkpoint={FULL_RUN / 'checkpoint-4'}", f"--dpo-device={device}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    output = result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines([f"ERROR: --dpo-device / dpo_device: '{device}' asks for a cuda device, but this machine has none*"])
    assert "Traceback" not in output and "AssertionError" not in output
    assert len(result.stderr.lines) <= 2


def test_a_device_index_this_machine_lacks_names_the_indices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda:1")
    with pytest.raises(SettingsError, match=r"'cuda:2' names cuda device 2, but this machine has 2 \(indices 0 to 1\)"):
        check_device("cuda:2")
    with pytest.raises(SettingsError, match="'gpu' is not a torch device"):
        check_device("gpu")


def test_helpers_and_gates_take_the_interval_method(pytester: pytest.Pytester) -> None:
    result = evaluate(FULL_RUN / "checkpoint-4", EVAL_STANDARD, reference=BASE)
    assert_margin_positive(result, at_least=-0.5, confidence=0.95, method="bootstrap")
    with pytest.raises(AssertionError, match=r"95% lower bound .* \(95% bootstrap\)"):
        assert_margin_positive(result, confidence=0.95, method="bootstrap")
    with pytest.raises(ValueError, match="Unknown interval method 'wald'"):
        assert_margin_positive(result, confidence=0.95, method="wald")
    pytester.makeini("[pytest]\ndpo_gates =\n    rewards/margins > 0 @95% bootstrap\n")
    run = pytester.runpytest(f"--dpo-checkpoint={FULL_RUN / 'checkpoint-4'}", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}")
    run.stdout.fnmatch_lines(
        ["*checkpoint-4: gate failed: rewards/margins = 0.40*, but its 95% lower bound * is not above 0; interval *(95% bootstrap) (N=24 rows scored)"]
    )


def test_an_unknown_interval_method_in_a_gate_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ndpo_gates =\n    rewards/margins > 0 @95% wald\n")
    result = pytester.runpytest(f"--dpo-checkpoint={FULL_RUN / 'checkpoint-4'}", f"--dpo-eval-set={EVAL_STANDARD}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: dpo_gates line 1: unknown interval method 'wald'*Write one of t, bootstrap*"])


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_dpo", *args], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_the_command_line_names_its_own_flags_and_shows_defaults() -> None:
    bad_beta = run_cli("evaluate", str(FULL_RUN / "checkpoint-4"), f"--eval-set={EVAL_STANDARD}", "--beta=-1")
    assert bad_beta.returncode == 2
    assert bad_beta.stderr.startswith("error: --beta: beta must be > 0, got -1.0"), bad_beta.stderr
    no_reference = run_cli("evaluate", str(FULL_RUN / "checkpoint-4"), f"--eval-set={EVAL_STANDARD}")
    assert "Pass the model the DPO run started from with --reference" in no_reference.stderr
    missing_set = run_cli("evaluate", str(FULL_RUN / "checkpoint-4"), "--eval-set=nowhere.jsonl")
    assert missing_set.stderr.startswith("error: --eval-set: nowhere.jsonl: eval set not found"), missing_set.stderr
    output = bad_beta.stderr + no_reference.stderr + missing_set.stderr
    assert "--dpo-" not in output and "Traceback" not in output
    help_text = " ".join(run_cli("evaluate", "--help").stdout.split())
    assert "completion log-probs. (default: 0.1)" in help_text
    assert "(default: keep_start)" not in help_text  # its help already says "keep_start (TRL default)"
    assert "Temperature of the discopop loss. (default: 0.05)" in help_text


def test_evaluate_names_its_keyword_arguments() -> None:
    with pytest.raises(Exception, match=r"Pass the model the DPO run started from with reference="):
        evaluate(FULL_RUN / "checkpoint-4", EVAL_STANDARD)


def test_the_example_test_says_what_it_checks(pytester: pytest.Pytester) -> None:
    pytester.makeini(GATES_INI)
    pytester.makepyfile(test_release=(ROOT / "examples" / "test_release.py").read_text())
    result = pytester.runpytest(f"--dpo-checkpoint={FULL_RUN / 'checkpoint-2'}")
    result.stdout.fnmatch_lines(
        ["*test_rejected_logps_below_chosen*", "E   *mean rejected log-prob * is not below the chosen one *"]
    )
