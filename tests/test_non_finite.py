"""A non-finite per-example loss: the metrics are what TRL's evaluate() logs, and the report counts the rows."""

from __future__ import annotations

import dataclasses
import math

import torch

from pytest_dpo import evaluate
from pytest_dpo.metrics import aggregate
from pytest_dpo.checkpoints import discover_checkpoints
from pytest_dpo.report import build_report, report_entry
from pytest_dpo.report_markdown import render_markdown
from pytest_dpo.verdicts import Verdicts

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN


def with_nan_row(per_example, row: int):  # type: ignore[no-untyped-def]
    """The arrays with one row's policy chosen log-prob NaN, and everything computed from it NaN too."""
    nan = float("nan")
    changed = {}
    for name in ("policy_chosen_logps", "chosen_rewards", "margins", "losses"):
        values = getattr(per_example, name).clone()
        values[row] = nan
        changed[name] = values
    return dataclasses.replace(per_example, **changed)


def trl_batch_metrics(per_example) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """TRL 1.16's `_compute_loss` logging over one batch holding every row, and Trainer's mean of the batch losses."""
    chosen, rejected = per_example.chosen_rewards, per_example.rejected_rewards
    return {
        "loss": per_example.losses.mean().item(),
        "rewards/chosen": chosen.mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "logps/chosen": per_example.policy_chosen_logps.mean().item(),
        "logps/rejected": per_example.policy_rejected_logps.mean().item(),
    }


def test_a_nan_row_gives_trls_metrics_and_is_counted_in_the_report() -> None:
    result = evaluate(FULL_RUN / "checkpoint-4", EVAL_STANDARD, reference=BASE)
    broken = with_nan_row(result.per_example, 3)
    ours, trl = aggregate(broken), trl_batch_metrics(broken)
    for name, value in trl.items():
        assert (math.isnan(ours[name]) and math.isnan(value)) or math.isclose(ours[name], value, rel_tol=1e-6), name
    # The NaN row counts as a wrong ranking, as `(nan > x)` is False in TRL's accuracy.
    assert ours["rewards/accuracies"] < aggregate(result.per_example)["rewards/accuracies"]
    assert math.isnan(ours["loss"]) and math.isnan(ours["rewards/margins"])
    (checkpoint,) = discover_checkpoints(FULL_RUN / "checkpoint-4")
    verdicts = Verdicts(["checkpoint-4"])
    entry = report_entry(checkpoint, verdicts["checkpoint-4"], dataclasses.replace(result, per_example=broken))
    assert entry.non_finite_rows == 1
    eval_set = {"path": "e.jsonl", "name": "e.jsonl", "sha256": "0" * 64, "rows": 24, "format": "standard"}
    report = build_report([entry], eval_set=eval_set, gates=[], settings={}, versions={})
    assert report["checkpoints"][0]["non_finite_rows"] == 1
    assert "1 scored rows have a NaN or infinite loss" in render_markdown(report)
    assert torch.isfinite(result.per_example.losses).all()
