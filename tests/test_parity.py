"""Our numbers against TRL 1.16's own `DPOTrainer.evaluate()` on the TRL-trained fixture checkpoints.

TRL runs with the whole eval set as one eval batch, where its per-batch
averaging equals our whole-set averaging. Per-example log-probs must agree
within 1e-4 (fp32), aggregated metrics within 1e-5 relative.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from pytest_dpo import evaluate, load_eval_set
from pytest_dpo.metric_table import METRIC_NAMES
from pytest_dpo.results import EvalResult
from pytest_dpo.settings import PER_EXAMPLE_LOSS_TYPES, SettingsError
from pytest_dpo.tokenization import tokenize_eval_set

from .fixture_paths import (
    BASE,
    EVAL_CONVERSATIONAL,
    EVAL_IMPLICIT,
    EVAL_IMPLICIT_CONVERSATIONAL,
    EVAL_STANDARD,
    FULL_RUN,
    LORA_RUN,
    PROMPT_TUNING_RUN,
)
from .trl_reference import TrlReference, trl_evaluate

pytestmark = pytest.mark.slow

LOGP_TOLERANCE = 1e-4
METRIC_RELATIVE_TOLERANCE = 1e-5
# Metrics near zero are compared with this absolute floor, far below any meaningful difference.
METRIC_ABSOLUTE_FLOOR = 1e-7
# Losses on exp(k * log-ratio) scores (forward KL, alpha divergences; |k| <= 1) turn an absolute log-prob gap g
# (policy and reference, chosen and rejected: up to 4g in a score difference, squared by IPO) into a relative
# loss difference of at most ~8g; the gap itself stays within LOGP_TOLERANCE. Summation order alone (which
# varies with the CPU's kernels) moves their loss by more than METRIC_RELATIVE_TOLERANCE.
EXPONENTIAL_DIVERGENCES = ("forward_kl", "alpha_divergence")
LOGP_GAP_TO_LOSS = 8


def assert_same_numbers(ours: EvalResult, trl: TrlReference, exponential_loss: bool = False) -> None:
    assert ours.per_example.rows.tolist() == trl.kept_rows
    gap = 0.0
    for name in ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps"):
        difference = (getattr(ours.per_example, name) - getattr(trl, name)).abs().max().item()
        assert difference <= LOGP_TOLERANCE, f"{name}: max |ours - TRL| = {difference:.3g}"
        gap = max(gap, difference)
    reported = [name for name in METRIC_NAMES if name in trl.metrics]
    assert [name for name in METRIC_NAMES if name in ours.metrics] == reported
    for name in reported:
        relative = METRIC_RELATIVE_TOLERANCE + (LOGP_GAP_TO_LOSS * gap if exponential_loss and name == "loss" else 0.0)
        assert math.isclose(ours.metrics[name], trl.metrics[name], rel_tol=relative, abs_tol=METRIC_ABSOLUTE_FLOOR), (
            f"{name}: ours {ours.metrics[name]!r} vs TRL {trl.metrics[name]!r} (relative tolerance {relative:.3g})"
        )


def trl_numbers(tmp_path: Path, eval_file: Path, checkpoint: Path, *, adapter: bool = False, **settings: Any) -> TrlReference:
    rows = load_eval_set(eval_file).rows
    if adapter:
        return trl_evaluate(checkpoint, BASE, rows, tmp_path, adapter_base=BASE, tokenizer_path=BASE, **settings)
    return trl_evaluate(checkpoint, BASE, rows, tmp_path, **settings)


@pytest.mark.parametrize(
    ("eval_file", "checkpoint", "max_length"),
    [
        pytest.param(EVAL_STANDARD, FULL_RUN / "checkpoint-6", 48, id="standard-truncated-full"),
        pytest.param(EVAL_STANDARD, FULL_RUN / "checkpoint-2", 1024, id="standard-full"),
        pytest.param(EVAL_CONVERSATIONAL, FULL_RUN / "checkpoint-4", 1024, id="conversational-full"),
        pytest.param(EVAL_CONVERSATIONAL, FULL_RUN / "checkpoint-6", 40, id="conversational-truncated-full"),
        pytest.param(EVAL_IMPLICIT, FULL_RUN / "checkpoint-4", 1024, id="implicit-full"),
        pytest.param(EVAL_IMPLICIT_CONVERSATIONAL, FULL_RUN / "checkpoint-6", 1024, id="implicit-conversational-full"),
    ],
)
def test_full_checkpoint_matches_trl(tmp_path: Path, eval_file: Path, checkpoint: Path, max_length: int) -> None:
    trl = trl_numbers(tmp_path, eval_file, checkpoint, max_length=max_length)
    ours = evaluate(checkpoint, eval_file, reference=BASE, max_length=max_length, device="cpu")
    assert_same_numbers(ours, trl)


@pytest.mark.parametrize(
    ("eval_file", "max_length"),
    [
        pytest.param(EVAL_STANDARD, 48, id="standard-truncated"),
        pytest.param(EVAL_CONVERSATIONAL, 1024, id="conversational"),
    ],
)
def test_lora_checkpoint_matches_trl_with_base_reference(tmp_path: Path, eval_file: Path, max_length: int) -> None:
    checkpoint = LORA_RUN / "checkpoint-6"
    trl = trl_numbers(tmp_path, eval_file, checkpoint, adapter=True, max_length=max_length)
    # No reference given: evaluate() uses the adapter's base with the adapter disabled.
    ours = evaluate(checkpoint, eval_file, max_length=max_length, device="cpu")
    assert_same_numbers(ours, trl)
    assert ours.metrics["rewards/margins"] != 0.0


@pytest.mark.parametrize(
    ("eval_file", "checkpoint", "max_length"),
    [
        pytest.param(EVAL_STANDARD, PROMPT_TUNING_RUN / "checkpoint-6", 48, id="standard-truncated"),
        pytest.param(EVAL_CONVERSATIONAL, PROMPT_TUNING_RUN / "checkpoint-2", 1024, id="conversational"),
    ],
)
def test_prompt_tuning_checkpoint_matches_trl_with_base_reference(
    tmp_path: Path, eval_file: Path, checkpoint: Path, max_length: int
) -> None:
    """The virtual tokens enter through the PEFT model's own forward, as in TRL; only the real tokens are scored."""
    trl = trl_numbers(tmp_path, eval_file, checkpoint, adapter=True, max_length=max_length)
    # No reference given: evaluate() uses the adapter's base with the adapter disabled.
    ours = evaluate(checkpoint, eval_file, max_length=max_length, device="cpu")
    assert_same_numbers(ours, trl)
    # Scored without its virtual tokens, the policy is its base and every reward is exactly 0.
    assert (ours.per_example.chosen_rewards != 0).all() and (ours.per_example.rejected_rewards != 0).all()


