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

from pytest_dpo.report import report_schema

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
    assert markdown.count("| checkpoint-") == 3 and "❌ checkpoint-2 held back" in markdown
    assert summary.read_text().startswith("earlier step\n") and "❌ checkpoint-2 held back" in summary.read_text()
