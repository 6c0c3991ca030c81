"""Terminal tables of evaluation results: metrics by checkpoint, and the verdict of each checkpoint.

Both fit 80 columns (the verdict table of several eval sets or subsets: 100); `format_value` is also the
number format of the Markdown summary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .metric_table import METRIC_NAMES
from .report import SUMMARY_COLUMNS
from .report_scopes import subset_results

if TYPE_CHECKING:
    from .results import EvalResult
    from .verdicts import Verdicts

TABLE_WIDTH = 80
_NAME_WIDTH = 20
_COLUMN_WIDTH = 14
_ID_WIDTH = 22
_NUMBER_WIDTH = 9
# The verdict table with several eval sets or subsets: its `eval set` column fits the longest label up to this
# (the whole table: at most 100), and its `N` column.
_MAX_SET_WIDTH = 24
_COUNT_WIDTH = 5


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


def verdict_table(
    checkpoint_ids: Sequence[str], results: Mapping[str, Mapping[str, EvalResult]], verdicts: Verdicts
) -> str:
    """One row per checkpoint: the summary metrics and verdict, then why each held-back checkpoint failed.

    `results` holds each checkpoint's results by eval set name (run order); a checkpoint without results
    (its evaluation failed) shows `-`. With several eval sets, or subsets, each checkpoint gets a row per
    set and per subset (`safety/math`), labelled in an `eval set` column, with the rows scored (`N`).
    """
    eval_sets = list(dict.fromkeys(name for by_set in results.values() for name in by_set))
    with_subsets = any(result.subset_labels is not None for by_set in results.values() for result in by_set.values())
    scoped = len(eval_sets) > 1 or with_subsets
    scopes = {checkpoint_id: _scopes(eval_sets, results.get(checkpoint_id, {})) for checkpoint_id in checkpoint_ids} if scoped else {}
    labels = [label for rows in scopes.values() for label, _ in rows]
    id_width = min(_ID_WIDTH, max(len("checkpoint"), *map(len, checkpoint_ids)) + 2) if scoped else _ID_WIDTH
    set_width = min(_MAX_SET_WIDTH, max(len("eval set"), *map(len, labels)) + 2) if scoped else 0
    metrics = "".join(metric.label.rjust(_NUMBER_WIDTH) for metric in SUMMARY_COLUMNS)
    if scoped:
        lines = ["checkpoint".ljust(id_width) + "eval set".ljust(set_width) + "N".rjust(_COUNT_WIDTH) + metrics + "  verdict"]
    else:
        lines = ["checkpoint".ljust(id_width) + metrics + "  verdict"]
    details = []
    for checkpoint_id in checkpoint_ids:
        verdict = verdicts[checkpoint_id]
        outcome = f"  {'PASSED' if verdict.passed else 'FAILED'}"
        name = _fit(checkpoint_id, id_width).ljust(id_width)
        by_set = results.get(checkpoint_id, {})
        if scoped:
            for number, (label, result) in enumerate(scopes[checkpoint_id]):
                count = "-" if result is None else str(result.num_examples)
                head = (name if number == 0 else " " * id_width) + _fit(label, set_width).ljust(set_width)
                lines.append(head + count.rjust(_COUNT_WIDTH) + _numbers(result) + (outcome if number == 0 else ""))
        else:
            lines.append(name + _numbers(next(iter(by_set.values()), None)) + outcome)
        if not verdict.passed:
            details.append(f"{checkpoint_id}: {verdict.summary}")
            details.extend(f"  {kind}: {nodeid}" for kind in ("failed", "error") for nodeid in verdict.tests(kind))
            details.extend(f"  not run: {nodeid}" for nodeid in verdict.not_run)
    return "\n".join(lines + details)


def _scopes(eval_sets: Sequence[str], by_set: Mapping[str, EvalResult]) -> list[tuple[str, EvalResult | None]]:
    """Each eval set's result and, after it, each of its subsets' (`set/subset`); None where nothing was scored."""
    scopes: list[tuple[str, EvalResult | None]] = []
    for eval_set in eval_sets:
        result = by_set.get(eval_set)
        scopes.append((eval_set, result))
        subsets = subset_results(result) if result is not None else {}
        scopes += [(f"{eval_set}/{subset}", one) for subset, one in subsets.items()]
    return scopes


def _numbers(result: EvalResult | None) -> str:
    """The summary metrics as right-aligned columns, `-` each without a result."""
    return "".join(
        (_short(result.metrics[metric.name]) if result else "-").rjust(_NUMBER_WIDTH) for metric in SUMMARY_COLUMNS
    )


def _fit(text: str, width: int) -> str:
    """`text`, cut from the left with `…` when it would fill `width`."""
    return text if len(text) < width else "…" + text[-(width - 2) :]


def _short(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) and abs(value) < 1e4 else f"{value:.2g}"
