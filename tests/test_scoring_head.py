"""The chunked LM head's per-sequence sums against TRL 1.16's own fused LM head, token for token.

TRL's `add_fused_lm_head` patches a tiny model; its per-token outputs, summed
over TRL's shifted completion mask (from TRL's own collator), must equal what
`scoring.score` reports, on the shared-prompt and the two-sequence path, with
and without truncation. The LD-DPO shared-length sums come from TRL's
`compute_ref_log_probs` with `ld_alpha=0`, which keeps exactly that part.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_dpo import scoring
from pytest_dpo.results import SequenceScores
from pytest_dpo.scoring import score
from pytest_dpo.tokenization import TokenizedEvalSet, TokenizedRow

VOCAB = 64
SUMS_TOLERANCE = 1e-4
TRL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def tiny_model() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def random_rows(tokens: list[int], count: int = 6) -> TokenizedEvalSet:
    """Rows of varied prompt and completion lengths (equal ones too), token ids drawn from `tokens`."""
    generator = torch.Generator().manual_seed(3)

    def ids(length: int) -> list[int]:
        return [tokens[i] for i in torch.randint(0, len(tokens), (length,), generator=generator).tolist()]

    lengths = [(3, 4, 6), (5, 2, 2), (2, 7, 3), (4, 5, 5), (6, 1, 4), (1, 3, 8)]
    return TokenizedEvalSet(
        [TokenizedRow(i, ids(p), ids(c), ids(r)) for i, (p, c, r) in enumerate(lengths[:count])], []
    )


def trl_sums(model: torch.nn.Module, rows: TokenizedEvalSet, max_length: int | None, truncation_mode: str) -> dict:
    """TRL's per-token fused-head outputs on TRL's collated batch, summed per sequence under our field names."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=TRL_OUTPUTS)
    collator = DataCollatorForPreference(pad_token_id=0, max_length=max_length, truncation_mode=truncation_mode)
    batch = collator(
        [{"prompt_ids": r.prompt_ids, "chosen_ids": r.chosen_ids, "rejected_ids": r.rejected_ids} for r in rows.rows]
    )
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        outputs = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
            fused_lm_head=True, use_cache=False,
        )  # fmt: skip
    completion, shift = batch["completion_mask"], batch["completion_mask"][:, 1:]
    per_sequence = {
        "logps": outputs.log_probs.sum(dim=1),
        "entropy_sum": (outputs.entropy * shift).sum(dim=1),
        "logits_sum": (outputs.mean_logits * shift).sum(dim=1),
        "log_sum_sq_probs": (outputs.log_sum_sq_probs * shift).sum(dim=1),
        "top1": (outputs.is_top1 & shift.bool()).sum(dim=1),
        "tokens": completion.sum(dim=1),
        "scored_tokens": shift.sum(dim=1),
    }
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext),
        ref_model=model,
        model=model,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        ld_alpha=0.0,
    )
    with torch.no_grad():
        per_sequence["shared_logps"] = torch.cat(DPOTrainer.compute_ref_log_probs(trainer, model, batch))
    half = len(rows.rows)
    return {
        f"{side}_{name}": values[part]
        for name, values in per_sequence.items()
        for side, part in (("chosen", slice(None, half)), ("rejected", slice(half, None)))
    }


def assert_same_sums(ours: SequenceScores, trl: dict) -> None:
    for name in ("chosen_tokens", "rejected_tokens", "chosen_scored_tokens", "rejected_scored_tokens", "chosen_top1"):
        assert getattr(ours, name).tolist() == trl[name].tolist(), name
    for side in ("chosen", "rejected"):
        for name in ("logps", "entropy_sum", "logits_sum", "log_sum_sq_probs", "shared_logps"):
            difference = (getattr(ours, f"{side}_{name}") - trl[f"{side}_{name}"]).abs().max().item()
            assert difference <= SUMS_TOLERANCE, f"{side}_{name}: max |ours - TRL| = {difference:.3g}"


