"""Prompt-learning PEFT adapters scored through the PEFT model's own forward, with their virtual tokens.

test_parity.py checks the TRL-trained prompt-tuning run against TRL. Here
prefix tuning (virtual keys and values in every layer) and p-tuning (virtual
input tokens from a prompt encoder), made on the fixture base, are checked
against a hand computation: the PEFT model's own logits, log-softmax on the
real completion tokens, one unpadded sequence at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pytest_dpo import evaluate, load_eval_set
from pytest_dpo.tokenization import tokenize_eval_set

from .fixture_paths import BASE, EVAL_STANDARD

LOGP_TOLERANCE = 1e-4
MAX_LENGTH = 1024  # no row is truncated: the hand computation scores whole sequences


def completion_logps(model: torch.nn.Module, prompt_ids: list[int], completion_ids: list[int]) -> float:
    ids = torch.tensor([prompt_ids + completion_ids])
    # p-tuning's logits start with its virtual tokens' positions: keep the real tokens'.
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -ids.shape[1] :]
    token_logps = logits[:-1].log_softmax(dim=-1).gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
    return token_logps[len(prompt_ids) - 1 :].sum().item()


def hand_logps(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Chosen and rejected log-probs of every eval_standard row, by the model's own forward."""
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    rows = tokenize_eval_set(load_eval_set(EVAL_STANDARD), tokenizer, MAX_LENGTH, "keep_start").rows
    with torch.inference_mode():
        return {
            side: torch.tensor([completion_logps(model, row.prompt_ids, getattr(row, f"{side}_ids")) for row in rows])
            for side in ("chosen", "rejected")
        }


@pytest.mark.parametrize(
    "make_config",
    [
        pytest.param(lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), id="prefix-tuning"),
        pytest.param(
            lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16),
            id="p-tuning",
        ),
    ],
)
def test_prompt_learning_adapter_scores_as_its_own_forward(
    tmp_path: Path, make_config: Callable[[], peft.PeftConfig]
) -> None:
    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32), make_config()).eval()
    model.save_pretrained(tmp_path)
    policy = hand_logps(model)
    with model.disable_adapter():
        reference = hand_logps(model)

    # No reference given: the adapter's base with the adapter disabled. Batches of rows of different lengths.
    ours = evaluate(tmp_path, EVAL_STANDARD, max_length=MAX_LENGTH, batch_size=4, device="cpu").per_example
    for name, expected in [
        ("policy_chosen_logps", policy["chosen"]),
        ("policy_rejected_logps", policy["rejected"]),
        ("reference_chosen_logps", reference["chosen"]),
        ("reference_rejected_logps", reference["rejected"]),
    ]:
        difference = (getattr(ours, name) - expected).abs().max().item()
        assert difference <= LOGP_TOLERANCE, f"{name}: max |ours - PEFT forward| = {difference:.3g}"
    assert (ours.chosen_rewards != 0).all() and (ours.rejected_rewards != 0).all()
