"""The Markdown summary of a JSON report (`dpo_summary.md`, GitHub's step summary).

Works from the report dict alone, as `python -m pytest_dpo report DIR` re-renders it:
which tests are gates, and which gate each checks, is read from the verdict record.
A report of several eval sets gets a section per set; subsets get a compact table below their set's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .gates import GateError, parse_gate
from .metric_table import DIAGNOSTIC_NAMES, DIAGNOSTIC_PREFIX, DIAGNOSTICS_BY_NAME
from .report import SUMMARY_COLUMNS
from .report_scopes import scoped
from .report_terminal import format_value

_CELL_LIMIT = 400
# Unset device and dtype mean "chosen for the hardware"; other unset settings mean "none" (e.g. no max_length).
_AUTO_WHEN_UNSET = ("device", "dtype")
_HELD_BACK_LABELS = {"failed": "failed", "error": "error", "not_run": "not run"}
# What the subsets table shows of each subset, besides its number of scored rows.
_SUBSET_COLUMNS = ("rewards/accuracies", "rewards/margins")


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as GitHub-flavoured Markdown: overview table, why checkpoints were held back, the
    diagnostics (checkpoints × diagnostics; left out for a report written without them), samples.

    Each value in a table is followed by its confidence interval when the report has one,
    e.g. `0.7188 [0.61, 0.81]`. With several eval sets (the report's `eval_sets`) each set gets a section
    (`### Eval set: safety`) with its own table; a set split into subsets gets a subsets table below it.
    """
    checkpoints = report["checkpoints"]
    eval_sets = report.get("eval_sets", [])
    passed = [c["id"] for c in checkpoints if c["verdict"]["passed"]]
    lines = [
        "# DPO checkpoint report",
        "",
        _eval_sets_line(report["eval_set"], eval_sets),
        f"**Settings:** {', '.join(f'{name}={_setting(name, value)}' for name, value in report['settings'].items())}  ",
        f"**Gates:** {', '.join(f'`{gate}`' for gate in report['gates']) or 'none'}  ",
        f"**Result:** {len(passed)} of {len(checkpoints)} checkpoints passed"
        + (f": {', '.join(passed)}" if passed else ""),
    ]
    if len(eval_sets) > 1:
        for eval_set in eval_sets:
            lines += ["", f"### Eval set: {_markdown_cell(eval_set['name'])}", "", _eval_set_facts(eval_set)]
            lines += _metrics_table(checkpoints, eval_set["name"]) + _subsets_table(checkpoints, eval_set["name"])
    else:
        lines += _metrics_table(checkpoints, None)
        lines += _subsets_table(checkpoints, eval_sets[0]["name"]) if eval_sets else []
    non_finite = [(c["id"], c["non_finite_rows"]) for c in checkpoints if c.get("non_finite_rows")]
    for checkpoint_id, count in non_finite:
        note = (
            f"**{_markdown_cell(checkpoint_id)}:** {count} scored rows have a NaN or infinite loss, so "
            "`loss` and the means over rows are NaN (as in TRL's `evaluate()`)."
        )
        lines += ["", note]
    warnings = [(c["id"], warning) for c in checkpoints for warning in c.get("settings", {}).get("warnings", ())]
    if warnings:
        lines += ["", "## ⚠️ Training settings not reproduced", ""]
        lines += [f"- {_markdown_cell(checkpoint_id)}: {_markdown_cell(warning)}" for checkpoint_id, warning in warnings]
    for checkpoint in checkpoints:
        if not checkpoint["verdict"]["passed"]:
            lines += ["", *_held_back(checkpoint)]
    lines += _diagnostics(checkpoints, [eval_set["name"] for eval_set in eval_sets] if len(eval_sets) > 1 else [])
    for checkpoint in checkpoints:
        if checkpoint.get("samples"):
            lines += ["", *_samples(checkpoint)]
    versions = ", ".join(f"{name} {number}" for name, number in report["versions"].items())
    lines += ["", f"<sub>Report schema {report['schema']}, created {report['created']}; {versions}</sub>", ""]
    return "\n".join(lines)


