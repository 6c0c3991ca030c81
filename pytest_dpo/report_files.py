"""The report files of a session, written and read back: JSON report, per-example arrays, summary, plot.

Each file is written atomically. A report is read back (`load_report`) to re-render
its views or to serve as the baseline of a later run (`baseline_from_report`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import write_atomic
from .report import REPORT_SCHEMA_VERSION, strict_json_values
from .report_markdown import render_markdown
from .report_plot import render_plot

if TYPE_CHECKING:
    from .results import EvalResult

REPORT_SCHEMA_PATH = Path(__file__).parent / "schemas" / "dpo_report.schema.json"
REPORT_JSON_FILE = "dpo_report.json"
PER_EXAMPLE_FILE = "dpo_per_example.json"
SUMMARY_FILE = "dpo_summary.md"
PLOT_FILE = "dpo_metrics.png"
PLOT_SKIPPED = f"plot skipped: install pytest-dpo[plots] (matplotlib) to get {PLOT_FILE}"


class ReportError(ValueError):
    """A report file cannot be read back; the message names the file and the fix."""


def write_report(
    directory: Path,
    report: Mapping[str, Any],
    per_example: Mapping[str, Mapping[str, Any]],
    *,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Write the report files into `directory` (created if needed), each atomically.

    `dpo_report.json`, `dpo_per_example.json` (checkpoint id → the default eval set's per-example
    arrays, the other sets' under `eval_sets` by set name; see `report.per_example_of`),
    `dpo_summary.md` and, when matplotlib is installed, `dpo_metrics.png`; without
    matplotlib `log` gets one line saying so (`PLOT_SKIPPED`). When
    `$GITHUB_STEP_SUMMARY` names a file, the Markdown summary is appended to it too.

    Returns:
        `list[Path]`: the files written in `directory`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = [
        write_atomic(directory / REPORT_JSON_FILE, _dumps(report, indent=2)),
        write_atomic(directory / PER_EXAMPLE_FILE, _dumps(strict_json_values(per_example), indent=None)),
    ]
    written += write_views(directory, report, log=log)
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as handle:
            handle.write("\n" + render_markdown(report))
    return written


def write_views(directory: Path, report: Mapping[str, Any], *, log: Callable[[str], None] = print) -> list[Path]:
    """(Re)write `dpo_summary.md` and, with matplotlib, `dpo_metrics.png` from a report; the files written."""
    directory = Path(directory)
    written = [write_atomic(directory / SUMMARY_FILE, render_markdown(report).encode("utf-8"))]
    if render_plot(report, directory / PLOT_FILE):
        written.append(directory / PLOT_FILE)
    else:
        log(PLOT_SKIPPED)
    return written


def _dumps(value: Any, indent: int | None) -> bytes:
    separators = None if indent else (",", ":")
    text = json.dumps(value, indent=indent, separators=separators, allow_nan=False, ensure_ascii=False)
    return (text + "\n").encode("utf-8")


def load_report(path: Path) -> dict[str, Any]:
    """Read a `dpo_report.json` back, refusing a missing file, broken JSON or another schema version.

    When `jsonschema` is installed the whole report is also checked against `REPORT_SCHEMA_PATH`.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(
            f"{path}: no such file; pass the folder a pytest-dpo run wrote {REPORT_JSON_FILE} into."
        ) from None
    try:
        report = json.loads(text)
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: not valid JSON ({error}); write it again with pytest-dpo.") from None
    found = report.get("schema") if isinstance(report, dict) else None
    if found != REPORT_SCHEMA_VERSION:
        written_by = report.get("versions", {}).get("pytest-dpo") if isinstance(report, dict) else None
        origin = f" (written by pytest-dpo {written_by})" if written_by else ""
        raise ReportError(
            f"{path}: report schema version {found!r}{origin}, but this pytest-dpo reads schema version "
            f"{REPORT_SCHEMA_VERSION}; render it with the pytest-dpo version that wrote it, or run the tests again."
        )
    try:
        import jsonschema
    except ImportError:
        return report
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(report_schema()).iter_errors(report))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "top level"
        raise ReportError(f"{path}: does not match the report schema at {where}: {error.message}")
    return report


def baseline_from_report(path: Path) -> EvalResult:
    """The last passing checkpoint of a saved report, as an `EvalResult` to compare new checkpoints with.

    `path` is a `dpo_report.json` or the folder holding it; the per-example
    arrays come from the `dpo_per_example.json` written beside it.

    Raises:
        ReportError: the report or its per-example file is missing or unreadable, or no checkpoint passed.
    """
    from .results import EvalResult, PerExample

    path = Path(path)
    report_path = path / REPORT_JSON_FILE if path.is_dir() else path
    report = load_report(report_path)
    passed = [entry for entry in report["checkpoints"] if entry["verdict"]["passed"]]
    if not passed:
        raise ReportError(f"{report_path}: no checkpoint passed in this report, so it has no release to compare with.")
    entry = passed[-1]
    per_example_path = report_path.parent / PER_EXAMPLE_FILE
    try:
        arrays = json.loads(per_example_path.read_text(encoding="utf-8"))[entry["id"]]
    except (OSError, json.JSONDecodeError, KeyError):
        raise ReportError(
            f"{per_example_path}: missing or without {entry['id']}; a baseline needs the per-example arrays "
            "written next to the report."
        ) from None
    return EvalResult(
        checkpoint=entry["id"],
        checkpoint_path=entry["path"],
        reference="(from report)",
        metrics={name: value if value is not None else math.nan for name, value in entry["metrics"].items()},
        per_example=PerExample.from_dict(arrays),
        dropped_rows=list(entry["dropped_rows"]),
        eval_set_sha256=report["eval_set"]["sha256"],
        settings=dict(report["settings"]),
    )


def report_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the report."""
    return json.loads(REPORT_SCHEMA_PATH.read_text(encoding="utf-8"))
