"""The report files: JSON against its schema, Markdown summary, plot, step summary, and re-rendering from JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest
import torch
from PIL import Image, ImageStat

from pytest_dpo.__main__ import main
from pytest_dpo.diagnostics import diagnose
from pytest_dpo.metric_table import (
    DIAGNOSTIC_NAMES,
    PER_EXAMPLE_METRICS,
    SUMMARY_METRICS,
)
from pytest_dpo.report import (
    ReportEntry,
    build_report,
    metric_intervals,
    per_example_of,
    report_entry,
    verdict_record,
)
from pytest_dpo.report_files import (
    PER_EXAMPLE_FILE,
    PLOT_FILE,
    PLOT_SKIPPED,
    REPORT_JSON_FILE,
    REPORT_SCHEMA_PATH,
    SUMMARY_FILE,
    baseline_from_report,
    load_report,
    report_schema,
    write_report,
)
from pytest_dpo.report_markdown import render_markdown
from pytest_dpo.report_plot import _PANELS, plot_figure, render_plot
from pytest_dpo.report_terminal import metrics_table, verdict_table
from pytest_dpo.results import PerExample
from pytest_dpo.verdicts import Verdicts, gate_nodeid

GATES = ["rewards/accuracies >= 0.6", "rewards/margins > 0"]
EVAL_SET = {"path": "data/eval.jsonl", "name": "eval.jsonl", "sha256": "ab12" * 16, "rows": 8, "format": "standard"}
SETTINGS = {"beta": 0.1, "loss_type": ("sigmoid",), "loss_weights": None, "max_length": 1024, "dtype": "float32",
            "device": "cpu"}
VERSIONS = {"pytest-dpo": "0.1.0", "torch": "2.4.0"}


def metrics(margin: float, accuracy: float, loss: float) -> dict[str, float]:
    return {
        "loss": loss,
        "rewards/chosen": margin / 2,
        "rewards/rejected": -margin / 2,
        "rewards/margins": margin,
        "rewards/accuracies": accuracy,
        "logps/chosen": -40.5,
        "logps/rejected": -44.25,
        "logits/chosen": -1.5,
        "logits/rejected": -1.25,
        "entropy": math.nan,
        "mean_token_accuracy": 0.5,
    }


def verdict(checkpoint: str, failed_gate: str | None = None) -> dict:
    """A verdict record whose gates all passed but `failed_gate`."""
    gate_ids = [gate_nodeid(checkpoint, gate) for gate in GATES]
    failed = [gate_nodeid(checkpoint, failed_gate)] if failed_gate else []
    tests = {
        "passed": [f"tests/test_dpo.py::test_margin[{checkpoint}]"] + [g for g in gate_ids if g not in failed],
        "failed": failed,
        "error": [],
        "skipped": [],
        "not_run": [],
    }
    gates = {gate_nodeid(checkpoint, gate): gate for gate in GATES}
    return {"passed": not failed, "summary": "1 failed" if failed else "passed", "tests": tests, "gates": gates}


def make_entries() -> list[ReportEntry]:
    per_example = {"rows": [0, 1, 2], "margins": [0.5, -0.25, math.inf], "losses": [0.4, 0.8, math.nan]}
    return [
        ReportEntry(
            id="checkpoint-2", path="run/checkpoint-2", step=2, kind="model",
            verdict=verdict("checkpoint-2", "rewards/margins > 0"),
            metrics=metrics(-0.0123, 0.625, 0.7012), scored_rows=8, dropped_rows=[], evaluate_seconds=1.5,
            per_example=per_example,
        ),
        ReportEntry(
            id="checkpoint-4", path="run/checkpoint-4", step=4, kind="model",
            verdict=verdict("checkpoint-4"),
            metrics=metrics(0.21, 0.75, 0.59), scored_rows=7, dropped_rows=[5], evaluate_seconds=1.25,
            per_example=per_example,
        ),
        ReportEntry(
            id="checkpoint-6", path="run/checkpoint-6", step=6, kind="adapter",
            verdict=verdict("checkpoint-6"),
            metrics=metrics(0.48, 0.875, 0.45), scored_rows=8, evaluate_seconds=None,
            intervals={
                "rewards/accuracies": {"low": 0.53, "high": 0.98, "confidence": 0.95, "method": "wilson"},
                "rewards/margins": {"low": 0.1, "high": 0.86, "confidence": 0.95, "method": "bootstrap"},
            },
            samples=[{"row": 3, "prompt": "Name a | pipe", "policy": "A pipe:\n| carries water", "reference": "No."}],
            per_example=per_example,
        ),
    ]


def make_report() -> dict:
    created = datetime(2025, 1, 31, 12, 0, tzinfo=timezone.utc)
    return build_report(make_entries(), eval_set=EVAL_SET, gates=GATES, settings=SETTINGS, versions=VERSIONS,
                        created=created)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    directory = tmp_path_factory.mktemp("report") / "out"
    entries = make_entries()
    return directory, write_report(directory, make_report(), per_example_of(entries), log=print)


def test_report_is_strict_json_that_matches_the_schema(written: tuple[Path, list[Path]]) -> None:
    directory, paths = written
    assert paths == [directory / name for name in (REPORT_JSON_FILE, PER_EXAMPLE_FILE, SUMMARY_FILE, PLOT_FILE)]
    text = (directory / REPORT_JSON_FILE).read_text()
    report = json.loads(text, parse_constant=lambda constant: pytest.fail(f"non-strict JSON: {constant}"))
    jsonschema.Draft202012Validator.check_schema(report_schema())
    jsonschema.validate(report, report_schema(), cls=jsonschema.Draft202012Validator)
    assert report == make_report()
    assert report["schema"] == 1 and report["created"] == "2025-01-31T12:00:00Z"
    assert report["settings"]["loss_type"] == ["sigmoid"]
    first, second, third = report["checkpoints"]
    assert first["metrics"]["entropy"] is None
    assert first["metrics"]["rewards/margins"] == -0.0123
    assert first["verdict"]["tests"]["failed"] == ["dpo-gate[checkpoint-2: rewards/margins > 0]"]
    assert first["verdict"]["gates"]["dpo-gate[checkpoint-2: rewards/margins > 0]"] == "rewards/margins > 0"
    assert second["dropped_rows"] == [5] and second["timings"] == {"evaluate_seconds": 1.25}
    assert third["kind"] == "adapter" and third["timings"] == {"evaluate_seconds": None}
    assert third["intervals"]["rewards/accuracies"]["method"] == "wilson"
    assert "per_example" not in text


def test_per_example_arrays_are_kept_apart(written: tuple[Path, list[Path]]) -> None:
    directory, _ = written
    arrays = json.loads((directory / PER_EXAMPLE_FILE).read_text())
    assert sorted(arrays) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert arrays["checkpoint-2"] == {"rows": [0, 1, 2], "margins": [0.5, -0.25, None], "losses": [0.4, 0.8, None]}


def test_schema_refuses_a_malformed_report() -> None:
    report = make_report()
    report["checkpoints"][0]["kind"] = "lora"
    del report["checkpoints"][1]["verdict"]["passed"]
    errors = list(jsonschema.Draft202012Validator(report_schema()).iter_errors(report))
    assert len(errors) == 2
    assert REPORT_SCHEMA_PATH.name == "dpo_report.schema.json" and REPORT_SCHEMA_PATH.is_file()


def test_markdown_has_a_row_per_checkpoint_and_says_why_one_was_held_back() -> None:
    markdown = render_markdown(make_report())
    rows = [line for line in markdown.splitlines() if line.startswith("| checkpoint-")]
    assert [row.split(" | ")[0] for row in rows] == ["| checkpoint-2", "| checkpoint-4", "| checkpoint-6"]
    assert [row.rsplit(" | ", 1)[1] for row in rows] == ["❌ failed |", "✅ passed |", "✅ passed |"]
    assert "| -0.0123 |" in rows[0] and "| 0.6250 |" in rows[0]
    assert "| 0.4800 [0.10, 0.86] | 0.8750 [0.53, 0.98] |" in rows[2]
    assert "| checkpoint | step | loss | rewards/margins | rewards/accuracies | rewards/chosen | rewards/rejected |" in markdown
    assert "Brackets: confidence intervals, 95% bootstrap for rewards/margins; 95% wilson for rewards/accuracies." in markdown
    assert "`eval.jsonl`: 8 rows, standard, sha256 `ab12ab12ab12`" in markdown
    assert "beta=0.1, loss_type=sigmoid, loss_weights=none, max_length=1024" in markdown
    assert "## ❌ checkpoint-2 held back: 1 failed" in markdown
    assert "- failed gate `rewards/margins > 0`: rewards/margins = **-0.0123**, required > 0" in markdown
    assert "checkpoint-4 held back" not in markdown
    assert "2 of 3 checkpoints passed: checkpoint-4, checkpoint-6" in markdown


def test_markdown_samples_stay_in_their_cells() -> None:
    markdown = render_markdown(make_report())
    assert "## Sample completions: checkpoint-6" in markdown
    assert "| 3 | Name a \\| pipe | A pipe:<br>\\| carries water | No. |" in markdown
    table = markdown[markdown.index("| row | prompt"):].split("\n\n")[0].splitlines()
    assert len(table) == 3


def test_markdown_lists_tests_that_failed_errored_or_never_ran() -> None:
    verdicts = Verdicts(["final"])
    for nodeid in ("t::a[final]", "t::b[final]", "t::c[final]"):
        verdicts.expect("final", nodeid)
    verdicts.expect("final", gate_nodeid("final", "loss < 0.5"), gate="loss < 0.5")
    verdicts.record("final", "t::a[final]", "call", "failed")
    verdicts.record("final", "t::b[final]", "setup", "failed")
    verdicts.record("final", gate_nodeid("final", "loss < 0.5"), "call", "failed")
    entry = ReportEntry(id="final", path="run", step=None, kind="model", verdict=verdict_record(verdicts["final"]),
                        metrics={"loss": math.nan}, scored_rows=8)
    report = build_report([entry], eval_set=EVAL_SET, gates=["loss < 0.5"], settings={}, versions={})
    markdown = render_markdown(report)
    assert "## ❌ final held back: 2 failed, 1 error, 1 not run" in markdown
    assert "- failed: `t::a[final]`" in markdown
    assert "- error: `t::b[final]`" in markdown
    assert "- not run: `t::c[final]`" in markdown
    assert "- failed gate `loss < 0.5`: loss = **—**, required < 0.5" in markdown
    assert "| final | — | — |" in markdown


def test_plot_is_a_readable_image(written: tuple[Path, list[Path]]) -> None:
    directory, _ = written
    with Image.open(directory / PLOT_FILE) as image:
        assert image.format == "PNG"
        assert image.size == (1000, 700)
        rgb = image.convert("RGB")
    assert len(rgb.getcolors(maxcolors=1 << 20)) > 100
    assert min(ImageStat.Stat(rgb).stddev) > 10
    red_crosses = sum(count for count, (r, g, b) in rgb.getcolors(maxcolors=1 << 20) if r > 180 and g < 80 and b < 80)
    assert red_crosses > 50


def test_plot_places_checkpoints_without_a_step_after_the_last_step(tmp_path: Path) -> None:
    report = make_report()
    report["checkpoints"][2] = {**report["checkpoints"][2], "id": "final-model", "step": None}
    assert render_plot(report, tmp_path / "plot.png")
    with Image.open(tmp_path / "plot.png") as image:
        assert image.size == (1000, 700)


def test_step_summary_is_appended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = tmp_path / "step_summary.md"
    summary.write_text("## earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    write_report(tmp_path / "out", make_report(), {}, log=lambda line: None)
    text = summary.read_text()
    assert text.startswith("## earlier step\n")
    assert "# DPO checkpoint report" in text and "❌ failed" in text


def test_without_matplotlib_the_plot_is_skipped_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    paths = write_report(tmp_path, make_report(), {})
    assert [path.name for path in paths] == [REPORT_JSON_FILE, PER_EXAMPLE_FILE, SUMMARY_FILE]
    assert not (tmp_path / PLOT_FILE).exists()
    assert capsys.readouterr().out == PLOT_SKIPPED + "\n"
    assert PLOT_SKIPPED == "plot skipped: install pytest-dpo[plots] (matplotlib) to get dpo_metrics.png"
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


def test_cli_rerenders_summary_and_plot_from_the_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / REPORT_JSON_FILE).write_text(json.dumps(make_report()))
    assert main(["report", str(tmp_path)]) == 0
    assert render_markdown(make_report()) == (tmp_path / SUMMARY_FILE).read_text()
    with Image.open(tmp_path / PLOT_FILE) as image:
        assert image.size == (1000, 700)
    assert capsys.readouterr().out.splitlines() == [f"wrote {tmp_path / SUMMARY_FILE}", f"wrote {tmp_path / PLOT_FILE}"]


def test_cli_refuses_another_schema_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = make_report() | {"schema": 2}
    (tmp_path / REPORT_JSON_FILE).write_text(json.dumps(report))
    assert main(["report", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert str(tmp_path / REPORT_JSON_FILE) in error
    assert "report schema version 2 (written by pytest-dpo 0.1.0)" in error
    assert "reads schema version 1" in error
    assert not (tmp_path / SUMMARY_FILE).exists()


def test_cli_names_a_missing_or_malformed_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert f"error: {tmp_path / REPORT_JSON_FILE}: no such file" in capsys.readouterr().err
    report = make_report()
    del report["checkpoints"][1]["verdict"]
    (tmp_path / REPORT_JSON_FILE).write_text(json.dumps(report))
    assert main(["report", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "does not match the report schema at checkpoints/1: 'verdict' is a required property" in error


def test_build_report_refuses_repeated_ids_and_unknown_kinds() -> None:
    entry = make_entries()[0]
    with pytest.raises(ValueError, match="repeated: checkpoint-2"):
        build_report([entry, entry], eval_set=EVAL_SET, gates=[], settings={}, versions={})
    with pytest.raises(ValueError, match="kind 'lora'"):
        ReportEntry(id="x", path="x", step=None, kind="lora", verdict=entry.verdict, metrics={}, scored_rows=0)


def test_importing_the_report_modules_stays_light() -> None:
    modules = ", ".join(f"pytest_dpo.{name}" for name in ("report", "report_files", "report_markdown", "report_plot",
                                                           "report_terminal"))
    code = f"import sys, {modules}; print(sorted({{'torch', 'matplotlib'}} & set(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


def test_terminal_tables_keep_their_layout() -> None:
    result = SimpleNamespace(checkpoint="checkpoint-2", metrics=metrics(-0.0123, 0.625, 0.7012), num_examples=8,
                             dropped_rows=[5], subset_labels=None)
    table = metrics_table([result])
    assert table.splitlines()[0] == "metric".ljust(20) + "checkpoint-2".rjust(14)
    assert table.splitlines()[-1] == "examples".ljust(20) + "8 (-1)".rjust(14)
    verdicts = Verdicts(["checkpoint-2"])
    verdicts.expect("checkpoint-2", "dpo-gate[checkpoint-2: rewards/margins > 0]")
    verdicts.record("checkpoint-2", "dpo-gate[checkpoint-2: rewards/margins > 0]", "call", "failed")
    lines = verdict_table(["checkpoint-2"], {"checkpoint-2": {"default": result}}, verdicts).splitlines()
    assert lines[0] == "checkpoint                 loss  margins accuracy   chosen rejected  verdict"
    assert lines[1].startswith("checkpoint-2") and lines[1].endswith("  FAILED")
    assert lines[2:] == ["checkpoint-2: 1 failed", "  failed: dpo-gate[checkpoint-2: rewards/margins > 0]"]


def test_report_entry_from_a_session_checkpoint() -> None:
    verdicts = Verdicts(["checkpoint-4", "checkpoint-6"])
    verdicts.expect("checkpoint-4", "t::a[checkpoint-4]")
    verdicts.record("checkpoint-4", "t::a[checkpoint-4]", "call", "passed")
    verdicts.expect("checkpoint-6", "t::a[checkpoint-6]")
    checkpoint = SimpleNamespace(name="checkpoint-4", path=Path("run/checkpoint-4"), step=4, kind="adapter")
    per_example = SimpleNamespace(to_dict=lambda: {"rows": [0, 2]}, losses=torch.tensor([0.5, float("nan")]))
    # NaN diagnostics have no intervals, so the stand-in per-example arrays are never read for one.
    result = SimpleNamespace(metrics={"loss": 0.5}, num_examples=2, dropped_rows=[1], per_example=per_example,
                             diagnostics=dict.fromkeys(DIAGNOSTIC_NAMES, math.nan))
    entry = report_entry(checkpoint, verdicts["checkpoint-4"], result, evaluate_seconds=0.5)
    assert entry == ReportEntry(
        id="checkpoint-4", path="run/checkpoint-4", step=4, kind="adapter",
        verdict={"passed": True, "summary": "passed", "tests": {"passed": ["t::a[checkpoint-4]"], "failed": [],
                                                              "error": [], "skipped": [], "not_run": []},
                 "gates": {}},
        metrics={"loss": 0.5}, scored_rows=2, dropped_rows=[1], evaluate_seconds=0.5, per_example={"rows": [0, 2]},
        non_finite_rows=1, diagnostics=result.diagnostics,
    )
    failed = SimpleNamespace(name="checkpoint-6", path=Path("run/checkpoint-6"), step=6, kind="model")
    entry = report_entry(failed, verdicts["checkpoint-6"], None)
    assert (entry.metrics, entry.scored_rows, entry.per_example) == ({}, 0, {})
    assert entry.verdict["tests"]["not_run"] == ["t::a[checkpoint-6]"] and not entry.verdict["passed"]
    report = build_report([entry], eval_set=EVAL_SET, gates=[], settings={}, versions={})
    jsonschema.validate(report, report_schema(), cls=jsonschema.Draft202012Validator)
    assert "| checkpoint-6 | 6 | — |" in render_markdown(report)


def test_files_get_the_usual_permissions(written: tuple[Path, list[Path]]) -> None:
    umask = os.umask(0)
    os.umask(umask)
    _, paths = written
    assert {path.stat().st_mode & 0o777 for path in paths} == {0o666 & ~umask}


def per_example_arrays(margins: list[float]) -> PerExample:
    """Per-example arrays whose margins, rewards, log-probs and losses follow `margins` (a NaN margin spreads)."""
    n = len(margins)
    margin = torch.tensor(margins)
    return PerExample.from_dict(
        {
            "rows": list(range(n)), "margins": margin.tolist(), "chosen_rewards": (margin / 2).tolist(),
            "rejected_rewards": (-margin / 2).tolist(), "losses": torch.nn.functional.softplus(-margin).tolist(),
            "policy_chosen_logps": (margin - 40).tolist(), "policy_rejected_logps": [-44.0] * n,
            "reference_chosen_logps": [-40.0] * n, "reference_rejected_logps": [-44.0] * n,
            **{name: [1] * n for name in ("chosen_tokens", "rejected_tokens", "chosen_scored_tokens",
                                          "rejected_scored_tokens", "chosen_top1")},
            **{name: [0.0] * n for name in ("chosen_logits_sum", "rejected_logits_sum", "chosen_entropy_sum",
                                            "rejected_entropy_sum")},
        }
    )


def result_of(margins: list[float]) -> SimpleNamespace:
    per_example = per_example_arrays(margins)
    metrics = {name: float(getattr(per_example, field).mean()) for name, field in (
        ("loss", "losses"), ("rewards/chosen", "chosen_rewards"), ("rewards/rejected", "rejected_rewards"),
        ("rewards/margins", "margins"), ("logps/chosen", "policy_chosen_logps"),
        ("logps/rejected", "policy_rejected_logps"))}
    metrics["rewards/accuracies"] = float((per_example.margins > 0).float().mean())
    return SimpleNamespace(checkpoint="c", metrics=metrics | {"entropy": 0.5}, per_example=per_example,
                           num_examples=len(margins), dropped_rows=[], diagnostics=diagnose(per_example))


def test_every_per_example_metric_gets_an_interval_with_its_level_and_method() -> None:
    intervals = metric_intervals(result_of([0.5, -0.25, 1.0, 0.75, 0.1, 0.3]))
    assert sorted(intervals) == sorted(PER_EXAMPLE_METRICS)
    assert intervals["rewards/accuracies"]["method"] == "Wilson"
    assert {interval["method"] for name, interval in intervals.items() if name != "rewards/accuracies"} == {"t"}
    assert {interval["confidence"] for interval in intervals.values()} == {0.95}
    # Every rejected log-prob is the same, so that interval has no width.
    assert all(interval["low"] < interval["high"] for name, interval in intervals.items() if name != "logps/rejected")
    assert intervals["logps/rejected"]["low"] == intervals["logps/rejected"]["high"] == -44
    assert metric_intervals(result_of([0.5, -0.25, 1.0]), 0.9, "bootstrap")["loss"]["method"] == "bootstrap"


def test_a_nan_row_leaves_its_metrics_without_an_interval_and_the_report_still_renders(tmp_path: Path) -> None:
    result = result_of([0.5, math.nan, 1.0, 0.75])
    checkpoint = SimpleNamespace(name="checkpoint-4", path=Path("run/checkpoint-4"), step=4, kind="model")
    entry = report_entry(checkpoint, Verdicts(["checkpoint-4"])["checkpoint-4"], result)
    # Log-probs of the rejected completions stay finite, and the accuracy counts a NaN row as wrong, as TRL does.
    assert sorted(entry.intervals) == ["logps/rejected", "rewards/accuracies"]
    lonely = report_entry(checkpoint, Verdicts(["checkpoint-4"])["checkpoint-4"], result_of([0.5]), checkpoint_id="one")
    report = build_report([entry, lonely], eval_set=EVAL_SET, gates=[], settings={}, versions={})
    jsonschema.validate(report, report_schema(), cls=jsonschema.Draft202012Validator)
    assert report["checkpoints"][1]["intervals"]["loss"] | {"confidence": 0.95} == {
        "low": None, "high": None, "confidence": 0.95, "method": "t"
    }
    rows = [line for line in render_markdown(report).splitlines() if line.startswith(("| checkpoint-4", "| one"))]
    assert rows[0].startswith("| checkpoint-4 | 4 | — | — | 0.7500 [0.30, 0.95] |") and "| 0.5000 |" in rows[1]
    assert render_plot(report, tmp_path / "plot.png")


def test_markdown_shows_compact_intervals_next_to_values() -> None:
    report = make_report()
    report["checkpoints"][1]["intervals"] = {
        "loss": {"low": 0.5512, "high": 0.6288, "confidence": 0.95, "method": "t"},
        "rewards/margins": {"low": -0.0412, "high": 0.0388, "confidence": 0.95, "method": "t"},
        "rewards/chosen": {"low": -42.31, "high": -38.4, "confidence": 0.95, "method": "t"},
        "rewards/rejected": {"low": None, "high": None, "confidence": 0.95, "method": "t"},
    }
    [row] = [line for line in render_markdown(report).splitlines() if line.startswith("| checkpoint-4")]
    assert row == (
        "| checkpoint-4 | 4 | 0.5900 [0.551, 0.629] | 0.2100 [-0.041, 0.039] | 0.7500 | 0.1050 [-42.31, -38.40] | "
        "-0.1050 | ✅ passed |"
    )


def test_markdown_reads_gates_from_the_verdict_record_never_from_the_node_id() -> None:
    verdicts = Verdicts(["run: a]b"])
    gate = "rewards/accuracies >= 0.6 @95%"
    verdicts.expect("run: a]b", gate_nodeid("run: a]b", gate), gate=gate)
    verdicts.expect("run: a]b", "t.py::test_x[run: a]b]")
    verdicts.record("run: a]b", gate_nodeid("run: a]b", gate), "call", "failed")
    verdicts.record("run: a]b", "t.py::test_x[run: a]b]", "call", "passed")
    entry = ReportEntry(
        id="run: a]b", path="run", step=None, kind="model", verdict=verdict_record(verdicts["run: a]b"]),
        metrics=metrics(0.2, 0.6667, 0.6), scored_rows=24,
        intervals={"rewards/accuracies": {"low": 0.4688, "high": 0.8203, "confidence": 0.95, "method": "Wilson"}},
    )
    report = build_report([entry], eval_set=EVAL_SET, gates=[gate], settings={}, versions={})
    assert "- failed gate `rewards/accuracies >= 0.6 @95%`: rewards/accuracies = **0.6667** [0.47, 0.82], required >= 0.6" in (
        render_markdown(report)
    )
    # Any node id the record names as a gate is one; a gate-shaped node id the record does not name is an ordinary test.
    record = report["checkpoints"][0]["verdict"]
    record["tests"]["failed"] = ["custom::check", "dpo-gate[run: loss < 0.5]"]
    record["gates"] = {"custom::check": "loss < 0.5"}
    markdown = render_markdown(report)
    assert "- failed gate `loss < 0.5`: loss = **0.6000**, required < 0.5" in markdown
    assert "- failed: `dpo-gate[run: loss < 0.5]`" in markdown


def test_a_report_written_before_gates_were_recorded_still_loads_renders_and_serves_as_baseline(tmp_path: Path) -> None:
    report = make_report()
    for checkpoint in report["checkpoints"]:
        del checkpoint["verdict"]["gates"]
        del checkpoint["intervals"]
    (tmp_path / REPORT_JSON_FILE).write_text(json.dumps(report))
    arrays = per_example_arrays([0.5, -0.25, 1.0]).to_dict()
    (tmp_path / PER_EXAMPLE_FILE).write_text(json.dumps({"checkpoint-6": arrays}))
    assert load_report(tmp_path / REPORT_JSON_FILE) == report
    assert "- failed: `dpo-gate[checkpoint-2: rewards/margins > 0]`" in render_markdown(report)
    baseline = baseline_from_report(tmp_path)
    assert baseline.checkpoint == "checkpoint-6" and baseline.per_example.margins.tolist() == [0.5, -0.25, 1.0]


def test_a_report_with_intervals_serves_as_baseline(written: tuple[Path, list[Path]]) -> None:
    directory, _ = written
    assert load_report(directory / REPORT_JSON_FILE)["checkpoints"][2]["intervals"]
    (directory / PER_EXAMPLE_FILE).write_text(json.dumps({"checkpoint-6": per_example_arrays([0.5, 1.0]).to_dict()}))
    assert baseline_from_report(directory / REPORT_JSON_FILE).metrics["rewards/margins"] == 0.48


def test_the_plot_shows_exactly_the_summary_metrics() -> None:
    assert sorted(name for _, names in _PANELS for name in names) == sorted(metric.name for metric in SUMMARY_METRICS)


def scope(margin: float, accuracy: float, loss: float, rows: int) -> dict:
    """An eval set's record in a checkpoint entry (`ReportEntry.eval_sets`), without intervals."""
    return {"metrics": metrics(margin, accuracy, loss), "diagnostics": {}, "intervals": {}, "diagnostic_intervals": {},
            "num_examples": rows, "dropped_rows": []}


