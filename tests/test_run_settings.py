"""Each checkpoint is scored with the settings its run trained with, unless told otherwise, and says so."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import huggingface_hub  # noqa: F401
import jsonschema
import peft  # noqa: F401
import pytest
import torch
import transformers  # noqa: F401
# Imported before any in-process pytester run, whose module snapshot would otherwise unload it between tests.
from trl.trainer.dpo_config import DPOConfig

from pytest_dpo import evaluate
from pytest_dpo.report_files import report_schema
from pytest_dpo.run_settings import resolve_settings
from pytest_dpo.settings import DPOSettings

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN

pytest_plugins = ["pytester"]
RUN_OPTIONS = [f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}"]
REWARDS_TEST = """
import json

def test_rewards(dpo_checkpoint, dpo_metrics):
    with open(f"rewards-{dpo_checkpoint.path.parent.name}.json", "w") as handle:
        json.dump(dpo_metrics, handle)
"""


def dpo_config(output_dir: Path, **overrides: Any) -> DPOConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return DPOConfig(output_dir=str(output_dir), use_cpu=True, report_to="none", **overrides)


def checkpoint_trained_with(folder: Path, name: str = "checkpoint-4", **overrides: Any) -> Path:
    """A copy of the bundled checkpoint-4 whose training_args.bin says it was trained with `overrides`."""
    target = folder / name
    shutil.copytree(FULL_RUN / "checkpoint-4", target)
    torch.save(dpo_config(folder / "out", max_length=128, **overrides), target / "training_args.bin")
    return target


class RunsCode:
    """Pickles into a call of os.system: what a hostile training_args.bin does when loaded the usual way."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_the_bundled_run_is_scored_with_its_own_settings() -> None:
    resolved = resolve_settings(DPOSettings(), {}, FULL_RUN / "checkpoint-4")
    sources = {source.name: source for source in resolved.sources}
    assert sources["beta"].source == "run" and sources["beta"].value == 0.1
    assert sources["max_length"].source == "run" and resolved.settings.max_length == 128
    assert resolved.warnings == ()
    assert resolved.training_args == str(FULL_RUN / "checkpoint-4" / "training_args.bin")


def test_an_explicit_setting_wins_and_is_flagged_when_it_differs_from_training() -> None:
    resolved = resolve_settings(DPOSettings(beta=0.2), {"beta": "command line"}, FULL_RUN / "checkpoint-4")
    beta = next(source for source in resolved.sources if source.name == "beta")
    assert resolved.settings.beta == 0.2
    assert beta.differs and str(beta) == "beta=0.2 (command line; trained with 0.1)"


def test_a_folder_without_training_args_uses_defaults(tmp_path: Path) -> None:
    resolved = resolve_settings(DPOSettings(), {}, tmp_path)
    assert resolved.settings == DPOSettings()
    assert {source.source for source in resolved.sources} == {"default"}


def test_a_run_trained_with_another_beta_is_scored_with_it(pytester: pytest.Pytester) -> None:
    checkpoint = checkpoint_trained_with(pytester.path / "runs", beta=0.05)
    pytester.makepyfile(test_rewards=REWARDS_TEST)
    result = pytester.runpytest(f"--dpo-checkpoint={checkpoint}", *RUN_OPTIONS)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.stdout.fnmatch_lines(["dpo settings: beta=0.05 (run), *max_length=128 (run)*"])
    scored = json.loads((pytester.path / "rewards-runs.json").read_text())
    expected = evaluate(FULL_RUN / "checkpoint-4", EVAL_STANDARD, reference=BASE, beta=0.05, max_length=128).metrics
    assert scored["rewards/margins"] == pytest.approx(expected["rewards/margins"], abs=1e-6)
    at_default_beta = evaluate(FULL_RUN / "checkpoint-4", EVAL_STANDARD, reference=BASE, beta=0.1).metrics
    assert scored["rewards/margins"] == pytest.approx(at_default_beta["rewards/margins"] / 2, rel=1e-6)


