"""The pieces a failure message is built from: numbers, row counts, and example rows with their prompts.

Text for an 80-column terminal, shared by the threshold check (`checks`) and the
assertion helpers. No pytest; no torch import.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .results import EvalResult

WIDTH = 80
_SNIPPET_CHARS = 50
# Stands for a space that wrapping must not break at; `example_lines` turns it back into a space.
_KEPT_SPACE = "\x00"


def number(value: float) -> str:
    """`value` at 4 significant digits."""
    return f"{value:.4g}"


def distinct_numbers(value: float, threshold: float) -> tuple[str, str]:
    """Both numbers at 4 significant digits, or in full where those would look equal but are not."""
    shown_value, shown_threshold = number(value), number(threshold)
    if shown_value == shown_threshold and value != threshold:
        return repr(float(value)), repr(float(threshold))
    return shown_value, shown_threshold


def count(n: int, noun: str) -> str:
    """`1 row`, `2 rows`."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def scored(result: EvalResult) -> str:
    """`N=24 rows scored`, with `, 2 dropped` when the eval set lost rows to truncation or filtering."""
    dropped = len(result.dropped_rows)
    return f"N={count(len(result.per_example), 'row')} scored" + (f", {dropped} dropped" if dropped else "")


def unbroken(text: str) -> str:
    """`text` kept on one line when an example's description wraps, e.g. one `margins  -3.346` column."""
    return text.replace(" ", _KEPT_SPACE)


def example_lines(result: EvalResult, positions: list[int], describe: Callable[[int], str]) -> list[str]:
    """Per example (a position in `result.per_example`): its eval-set row, `describe(position)`, and its
    prompt snippet on the next line."""
    if not positions:
        return []
    rows = [int(result.per_example.rows[position]) for position in positions]
    row_width = max(len(str(row)) for row in rows)
    lines = []
    for position, row in zip(positions, rows):
        prefix = f"  row {row:>{row_width}}  "
        indent = " " * len(prefix)
        wrapped = textwrap.wrap(describe(position), WIDTH, initial_indent=prefix, subsequent_indent=indent)
        lines += [line.replace(_KEPT_SPACE, " ") for line in wrapped]
        snippet = _prompt_snippet(result, row)
        if snippet is not None:
            lines.append(indent + snippet)
    return lines


def _prompt_snippet(result: EvalResult, row: int) -> str | None:
    if row >= len(result.prompts):
        return None
    text = " ".join(result.prompts[row].split())
    if len(text) > _SNIPPET_CHARS:
        text = text[: _SNIPPET_CHARS - 1].rstrip() + "…"
    return f'"{text}"'
