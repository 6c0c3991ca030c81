"""Built-in gates: `metric op threshold` lines from the ini file, and their check against a result.

Parsing here; the comparison and its failure message are `checks.check_metric`'s,
shared with the assertion helpers. No pytest, no models.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .checks import OPERATORS, check_metric
from .metric_table import (
    BY_NAME,
    DEFAULT_INTERVAL_METHOD,
    DIAGNOSTIC_NAMES,
    DIAGNOSTICS_BY_NAME,
    INTERVAL_DIAGNOSTICS,
    INTERVAL_METHODS,
    INTERVAL_METRICS,
    METRIC_NAMES,
)

if TYPE_CHECKING:
    from .results import EvalResult

_GATE = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][\w/]*)\s*(?P<op>>=|<=|==|!=|>|<)\s*"
    r"(?P<threshold>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
    r"(?:\s*@\s*(?P<confidence>\d+(?:\.\d+)?)\s*%(?:\s+(?P<method>[A-Za-z_]+))?)?\s*$"
)


class GateError(ValueError):
    """A gate line cannot be used; the message names the line and the fix."""


@dataclass(frozen=True)
class Gate:
    """One gate, e.g. `rewards/accuracies >= 0.6` or `diagnostics/likelihood_displacement <= 0.5`.

    Attributes:
        metric (`str`): a TRL metric name (an `eval_` prefix is accepted and dropped) or a diagnostic
            (`metric_table.DIAGNOSTIC_NAMES`).
        operator (`str`): one of `>=`, `>`, `<=`, `<`, `==`, `!=`.
        threshold (`float`): the number the metric is compared with.
        confidence (`float`, *optional*): with it, the interval's bound must clear the threshold.
        method (`str`, *optional*, defaults to `"t"`): how a mean's interval is computed (`t` or `bootstrap`).
    """

    metric: str
    operator: str
    threshold: float
    confidence: float | None = None
    method: str = DEFAULT_INTERVAL_METHOD

    def __str__(self) -> str:
        suffix = f" @{self.confidence * 100:g}%" if self.confidence is not None else ""
        if self.method != DEFAULT_INTERVAL_METHOD:
            suffix += f" {self.method}"
        return f"{self.metric} {self.operator} {self.threshold:g}{suffix}"

    def check(self, result: EvalResult) -> str | None:
        """None when `result` passes the gate; otherwise why not (see `checks.check_metric`).

        Args:
            result (`EvalResult`): the evaluation of one checkpoint; it must have the gate's metric.
        """
        return check_metric(
            result, self.metric, self.operator, self.threshold, confidence=self.confidence, method=self.method
        )


def parse_gate(text: str, where: str) -> Gate:
    """Parse one gate line; `where` names its place (`dpo_gates line 2`) in errors."""
    match = _GATE.match(text)
    if match is None:
        raise GateError(
            f"{where}: cannot read gate {text.strip()!r}. Write `<metric> <op> <number>`, "
            f"e.g. `rewards/accuracies >= 0.6`, with <op> one of {', '.join(OPERATORS)}."
        )
    metric = match.group("metric").removeprefix("eval_")
    record = BY_NAME.get(metric) or DIAGNOSTICS_BY_NAME.get(metric)
    if record is None:
        raise GateError(
            f"{where}: unknown metric {match.group('metric')!r} in gate {text.strip()!r}. "
            f"Known metrics: {', '.join(METRIC_NAMES)}. Known diagnostics: {', '.join(DIAGNOSTIC_NAMES)}."
        )
    confidence = None
    if match.group("confidence") is not None:
        confidence = float(match.group("confidence")) / 100
        if not 0 < confidence < 1 or match.group("op") in ("==", "!="):
            raise GateError(
                f"{where}: a confidence gate needs <, <=, > or >= and a level between 0 and 100%, "
                f"e.g. `rewards/accuracies >= 0.6 @95%`; got {text.strip()!r}."
            )
        if not record.has_interval:
            raise GateError(
                f"{where}: {metric} is {record.kind_text}, so it has no per-example confidence interval. "
                f"Confidence gates work for: {', '.join(INTERVAL_METRICS + INTERVAL_DIAGNOSTICS)}."
            )
    method = match.group("method") or DEFAULT_INTERVAL_METHOD
    if method not in INTERVAL_METHODS:
        raise GateError(
            f"{where}: unknown interval method {method!r} in gate {text.strip()!r}. Write one of "
            f"{', '.join(INTERVAL_METHODS)} after the level, e.g. `rewards/margins > 0 @95% bootstrap`."
        )
    return Gate(metric, match.group("op"), float(match.group("threshold")), confidence, method)


def parse_gates(lines: Sequence[str], source: str = "dpo_gates") -> tuple[Gate, ...]:
    """Parse gate lines, skipping blank lines and `#` comments; errors name `source` and the line number."""
    gates = []
    for number, line in enumerate(lines, start=1):
        if line.strip() and not line.strip().startswith("#"):
            gates.append(parse_gate(line, f"{source} line {number}"))
    return tuple(gates)