def test_lora_checkpoint_that_continued_an_adapter_matches_trl_with_that_adapter_as_reference(tmp_path: Path) -> None:
    checkpoint, earlier = LORA_RUN / "checkpoint-6", LORA_RUN / "checkpoint-2"
    rows = load_eval_set(EVAL_STANDARD).rows
    trl = trl_evaluate(
        checkpoint, earlier, rows, tmp_path, adapter_base=BASE, reference_is_adapter=True, tokenizer_path=BASE
    )
    ours = evaluate(checkpoint, EVAL_STANDARD, reference=earlier, device="cpu")
    assert_same_numbers(ours, trl)


@pytest.mark.parametrize("loss_type", PER_EXAMPLE_LOSS_TYPES)
def test_every_loss_type_matches_trl(tmp_path: Path, loss_type: str) -> None:
    checkpoint = FULL_RUN / "checkpoint-6"
    label_smoothing = {"robust": 0.1, "exo_pair": 1e-3}.get(loss_type, 0.0)
    settings = {"loss_type": loss_type, "label_smoothing": label_smoothing, "max_length": 48}
    trl = trl_numbers(tmp_path, EVAL_STANDARD, checkpoint, **settings)
    ours = evaluate(checkpoint, EVAL_STANDARD, reference=BASE, device="cpu", **settings)
    assert_same_numbers(ours, trl)


