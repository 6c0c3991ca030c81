"""DPO failure-mode diagnostics from the per-example arrays: pytest-dpo's own numbers, never TRL's metrics.

Which diagnostics exist, which way is better and which have intervals is
`metric_table.DIAGNOSTICS`; this module computes them. A share or mean change
is the mean of one value per row (`row_values`), so its interval comes from
those values like a TRL metric's (`stats.metric_interval`).

A diagnostic is NaN when a value it reads is NaN, so a gate never passes a
broken checkpoint on it (an indicator would count a NaN row as "not
displaced"); infinite log-probs compare and subtract as IEEE numbers. The rank
correlation is also NaN where it is undefined: fewer than 2 rows, or margins or
length differences that are all equal (`undefined_cause` says which). No
models, no files; scipy is imported only when a rank correlation is computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from .metric_table import DIAGNOSTIC_NAMES, DIAGNOSTICS_BY_NAME

if TYPE_CHECKING:
    import torch

    from .results import PerExample

__all__ = ["diagnose", "margin_length_correlation", "row_values", "undefined_cause"]

_CORRELATION = "diagnostics/margin_length_correlation"


def _indicator(holds: torch.Tensor, *read: torch.Tensor) -> torch.Tensor:
    """1.0 where `holds`, 0.0 where not, NaN in the rows where one of the values it was read from is NaN."""
    unknown = read[0].isnan()
    for values in read[1:]:
        unknown = unknown | values.isnan()
    return holds.double().masked_fill(unknown, math.nan)


def _likelihood_displacement(p: PerExample) -> torch.Tensor:
    return _indicator(p.policy_chosen_logps < p.reference_chosen_logps, p.policy_chosen_logps, p.reference_chosen_logps)


def _chosen_logps_change(p: PerExample) -> torch.Tensor:
    return p.policy_chosen_logps.double() - p.reference_chosen_logps.double()


def _rejected_logps_change(p: PerExample) -> torch.Tensor:
    return p.policy_rejected_logps.double() - p.reference_rejected_logps.double()


def _tied_rewards(p: PerExample) -> torch.Tensor:
    return _indicator(p.chosen_rewards == p.rejected_rewards, p.chosen_rewards, p.rejected_rewards)


_ROW_VALUES: dict[str, Callable[[PerExample], torch.Tensor]] = {
    "diagnostics/likelihood_displacement": _likelihood_displacement,
    "diagnostics/chosen_logps_change": _chosen_logps_change,
    "diagnostics/rejected_logps_change": _rejected_logps_change,
    "diagnostics/tied_rewards": _tied_rewards,
}


def row_values(per_example: PerExample, diagnostic: str) -> torch.Tensor:
    """The per-row values (float64) whose mean is `diagnostic`: 1 or 0 for a share, the difference for a change.

    Args:
        per_example (`PerExample`): the arrays of one evaluation.
        diagnostic (`str`): a `metric_table.DIAGNOSTICS` name of kind `per_example`.

    Raises:
        ValueError: `diagnostic` is unknown or has no per-row values (the rank correlation).
    """
    if diagnostic not in _ROW_VALUES:
        known = ", ".join(_ROW_VALUES)
        what = "has no per-row values" if diagnostic in DIAGNOSTICS_BY_NAME else "is not a diagnostic"
        raise ValueError(f"{diagnostic!r} {what}; diagnostics with per-row values: {known}.")
    return _ROW_VALUES[diagnostic](per_example)


def _length_differences(per_example: PerExample) -> torch.Tensor:
    return (per_example.chosen_tokens - per_example.rejected_tokens).double()


def _constant(values: torch.Tensor) -> bool:
    return bool((values == values[0]).all())


def margin_length_correlation(per_example: PerExample) -> float:
    """Spearman's rank correlation between the margins and the chosen-minus-rejected lengths in tokens.

    NaN when a margin is NaN, with fewer than 2 rows, or when the margins or the
    length differences are all equal (`scipy.stats.spearmanr`, ties ranked by their average).

    Example:
        >>> from pytest_dpo.results import PerExample
        >>> arrays = {name: [0, 0, 0] for name in PerExample.__dataclass_fields__}
        >>> arrays |= {"margins": [0.5, 1.5, -1.0], "chosen_tokens": [12, 30, 5], "rejected_tokens": [10, 10, 10]}
        >>> margin_length_correlation(PerExample.from_dict(arrays))
        1.0
    """
    margins, lengths = per_example.margins.double(), _length_differences(per_example)
    if len(margins) < 2 or bool(margins.isnan().any()) or _constant(margins) or _constant(lengths):
        return math.nan
    from scipy.stats import spearmanr

    return float(spearmanr(margins.tolist(), lengths.tolist()).statistic)


def diagnose(per_example: PerExample) -> dict[str, float]:
    """Every diagnostic of one evaluation, by name in `metric_table.DIAGNOSTIC_NAMES` order (what
    `EvalResult.diagnostics` holds). With no rows every diagnostic is NaN.

    Example:
        >>> from pytest_dpo.results import PerExample
        >>> arrays = {name: [0, 0] for name in PerExample.__dataclass_fields__}
        >>> arrays |= {"policy_chosen_logps": [-12.0, -9.0], "reference_chosen_logps": [-10.0, -10.0]}
        >>> diagnose(PerExample.from_dict(arrays))["diagnostics/likelihood_displacement"]
        0.5
    """
    values = {name: float(compute(per_example).mean()) for name, compute in _ROW_VALUES.items()}
    values[_CORRELATION] = margin_length_correlation(per_example)
    return {name: values[name] for name in DIAGNOSTIC_NAMES}


def undefined_cause(per_example: PerExample, diagnostic: str) -> str | None:
    """Why `diagnostic` is NaN although no value it reads is NaN, or None (then a NaN value is to blame).

    Args:
        per_example (`PerExample`): the arrays of one evaluation.
        diagnostic (`str`): a `metric_table.DIAGNOSTICS` name.
    """
    if len(per_example) == 0:
        return "no rows were scored"
    if diagnostic != _CORRELATION or bool(per_example.margins.isnan().any()):
        return None
    if len(per_example) < 2:
        return "a rank correlation needs at least 2 rows, and 1 was scored"
    if _constant(per_example.margins):
        return "every row has the same margin, so the margins rank nothing"
    lengths = _length_differences(per_example)
    if _constant(lengths):
        return (
            f"every row's chosen completion is {int(lengths[0])} tokens longer than its rejected one, so the length "
            "difference ranks nothing; gate on it only with an eval set whose length differences vary"
        )
    return None
