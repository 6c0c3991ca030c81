"""Built-in gates: `metric op threshold` lines from the ini file, checked against a result's metrics.

Pure parsing and comparison; no pytest, no models.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .metrics_names import METRIC_NAMES

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
_GATE = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][\w/]*)\s*(?P<op>>=|<=|==|!=|>|<)\s*"
    r"(?P<threshold>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$"
)


class GateError(ValueError):
    """A gate line cannot be used; the message names the line and the fix."""


@dataclass(frozen=True)
class Gate:
    """One gate, e.g. `rewards/accuracies >= 0.6`.

    Attributes:
        metric (`str`): a TRL metric name (an `eval_` prefix is accepted and dropped).
        operator (`str`): one of `>=`, `>`, `<=`, `<`, `==`, `!=`.
        threshold (`float`): the number the metric is compared with.
    """

    metric: str
    operator: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric} {self.operator} {self.threshold:g}"

    def passes(self, value: float) -> bool:
        """Whether `value` satisfies the gate; a NaN or infinite value never does."""
        return math.isfinite(value) and OPERATORS[self.operator](value, self.threshold)

    def failure_message(self, checkpoint: str, metrics: Mapping[str, float]) -> str:
        value = metrics[self.metric]
        return f"{checkpoint}: gate failed: {self.metric} = {value:.6g}, required {self.operator} {self.threshold:g}"


def parse_gate(text: str, where: str) -> Gate:
    """Parse one gate line; `where` names its place (`dpo_gates line 2`) in errors."""
    match = _GATE.match(text)
    if match is None:
        raise GateError(
            f"{where}: cannot read gate {text.strip()!r}. Write `<metric> <op> <number>`, "
            f"e.g. `rewards/accuracies >= 0.6`, with <op> one of {', '.join(OPERATORS)}."
        )
    metric = match.group("metric").removeprefix("eval_")
    if metric not in METRIC_NAMES:
        raise GateError(
            f"{where}: unknown metric {match.group('metric')!r} in gate {text.strip()!r}. "
            f"Known metrics: {', '.join(METRIC_NAMES)}."
        )
    return Gate(metric, match.group("op"), float(match.group("threshold")))


def parse_gates(lines: Sequence[str], source: str = "dpo_gates") -> tuple[Gate, ...]:
    """Parse gate lines, skipping blank lines and `#` comments; errors name `source` and the line number."""
    gates = []
    for number, line in enumerate(lines, start=1):
        if line.strip() and not line.strip().startswith("#"):
            gates.append(parse_gate(line, f"{source} line {number}"))
    return tuple(gates)