def _eval_sets_line(default: Mapping[str, Any], eval_sets: Sequence[Mapping[str, Any]]) -> str:
    """The header line naming the eval set, or the eval sets whose sections follow."""
    if len(eval_sets) > 1:
        names = ", ".join(f"`{_markdown_code(eval_set['name'])}`" for eval_set in eval_sets)
        return f"**Eval sets:** {names}, a section each below  "
    return (
        f"**Eval set:** `{_markdown_code(default['name'])}`: {default['rows']} rows, {default['format']}, "
        f"sha256 `{str(default['sha256'])[:12]}`  "
    )


def _eval_set_facts(eval_set: Mapping[str, Any]) -> str:
    """`` `data/safety.jsonl`: 24 rows, standard, sha256 `…` ``, with the Hub revision and the set's own settings."""
    facts = [f"{eval_set['rows']} rows", str(eval_set["format"]), f"sha256 `{str(eval_set['sha256'])[:12]}`"]
    if eval_set["revision"] is not None:
        facts.append(f"revision `{_markdown_code(eval_set['revision'])[:12]}`")
    facts += [f"{key}={_markdown_cell(value)}" for key, value in eval_set["options"].items()]
    return f"`{_markdown_code(eval_set['path'])}`: {', '.join(facts)}"


def _metrics_table(checkpoints: Sequence[Mapping[str, Any]], eval_set: str | None) -> list[str]:
    """Checkpoints × summary metrics of one eval set (None: the default set), a verdict column, the legend."""
    columns = [metric.name for metric in SUMMARY_COLUMNS]
    lines = ["", "| checkpoint | step | " + " | ".join(columns) + " | verdict |", "|:--|--:|" + "--:|" * len(columns) + ":--|"]
    records = [scoped(checkpoint, eval_set) or {} for checkpoint in checkpoints]
    for checkpoint, record in zip(checkpoints, records):
        step = "—" if checkpoint["step"] is None else str(checkpoint["step"])
        verdict = "✅ passed" if checkpoint["verdict"]["passed"] else "❌ failed"
        lines.append(f"| {_markdown_cell(checkpoint['id'])} | {step} | {_cells(record, columns)} | {verdict} |")
    return lines + _intervals_legend(records, columns)


def _subsets_table(checkpoints: Sequence[Mapping[str, Any]], eval_set: str) -> list[str]:
    """(Checkpoint, subset) rows with the rows scored, accuracy and margin; empty for a set without subsets."""
    rows = [
        (checkpoint["id"], subset, record)
        for checkpoint in checkpoints
        for subset, record in ((scoped(checkpoint, eval_set) or {}).get("subsets") or {}).items()
    ]
    if not rows:
        return []
    lines = [
        "",
        f"**Subsets of `{_markdown_code(eval_set)}`:**",
        "",
        "| checkpoint | subset | N | " + " | ".join(_SUBSET_COLUMNS) + " |",
        "|:--|:--|--:|" + "--:|" * len(_SUBSET_COLUMNS),
    ]
    for checkpoint_id, subset, record in rows:
        cells = _cells(record, _SUBSET_COLUMNS)
        lines.append(f"| {_markdown_cell(checkpoint_id)} | {_markdown_cell(subset)} | {record['num_examples']} | {cells} |")
    return lines


def _diagnostics(checkpoints: list[Mapping[str, Any]], eval_sets: Sequence[str]) -> list[str]:
    """The diagnostics table, columns named as gates name them without `diagnostics/`, a row per checkpoint
    (per checkpoint and eval set when `eval_sets` names several); empty without diagnostics."""
    if not any(checkpoint.get("diagnostics") for checkpoint in checkpoints):
        return []
    set_column = "eval set | " if eval_sets else ""
    lines = [
        "",
        f"## Diagnostics (`{DIAGNOSTIC_PREFIX}…`)",
        "",
        f"| checkpoint | {set_column}" + " | ".join(_column(name) for name in DIAGNOSTIC_NAMES) + " |",
        "|:--|" + (":--|" if eval_sets else "") + "--:|" * len(DIAGNOSTIC_NAMES),
    ]
    records = []
    for checkpoint in checkpoints:
        for eval_set in eval_sets or [None]:
            record = scoped(checkpoint, eval_set) or {}
            records.append(record)
            label = "" if eval_set is None else f"{_markdown_cell(eval_set)} | "
            lines.append(f"| {_markdown_cell(checkpoint['id'])} | {label}{_cells(record, DIAGNOSTIC_NAMES)} |")
    return lines + _intervals_legend(records, list(DIAGNOSTIC_NAMES))


