"""Prompt sharing: each row's prompt runs once, with both completions packed after it in one sequence
(`pytest_dpo.packing`), or continuing from its KV cache.

Same numbers as the two-sequence path (TRL's), less backbone work; models
whose cache is not a plain `DynamicCache` and truncated rows take the
two-sequence path, and a model whose attention does not honour the packed
mask keeps the KV-cache path.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from pytest_dpo import evaluate
from pytest_dpo.evalset import load_eval_set
from pytest_dpo.scoring import score
from pytest_dpo.tokenization import TokenizedEvalSet, TokenizedRow, tokenize_eval_set

from .fixture_paths import (
    BASE,
    EVAL_CONVERSATIONAL,
    EVAL_IMPLICIT,
    EVAL_IMPLICIT_CONVERSATIONAL,
    EVAL_STANDARD,
    FULL_RUN,
    LORA_RUN,
)

LOGPS_TOLERANCE = 1e-4
PER_EXAMPLE = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps",
               "chosen_logits_sum", "rejected_logits_sum", "chosen_entropy_sum", "rejected_entropy_sum")
COUNTS = ("chosen_tokens", "rejected_tokens", "chosen_scored_tokens", "rejected_scored_tokens", "chosen_top1")


def assert_same_results(shared: object, separate: object) -> None:
    for name in PER_EXAMPLE:
        difference = (getattr(shared.per_example, name) - getattr(separate.per_example, name)).abs().max().item()
        assert difference <= LOGPS_TOLERANCE, f"{name} differs by {difference:.3g}"
    for name in COUNTS:
        assert torch.equal(getattr(shared.per_example, name), getattr(separate.per_example, name)), name
    for name, value in separate.metrics.items():
        assert shared.metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


@pytest.mark.parametrize(
    ("checkpoint", "eval_file", "reference"),
    [
        (FULL_RUN / "checkpoint-6", EVAL_STANDARD, BASE),
        (FULL_RUN / "checkpoint-4", EVAL_CONVERSATIONAL, BASE),
        (FULL_RUN / "checkpoint-6", EVAL_IMPLICIT, BASE),
        (FULL_RUN / "checkpoint-2", EVAL_IMPLICIT_CONVERSATIONAL, BASE),
        (LORA_RUN / "checkpoint-6", EVAL_STANDARD, None),
    ],
    ids=["standard", "conversational", "implicit", "implicit-conversational", "lora"],
)
def test_shared_prompt_gives_the_two_sequence_numbers(checkpoint: object, eval_file: object, reference: object) -> None:
    shared = evaluate(checkpoint, eval_file, reference=reference, batch_size=4, share_prompt=True)
    separate = evaluate(checkpoint, eval_file, reference=reference, batch_size=4, share_prompt=False)
    assert_same_results(shared, separate)


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
def test_truncated_rows_take_the_two_sequence_path_and_agree(truncation_mode: str) -> None:
    args = (FULL_RUN / "checkpoint-6", EVAL_STANDARD)
    kwargs = {"reference": BASE, "max_length": 30, "truncation_mode": truncation_mode, "batch_size": 3}
    shared = evaluate(*args, share_prompt=True, **kwargs)
    separate = evaluate(*args, share_prompt=False, **kwargs)
    assert_same_results(shared, separate)


@pytest.mark.parametrize(
    "variant", [{"ld_alpha": 0.5}, {"use_weighting": True}, {"ld_alpha": 0.0, "use_weighting": True}],
    ids=["ld-alpha", "use-weighting", "both"],
)
def test_shared_prompt_gives_the_two_sequence_numbers_with_ld_alpha_and_weighting(variant: dict) -> None:
    """The shared-length and log sum p^2 sums come out of both paths alike."""
    args = (FULL_RUN / "checkpoint-6", EVAL_STANDARD)
    shared = evaluate(*args, reference=BASE, batch_size=4, share_prompt=True, **variant)
    separate = evaluate(*args, reference=BASE, batch_size=4, share_prompt=False, **variant)
    assert_same_results(shared, separate)


def backbone_batch_sizes(model: torch.nn.Module, tokenized: TokenizedEvalSet, share_prompt: bool) -> list[int]:
    sizes: list[int] = []
    handle = model.model.register_forward_hook(lambda module, args, output: sizes.append(output.last_hidden_state.shape[0]))
    score(model, tokenized, batch_size=4, max_length=1024, truncation_mode="keep_start", share_prompt=share_prompt)
    handle.remove()
    return sizes


def fixture_model(attention: str = "sdpa") -> tuple[torch.nn.Module, TokenizedEvalSet]:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(FULL_RUN / "checkpoint-6"), dtype=torch.float32, attn_implementation=attention
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(BASE))
    return model, tokenize_eval_set(load_eval_set(EVAL_STANDARD), tokenizer, 1024, "keep_start")


def test_prompts_run_once_per_row_when_shared() -> None:
    model, tokenized = fixture_model()
    # Packed: one sequence per row (the first batch's two shortest rows are also checked against a 2-row prompt
    # pass and its 4 completions from the KV cache); separate: 8 whole sequences.
    assert backbone_batch_sizes(model, tokenized, share_prompt=True) == [4, 2, 4] + [4] * 5
    assert backbone_batch_sizes(model, tokenized, share_prompt=False) == [8] * 6


def scores_equal(left: object, right: object) -> None:
    for name in ("chosen_logps", "rejected_logps", "chosen_entropy_sum", "rejected_shared_logps", "chosen_log_sum_sq_probs"):
        difference = (getattr(left, name) - getattr(right, name)).abs().max().item()
        assert difference <= LOGPS_TOLERANCE, f"{name} differs by {difference:.3g}"
    for name in COUNTS:
        assert torch.equal(getattr(left, name), getattr(right, name)), name


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_the_two_sequence_numbers_with_either_attention(attention: str) -> None:
    model, tokenized = fixture_model(attention)
    kwargs = {"batch_size": 4, "max_length": 1024, "truncation_mode": "keep_start"}
    scores_equal(score(model, tokenized, share_prompt=True, **kwargs), score(model, tokenized, share_prompt=False, **kwargs))


def test_a_model_that_ignores_the_packed_mask_keeps_the_kv_cache_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """An architecture that builds its own mask sees the other completion: the first batch's check notices."""
    from pytest_dpo import packing

    plain_causal = packing.PackedBatch.attention_mask

    def causal_only(self: packing.PackedBatch, implementation: str, dtype: torch.dtype) -> torch.Tensor:
        return plain_causal(dataclasses.replace(self, segments=torch.zeros_like(self.segments)), implementation, dtype)

    monkeypatch.setattr(packing.PackedBatch, "attention_mask", causal_only)
    model, tokenized = fixture_model()
    # The check (2 rows) fails, so the first batch runs again whole on the KV-cache path, as every later one.
    assert backbone_batch_sizes(model, tokenized, share_prompt=True) == [4, 2, 4, 4, 8] + [4, 8] * 5
    kwargs = {"batch_size": 4, "max_length": 1024, "truncation_mode": "keep_start"}
    scores_equal(score(model, tokenized, share_prompt=True, **kwargs), score(model, tokenized, share_prompt=False, **kwargs))


def test_sliding_window_models_fall_back_and_keep_their_numbers() -> None:
    config = transformers.Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64, sliding_window=4,
    )
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(2)
    rows = [
        TokenizedRow(i, *(torch.randint(3, 64, (n,), generator=generator).tolist() for n in (5 + i, 4 + i, 6)))
        for i in range(4)
    ]
    tokenized = TokenizedEvalSet(rows, [])
    assert backbone_batch_sizes(model, tokenized, share_prompt=True)[1:] == [8]
    shared = score(model, tokenized, batch_size=4, max_length=None, truncation_mode="keep_start", share_prompt=True)
    for index, row in enumerate(rows):
        ids = torch.tensor([row.prompt_ids + row.chosen_ids])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        start = len(row.prompt_ids) - 1
        expected = log_probs[start:].gather(-1, ids[0, start + 1 :, None]).sum()
        assert abs(shared.chosen_logps[index].item() - expected.item()) < 1e-4
