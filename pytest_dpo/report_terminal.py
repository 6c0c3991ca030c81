"""Terminal tables of evaluation results: metrics by checkpoint, and the verdict of each checkpoint.

Both fit 80 columns; `format_value` is also the number format of the Markdown summary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .metric_table import METRIC_NAMES
from .report import SUMMARY_COLUMNS

if TYPE_CHECKING:
    from .results import EvalResult
    from .verdicts import Verdicts

TABLE_WIDTH = 80
_NAME_WIDTH = 20
_COLUMN_WIDTH = 14
_ID_WIDTH = 22
_NUMBER_WIDTH = 9


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


def verdict_table(checkpoint_ids: Sequence[str], results: Mapping[str, EvalResult], verdicts: Verdicts) -> str:
    """One row per checkpoint: the summary metrics and verdict, then why each held-back checkpoint failed."""
    header = "checkpoint".ljust(_ID_WIDTH) + "".join(metric.label.rjust(_NUMBER_WIDTH) for metric in SUMMARY_COLUMNS)
    lines = [header + "  verdict"]
    details = []
    for checkpoint_id in checkpoint_ids:
        verdict = verdicts[checkpoint_id]
        result = results.get(checkpoint_id)
        numbers = "".join(
            (_short(result.metrics[metric.name]) if result else "-").rjust(_NUMBER_WIDTH) for metric in SUMMARY_COLUMNS
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
