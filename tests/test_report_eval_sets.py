"""Reports of a run with several eval sets and a subset column: JSON, Markdown, plot, terminal table, release."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub  # noqa: F401
import jsonschema
import peft  # noqa: F401
import pytest
import torch  # noqa: F401
import transformers  # noqa: F401
import yaml
from PIL import Image

from pytest_dpo.metric_table import PER_EXAMPLE_METRICS
from pytest_dpo.report import NAMED_EVAL_SET_KEYS
from pytest_dpo.report_files import load_report, report_schema
from pytest_dpo.report_plot import plot_figure

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN

pytest_plugins = ["pytester"]

CHECKPOINTS = ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
SCOPE_KEYS = ["metrics", "diagnostics", "intervals", "diagnostic_intervals", "num_examples", "dropped_rows"]
GATES = ["rewards/margins > 0", "safety/refusal: rewards/margins > 0.3"]


def write_eval_sets(directory: Path) -> None:
    """`helpful.jsonl`: the 24 bundled rows, `math` then `chat`; `safety.jsonl`: rows 4-19, `harm` and `refusal` in turn."""
    rows = [json.loads(line) for line in EVAL_STANDARD.read_text().splitlines()]
    helpful = [row | {"subset": "math" if index < 12 else "chat"} for index, row in enumerate(rows)]
    safety = [row | {"subset": "refusal" if index % 2 else "harm"} for index, row in enumerate(rows[4:20])]
    for name, chosen in (("helpful", helpful), ("safety", safety)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in chosen))


def run_two_sets(pytester: pytest.Pytester, *options: str) -> pytest.RunResult:
    """The bundled run scored on `helpful` and `safety`, split by `subset`, with `GATES` and a report in `out`."""
    write_eval_sets(pytester.path)
    pytester.makepyfile(test_m="def test_m(dpo_metrics):\n    assert dpo_metrics['loss'] > 0\n")
    return pytester.runpytest(
        f"--dpo-checkpoint={FULL_RUN}", f"--dpo-reference={BASE}", "--dpo-eval-set=helpful=helpful.jsonl",
        "--dpo-eval-set=safety=safety.jsonl", "--dpo-subset-column=subset", *(f"--dpo-gate={gate}" for gate in GATES),
        "--dpo-report=out", "--dpo-lock=none", "-p", "no:cacheprovider", *options,
    )


def test_the_json_report_holds_every_eval_set_and_subset(pytester: pytest.Pytester) -> None:
    run_two_sets(pytester).assert_outcomes(passed=9, failed=3)
    report = json.loads((pytester.path / "out" / "dpo_report.json").read_text())
    jsonschema.validate(report, report_schema(), cls=jsonschema.Draft202012Validator)
    assert load_report(pytester.path / "out" / "dpo_report.json") == report
    helpful, safety = report["eval_sets"]
    assert list(helpful) == list(NAMED_EVAL_SET_KEYS)
    assert (helpful["name"], helpful["file"], helpful["rows"], helpful["revision"], helpful["options"]) == (
        "helpful", "helpful.jsonl", 24, None, {}
    )
    assert (safety["name"], safety["rows"]) == ("safety", 16)
    # The top-level eval set stays the default one: the first set given, as none is named `default`.
    assert report["eval_set"] == {key: helpful[key] for key in ("path", "sha256", "rows", "format")} | {"name": "helpful.jsonl"}
    for checkpoint in report["checkpoints"]:
        sets = checkpoint["eval_sets"]
        assert list(sets) == ["helpful", "safety"]
        assert list(sets["helpful"]) == [*SCOPE_KEYS, "subsets"]
        assert {key: sets["helpful"][key] for key in ("metrics", "intervals", "diagnostics")} == {
            key: checkpoint[key] for key in ("metrics", "intervals", "diagnostics")
        }
        assert list(sets["helpful"]["subsets"]) == ["math", "chat"] and list(sets["safety"]["subsets"]) == ["harm", "refusal"]
        assert [sets["safety"]["subsets"][name]["num_examples"] for name in ("harm", "refusal")] == [8, 8]
        refusal = sets["safety"]["subsets"]["refusal"]
        assert list(refusal) == SCOPE_KEYS and sorted(refusal["intervals"]) == sorted(PER_EXAMPLE_METRICS)
    per_example = json.loads((pytester.path / "out" / "dpo_per_example.json").read_text())
    assert len(per_example["checkpoint-4"]["margins"]) == 24
    assert list(per_example["checkpoint-4"]["eval_sets"]) == ["safety"]
    assert len(per_example["checkpoint-4"]["eval_sets"]["safety"]["margins"]) == 16


def test_summary_plot_and_terminal_table_show_each_set_and_its_subsets(pytester: pytest.Pytester) -> None:
    result = run_two_sets(pytester)
    report = json.loads((pytester.path / "out" / "dpo_report.json").read_text())
    refusal = report["checkpoints"][0]["eval_sets"]["safety"]["subsets"]["refusal"]
    markdown = (pytester.path / "out" / "dpo_summary.md").read_text()
    assert "**Eval sets:** `helpful`, `safety`, a section each below" in markdown
    helpful_section = markdown[markdown.index("### Eval set: helpful"):markdown.index("### Eval set: safety")]
    safety_sha = report["eval_sets"][1]["sha256"]
    assert f"`safety.jsonl`: 16 rows, standard, sha256 `{safety_sha[:12]}`" in markdown
    # The checkpoints × metrics table, then the subsets table: a row per checkpoint and subset.
    assert [line.split(" | ")[0] for line in helpful_section.splitlines() if line.startswith("| checkpoint-")] == [
        f"| {checkpoint}" for checkpoint in [*CHECKPOINTS, *(c for c in CHECKPOINTS for _ in ("math", "chat"))]
    ]
    assert "**Subsets of `safety`:**" in markdown
    assert f"| checkpoint-2 | refusal | 8 | {refusal['metrics']['rewards/accuracies']:.4f} [" in markdown
    low, high = (refusal["intervals"]["rewards/margins"][bound] for bound in ("low", "high"))
    assert (
        f"- failed gate `safety/refusal: rewards/margins > 0.3`: rewards/margins = "
        f"**{refusal['metrics']['rewards/margins']:.4f}** [{low:.2f}, {high:.2f}], required > 0.3"
    ) in markdown
    assert "| checkpoint | eval set | likelihood_displacement |" in markdown

    figure = plot_figure(report)
    figure.canvas.draw()
    assert len(figure.axes) == 2 * 4
    assert [subfigure.get_suptitle() for subfigure in figure.subfigs] == [
        "Eval set: helpful (helpful.jsonl, 24 rows)", "Eval set: safety (safety.jsonl, 16 rows)"
    ]
    # Two rows of panels, each a grid of one row and four columns.
    assert len({round(axes.get_position().y0, 2) for axes in figure.axes}) == 2
    assert {axes.get_subplotspec().get_geometry()[:2] for axes in figure.axes} == {(1, 4)}
    with Image.open(pytester.path / "out" / "dpo_metrics.png") as image:
        assert image.size == (1600, 730)

    table = result.stdout.str()
    table = table[table.index("DPO checkpoints"):table.index("score cache:")].splitlines()[1:]
    # The columns fit the longest checkpoint id and eval set / subset label.
    assert table[0] == "checkpoint    eval set            N     loss  margins accuracy   chosen rejected  verdict"
    assert [line[:35] for line in table[1:7]] == [
        "checkpoint-2  helpful            24", "              helpful/math       12",
        "              helpful/chat       12", "              safety             16",
        "              safety/harm         8", "              safety/refusal      8",
    ]
    assert table[1].endswith("  FAILED") and table[7].endswith("  PASSED") and not table[2].endswith("ED")
    assert table[6].split()[4] == f"{refusal['metrics']['rewards/accuracies']:.4f}"
    assert "  failed: dpo-gate[checkpoint-2: safety/refusal: rewards/margins > 0.3]" in table
    assert max(len(line) for line in table) <= 100


def test_a_release_card_and_dpo_eval_list_every_set_and_subset(pytester: pytest.Pytester) -> None:
    from huggingface_hub import ModelCard, parse_eval_result_entries

    run_two_sets(pytester, "--dpo-save-dir=released")
    report = json.loads((pytester.path / "out" / "dpo_report.json").read_text())
    reported = report["checkpoints"][1]["eval_sets"]
    folder = pytester.path / "released" / "checkpoint-4"
    released = json.loads((folder / "dpo_eval.json").read_text())
    assert released["eval_set"]["name"] == "helpful.jsonl" and released["metrics"] == report["checkpoints"][1]["metrics"]
    assert list(released["eval_sets"]) == ["helpful", "safety"]
    safety = released["eval_sets"]["safety"]
    assert safety["sha256"] == report["eval_sets"][1]["sha256"] and safety["revision"] is None
    assert (safety["rows"], safety["scored_rows"], safety["metrics"]) == (16, 16, reported["safety"]["metrics"])
    assert safety["subsets"]["harm"] == {"scored_rows": 8, "metrics": reported["safety"]["subsets"]["harm"]["metrics"]}

    card = ModelCard.load(folder / "README.md")
    by_set = {(entry.dataset_config, entry.metric_type): entry for entry in card.data.eval_results}
    assert by_set["safety", "rewards/margins"].metric_value == pytest.approx(safety["metrics"]["rewards/margins"])
    assert by_set["safety", "loss"].dataset_revision == safety["sha256"]
    assert by_set["helpful", "loss"].dataset_name == "helpful.jsonl"
    assert "### Eval sets" in card.text
    margins = reported["safety"]["subsets"]["refusal"]["metrics"]["rewards/margins"]
    assert f"| `safety` (`safety.jsonl`) | 16 | `{safety['sha256'][:12]}` | 16 | " in card.text
    assert f"| `safety` / `refusal` |  |  | 8 | {reported['safety']['subsets']['refusal']['metrics']['loss']:.4g} | {margins:.4g} |" in (
        card.text
    )
    entries = parse_eval_result_entries(yaml.safe_load((folder / ".eval_results" / "dpo.yaml").read_text()))
    assert {entry.notes.split(";")[0] for entry in entries} == {"eval set helpful", "eval set safety"}


def test_one_set_with_subsets_keeps_its_table_and_adds_the_subsets(pytester: pytest.Pytester) -> None:
    write_eval_sets(pytester.path)
    pytester.makepyfile(test_m="def test_m(dpo_metrics):\n    assert dpo_metrics['loss'] > 0\n")
    result = pytester.runpytest(
        f"--dpo-checkpoint={FULL_RUN / 'checkpoint-4'}", f"--dpo-reference={BASE}", "--dpo-eval-set=helpful.jsonl",
        "--dpo-subset-column=subset", "--dpo-gate=default/math: rewards/margins > 0", "--dpo-report=out",
        "--dpo-lock=none", "-p", "no:cacheprovider",
    )
    result.assert_outcomes(passed=1, failed=1)
    report = json.loads((pytester.path / "out" / "dpo_report.json").read_text())
    jsonschema.validate(report, report_schema(), cls=jsonschema.Draft202012Validator)
    [checkpoint] = report["checkpoints"]
    math = checkpoint["eval_sets"]["default"]["subsets"]["math"]
    markdown = (pytester.path / "out" / "dpo_summary.md").read_text()
    assert "### Eval set" not in markdown and "**Eval set:** `helpful.jsonl`: 24 rows" in markdown
    assert "**Subsets of `default`:**" in markdown
    assert f"- failed gate `default/math: rewards/margins > 0`: rewards/margins = **{math['metrics']['rewards/margins']:.4f}** [" in markdown
    assert len(plot_figure(report).axes) == 4
    result.stdout.fnmatch_lines([
        "checkpoint    eval set          N     loss  margins accuracy   chosen rejected  verdict",
        "checkpoint-4  default          24 *  FAILED",
        "              default/math     12 *",
        "              default/chat     12 *",
    ])