def two_set_report() -> dict:
    """`make_report`'s checkpoints scored on `default` and `safety` (6 rows, from the Hub, its own max_length);
    checkpoint-2 also fails the gate `safety: rewards/margins > 0`."""
    entries = make_entries()
    for index, (margin, accuracy) in enumerate([(-0.5, 0.25), (0.125, 0.5), (0.75, 1.0)]):
        own = scope(*(entries[index].metrics[name] for name in ("rewards/margins", "rewards/accuracies", "loss")), 8)
        entries[index] = dataclasses.replace(entries[index], eval_sets={"default": own, "safety": scope(margin, accuracy, 0.5, 6)})
    entries[0].verdict["gates"]["dpo-gate[checkpoint-2: safety: rewards/margins > 0]"] = "safety: rewards/margins > 0"
    entries[0].verdict["tests"]["failed"].append("dpo-gate[checkpoint-2: safety: rewards/margins > 0]")
    sets = [
        {"name": "default", "path": "data/eval.jsonl", "file": "eval.jsonl", "sha256": "ab12" * 16, "rows": 8,
         "format": "standard", "revision": None, "options": {}},
        {"name": "safety", "path": "hub:org/safety", "file": "safety", "sha256": "cd34" * 16, "rows": 6,
         "format": "standard", "revision": "0123456789abcdef", "options": {"max_length": "64"}},
    ]
    return build_report(entries, eval_set=EVAL_SET, gates=GATES, settings=SETTINGS, versions=VERSIONS, eval_sets=sets)