@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared-prompt", "two-sequence"])
@pytest.mark.parametrize(
    ("max_length", "truncation_mode"),
    [(None, "keep_start"), (8, "keep_start"), (7, "keep_end")],
    ids=["whole", "keep-start-truncated", "keep-end-truncated"],
)
def test_head_sums_are_trls_fused_head_sums(share_prompt: bool, max_length: int | None, truncation_mode: str) -> None:
    model = tiny_model()
    rows = random_rows(list(range(VOCAB)))
    ours = score(
        model, rows, batch_size=4, max_length=max_length, truncation_mode=truncation_mode, share_prompt=share_prompt
    )
    trl = trl_sums(model, rows, max_length, truncation_mode)
    assert_same_sums(ours, trl)
    if truncation_mode == "keep_end":  # a completion starts some sequences: its first token gets no log-prob
        assert not torch.equal(ours.chosen_tokens, ours.chosen_scored_tokens)


def test_head_sums_do_not_depend_on_the_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    # A budget of one vocabulary row per chunk forces one token per LM-head chunk.
    monkeypatch.setattr(scoring, "LOGITS_BUDGET", 1)
    model = tiny_model()
    rows = random_rows(list(range(VOCAB)))
    ours = score(model, rows, batch_size=4, max_length=7, truncation_mode="keep_end", share_prompt=False)
    assert_same_sums(ours, trl_sums(model, rows, 7, "keep_end"))


def one_live_token_head(model: torch.nn.Module, live: int) -> torch.nn.Module:
    """Every logit is 0 except the `live` token's: whenever that one is negative, all other tokens tie for the top."""
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[live] = torch.linspace(-3, 3, model.lm_head.weight.shape[1])
    return model


@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared-prompt", "two-sequence"])
def test_token_accuracy_gives_a_tie_to_the_lowest_token_id(share_prompt: bool) -> None:
    """TRL counts a token as top-1 when it is the argmax, the first of tied maxima: among the tied
    zeros that is token 0, never the 3 or the 7, which a tie-as-hit rule would count too."""
    model = one_live_token_head(tiny_model(), live=5)
    rows = random_rows([0, 3, 5, 7])
    ours = score(model, rows, batch_size=4, max_length=None, truncation_mode="keep_start", share_prompt=share_prompt)
    trl = trl_sums(model, rows, None, "keep_start")
    assert_same_sums(ours, trl)
    assert 0 < ours.chosen_top1.sum().item() < ours.chosen_scored_tokens.sum().item()


@settings(max_examples=200, deadline=None)
@given(
    logits=st.lists(st.lists(st.integers(-2, 2), min_size=5, max_size=5), min_size=1, max_size=6),
    data=st.data(),
)
def test_top1_hits_from_amax_are_the_argmax_hits(logits: list[list[int]], data: st.DataObject) -> None:
    """The CPU path (`amax`, then a tie check on rows whose target sits at the maximum) counts exactly the rows
    whose target is the first argmax; small integer logits make ties common."""
    values = torch.tensor(logits, dtype=torch.float32)
    targets = torch.tensor(data.draw(st.lists(st.integers(0, 4), min_size=len(logits), max_size=len(logits))))
    target_logits = values.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    hits = scoring._top1_hits(values, targets, target_logits, values.amax(dim=-1))
    assert hits.tolist() == (values.argmax(dim=-1) == targets).long().tolist()


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 5), width=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_row_dots_are_the_batched_matmul(rows: int, width: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    left, right = torch.randn(rows, width, generator=generator), torch.randn(rows, width, generator=generator)
    expected = torch.bmm(left.unsqueeze(1), right.unsqueeze(2)).view(-1)
    torch.testing.assert_close(scoring._row_dots(left, right), expected, rtol=1e-5, atol=1e-5)


def test_without_sum_sq_probs_every_other_sum_is_the_same() -> None:
    model = tiny_model()
    rows = random_rows(list(range(VOCAB)))
    kwargs = {"batch_size": 4, "max_length": None, "truncation_mode": "keep_start"}
    full, lean = score(model, rows, **kwargs), score(model, rows, sum_sq_probs=False, **kwargs)
    assert lean.chosen_log_sum_sq_probs is None and lean.rejected_log_sum_sq_probs is None
    for name in ("chosen_logps", "rejected_logps", "chosen_entropy_sum", "rejected_logits_sum", "chosen_top1"):
        assert torch.equal(getattr(full, name), getattr(lean, name)), name
