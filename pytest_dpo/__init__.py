"""pytest-dpo: regression-test DPO checkpoints with TRL's own eval metrics.

The public names are imported lazily, so importing the package (as pytest
does when it loads the plugin) costs no torch or transformers import.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "evaluate": "pytest_dpo.evaluation",
    "FROM_RUN": "pytest_dpo.run_settings",
    "CheckpointSettings": "pytest_dpo.run_settings",
    "EvalResult": "pytest_dpo.results",
    "PerExample": "pytest_dpo.results",
    "DPOSettings": "pytest_dpo.settings",
    "SettingsError": "pytest_dpo.settings",
    "EvalSet": "pytest_dpo.evalset",
    "EvalSetError": "pytest_dpo.evalset",
    "load_eval_set": "pytest_dpo.evalset",
    "Checkpoint": "pytest_dpo.checkpoints",
    "CheckpointError": "pytest_dpo.checkpoints",
    "discover_checkpoints": "pytest_dpo.checkpoints",
    "assert_margin_positive": "pytest_dpo.assertions",
    "assert_accuracy_above": "pytest_dpo.assertions",
    "assert_loss_below": "pytest_dpo.assertions",
    "assert_chosen_reward_above": "pytest_dpo.assertions",
    "assert_rejected_reward_below": "pytest_dpo.assertions",
    "assert_metrics_finite": "pytest_dpo.assertions",
    "assert_no_regression": "pytest_dpo.assertions",
    "paired_comparison": "pytest_dpo.paired",
    "metric_interval": "pytest_dpo.stats",
    "wilson_interval": "pytest_dpo.stats",
    "Verdicts": "pytest_dpo.verdicts",
    "CheckpointVerdict": "pytest_dpo.verdicts",
    "Gate": "pytest_dpo.gates",
    "DPOGateCallback": "pytest_dpo.training_gate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pytest_dpo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
