"""Human-readable output of evaluation results: no models, no evaluation."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .metrics import METRIC_NAMES
from .results import EvalResult

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
        for name in METRIC_NAMES:
            lines.append(name.ljust(_NAME_WIDTH) + "".join(_cell(format_value(r.metrics[name])) for r in block))
        lines.append("examples".ljust(_NAME_WIDTH) + "".join(_cell(_examples(r)) for r in block))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _cell(text: str) -> str:
    text = text if len(text) < _COLUMN_WIDTH else "…" + text[-(_COLUMN_WIDTH - 2) :]
    return text.rjust(_COLUMN_WIDTH)


def _examples(result: EvalResult) -> str:
    dropped = len(result.dropped_rows)
    return f"{result.num_examples}" + (f" (-{dropped})" if dropped else "")