def test_combined_loss_types_with_weights_match_trl(tmp_path: Path) -> None:
    checkpoint = FULL_RUN / "checkpoint-4"
    settings = {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}
    trl = trl_numbers(tmp_path, EVAL_STANDARD, checkpoint, **settings)
    ours = evaluate(checkpoint, EVAL_STANDARD, reference=BASE, device="cpu", **settings)
    assert_same_numbers(ours, trl)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("f_divergence_type", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergences_match_trl(tmp_path: Path, f_divergence_type: str, loss_type: str) -> None:
    checkpoint = FULL_RUN / "checkpoint-6"
    settings = {
        "loss_type": loss_type,
        "f_divergence_type": f_divergence_type,
        "f_alpha_divergence_coef": 0.7,
        "max_length": 48,
    }
    trl = trl_numbers(tmp_path, EVAL_STANDARD, checkpoint, **settings)
    ours = evaluate(checkpoint, EVAL_STANDARD, reference=BASE, device="cpu", **settings)
    assert_same_numbers(ours, trl, exponential_loss=f_divergence_type in EXPONENTIAL_DIVERGENCES)


def test_f_divergence_with_a_raw_log_ratio_loss_is_refused_as_trl_refuses_it(tmp_path: Path) -> None:
    checkpoint = FULL_RUN / "checkpoint-6"
    settings = {"loss_type": "nca_pair", "f_divergence_type": "forward_kl"}
    with pytest.raises(ValueError, match="only supported for the following loss types"):
        trl_numbers(tmp_path, EVAL_STANDARD, checkpoint, **settings)
    with pytest.raises(SettingsError, match="does not apply to loss_type nca_pair"):
        evaluate(checkpoint, EVAL_STANDARD, reference=BASE, device="cpu", **settings)


@pytest.mark.parametrize("loss_type", ["sigmoid", "bco_pair"])
def test_wpo_weighting_matches_trl(tmp_path: Path, loss_type: str) -> None:
    checkpoint = FULL_RUN / "checkpoint-6"
    settings = {"loss_type": loss_type, "use_weighting": True, "max_length": 48}
    trl = trl_numbers(tmp_path, EVAL_STANDARD, checkpoint, **settings)
    ours = evaluate(checkpoint, EVAL_STANDARD, reference=BASE, device="cpu", **settings)
    assert_same_numbers(ours, trl)


@pytest.mark.parametrize("loss_type", ["sigmoid", "apo_zero"])
@pytest.mark.parametrize("ld_alpha", [0.5, 0.0])
def test_ld_alpha_matches_trl(tmp_path: Path, ld_alpha: float, loss_type: str) -> None:
    checkpoint = FULL_RUN / "checkpoint-6"
    settings = {"loss_type": loss_type, "ld_alpha": ld_alpha, "max_length": 48}
    trl = trl_numbers(tmp_path, EVAL_STANDARD, checkpoint, **settings)
    ours = evaluate(checkpoint, EVAL_STANDARD, reference=BASE, device="cpu", **settings)
    assert_same_numbers(ours, trl)
    plain = evaluate(checkpoint, EVAL_STANDARD, reference=BASE, device="cpu", loss_type=loss_type, max_length=48)
    assert not torch.allclose(ours.per_example.policy_chosen_logps, plain.per_example.policy_chosen_logps)


def test_ld_alpha_on_keep_end_truncation_and_a_lora_reference_matches_trl(tmp_path: Path) -> None:
    """Completions that start their sequence have one scored token fewer, which sets the shared length."""
    checkpoint = LORA_RUN / "checkpoint-6"
    settings = {"ld_alpha": 0.5, "max_length": 32, "truncation_mode": "keep_end"}
    trl = trl_numbers(tmp_path, EVAL_STANDARD, checkpoint, adapter=True, **settings)
    ours = evaluate(checkpoint, EVAL_STANDARD, device="cpu", **settings)
    assert_same_numbers(ours, trl)


def test_ld_alpha_weighting_and_alpha_divergence_together_match_trl(tmp_path: Path) -> None:
    checkpoint = FULL_RUN / "checkpoint-4"
    settings = {
        "loss_type": ["sigmoid", "hinge"],
        "loss_weights": [1.0, 0.5],
        "ld_alpha": 0.3,
        "use_weighting": True,
        "f_divergence_type": "alpha_divergence",
        "f_alpha_divergence_coef": 1.4,
    }
    trl = trl_numbers(tmp_path, EVAL_CONVERSATIONAL, checkpoint, **settings)
    ours = evaluate(checkpoint, EVAL_CONVERSATIONAL, reference=BASE, device="cpu", **settings)
    assert_same_numbers(ours, trl)


def test_keep_end_truncation_matches_trl(tmp_path: Path) -> None:
    checkpoint = FULL_RUN / "checkpoint-6"
    settings = {"max_length": 32, "truncation_mode": "keep_end"}
    trl = trl_numbers(tmp_path, EVAL_STANDARD, checkpoint, **settings)
    ours = evaluate(checkpoint, EVAL_STANDARD, reference=BASE, device="cpu", **settings)
    assert ours.dropped_rows == []
    assert_same_numbers(ours, trl)


@pytest.mark.parametrize(
    ("eval_file", "max_length"),
    [(EVAL_STANDARD, 48), (EVAL_CONVERSATIONAL, 1024), (EVAL_IMPLICIT, 1024), (EVAL_IMPLICIT_CONVERSATIONAL, 1024)],
    ids=["standard", "conversational", "implicit", "implicit-conversational"],
)
def test_tokenization_is_trls(tmp_path: Path, eval_file: Path, max_length: int) -> None:
    from transformers import AutoTokenizer

    trl = trl_numbers(tmp_path, eval_file, FULL_RUN / "checkpoint-2", max_length=max_length)
    tokenizer = AutoTokenizer.from_pretrained(str(FULL_RUN / "checkpoint-2"))
    ours = tokenize_eval_set(load_eval_set(eval_file), tokenizer, max_length, "keep_start")
    assert [row.row for row in ours.rows] == trl.kept_rows
    assert [row.prompt_ids for row in ours.rows] == trl.prompt_ids
    assert [row.chosen_ids for row in ours.rows] == trl.chosen_ids
    assert [row.rejected_ids for row in ours.rows] == trl.rejected_ids


def test_logps_do_not_move_with_batch_size() -> None:
    checkpoint = FULL_RUN / "checkpoint-6"
    results = [
        evaluate(checkpoint, EVAL_STANDARD, reference=BASE, max_length=48, batch_size=size, device="cpu")
        for size in (1, 3, 8, 64)
    ]
    first = results[0].per_example
    for result in results[1:]:
        for name in ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps"):
            difference = (getattr(result.per_example, name) - getattr(first, name)).abs().max().item()
            assert difference <= 5e-5, f"{name} moved by {difference:.3g} with batch size {result.settings['batch_size']}"
        assert torch.equal(result.per_example.rows, first.rows)