def test_checkpoints_of_one_sweep_are_each_scored_with_their_own_settings(pytester: pytest.Pytester) -> None:
    low = checkpoint_trained_with(pytester.path / "sweep-a", beta=0.05)
    high = checkpoint_trained_with(pytester.path / "sweep-b", beta=0.2)
    pytester.makepyfile(test_rewards=REWARDS_TEST)
    result = pytester.runpytest(f"--dpo-checkpoint={low}", f"--dpo-checkpoint={high}", *RUN_OPTIONS)
    result.stdout.fnmatch_lines(
        ["dpo settings (sweep-a/checkpoint-4): beta=0.05 (run)*", "dpo settings (sweep-b/checkpoint-4): beta=0.2 (run)*"]
    )
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    margin = {run: json.loads((pytester.path / f"rewards-{run}.json").read_text())["rewards/margins"] for run in ("sweep-a", "sweep-b")}
    assert margin["sweep-a"] == pytest.approx(margin["sweep-b"] / 4, rel=1e-6)


def test_the_command_line_wins_over_the_run_and_the_header_says_so(pytester: pytest.Pytester) -> None:
    checkpoint = checkpoint_trained_with(pytester.path / "runs", beta=0.05)
    pytester.makepyfile(test_rewards=REWARDS_TEST)
    result = pytester.runpytest(f"--dpo-checkpoint={checkpoint}", "--dpo-beta=0.1", *RUN_OPTIONS)
    result.stdout.fnmatch_lines(["dpo settings: beta=0.1 (command line; trained with 0.05), *"])


def test_a_loss_the_plugin_cannot_reproduce_is_named_in_the_header_and_the_report(pytester: pytest.Pytester) -> None:
    checkpoint = checkpoint_trained_with(pytester.path / "runs", loss_type=["aot"], sync_ref_model=True)
    pytester.makepyfile(test_rewards=REWARDS_TEST)
    result = pytester.runpytest(f"--dpo-checkpoint={checkpoint}", "--dpo-report=report", *RUN_OPTIONS)
    result.stdout.fnmatch_lines(
        [
            "dpo settings: *loss_type=sigmoid (default)*",
            f"dpo warning: checkpoint-4: {checkpoint / 'training_args.bin'}: trained with loss_type 'aot' (sorted across*",
            "dpo warning: checkpoint-4: *trained with sync_ref_model=True*",
        ]
    )
    report = json.loads((pytester.path / "report" / "dpo_report.json").read_text())
    jsonschema.validate(report, report_schema())
    record = report["checkpoints"][0]["settings"]
    assert record["sources"]["loss_type"] == {"value": ["sigmoid"], "source": "default", "trained": ["aot"]}
    assert any("aot" in warning for warning in record["warnings"])
    assert "## ⚠️ Training settings not reproduced" in (pytester.path / "report" / "dpo_summary.md").read_text()


def test_a_training_args_file_that_would_run_code_is_not_executed(pytester: pytest.Pytester) -> None:
    checkpoint = checkpoint_trained_with(pytester.path / "runs")
    marker = pytester.path / "pwned"
    torch.save(RunsCode(marker), checkpoint / "training_args.bin")
    pytester.makepyfile(test_rewards=REWARDS_TEST)
    result = pytester.runpytest(f"--dpo-checkpoint={checkpoint}", *RUN_OPTIONS)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.stdout.fnmatch_lines(
        ["dpo settings: beta=0.1 (default)*", "dpo warning: checkpoint-4: *training_args.bin: refused to load the global `posix.system`*Nothing in the file "
         "was executed. Scored with the settings given and defaults instead."]
    )
    assert not marker.exists()


def test_evaluate_takes_the_runs_settings_unless_given(tmp_path: Path) -> None:
    checkpoint = checkpoint_trained_with(tmp_path, beta=0.05)
    from_run = evaluate(checkpoint, EVAL_STANDARD, reference=BASE)
    assert from_run.settings["beta"] == 0.05 and from_run.settings["max_length"] == 128
    given = evaluate(checkpoint, EVAL_STANDARD, reference=BASE, beta=0.1)
    assert from_run.metrics["rewards/margins"] == pytest.approx(given.metrics["rewards/margins"] / 2, rel=1e-6)


def test_evaluate_warns_about_training_settings_it_cannot_reproduce(tmp_path: Path) -> None:
    checkpoint = checkpoint_trained_with(tmp_path, loss_type=["aot"])
    with pytest.warns(UserWarning, match="trained with loss_type 'aot'"):
        result = evaluate(checkpoint, EVAL_STANDARD, reference=BASE)
    assert result.settings["loss_type"] == ["sigmoid"]