def _cells(record: Mapping[str, Any], names: Sequence[str]) -> str:
    """Each named metric's or diagnostic's value with its interval in a checkpoint's or a `scoped` record,
    as table cells."""
    return " | ".join(_number(_value(record, name)) + _interval(record, name) for name in names)


def _column(name: str) -> str:
    return name.removeprefix(DIAGNOSTIC_PREFIX)


def _value(record: Mapping[str, Any], name: str) -> float | None:
    """A metric's or a diagnostic's value in a checkpoint's or a `scoped` record; None when it has none."""
    return record.get("diagnostics" if name in DIAGNOSTICS_BY_NAME else "metrics", {}).get(name)


def _interval(record: Mapping[str, Any], metric: str) -> str:
    """` [low, high]` after a value, empty without bounds: two decimals, more (up to four) for a narrow interval."""
    interval = _interval_of(record, metric)
    if interval is None or interval["low"] is None or interval["high"] is None:
        return ""
    low, high = interval["low"], interval["high"]
    decimals = 4 if high <= low else min(4, max(2, 1 - math.floor(math.log10(high - low))))
    return f" [{low:.{decimals}f}, {high:.{decimals}f}]"


def _intervals_legend(records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[str]:
    """What the brackets in the table are: each confidence level and method, with the metrics it applies to."""
    kinds: dict[tuple[float, str], list[str]] = {}
    for name in columns:
        for interval in (_interval_of(record, name) for record in records):
            if interval is not None:
                names = kinds.setdefault((interval["confidence"], interval["method"]), [])
                if _column(name) not in names:
                    names.append(_column(name))
    if not kinds:
        return []
    parts = [f"{confidence * 100:g}% {method} for {', '.join(names)}" for (confidence, method), names in kinds.items()]
    return ["", f"Brackets: confidence intervals, {'; '.join(parts)}."]


def _interval_of(record: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    intervals = record.get("diagnostic_intervals" if name in DIAGNOSTICS_BY_NAME else "intervals", {})
    return intervals.get(name)


def _held_back(checkpoint: Mapping[str, Any]) -> list[str]:
    verdict = checkpoint["verdict"]
    gates = verdict.get("gates", {})
    lines = [f"## ❌ {_markdown_cell(checkpoint['id'])} held back: {_markdown_cell(verdict['summary'])}", ""]
    for outcome, label in _HELD_BACK_LABELS.items():
        for nodeid in verdict["tests"][outcome]:
            if nodeid in gates:
                lines.append(_gate_line(label, gates[nodeid], checkpoint))
            else:
                lines.append(f"- {label}: `{_markdown_code(nodeid)}`")
    if len(lines) == 2:
        lines.append(f"- {_markdown_cell(verdict['summary'])}")
    return lines


def _gate_line(label: str, text: str, checkpoint: Mapping[str, Any]) -> str:
    """`- failed gate `rewards/margins > 0`: rewards/margins = **-0.0123** [-0.05, 0.03], required > 0`.

    A gate on an eval set or subset (`safety: …`, `helpful/math: …`) shows that set's or subset's value.
    """
    head = f"- {label} gate `{_markdown_code(text)}`"
    try:
        gate = parse_gate(text, f"gate of {checkpoint['id']}")
    except GateError:
        return head
    record = scoped(checkpoint, gate.eval_set, gate.subset) or {}
    value = _number(_value(record, gate.metric))
    interval = _interval(record, gate.metric)
    return f"{head}: {gate.metric} = **{value}**{interval}, required {gate.operator} {gate.threshold:g}"


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
