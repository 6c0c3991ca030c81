"""`--dpo-report`: the plugin writes the JSON report, the Markdown summary and the plot at session end."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import huggingface_hub  # noqa: F401
import jsonschema
import peft  # noqa: F401
import pytest
import torch  # noqa: F401
import transformers  # noqa: F401

from pytest_dpo.metric_table import PER_EXAMPLE_METRICS, SUMMARY_METRICS
from pytest_dpo.report_files import report_schema

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN

pytest_plugins = ["pytester"]


def test_report_files_describe_every_checkpoint_and_its_verdict(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = tmp_path / "step_summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    pytester.makeini("[pytest]\ndpo_gates =\n    rewards/margins > 0\ndpo_report = out\n")
    pytester.makepyfile(test_m=textwrap.dedent("def test_m(dpo_metrics):\n    assert dpo_metrics['loss'] > 0\n"))
    result = pytester.runpytest(f"--dpo-checkpoint={FULL_RUN}", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}")
    result.stdout.fnmatch_lines(["wrote *out/dpo_report.json", "wrote *out/dpo_summary.md", "wrote *out/dpo_metrics.png"])
    report = json.loads((pytester.path / "out" / "dpo_report.json").read_text())
    jsonschema.validate(report, report_schema())
    assert [(c["id"], c["verdict"]["passed"]) for c in report["checkpoints"]] == [
        ("checkpoint-2", False), ("checkpoint-4", True), ("checkpoint-6", True),
    ]
    assert report["checkpoints"][0]["verdict"]["tests"]["failed"] == ["dpo-gate[checkpoint-2: rewards/margins > 0]"]
    assert report["checkpoints"][1]["timings"]["evaluate_seconds"] > 0
    assert report["eval_set"]["rows"] == 24 and report["gates"] == ["rewards/margins > 0"]
    per_example = json.loads((pytester.path / "out" / "dpo_per_example.json").read_text())
    assert len(per_example["checkpoint-6"]["margins"]) == 24
    markdown = (pytester.path / "out" / "dpo_summary.md").read_text()
    # A row per checkpoint in the metrics table and in the diagnostics table.
    assert markdown.count("| checkpoint-") == 2 * 3 and "❌ checkpoint-2 held back" in markdown
    assert summary.read_text().startswith("earlier step\n") and "❌ checkpoint-2 held back" in summary.read_text()


def test_a_real_run_reports_intervals_and_names_a_failed_gate_from_its_verdict_record(pytester: pytest.Pytester) -> None:
    gate = "rewards/accuracies >= 0.6 @95%"
    pytester.makeini(f"[pytest]\ndpo_gates =\n    {gate}\ndpo_report = out\n")
    pytester.makepyfile(test_m="def test_m(dpo_metrics):\n    assert dpo_metrics['loss'] > 0\n")
    pytester.runpytest(f"--dpo-checkpoint={FULL_RUN / 'checkpoint-4'}", f"--dpo-reference={BASE}",
                       f"--dpo-eval-set={EVAL_STANDARD}", "-p", "no:cacheprovider")
    report = json.loads((pytester.path / "out" / "dpo_report.json").read_text())
    jsonschema.validate(report, report_schema())
    [checkpoint] = report["checkpoints"]
    assert sorted(checkpoint["intervals"]) == sorted(PER_EXAMPLE_METRICS)
    for name, interval in checkpoint["intervals"].items():
        assert interval["low"] <= checkpoint["metrics"][name] <= interval["high"], name
        assert interval["confidence"] == 0.95 and interval["method"] == ("Wilson" if name == "rewards/accuracies" else "t")
    gate_id = "dpo-gate[checkpoint-4: rewards/accuracies >= 0.6 @95%]"
    assert checkpoint["verdict"]["tests"]["failed"] == [gate_id] and checkpoint["verdict"]["gates"] == {gate_id: gate}
    markdown = (pytester.path / "out" / "dpo_summary.md").read_text()
    [row, _diagnostics_row] = [line for line in markdown.splitlines() if line.startswith("| checkpoint-4")]
    assert row.count(" [") == len(SUMMARY_METRICS), row
    low, high = (checkpoint["intervals"]["rewards/accuracies"][bound] for bound in ("low", "high"))
    assert f"- failed gate `{gate}`: rewards/accuracies = **0.6667** [{low:.2f}, {high:.2f}], required >= 0.6" in markdown


def test_under_xdist_the_controller_report_knows_the_gates_its_workers_ran(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_m="def test_m(dpo_metrics):\n    assert dpo_metrics['loss'] > 0\n")
    result = pytester.runpytest(
        "-n", "2", f"--dpo-checkpoint={FULL_RUN}", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}",
        "--dpo-gate=rewards/margins > 0", "--dpo-report=out", "--dpo-lock=none",
    )
    result.assert_outcomes(passed=5, failed=1)
    report = json.loads((pytester.path / "out" / "dpo_report.json").read_text())
    assert [c["verdict"]["gates"] for c in report["checkpoints"]] == [
        {f"dpo-gate[{c}: rewards/margins > 0]": "rewards/margins > 0"} for c in ("checkpoint-2", "checkpoint-4", "checkpoint-6")
    ]
    assert all(sorted(c["intervals"]) == sorted(PER_EXAMPLE_METRICS) for c in report["checkpoints"])
    markdown = (pytester.path / "out" / "dpo_summary.md").read_text()
    assert "- failed gate `rewards/margins > 0`: rewards/margins = **-0.0061** [" in markdown
