"""Human-readable output of evaluation results: no models, no evaluation.

Terminal tables, and the report files of a session: a versioned JSON report
(schema in `schemas/dpo_report.schema.json`), the per-example arrays, a Markdown
summary and a metrics plot. matplotlib is optional and imported only to plot.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import write_atomic
from .gates import Gate, GateError, parse_gate
from .metric_table import METRIC_NAMES

if TYPE_CHECKING:
    from .checkpoints import Checkpoint
    from .evalset import EvalSet
    from .results import EvalResult
    from .verdicts import CheckpointVerdict, Verdicts

TABLE_WIDTH = 80
_NAME_WIDTH = 20
_COLUMN_WIDTH = 14


def format_value(value: float) -> str:
    """A metric value in at most 11 characters: fixed point when readable, else scientific."""
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4f}"


def metrics_table(results: Sequence[EvalResult], width: int = TABLE_WIDTH) -> str:
    """Metrics (rows) by checkpoint (columns), split into blocks that fit `width` characters."""
    per_block = max(1, (width - _NAME_WIDTH) // _COLUMN_WIDTH)
    blocks = []
    for start in range(0, len(results), per_block):
        block = results[start : start + per_block]
        header = "metric".ljust(_NAME_WIDTH) + "".join(_cell(r.checkpoint) for r in block)
        lines = [header, "-" * len(header)]
        for name in (name for name in METRIC_NAMES if any(name in r.metrics for r in block)):
            lines.append(name.ljust(_NAME_WIDTH) + "".join(_cell(_metric_text(r.metrics, name)) for r in block))
        lines.append("examples".ljust(_NAME_WIDTH) + "".join(_cell(_examples(r)) for r in block))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _metric_text(metrics: Mapping[str, float], name: str) -> str:
    """The formatted value, or `-` for a metric only some checkpoints have (a MoE policy's `aux_loss`)."""
    return format_value(metrics[name]) if name in metrics else "-"


def _cell(text: str) -> str:
    text = text if len(text) < _COLUMN_WIDTH else "…" + text[-(_COLUMN_WIDTH - 2) :]
    return text.rjust(_COLUMN_WIDTH)


def _examples(result: EvalResult) -> str:
    dropped = len(result.dropped_rows)
    return f"{result.num_examples}" + (f" (-{dropped})" if dropped else "")


_SUMMARY_METRICS = (
    ("loss", "loss"),
    ("margins", "rewards/margins"),
    ("accuracy", "rewards/accuracies"),
    ("chosen", "rewards/chosen"),
    ("rejected", "rewards/rejected"),
)
_ID_WIDTH = 22
_NUMBER_WIDTH = 9


def verdict_table(checkpoint_ids: Sequence[str], results: Mapping[str, EvalResult], verdicts: Verdicts) -> str:
    """One row per checkpoint: main metrics and verdict, then why each held-back checkpoint failed; fits 80 columns."""
    header = "checkpoint".ljust(_ID_WIDTH) + "".join(label.rjust(_NUMBER_WIDTH) for label, _ in _SUMMARY_METRICS)
    lines = [header + "  verdict"]
    details = []
    for checkpoint_id in checkpoint_ids:
        verdict = verdicts[checkpoint_id]
        result = results.get(checkpoint_id)
        numbers = "".join(
            (_short(result.metrics[metric]) if result else "-").rjust(_NUMBER_WIDTH) for _, metric in _SUMMARY_METRICS
        )
        name = checkpoint_id if len(checkpoint_id) < _ID_WIDTH else "…" + checkpoint_id[-(_ID_WIDTH - 2) :]
        lines.append(f"{name.ljust(_ID_WIDTH)}{numbers}  {'PASSED' if verdict.passed else 'FAILED'}")
        if not verdict.passed:
            details.append(f"{checkpoint_id}: {verdict.summary}")
            details.extend(f"  {kind}: {nodeid}" for kind in ("failed", "error") for nodeid in verdict.tests(kind))
            details.extend(f"  not run: {nodeid}" for nodeid in verdict.not_run)
    return "\n".join(lines + details)


def _short(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) and abs(value) < 1e4 else f"{value:.2g}"


REPORT_SCHEMA_VERSION = 1
REPORT_SCHEMA_PATH = Path(__file__).parent / "schemas" / "dpo_report.schema.json"
REPORT_FILE = "dpo_report.json"
PER_EXAMPLE_FILE = "dpo_per_example.json"
SUMMARY_FILE = "dpo_summary.md"
PLOT_FILE = "dpo_metrics.png"
PLOT_SKIPPED = f"plot skipped: install pytest-dpo[plots] (matplotlib) to get {PLOT_FILE}"
KINDS = ("model", "adapter")
TEST_OUTCOMES = ("passed", "failed", "error", "skipped", "not_run")
EVAL_SET_KEYS = ("path", "name", "sha256", "rows", "format")
MARKDOWN_METRICS = (
    "loss",
    "rewards/margins",
    "rewards/accuracies",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
)
_GATE_NODE = re.compile(r"^dpo-gate\[(?P<checkpoint>.+): (?P<gate>[^:]+)\]$")
_CELL_LIMIT = 400
# Unset device and dtype mean "chosen for the hardware"; other unset settings mean "none" (e.g. no max_length).
_AUTO_WHEN_UNSET = ("device", "dtype")


class ReportError(ValueError):
    """A report file cannot be read back; the message names the file and the fix."""


@dataclass(frozen=True)
class ReportEntry:
    """What the report says about one checkpoint.

    Attributes:
        id (`str`): the checkpoint's name, e.g. `checkpoint-500`.
        path (`str`): where it was loaded from.
        step (`int | None`): its training step, None when unknown (e.g. a final model).
        kind (`str`): `"model"` or `"adapter"`.
        verdict (`Mapping`): `{"passed": bool, "summary": str, "tests": {"passed": [...], "failed": [...],
            "error": [...], "skipped": [...], "not_run": [...]}}`, see `verdict_record`.
        metrics (`Mapping[str, float | None]`): TRL's eval metrics; empty when the evaluation failed.
        scored_rows (`int`): how many eval-set rows were scored.
        dropped_rows (`Sequence[int]`, *optional*): eval-set rows TRL drops, never scored.
        evaluate_seconds (`float | None`, *optional*): how long the evaluation took.
        intervals (`Mapping`, *optional*): confidence intervals by metric name,
            each `{"low": float, "high": float, "confidence": float, "method": str}`.
        samples (`Sequence[Mapping]`, *optional*): sample completions,
            each `{"row": int, "prompt": str, "policy": str, "reference": str}`.
        per_example (`Mapping[str, list]`, *optional*): the per-example arrays
            (`PerExample.to_dict()`); written to `dpo_per_example.json`, not to the main report.
        settings (`Mapping`, *optional*): where each setting came from and the training settings not
            reproduced (`CheckpointSettings.to_dict()`).
        non_finite_rows (`int`, *optional*): scored rows whose loss is NaN or infinite; as in TRL, they make
            `loss` and the other means over rows NaN.
    """

    id: str
    path: str
    step: int | None
    kind: str
    verdict: Mapping[str, Any]
    metrics: Mapping[str, float | None]
    scored_rows: int
    dropped_rows: Sequence[int] = ()
    evaluate_seconds: float | None = None
    intervals: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    samples: Sequence[Mapping[str, Any]] = ()
    per_example: Mapping[str, list] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    non_finite_rows: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ReportEntry {self.id}: kind {self.kind!r} is neither of {', '.join(KINDS)}.")
        missing = [key for key in ("passed", "summary", "tests") if key not in self.verdict]
        if missing:
            raise ValueError(
                f"ReportEntry {self.id}: verdict lacks {', '.join(missing)}; build it with `verdict_record(verdict)`."
            )
        for row, sample in enumerate(self.samples):
            absent = [key for key in ("row", "prompt", "policy", "reference") if key not in sample]
            if absent:
                raise ValueError(f"ReportEntry {self.id}: sample {row} lacks {', '.join(absent)}.")
        for metric, interval in self.intervals.items():
            absent = [key for key in ("low", "high", "confidence", "method") if key not in interval]
            if absent:
                raise ValueError(f"ReportEntry {self.id}: interval of {metric} lacks {', '.join(absent)}.")


def report_entry(
    checkpoint: Checkpoint,
    verdict: CheckpointVerdict,
    result: EvalResult | None,
    *,
    evaluate_seconds: float | None = None,
    intervals: Mapping[str, Mapping[str, Any]] | None = None,
    samples: Sequence[Mapping[str, Any]] = (),
    checkpoint_id: str | None = None,
    settings: Mapping[str, Any] | None = None,
) -> ReportEntry:
    """The report entry of a checkpoint from what a session holds; `result` is None when its evaluation failed.

    `checkpoint_id` is the checkpoint's unique id in the session (default: its folder name).
    """
    return ReportEntry(
        id=checkpoint_id or checkpoint.name,
        path=str(checkpoint.path),
        step=checkpoint.step,
        kind=checkpoint.kind,
        verdict=verdict_record(verdict),
        metrics=dict(result.metrics) if result else {},
        scored_rows=result.num_examples if result else 0,
        dropped_rows=list(result.dropped_rows) if result else [],
        evaluate_seconds=evaluate_seconds,
        intervals=dict(intervals or {}),
        samples=tuple(samples),
        per_example=result.per_example.to_dict() if result else {},
        settings=dict(settings or {}),
        non_finite_rows=int((~result.per_example.losses.isfinite()).sum()) if result else 0,
    )


def verdict_record(verdict: CheckpointVerdict) -> dict[str, Any]:
    """A checkpoint's verdict as the report stores it (what `ReportEntry.verdict` expects)."""
    tests = {outcome: verdict.tests(outcome) for outcome in TEST_OUTCOMES if outcome != "not_run"}
    return {"passed": verdict.passed, "summary": verdict.summary, "tests": tests | {"not_run": verdict.not_run}}


def eval_set_record(eval_set: EvalSet) -> dict[str, Any]:
    """An eval set as the report describes it (what `build_report(eval_set=...)` expects)."""
    return {
        "path": eval_set.path,
        "name": Path(eval_set.path).name,
        "sha256": eval_set.sha256,
        "rows": len(eval_set),
        "format": eval_set.format,
    }


def build_report(
    entries: Sequence[ReportEntry],
    *,
    eval_set: Mapping[str, Any],
    gates: Sequence[str],
    settings: Mapping[str, Any],
    versions: Mapping[str, str],
    created: datetime | None = None,
) -> dict[str, Any]:
    """The JSON report (schema `REPORT_SCHEMA_VERSION`, see `REPORT_SCHEMA_PATH`) of one session.

    Args:
        entries (`Sequence[ReportEntry]`): one per checkpoint, in checkpoint order.
        eval_set (`Mapping`): `path`, `name`, `sha256`, `rows`, `format` (see `eval_set_record`).
        gates (`Sequence[str]`): the gates, e.g. `["rewards/accuracies >= 0.6"]` (`Gate` objects are accepted).
        settings (`Mapping`): the `DPOSettings` used, as plain values.
        versions (`Mapping[str, str]`): installed package versions (e.g. `model_card.versions()`).
        created (`datetime`, *optional*): when the report was made; now by default.

    NaN and infinite numbers become `null`, so the result dumps as strict JSON.

    Example:
        >>> report = build_report(entries, eval_set=eval_set_record(eval_set), gates=["rewards/margins > 0"],
        ...                       settings=result.settings, versions=versions())
    """
    ids = [entry.id for entry in entries]
    duplicates = sorted({name for name in ids if ids.count(name) > 1})
    if duplicates:
        raise ValueError(f"checkpoint ids must be unique in a report; repeated: {', '.join(duplicates)}.")
    missing = [key for key in EVAL_SET_KEYS if key not in eval_set]
    if missing:
        raise ValueError(f"eval_set lacks {', '.join(missing)}; build it with `eval_set_record(eval_set)`.")
    moment = (created or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return {
        "schema": REPORT_SCHEMA_VERSION,
        "created": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "eval_set": _strict({key: eval_set[key] for key in EVAL_SET_KEYS}),
        "settings": _strict(dict(settings)),
        "gates": [str(gate) for gate in gates],
        "versions": {str(name): str(number) for name, number in versions.items()},
        "checkpoints": [_checkpoint_record(entry) for entry in entries],
    }


def _checkpoint_record(entry: ReportEntry) -> dict[str, Any]:
    known = [name for name in METRIC_NAMES if name in entry.metrics]
    others = sorted(name for name in entry.metrics if name not in METRIC_NAMES)
    tests = entry.verdict["tests"]
    return _strict(
        {
            "id": entry.id,
            "path": str(entry.path),
            "step": None if entry.step is None else int(entry.step),
            "kind": entry.kind,
            "verdict": {
                "passed": bool(entry.verdict["passed"]),
                "summary": str(entry.verdict["summary"]),
                "tests": {outcome: [str(nodeid) for nodeid in tests.get(outcome, ())] for outcome in TEST_OUTCOMES},
            },
            "metrics": {name: _float(entry.metrics[name]) for name in known + others},
            "scored_rows": entry.scored_rows,
            "dropped_rows": [int(row) for row in entry.dropped_rows],
            "non_finite_rows": entry.non_finite_rows,
            "timings": {"evaluate_seconds": entry.evaluate_seconds},
            "intervals": {metric: dict(interval) for metric, interval in entry.intervals.items()},
            "samples": [
                {"row": int(s["row"]), "prompt": str(s["prompt"]), "policy": str(s["policy"]),
                 "reference": str(s["reference"])}
                for s in entry.samples
            ],
        }
        | ({"settings": dict(entry.settings)} if entry.settings else {})
    )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _strict(value: Any) -> Any:
    """`value` with NaN and infinities as None and tuples as lists: dumpable with `allow_nan=False`."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


def per_example_of(entries: Sequence[ReportEntry]) -> dict[str, dict[str, list]]:
    """The per-example arrays of the entries that have them, by checkpoint id (what `write_report` expects)."""
    return {entry.id: dict(entry.per_example) for entry in entries if entry.per_example}


def write_report(
    directory: Path,
    report: Mapping[str, Any],
    per_example: Mapping[str, Mapping[str, list]],
    *,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Write the report files into `directory` (created if needed), each atomically.

    `dpo_report.json`, `dpo_per_example.json` (checkpoint id → per-example arrays),
    `dpo_summary.md` and, when matplotlib is installed, `dpo_metrics.png`; without
    matplotlib `log` gets one line saying so (`PLOT_SKIPPED`). When
    `$GITHUB_STEP_SUMMARY` names a file, the Markdown summary is appended to it too.

    Returns:
        `list[Path]`: the files written in `directory`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = [
        write_atomic(directory / REPORT_FILE, _dumps(report, indent=2)),
        write_atomic(directory / PER_EXAMPLE_FILE, _dumps(_strict(per_example), indent=None)),
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


def load_report(path: Path) -> dict[str, Any]:
    """Read a `dpo_report.json` back, refusing a missing file, broken JSON or another schema version.

    When `jsonschema` is installed the whole report is also checked against `REPORT_SCHEMA_PATH`.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file; pass the folder a pytest-dpo run wrote {REPORT_FILE} into.") from None
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
    report_path = path / REPORT_FILE if path.is_dir() else path
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


def _dumps(value: Any, indent: int | None) -> bytes:
    separators = None if indent else (",", ":")
    text = json.dumps(value, indent=indent, separators=separators, allow_nan=False, ensure_ascii=False)
    return (text + "\n").encode("utf-8")


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as GitHub-flavoured Markdown: overview table, why checkpoints were held back, samples."""
    checkpoints = report["checkpoints"]
    eval_set = report["eval_set"]
    passed = [c["id"] for c in checkpoints if c["verdict"]["passed"]]
    lines = [
        "# DPO checkpoint report",
        "",
        f"**Eval set:** `{_markdown_code(eval_set['name'])}`: {eval_set['rows']} rows, {eval_set['format']}, "
        f"sha256 `{str(eval_set['sha256'])[:12]}`  ",
        f"**Settings:** {', '.join(f'{name}={_setting(name, value)}' for name, value in report['settings'].items())}  ",
        f"**Gates:** {', '.join(f'`{gate}`' for gate in report['gates']) or 'none'}  ",
        f"**Result:** {len(passed)} of {len(checkpoints)} checkpoints passed"
        + (f": {', '.join(passed)}" if passed else ""),
        "",
        "| checkpoint | step | " + " | ".join(MARKDOWN_METRICS) + " | verdict |",
        "|:--|--:|" + "--:|" * len(MARKDOWN_METRICS) + ":--|",
    ]
    for checkpoint in checkpoints:
        numbers = " | ".join(_number(checkpoint["metrics"].get(name)) for name in MARKDOWN_METRICS)
        step = "—" if checkpoint["step"] is None else str(checkpoint["step"])
        verdict = "✅ passed" if checkpoint["verdict"]["passed"] else "❌ failed"
        lines.append(f"| {_markdown_cell(checkpoint['id'])} | {step} | {numbers} | {verdict} |")
    non_finite = [(c["id"], c["non_finite_rows"]) for c in checkpoints if c.get("non_finite_rows")]
    for checkpoint_id, count in non_finite:
        lines += ["", f"**{_markdown_cell(checkpoint_id)}:** {count} scored rows have a NaN or infinite loss, so "
                  "`loss` and the means over rows are NaN (as in TRL's `evaluate()`)."]
    warnings = [(c["id"], warning) for c in checkpoints for warning in c.get("settings", {}).get("warnings", ())]
    if warnings:
        lines += ["", "## ⚠️ Training settings not reproduced", ""]
        lines += [f"- {_markdown_cell(checkpoint_id)}: {_markdown_cell(warning)}" for checkpoint_id, warning in warnings]
    for checkpoint in checkpoints:
        if not checkpoint["verdict"]["passed"]:
            lines += ["", *_held_back(checkpoint)]
    for checkpoint in checkpoints:
        if checkpoint.get("samples"):
            lines += ["", *_samples(checkpoint)]
    versions = ", ".join(f"{name} {number}" for name, number in report["versions"].items())
    lines += ["", f"<sub>Report schema {report['schema']}, created {report['created']}; {versions}</sub>", ""]
    return "\n".join(lines)


def _held_back(checkpoint: Mapping[str, Any]) -> list[str]:
    verdict = checkpoint["verdict"]
    lines = [f"## ❌ {_markdown_cell(checkpoint['id'])} held back: {_markdown_cell(verdict['summary'])}", ""]
    labels = {"failed": "failed", "error": "error", "not_run": "not run"}
    for outcome, label in labels.items():
        for nodeid in verdict["tests"][outcome]:
            gate = _gate_of(nodeid)
            if gate is None:
                lines.append(f"- {label}: `{_markdown_code(nodeid)}`")
            else:
                value = _number(checkpoint["metrics"].get(gate.metric))
                lines.append(
                    f"- {label} gate `{gate}`: {gate.metric} = **{value}**, required {gate.operator} {gate.threshold:g}"
                )
    if len(lines) == 2:
        lines.append(f"- {_markdown_cell(verdict['summary'])}")
    return lines


def _gate_of(nodeid: str) -> Gate | None:
    """The gate a built-in gate item checks, from its node id `dpo-gate[checkpoint-2: rewards/margins > 0]`."""
    match = _GATE_NODE.match(nodeid)
    if match is None:
        return None
    try:
        return parse_gate(match.group("gate"), nodeid)
    except GateError:
        return None


def _samples(checkpoint: Mapping[str, Any]) -> list[str]:
    lines = [
        f"## Sample completions: {_markdown_cell(checkpoint['id'])}",
        "",
        "| row | prompt | policy | reference |",
        "|--:|:--|:--|:--|",
    ]
    for sample in checkpoint["samples"]:
        cells = " | ".join(_markdown_cell(sample[key]) for key in ("prompt", "policy", "reference"))
        lines.append(f"| {sample['row']} | {cells} |")
    return lines


def _markdown_cell(text: Any) -> str:
    """Text that stays inside one Markdown table cell and renders as plain text."""
    text = str(text)
    if len(text) > _CELL_LIMIT:
        text = text[: _CELL_LIMIT - 1] + "…"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\\", "\\\\")
    return text.replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def _markdown_code(text: Any) -> str:
    return str(text).replace("`", "'").replace("\n", " ")


def _number(value: float | None) -> str:
    return "—" if value is None else format_value(float(value))


def _setting(name: str, value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    if value is None:
        return "auto" if name in _AUTO_WHEN_UNSET else "none"
    return str(value)


_PANELS = (
    ("Reward margins", ("rewards/margins",)),
    ("Reward accuracy", ("rewards/accuracies",)),
    ("Chosen / rejected rewards", ("rewards/chosen", "rewards/rejected")),
    ("Loss", ("loss",)),
)
_FIGURE_SIZE = (10, 7)
_ALL_STEP_TICKS = 8
_TICK_LABEL_LIMIT = 16
_DPI = 100


def render_plot(report: Mapping[str, Any], path: Path) -> bool:
    """Plot the main metrics against training step into a PNG at `path`; False (nothing written) without matplotlib.

    Checkpoints without a step come after the last step, labelled by id. Gate thresholds are
    dashed lines, confidence intervals shaded bands, held-back checkpoints red crosses.
    Uses matplotlib's object API with the Agg canvas, so pyplot's global state is never touched.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    checkpoints = report["checkpoints"]
    positions, ticks, tick_labels = _positions(checkpoints, MaxNLocator)
    order = sorted(range(len(checkpoints)), key=lambda index: positions[index])
    xs = [positions[index] for index in order]
    ordered = [checkpoints[index] for index in order]
    failed = [i for i, checkpoint in enumerate(ordered) if not checkpoint["verdict"]["passed"]]
    gates = _plot_gates(report["gates"])

    figure = Figure(figsize=_FIGURE_SIZE, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    eval_set = report["eval_set"]
    figure.suptitle(f"DPO eval metrics: {eval_set['name']} ({eval_set['rows']} rows)")
    for axes, (title, metrics) in zip(figure.subplots(2, 2).flat, _PANELS):
        series = {metric: [_nan(checkpoint["metrics"].get(metric)) for checkpoint in ordered] for metric in metrics}
        for metric, values in series.items():
            line = axes.plot(xs, values, marker="o", markersize=4, label=metric)[0]
            _interval_band(axes, xs, ordered, metric, line.get_color())
        if failed:
            axes.plot([xs[i] for i in failed for _ in metrics], [v[i] for i in failed for v in series.values()],
                      linestyle="none", marker="x", markersize=9, markeredgewidth=2, color="tab:red", label="held back")
        for gate in gates:
            if gate.metric in metrics:
                axes.axhline(gate.threshold, linestyle="--", linewidth=1, color="0.35", label=f"gate: {gate}")
        axes.set_title(title)
        axes.set_xticks(ticks, tick_labels)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    for axes in figure.axes[2:]:
        axes.set_xlabel("training step" if any(c["step"] is not None for c in checkpoints) else "checkpoint")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_atomic(Path(path), buffer.getvalue())
    return True


def _positions(checkpoints: Sequence[Mapping[str, Any]], locator: Any) -> tuple[list[float], list[float], list[str]]:
    """x position of each checkpoint, and the ticks: steps as numbers, step-less checkpoints by id after them."""
    steps = sorted({c["step"] for c in checkpoints if c["step"] is not None})
    gap = min((b - a for a, b in zip(steps, steps[1:])), default=1) or 1
    if steps:
        gap = max(gap, (steps[-1] - steps[0]) / 8)
    after = steps[-1] if steps else -gap
    positions = []
    extra_ticks, extra_labels = [], []
    for checkpoint in checkpoints:
        if checkpoint["step"] is None:
            after += gap
            positions.append(after)
            extra_ticks.append(after)
            name = checkpoint["id"]
            name = name if len(name) <= _TICK_LABEL_LIMIT else "…" + name[-(_TICK_LABEL_LIMIT - 1) :]
            # A second line keeps an id clear of the step numbers beside it.
            extra_labels.append("\n" + name if steps else name)
        else:
            positions.append(checkpoint["step"])
    if len(steps) <= _ALL_STEP_TICKS:
        step_ticks = list(steps)
    else:
        candidates = locator(nbins=6, integer=True).tick_values(steps[0], steps[-1])
        step_ticks = [tick for tick in candidates if steps[0] <= tick <= steps[-1]]
    return positions, step_ticks + extra_ticks, [f"{t:g}" for t in step_ticks] + extra_labels


def _interval_band(axes: Any, xs: list[float], ordered: Sequence[Mapping[str, Any]], metric: str, color: str) -> None:
    points = [
        (x, checkpoint["intervals"][metric])
        for x, checkpoint in zip(xs, ordered)
        if metric in checkpoint.get("intervals", {})
        and checkpoint["intervals"][metric]["low"] is not None
        and checkpoint["intervals"][metric]["high"] is not None
    ]
    if not points:
        return
    first = points[0][1]
    label = f"{first['confidence']:.0%} interval ({first['method']})"
    band_x = [x for x, _ in points]
    lows = [interval["low"] for _, interval in points]
    highs = [interval["high"] for _, interval in points]
    if len(points) > 1:
        axes.fill_between(band_x, lows, highs, color=color, alpha=0.18, linewidth=0, label=label)
        label = None
    centres = [(low + high) / 2 for low, high in zip(lows, highs)]
    half = [(high - low) / 2 for low, high in zip(lows, highs)]
    axes.errorbar(band_x, centres, yerr=half, fmt="none", ecolor=color, alpha=0.6, capsize=4, label=label)


def _plot_gates(lines: Sequence[str]) -> list[Gate]:
    gates = []
    for number, line in enumerate(lines, start=1):
        try:
            gates.append(parse_gate(line, f"report gate {number}"))
        except GateError:
            continue
    return gates


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)