def test_a_report_of_two_sets_has_a_section_and_a_plot_row_per_set(tmp_path: Path) -> None:
    report = two_set_report()
    jsonschema.validate(report, report_schema(), cls=jsonschema.Draft202012Validator)
    markdown = render_markdown(report)
    assert "`hub:org/safety`: 6 rows, standard, sha256 `cd34cd34cd34`, revision `0123456789ab`, max_length=64" in markdown
    safety = markdown[markdown.index("### Eval set: safety"):]
    [row] = [line for line in safety.splitlines() if line.startswith("| checkpoint-6 | 6 |")]
    assert "| 0.7500 | 1.0000 |" in row and row.endswith("✅ passed |")
    assert "- failed gate `safety: rewards/margins > 0`: rewards/margins = **-0.5000**, required > 0" in markdown
    assert "- failed gate `rewards/margins > 0`: rewards/margins = **-0.0123**, required > 0" in markdown
    assert "Subsets of" not in markdown
    figure = plot_figure(report)
    assert len(figure.axes) == 8 and [sub.get_suptitle() for sub in figure.subfigs][1] == "Eval set: safety (safety, 6 rows)"
    # A checkpoint whose evaluation failed has no numbers in any set's table.
    report["checkpoints"][1] = {key: value for key, value in report["checkpoints"][1].items() if key != "eval_sets"}
    assert safety.count("| checkpoint-4 | 4 |") == 1 and "| checkpoint-4 | 4 | — |" in render_markdown(report)
    assert render_plot(report, tmp_path / "plot.png")


