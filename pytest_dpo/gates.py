"""Built-in gates: `metric op threshold` lines from the ini file, and their check against a result.

Parsing here; the comparison and its failure message are `checks.check_metric`'s,
shared with the assertion helpers. No pytest, no models.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
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

# `safety: …` or `helpful/math: …`: the set a gate is for, and optionally a subset of it.
_PREFIX = re.compile(r"^\s*(?P<eval_set>[A-Za-z0-9_][A-Za-z0-9_.-]*)(?:/(?P<subset>[^:]*[^:\s][^:]*))?\s*:(?P<rest>.*)$")
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
        eval_set (`str`, *optional*): the eval set it judges (`safety: …`); None: the run's only set, and,
            in a run with several, one gate per set (`config.read_run_config` makes them).
        subset (`str`, *optional*): the subset of `eval_set` it judges (`helpful/math: …`).
        where (`str`): where it was written (`dpo_gates line 2`), for messages; not part of its identity.
    """

    metric: str
    operator: str
    threshold: float
    confidence: float | None = None
    method: str = DEFAULT_INTERVAL_METHOD
    eval_set: str | None = None
    subset: str | None = None
    where: str = field(default="", compare=False, repr=False)

    def __str__(self) -> str:
        suffix = f" @{self.confidence * 100:g}%" if self.confidence is not None else ""
        if self.method != DEFAULT_INTERVAL_METHOD:
            suffix += f" {self.method}"
        return f"{self.scope_prefix}{self.metric} {self.operator} {self.threshold:g}{suffix}"

    @property
    def scope_prefix(self) -> str:
        """`safety: `, `helpful/math: `, or nothing for a gate on the run's only eval set."""
        if self.eval_set is None:
            return ""
        return f"{self.eval_set}/{self.subset}: " if self.subset is not None else f"{self.eval_set}: "

    def check(self, result: EvalResult) -> str | None:
        """None when `result` passes the gate; otherwise why not (see `checks.check_metric`).

        Args:
            result (`EvalResult`): the evaluation of one checkpoint; it must have the gate's metric.
        """
        return check_metric(
            result, self.metric, self.operator, self.threshold, confidence=self.confidence, method=self.method
        )


def parse_gate(text: str, where: str) -> Gate:
    """Parse one gate line, with its optional `set:` or `set/subset:` prefix; `where` names its place
    (`dpo_gates line 2`) in errors and in the gate."""
    eval_set = subset = None
    prefix = _PREFIX.match(text)
    if prefix is not None:
        eval_set, subset = prefix.group("eval_set"), prefix.group("subset")
        subset = subset.strip() if subset is not None else None
        gate = parse_gate(prefix.group("rest"), where)
        if gate.eval_set is not None:
            raise GateError(f"{where}: gate {text.strip()!r} has two eval-set prefixes. Write one, e.g. `safety: …`.")
        return replace(gate, eval_set=eval_set, subset=subset)
    match = _GATE.match(text)
    if match is None:
        raise GateError(
            f"{where}: cannot read gate {text.strip()!r}. Write `<metric> <op> <number>`, "
            f"e.g. `rewards/accuracies >= 0.6`, with <op> one of {', '.join(OPERATORS)}, optionally after an "
            "eval set and subset: `safety: …`, `helpful/math: …`."
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
    return Gate(metric, match.group("op"), float(match.group("threshold")), confidence, method, where=where)


def parse_gates(lines: Sequence[str], source: str = "dpo_gates") -> tuple[Gate, ...]:
    """Parse gate lines, skipping blank lines and `#` comments; errors name `source` and the line number."""
    gates = []
    for number, line in enumerate(lines, start=1):
        if line.strip() and not line.strip().startswith("#"):
            gates.append(parse_gate(line, f"{source} line {number}"))
    return tuple(gates)
