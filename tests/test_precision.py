"""Precision modes: TRL's default DPOConfig(bf16=True) runs float32 weights under bf16 autocast; we offer it by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pytest_dpo import evaluate
from pytest_dpo.loading import autocast_dtype, choose_dtype
from pytest_dpo.settings import DPOSettings, SettingsError

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN
from .trl_reference import trl_evaluate

ROWS = [json.loads(line) for line in EVAL_STANDARD.read_text().splitlines() if line.strip()]


def test_autocast_modes_load_float32_weights_and_run_under_autocast() -> None:
    assert choose_dtype("autocast-bfloat16", "cpu") == torch.float32
    assert autocast_dtype("autocast-bfloat16") == torch.bfloat16
    assert autocast_dtype("autocast-float16") == torch.float16
    assert autocast_dtype("bfloat16") is None and choose_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(SettingsError, match="Choose from: float32, bfloat16, float16, autocast-bfloat16, autocast-float16"):
        DPOSettings(dtype="autocast-float8")


@pytest.mark.slow
def test_autocast_bfloat16_reproduces_trl_default_precision(tmp_path: Path) -> None:
    """TRL's bf16 autocast forward (DPOConfig(bf16=True) on a float32 model, on CPU) against dtype='autocast-bfloat16'."""
    checkpoint = FULL_RUN / "checkpoint-4"
    trl = trl_evaluate(checkpoint, BASE, ROWS, tmp_path, bf16=True, max_length=128)
    # Half-precision rounding depends on which rows share a forward pass, in TRL as here: score in TRL's one batch.
    ours = evaluate(
        checkpoint, EVAL_STANDARD, reference=BASE, dtype="autocast-bfloat16", share_prompt=False, batch_size=len(ROWS)
    )
    full = evaluate(checkpoint, EVAL_STANDARD, reference=BASE, dtype="float32")
    assert ours.settings["dtype"] == "autocast-bfloat16"
    ours_logps = ours.per_example.policy_chosen_logps
    gap_to_trl = (ours_logps - trl.policy_chosen_logps).abs().max().item()
    gap_to_float32 = (full.per_example.policy_chosen_logps - trl.policy_chosen_logps).abs().max().item()
    # bf16 keeps 8 bits of mantissa: the autocast run must sit on TRL's bf16 numbers, not on the float32 ones.
    assert gap_to_trl < 1e-4 and gap_to_float32 > 1e-2, (gap_to_trl, gap_to_float32)
    assert torch.allclose(ours.per_example.reference_rejected_logps, trl.reference_rejected_logps, atol=1e-4)
    # A standalone TRL evaluate() (no train() before it) prepares only the reference with accelerate, so its
    # policy ran without autocast: TRL's logged logps/chosen is the float32 policy's, as the README says.
    assert trl.metrics["logps/chosen"] == pytest.approx(full.metrics["logps/chosen"], abs=1e-4)