def test_build_report_refuses_an_eval_set_record_without_its_keys() -> None:
    with pytest.raises(ValueError, match="an eval_sets record lacks revision, options"):
        build_report([], eval_set=EVAL_SET, gates=[], settings={}, versions={}, eval_sets=[{"name": "x", "file": "x"} | EVAL_SET])


def test_the_verdict_table_of_two_sets_has_a_row_per_set_and_dashes_for_a_failed_evaluation() -> None:
    def result(margin: float) -> SimpleNamespace:
        return SimpleNamespace(metrics=metrics(margin, 0.5, 0.7), num_examples=8, subset_labels=None, subsets=[])

    verdicts = Verdicts(["checkpoint-2", "checkpoint-4"])
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        verdicts.expect(checkpoint, f"t::a[{checkpoint}]")
        verdicts.record(checkpoint, f"t::a[{checkpoint}]", "call", "passed")
    results = {"checkpoint-2": {"default": result(0.25), "safety": result(-0.5)}}
    lines = verdict_table(["checkpoint-2", "checkpoint-4"], results, verdicts).splitlines()
    assert lines == [
        "checkpoint    eval set      N     loss  margins accuracy   chosen rejected  verdict",
        "checkpoint-2  default       8   0.7000   0.2500   0.5000   0.1250  -0.1250  PASSED",
        "              safety        8   0.7000  -0.5000   0.5000  -0.2500   0.2500",
        "checkpoint-4  default       -        -        -        -        -        -  PASSED",
        "              safety        -        -        -        -        -        -",
    ]
