"""Property tests for the DPO metric math in `pytest_dpo.metrics` (pure tensors, no models).

Expected values are computed independently of the code under test: closed forms in
plain Python `math` on doubles, and, for parity, TRL 1.16's own
`DPOTrainer._compute_loss` driven with a stub model and a stub trainer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pytest_dpo import metrics
from pytest_dpo.metric_table import METRIC_NAMES, MOE_METRICS
from pytest_dpo.results import ROUTER_FIELDS, PerExample, SequenceScores
from pytest_dpo.settings import (
    F_DIVERGENCE_LOSS_TYPES,
    PER_EXAMPLE_LOSS_TYPES,
    DPOSettings,
    SettingsError,
)
from pytest_dpo.training_args import TRAINING_SETTING_FIELDS

from .token_statistics import token_statistics

EXAMPLE_MEAN_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
TOKEN_WEIGHTED_METRICS = ("logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")
FLOAT32_LOSS_TOLERANCE = {"rel_tol": 1e-5, "abs_tol": 1e-5}


# --------------------------------------------------------------------------------------------
# Closed forms, plain Python floats. Each branch quotes the TRL 1.16 `_compute_loss` line it
# reproduces (with `delta_score = chosen_logratios - rejected_logratios` for reverse KL).
# --------------------------------------------------------------------------------------------


def logsigmoid(x: float) -> float:
    """log(sigmoid(x)) without overflow: min(x, 0) - log1p(exp(-|x|))."""
    return min(x, 0.0) - math.log1p(math.exp(-abs(x)))


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def closed_form_loss(
    loss_type: str,
    c: float,
    r: float,
    c_tokens: int,
    r_tokens: int,
    policy_chosen_logp: float,
    num_examples: int,
    total_chosen_scored: int,
    *,
    beta: float,
    label_smoothing: float,
    tau: float,
) -> float:
    """One example's loss; `c`, `r` are the chosen/rejected log-ratios (policy - reference)."""
    z = beta * (c - r)
    if loss_type == "sigmoid":
        # per_sequence_loss = -F.logsigmoid(self.beta * delta_score)
        return -logsigmoid(z)
    if loss_type == "hinge":
        # per_sequence_loss = torch.relu(1 - self.beta * delta_score)
        return max(0.0, 1.0 - z)
    if loss_type == "ipo":
        # chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)  (same for rejected)
        # per_sequence_loss = (ipo_delta - 1 / (2 * self.beta)) ** 2
        avg = c / max(c_tokens, 1) - r / max(r_tokens, 1)
        return (avg - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "exo_pair":
        # qw * (log_qw - log_pw) + ql * (log_ql - log_pl), log_pw = log1p(-eps), log_pl = log(eps)
        eps = label_smoothing
        return sigmoid(z) * (logsigmoid(z) - math.log1p(-eps)) + sigmoid(-z) * (logsigmoid(-z) - math.log(eps))
    if loss_type == "nca_pair":
        # -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)
        return -logsigmoid(beta * c) - 0.5 * logsigmoid(-beta * c) - 0.5 * logsigmoid(-beta * r)
    if loss_type == "robust":
        # (-(1 - ls) * F.logsigmoid(beta * delta) - (-ls * F.logsigmoid(-beta * delta))) / (1 - 2 * ls)
        ls = label_smoothing
        return (-(1 - ls) * logsigmoid(z) + ls * logsigmoid(-z)) / (1 - 2 * ls)
    if loss_type == "bco_pair":
        # -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
        return -logsigmoid(beta * c) - logsigmoid(-beta * r)
    if loss_type == "sppo_hard":
        # (chosen_logratios - 0.5 / self.beta) ** 2 + (rejected_logratios + 0.5 / self.beta) ** 2
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        # 1 - torch.sigmoid(self.beta * chosen_logratios) + torch.sigmoid(self.beta * rejected_logratios)
        return 1 - sigmoid(beta * c) + sigmoid(beta * r)
    if loss_type == "apo_down":
        # torch.sigmoid(self.beta * chosen_logratios) + 1 - torch.sigmoid(self.beta * (chosen - rejected))
        return sigmoid(beta * c) + 1 - sigmoid(z)
    if loss_type == "discopop":
        # m = sigmoid(logits / tau); -F.logsigmoid(logits) * (1 - m) + torch.exp(-logits) * m
        m = sigmoid(z / tau)
        return -logsigmoid(z) * (1 - m) + math.exp(-z) * m
    if loss_type == "sigmoid_norm":
        # -F.logsigmoid(self.beta * (chosen_scores / n_chosen - rejected_scores / n_rejected))
        return -logsigmoid(beta * (c / max(c_tokens, 1) - r / max(r_tokens, 1)))
    if loss_type == "sft":
        # batch_loss = -chosen_per_token_logps[chosen_mask.bool()].mean(): the example's token-weighted share
        return -policy_chosen_logp * num_examples / max(total_chosen_scored, 1)
    raise AssertionError(f"no closed form for {loss_type}")


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

# Log-ratios on a 2**-10 grid inside [-30, 30]: exact in float32, and so are their differences,
# so the only float32 error left is the rounding of the loss formula itself.
logratio = st.integers(-30 * 1024, 30 * 1024).map(lambda k: k / 1024)
betas = st.floats(min_value=0.01, max_value=2.0, exclude_min=True, allow_nan=False)
smoothings = st.floats(min_value=1e-4, max_value=0.49, exclude_max=True, allow_nan=False)
# Sequence log-probs on a 1/8 grid: coarse enough that ties between rewards happen.
logp = st.integers(-320, 0).map(lambda k: k / 8)


@st.composite
def loss_inputs(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 8))
    return {
        "c": draw(st.lists(logratio, min_size=n, max_size=n)),
        "r": draw(st.lists(logratio, min_size=n, max_size=n)),
        "c_tokens": draw(st.lists(st.integers(1, 64), min_size=n, max_size=n)),
        "r_tokens": draw(st.lists(st.integers(1, 64), min_size=n, max_size=n)),
        "lp": draw(st.lists(logp, min_size=n, max_size=n)),
        "scored": draw(st.lists(st.integers(1, 64), min_size=n, max_size=n)),
    }


@st.composite
def score_rows(draw: st.DrawFn, n: int) -> list[dict[str, float]]:
    """`n` realistic rows of one model's scores (no scored token: every sum is 0)."""
    rows = []
    for _ in range(n):
        row: dict[str, float] = {}
        for side in ("chosen", "rejected"):
            tokens = draw(st.integers(1, 40))
            scored = tokens - draw(st.integers(0, 1))
            row[f"{side}_tokens"] = tokens
            row[f"{side}_scored_tokens"] = scored
            row[f"{side}_logps"] = draw(logp) if scored else 0.0
            row[f"{side}_logits_sum"] = draw(st.floats(-500, 500, width=32)) if scored else 0.0
            row[f"{side}_entropy_sum"] = draw(st.floats(0, 300, width=32)) if scored else 0.0
        row["chosen_top1"] = draw(st.integers(0, row["chosen_scored_tokens"]))
        rows.append(row)
    return rows


INT_FIELDS = ("chosen_tokens", "rejected_tokens", "chosen_scored_tokens", "rejected_scored_tokens", "chosen_top1")
OPTIONAL_SUMS = ("chosen_log_sum_sq_probs", "rejected_log_sum_sq_probs", "chosen_shared_logps", "rejected_shared_logps")
# The metrics of a model without router logits: all but a MoE policy's `aux_loss`.
DENSE_METRICS = tuple(name for name in METRIC_NAMES if name not in MOE_METRICS)


def to_scores(rows: list[dict[str, float]]) -> SequenceScores:
    """SequenceScores with the dtypes `pytest_dpo.scoring.score` produces (float32 sums, int64 counts).

    The WPO and LD-DPO sums are optional: rows without them give scores without them.
    """
    columns = {}
    for name in SequenceScores.__dataclass_fields__:
        if name in ROUTER_FIELDS or (rows and name in OPTIONAL_SUMS and name not in rows[0]):
            continue
        dtype = torch.int64 if name in INT_FIELDS else torch.float32
        columns[name] = torch.tensor([row[name] for row in rows], dtype=dtype)
    return SequenceScores(**columns)


@st.composite
def policy_and_reference(draw: st.DrawFn, min_size: int = 1) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    n = draw(st.integers(min_size, 12))
    policy = draw(score_rows(n))
    reference = draw(score_rows(n))
    if draw(st.booleans()):  # force some exact ties between chosen and rejected rewards
        for p_row, r_row in zip(policy, reference):
            if draw(st.booleans()):
                p_row["rejected_logps"], r_row["rejected_logps"] = p_row["chosen_logps"], r_row["chosen_logps"]
    return policy, reference


@st.composite
def dpo_settings(draw: st.DrawFn, loss_types: tuple[str, ...] = PER_EXAMPLE_LOSS_TYPES) -> DPOSettings:
    return DPOSettings(
        beta=draw(betas),
        loss_type=(draw(st.sampled_from(loss_types)),),
        label_smoothing=draw(st.floats(1e-3, 0.45)),
    )


def build(policy_rows: list[dict[str, float]], reference_rows: list[dict[str, float]], config: DPOSettings) -> PerExample:
    return metrics.build_per_example(
        torch.arange(len(policy_rows)), to_scores(policy_rows), to_scores(reference_rows), config
    )


def assert_close(got: float, expected: float, rel: float = 1e-9, abs_: float = 1e-9, what: str = "") -> None:
    if math.isnan(expected):  # discopop overflows to nan (as in TRL) for beta * margin below about -88.7
        assert math.isnan(got), f"{what}: got {got!r}, expected nan"
        return
    assert math.isclose(got, expected, rel_tol=rel, abs_tol=abs_), f"{what}: got {got!r}, expected {expected!r}"


# --------------------------------------------------------------------------------------------
# loss_per_example against the closed forms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", PER_EXAMPLE_LOSS_TYPES)
@settings(max_examples=40, deadline=None)
@given(data=loss_inputs(), beta=betas, label_smoothing=smoothings, tau=st.floats(0.02, 1.0))
def test_loss_per_example_matches_closed_form(
    loss_type: str, data: dict[str, Any], beta: float, label_smoothing: float, tau: float
) -> None:
    n = len(data["c"])
    if loss_type == "discopop":
        # exp(-logits) overflows float32 below -88.7 and TRL's formula then gives inf * 0 = nan (in TRL too).
        assume(all(beta * (c - r) > -85 for c, r in zip(data["c"], data["r"])))
    got = metrics.loss_per_example(
        loss_type,
        torch.tensor(data["c"], dtype=torch.float32),
        torch.tensor(data["r"], dtype=torch.float32),
        torch.tensor(data["c_tokens"], dtype=torch.float32),
        torch.tensor(data["r_tokens"], dtype=torch.float32),
        torch.tensor(data["lp"], dtype=torch.float32),
        torch.tensor(data["scored"], dtype=torch.float32),
        beta=beta,
        label_smoothing=label_smoothing,
        discopop_tau=tau,
    )
    assert got.shape == (n,)
    for i in range(n):
        expected = closed_form_loss(
            loss_type,
            data["c"][i],
            data["r"][i],
            data["c_tokens"][i],
            data["r_tokens"][i],
            data["lp"][i],
            n,
            sum(data["scored"]),
            beta=beta,
            label_smoothing=label_smoothing,
            tau=tau,
        )
        assert math.isclose(got[i].item(), expected, **FLOAT32_LOSS_TOLERANCE), (
            f"{loss_type} example {i}: got {got[i].item()!r}, expected {expected!r}"
        )


def test_loss_per_example_rejects_unknown_loss_type() -> None:
    one = torch.ones(1)
    with pytest.raises(ValueError, match="Unknown loss type 'aot'"):
        metrics.loss_per_example("aot", one, one, one, one, one, one, beta=0.1)


@settings(max_examples=100, deadline=None)
@given(data=loss_inputs(), beta=betas)
def test_sft_mean_is_token_weighted_chosen_nll(data: dict[str, Any], beta: float) -> None:
    losses = metrics.loss_per_example(
        "sft",
        torch.tensor(data["c"]),
        torch.tensor(data["r"]),
        torch.tensor(data["c_tokens"], dtype=torch.float32),
        torch.tensor(data["r_tokens"], dtype=torch.float32),
        torch.tensor(data["lp"], dtype=torch.float32),
        torch.tensor(data["scored"], dtype=torch.int64),
        beta=beta,
    )
    expected = -math.fsum(data["lp"]) / sum(data["scored"])
    assert_close(math.fsum(losses.tolist()) / len(losses), expected, rel=1e-5, abs_=1e-5, what="sft mean")


@settings(max_examples=60, deadline=None)
@given(
    pair=policy_and_reference(),
    loss_types=st.lists(st.sampled_from(PER_EXAMPLE_LOSS_TYPES), min_size=1, max_size=3),
    weights=st.lists(st.floats(0.0, 2.0), min_size=3, max_size=3),
    use_weights=st.booleans(),
    beta=betas,
    label_smoothing=st.floats(1e-3, 0.45),
)
def test_combined_losses_are_the_weighted_sum(
    pair: tuple[list[dict[str, float]], list[dict[str, float]]],
    loss_types: list[str],
    weights: list[float],
    use_weights: bool,
    beta: float,
    label_smoothing: float,
) -> None:
    policy_rows, reference_rows = pair
    weights = weights[: len(loss_types)] if use_weights else [1.0] * len(loss_types)
    if "discopop" in loss_types:
        assume(
            all(
                beta * ((p["chosen_logps"] - q["chosen_logps"]) - (p["rejected_logps"] - q["rejected_logps"])) > -85
                for p, q in zip(policy_rows, reference_rows)
            )
        )
    config = DPOSettings(
        beta=beta,
        loss_type=tuple(loss_types),
        loss_weights=tuple(weights) if use_weights else None,
        label_smoothing=label_smoothing,
    )
    reference = to_scores(reference_rows)
    got = metrics.combined_losses(to_scores(policy_rows), reference.chosen_logps, reference.rejected_logps, config)
    n = len(policy_rows)
    total_scored = sum(p["chosen_scored_tokens"] for p in policy_rows)
    for i, (p, q) in enumerate(zip(policy_rows, reference_rows)):
        c = p["chosen_logps"] - q["chosen_logps"]
        r = p["rejected_logps"] - q["rejected_logps"]
        terms = [
            weight
            * closed_form_loss(
                loss_type,
                c,
                r,
                p["chosen_tokens"],
                p["rejected_tokens"],
                p["chosen_logps"],
                n,
                total_scored,
                beta=beta,
                label_smoothing=label_smoothing,
                tau=config.discopop_tau,
            )
            for loss_type, weight in zip(loss_types, weights)
        ]
        expected = math.fsum(terms)
        scale = 1.0 + math.fsum(abs(term) for term in terms)
        assert math.isclose(got[i].item(), expected, rel_tol=1e-5, abs_tol=1e-5 * scale), (
            f"{loss_types} x {weights}, example {i}: got {got[i].item()!r}, expected {expected!r}"
        )


@pytest.mark.parametrize(
    ("loss_type", "loss_weights"),
    [(("sigmoid", "sft"), (0.8, 0.2)), (("ipo", "hinge"), (0.5, 2.0)), (("sigmoid", "bco_pair", "sft"), (1.0, 0.3, 0.0))],
)
def test_combined_losses_fixed_weights(loss_type: tuple[str, ...], loss_weights: tuple[float, ...]) -> None:
    config = DPOSettings(beta=0.25, loss_type=loss_type, loss_weights=loss_weights)
    policy_rows = [
        {"chosen_tokens": 5, "rejected_tokens": 7, "chosen_scored_tokens": 5, "rejected_scored_tokens": 7,
         "chosen_logps": -4.5, "rejected_logps": -9.0, "chosen_logits_sum": 0.0, "rejected_logits_sum": 0.0,
         "chosen_entropy_sum": 0.0, "rejected_entropy_sum": 0.0, "chosen_top1": 3},
        {"chosen_tokens": 3, "rejected_tokens": 2, "chosen_scored_tokens": 2, "rejected_scored_tokens": 2,
         "chosen_logps": -6.0, "rejected_logps": -1.5, "chosen_logits_sum": 0.0, "rejected_logits_sum": 0.0,
         "chosen_entropy_sum": 0.0, "rejected_entropy_sum": 0.0, "chosen_top1": 1},
    ]  # fmt: skip
    reference_rows = [dict(row, chosen_logps=-5.0, rejected_logps=-8.0) for row in policy_rows]
    reference = to_scores(reference_rows)
    got = metrics.combined_losses(to_scores(policy_rows), reference.chosen_logps, reference.rejected_logps, config)
    # hand-computed: log-ratios (0.5, -1.0) and (-1.0, 6.5); sft share = 2 examples / 7 scored tokens
    c, r = (0.5, -1.0), (-1.0, 6.5)
    per_type = {
        "sigmoid": [-logsigmoid(0.25 * (c[i] - r[i])) for i in range(2)],
        "sft": [4.5 * 2 / 7, 6.0 * 2 / 7],
        "ipo": [((c[0] / 5 - r[0] / 7) - 2.0) ** 2, ((c[1] / 3 - r[1] / 2) - 2.0) ** 2],
        "hinge": [max(0.0, 1 - 0.25 * (c[i] - r[i])) for i in range(2)],
        "bco_pair": [-logsigmoid(0.25 * c[i]) - logsigmoid(-0.25 * r[i]) for i in range(2)],
    }
    for i in range(2):
        expected = sum(w * per_type[t][i] for t, w in zip(loss_type, loss_weights))
        assert_close(got[i].item(), expected, rel=1e-6, abs_=1e-6, what=f"row {i}")


# --------------------------------------------------------------------------------------------
# Parity with TRL's own `_compute_loss` on fixed batches (stub trainer, stub fused-head model)
# --------------------------------------------------------------------------------------------


def _fixed_batch() -> dict[str, torch.Tensor]:
    """A 4-row batch (8 sequences: chosen then rejected) of length 9, with per-token model outputs.

    Row 0's chosen completion starts the sequence (no prompt), so its first completion token has
    no log-prob: completion tokens (what ipo/sigmoid_norm divide by) != scored tokens. The rows'
    completions differ in length, so LD-DPO's shared length cuts into one side of each row.
    """
    generator = torch.Generator().manual_seed(1234)
    rows, length = 4, 9
    spans = [  # (prompt length, completion length) per sequence
        (0, 5), (2, 6), (3, 2), (1, 8),  # chosen
        (2, 4), (2, 7), (3, 5), (1, 3),  # rejected
    ]  # fmt: skip
    completion_mask = torch.zeros(2 * rows, length, dtype=torch.long)
    attention_mask = torch.zeros(2 * rows, length, dtype=torch.long)
    for i, (prompt, completion) in enumerate(spans):
        completion_mask[i, prompt : prompt + completion] = 1
        attention_mask[i, : prompt + completion] = 1
    shift = completion_mask[:, 1:].float()
    batch = {
        "input_ids": torch.randint(0, 50, (2 * rows, length), generator=generator) * attention_mask,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        # the fused head returns 0 log-prob outside the labels, TRL sums the whole row
        "log_probs": -3 * torch.rand(2 * rows, length - 1, generator=generator) * shift,
        "entropy": 4 * torch.rand(2 * rows, length - 1, generator=generator),
        "mean_logits": 6 * torch.rand(2 * rows, length - 1, generator=generator) - 3,
        "is_top1": torch.rand(2 * rows, length - 1, generator=generator) < 0.5,
        # log sum_v p_v^2 lies in [log(1 / vocab), 0]
        "log_sum_sq_probs": -2 * torch.rand(2 * rows, length - 1, generator=generator),
    }
    # The reference's per-token log-probs: uneven over the scored tokens, summing to these totals per sequence.
    reference_totals = torch.tensor([-6.0, -9.5, -2.25, -13.0, -5.5, -8.0, -9.0, -3.5])
    spread = (0.1 + torch.rand(2 * rows, length - 1, generator=generator)) * shift
    batch["ref_log_probs"] = reference_totals.unsqueeze(1) * spread / spread.sum(dim=1, keepdim=True)
    return batch


class _FusedHeadStub(torch.nn.Module):
    """A model called as TRL calls a model with its fused LM head, answering with fixed per-token outputs."""

    is_gradient_checkpointing = False

    def __init__(self, outputs: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.outputs = outputs
        self.eval()

    def forward(self, **kwargs: Any) -> SimpleNamespace:
        assert kwargs["fused_lm_head"] is True
        return SimpleNamespace(**self.outputs)


def _trl_eval(
    batch: dict[str, torch.Tensor], config: DPOSettings, precompute_ref: bool = False
) -> tuple[float, dict[str, float]]:
    """Run TRL 1.16 `DPOTrainer._compute_loss` (eval mode) on `batch`, with the reference scored in the same
    call or (`precompute_ref`) beforehand by `DPOTrainer.compute_ref_log_probs`, as `precompute_ref_log_probs` does."""
    from trl.trainer.dpo_trainer import DPOTrainer

    model = _FusedHeadStub(
        {key: batch[key] for key in ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")}
    )
    identity = lambda tensor: tensor  # noqa: E731
    trainer = SimpleNamespace(
        model=model,
        ref_model=_FusedHeadStub({"log_probs": batch["ref_log_probs"]}),
        accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather_for_metrics=identity, gather=identity, autocast=contextlib.nullcontext
        ),
        aux_loss_enabled=False,
        ld_alpha=config.ld_alpha,
        precompute_ref_logps=precompute_ref,
        f_divergence_type=config.f_divergence_type,
        f_alpha_divergence_coef=config.f_alpha_divergence_coef,
        loss_types=list(config.loss_type),
        loss_weights=list(config.weights),
        beta=config.beta,
        label_smoothing=config.label_smoothing,
        args=SimpleNamespace(discopop_tau=config.discopop_tau, gradient_checkpointing_kwargs=None),
        use_weighting=config.use_weighting,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "completion_mask")}
    if precompute_ref:
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = DPOTrainer.compute_ref_log_probs(
            trainer, trainer.ref_model, inputs
        )
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    logged = {name: values[-1] for name, values in trainer._metrics["eval"].items() if name in METRIC_NAMES}
    return float(loss), logged


def _shared_length_sums(per_token: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per sequence, the sum over its first K scored tokens, K the smaller scored count of its row's two sequences."""
    counts = shift.sum(dim=1)
    half = len(counts) // 2
    shared = torch.minimum(counts[:half], counts[half:]).repeat(2)
    within = shift.bool() & (shift.cumsum(dim=1) <= shared.unsqueeze(1))
    return (per_token * within).sum(dim=1)


def _scores_from_batch(batch: dict[str, torch.Tensor]) -> tuple[SequenceScores, SequenceScores]:
    """What `pytest_dpo.scoring.score` would report for this batch, derived from the per-token arrays."""
    half = batch["completion_mask"].shape[0] // 2
    completion = batch["completion_mask"]
    shift = completion[:, 1:]
    tokens, scored = completion.sum(dim=1), shift.sum(dim=1)
    logps = batch["log_probs"].sum(dim=1)
    logits = (batch["mean_logits"] * shift).sum(dim=1)
    entropy = (batch["entropy"] * shift).sum(dim=1)
    top1 = (batch["is_top1"] & shift.bool()).sum(dim=1)
    log_sum_sq_probs = (batch["log_sum_sq_probs"] * shift).sum(dim=1)
    shared = _shared_length_sums(batch["log_probs"], shift)
    policy = SequenceScores(
        chosen_logps=logps[:half],
        rejected_logps=logps[half:],
        chosen_tokens=tokens[:half],
        rejected_tokens=tokens[half:],
        chosen_scored_tokens=scored[:half],
        rejected_scored_tokens=scored[half:],
        chosen_logits_sum=logits[:half],
        rejected_logits_sum=logits[half:],
        chosen_entropy_sum=entropy[:half],
        rejected_entropy_sum=entropy[half:],
        chosen_top1=top1[:half],
        chosen_log_sum_sq_probs=log_sum_sq_probs[:half],
        rejected_log_sum_sq_probs=log_sum_sq_probs[half:],
        chosen_shared_logps=shared[:half],
        rejected_shared_logps=shared[half:],
    )
    zeros = torch.zeros(half)
    reference_logps = batch["ref_log_probs"].sum(dim=1)
    reference_shared = _shared_length_sums(batch["ref_log_probs"], shift)
    reference = SequenceScores(
        reference_logps[:half],
        reference_logps[half:],
        **token_statistics(zeros, zeros),
        chosen_shared_logps=reference_shared[:half],
        rejected_shared_logps=reference_shared[half:],
    )
    return policy, reference


TRL_PARITY_CASES = [
    *(DPOSettings(beta=0.1, loss_type=(loss_type,), label_smoothing=0.1) for loss_type in PER_EXAMPLE_LOSS_TYPES),
    *(DPOSettings(beta=0.7, loss_type=(loss_type,), label_smoothing=0.3) for loss_type in ("robust", "exo_pair", "ipo")),
    DPOSettings(beta=0.1, loss_type=("sigmoid", "sft"), loss_weights=(0.8, 0.2)),
    DPOSettings(beta=0.3, loss_type=("ipo", "hinge", "apo_zero"), loss_weights=(1.0, 0.5, 2.0)),
    DPOSettings(beta=1.5, loss_type=("discopop",), discopop_tau=0.2),
]
# f-divergences (with TRL's coef -> 1 fallback just inside and just outside its 1e-6 window), WPO weighting and LD-DPO.
F_DIVERGENCES = [
    {"f_divergence_type": "forward_kl"},
    {"f_divergence_type": "js_divergence"},
    *(
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": coef}
        for coef in (0.3, 1.7, 1 + 5e-7, 1 + 1e-4)
    ),
]
NEW_SETTINGS_PARITY_CASES = [
    *(
        DPOSettings(beta=0.5, loss_type=(loss_type,), label_smoothing=0.1, **divergence)
        for divergence in F_DIVERGENCES
        for loss_type in F_DIVERGENCE_LOSS_TYPES
    ),
    *(
        DPOSettings(beta=0.5, loss_type=(loss_type,), label_smoothing=0.1, use_weighting=True)
        for loss_type in PER_EXAMPLE_LOSS_TYPES
        if loss_type != "sft"
    ),
    *(
        DPOSettings(beta=0.5, loss_type=(loss_type,), label_smoothing=0.1, ld_alpha=ld_alpha)
        for ld_alpha in (0.0, 0.5, 1.0)
        for loss_type in PER_EXAMPLE_LOSS_TYPES
    ),
    DPOSettings(
        beta=0.2,
        loss_type=("sigmoid", "ipo", "hinge"),
        loss_weights=(1.0, 0.3, 0.5),
        ld_alpha=0.25,
        f_divergence_type="alpha_divergence",
        f_alpha_divergence_coef=0.6,
        use_weighting=True,
    ),
    DPOSettings(beta=0.2, loss_type=("bco_pair", "apo_down"), ld_alpha=0.5, use_weighting=True),
]


def _case_id(config: DPOSettings) -> str:
    variants = [
        f"{name}={getattr(config, name)}"
        for name in ("ld_alpha", "f_divergence_type", "f_alpha_divergence_coef", "use_weighting")
        if getattr(config, name) != DPOSettings.__dataclass_fields__[name].default
    ]
    return "-".join(["+".join(config.loss_type), f"b{config.beta}", *variants])


def assert_metrics_equal_trl(config: DPOSettings, precompute_ref: bool) -> None:
    batch = _fixed_batch()
    trl_loss, trl_metrics = _trl_eval(batch, config, precompute_ref)
    policy, reference = _scores_from_batch(batch)
    ours = metrics.aggregate(metrics.build_per_example(torch.arange(len(policy)), policy, reference, config))
    assert set(trl_metrics) == set(DENSE_METRICS) - {"loss"}
    assert math.isclose(ours["loss"], trl_loss, rel_tol=1e-5, abs_tol=1e-6), (ours["loss"], trl_loss)
    for name, value in trl_metrics.items():
        assert math.isclose(ours[name], value, rel_tol=1e-5, abs_tol=1e-6), f"{name}: ours {ours[name]}, TRL {value}"


@pytest.mark.parametrize("precompute_ref", [False, True], ids=["ref-inline", "ref-precomputed"])
@pytest.mark.parametrize("config", TRL_PARITY_CASES, ids=_case_id)
def test_single_batch_metrics_equal_trl_compute_loss(config: DPOSettings, precompute_ref: bool) -> None:
    assert_metrics_equal_trl(config, precompute_ref)


@pytest.mark.parametrize("precompute_ref", [False, True], ids=["ref-inline", "ref-precomputed"])
@pytest.mark.parametrize("config", NEW_SETTINGS_PARITY_CASES, ids=_case_id)
def test_f_divergence_weighting_and_ld_alpha_equal_trl_compute_loss(config: DPOSettings, precompute_ref: bool) -> None:
    assert_metrics_equal_trl(config, precompute_ref)


def test_trl_cannot_weigh_the_sft_loss_and_neither_do_we() -> None:
    """TRL's sft loss is one value expanded over the batch, which its in-place WPO weighting cannot write to."""
    # DPOSettings refuses the combination, so it is set past the check to drive TRL with it.
    unchecked = DPOSettings(loss_type="sigmoid", use_weighting=True)
    object.__setattr__(unchecked, "loss_type", ("sigmoid", "sft"))
    object.__setattr__(unchecked, "loss_weights", None)
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        _trl_eval(_fixed_batch(), unchecked)
    with pytest.raises(SettingsError, match="use_weighting cannot weigh loss_type 'sft'") as refused:
        DPOSettings(loss_type=("sigmoid", "sft"), use_weighting=True)
    assert refused.value.field == "use_weighting"


def test_fixed_batch_exercises_the_edge_cases() -> None:
    """Guard the parity fixture itself: the token counts differ, accuracies is neither 0 nor 1, LD-DPO's
    shared length cuts both models' sums, and the WPO weights are not all 1."""
    batch = _fixed_batch()
    policy, reference = _scores_from_batch(batch)
    assert not torch.equal(policy.chosen_tokens, policy.chosen_scored_tokens)
    rewards_c = policy.chosen_logps - reference.chosen_logps
    rewards_r = policy.rejected_logps - reference.rejected_logps
    assert 0 < (rewards_c > rewards_r).sum().item() < len(policy)
    for scores in (policy, reference):
        assert not torch.equal(scores.chosen_shared_logps, scores.chosen_logps)
        assert not torch.equal(scores.rejected_shared_logps, scores.rejected_logps)
    assert (metrics.wpo_weights(policy) - 1).abs().min().item() > 1e-3


# --------------------------------------------------------------------------------------------
# build_per_example + aggregate
# --------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(pair=policy_and_reference(), config=dpo_settings())
def test_rewards_margins_and_accuracies(
    pair: tuple[list[dict[str, float]], list[dict[str, float]]], config: DPOSettings
) -> None:
    policy_rows, reference_rows = pair
    per_example = build(policy_rows, reference_rows, config)
    n = len(policy_rows)
    assert len(per_example) == n
    assert per_example.rows.tolist() == list(range(n))
    assert torch.equal(per_example.margins, per_example.chosen_rewards - per_example.rejected_rewards)
    wins = 0
    for i, (p, q) in enumerate(zip(policy_rows, reference_rows)):
        # on the 1/8 grid the log-prob differences are exact, and distinct ones stay distinct after *beta
        chosen_ratio, rejected_ratio = p["chosen_logps"] - q["chosen_logps"], p["rejected_logps"] - q["rejected_logps"]
        assert_close(per_example.chosen_rewards[i].item(), config.beta * chosen_ratio, 1e-6, 1e-6, "chosen reward")
        assert_close(per_example.rejected_rewards[i].item(), config.beta * rejected_ratio, 1e-6, 1e-6, "rejected reward")
        # The margin is a difference of two fp32 rewards, each rounded relative to its own size.
        rounding = 1e-6 * (abs(config.beta * chosen_ratio) + abs(config.beta * rejected_ratio))
        assert_close(
            per_example.margins[i].item(), config.beta * (chosen_ratio - rejected_ratio), 1e-6, 2e-6 + rounding, "margin"
        )
        assert per_example.policy_chosen_logps[i].item() == p["chosen_logps"]
        assert per_example.reference_rejected_logps[i].item() == q["rejected_logps"]
        wins += chosen_ratio > rejected_ratio
    aggregated = metrics.aggregate(per_example)
    accuracy = aggregated["rewards/accuracies"]
    assert 0.0 <= accuracy <= 1.0
    assert accuracy == wins / n
    strict = sum(c > r for c, r in zip(per_example.chosen_rewards.tolist(), per_example.rejected_rewards.tolist()))
    assert accuracy == strict / n


@settings(max_examples=100, deadline=None)
@given(pair=policy_and_reference(), config=dpo_settings())
def test_aggregate_means_and_token_weighted_ratios(
    pair: tuple[list[dict[str, float]], list[dict[str, float]]], config: DPOSettings
) -> None:
    policy_rows, reference_rows = pair
    per_example = build(policy_rows, reference_rows, config)
    aggregated = metrics.aggregate(per_example)
    assert set(aggregated) == set(DENSE_METRICS)
    n = len(policy_rows)

    def mean(values: list[float]) -> float:
        return math.fsum(values) / n

    def ratio(numerator: float, denominator: float) -> float:
        return numerator / denominator if denominator > 0 else 0.0

    expected = {
        "loss": mean(per_example.losses.tolist()),
        "rewards/chosen": mean(per_example.chosen_rewards.tolist()),
        "rewards/rejected": mean(per_example.rejected_rewards.tolist()),
        "rewards/margins": mean(per_example.margins.tolist()),
        "logps/chosen": mean([p["chosen_logps"] for p in policy_rows]),
        "logps/rejected": mean([p["rejected_logps"] for p in policy_rows]),
        "logits/chosen": ratio(
            math.fsum(p["chosen_logits_sum"] for p in policy_rows), sum(p["chosen_scored_tokens"] for p in policy_rows)
        ),
        "logits/rejected": ratio(
            math.fsum(p["rejected_logits_sum"] for p in policy_rows),
            sum(p["rejected_scored_tokens"] for p in policy_rows),
        ),
        "entropy": ratio(
            math.fsum(p["chosen_entropy_sum"] + p["rejected_entropy_sum"] for p in policy_rows),
            sum(p["chosen_scored_tokens"] + p["rejected_scored_tokens"] for p in policy_rows),
        ),
        "mean_token_accuracy": ratio(
            sum(p["chosen_top1"] for p in policy_rows), sum(p["chosen_scored_tokens"] for p in policy_rows)
        ),
    }
    for name, value in expected.items():
        # entropy adds the chosen and rejected float32 sums per row before the double-precision total
        tolerance = 1e-6 if name == "entropy" else 1e-9
        assert_close(aggregated[name], value, tolerance, 1e-9, name)
    # the reference's own token statistics never enter the metrics
    assert 0.0 <= aggregated["mean_token_accuracy"] <= 1.0


def test_aggregate_empty_and_zero_token_conventions() -> None:
    """No rows: example means are nan; no scored tokens: TRL's `... if total_tokens > 0 else 0.0`."""
    empty = SequenceScores(torch.zeros(0), torch.zeros(0), **token_statistics(torch.zeros(0), torch.zeros(0)))
    aggregated = metrics.aggregate(metrics.build_per_example(torch.arange(0), empty, empty, DPOSettings()))
    assert math.isnan(aggregated["rewards/chosen"]) and math.isnan(aggregated["loss"])
    for name in TOKEN_WEIGHTED_METRICS:
        assert aggregated[name] == 0.0


def permuted(rows: list[dict[str, float]], order: list[int]) -> list[dict[str, float]]:
    return [rows[i] for i in order]


@settings(max_examples=100, deadline=None)
@given(pair=policy_and_reference(), config=dpo_settings(), data=st.data())
def test_metrics_invariant_to_row_order(
    pair: tuple[list[dict[str, float]], list[dict[str, float]]], config: DPOSettings, data: st.DataObject
) -> None:
    policy_rows, reference_rows = pair
    order = data.draw(st.permutations(range(len(policy_rows))))
    base = build(policy_rows, reference_rows, config)
    shuffled = build(permuted(policy_rows, order), permuted(reference_rows, order), config)
    index = torch.tensor(order, dtype=torch.long)
    for name in ("chosen_rewards", "rejected_rewards", "margins", "losses"):
        torch.testing.assert_close(getattr(shuffled, name), getattr(base, name)[index], rtol=1e-6, atol=1e-6, equal_nan=True)
    base_metrics, shuffled_metrics = metrics.aggregate(base), metrics.aggregate(shuffled)
    for name in DENSE_METRICS:
        assert_close(shuffled_metrics[name], base_metrics[name], 1e-6, 1e-6, name)


@settings(max_examples=100, deadline=None)
@given(pair=policy_and_reference(min_size=2), config=dpo_settings(), data=st.data())
def test_metrics_do_not_depend_on_batch_partition(
    pair: tuple[list[dict[str, float]], list[dict[str, float]]], config: DPOSettings, data: st.DataObject
) -> None:
    """Scoring the set in any split into parts and combining the part aggregates gives the whole-set aggregate.

    Example means combine weighted by part size; token-weighted metrics by the part's token count.
    TRL's `sft` loss is a token-weighted mean, so it combines by chosen scored tokens.
    """
    policy_rows, reference_rows = pair
    n = len(policy_rows)
    order = data.draw(st.permutations(range(n)))
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), min_size=1, max_size=n - 1)))
    bounds = [0, *cuts, n]
    parts = [order[start:end] for start, end in zip(bounds, bounds[1:])]
    whole = metrics.aggregate(build(policy_rows, reference_rows, config))

    def tokens(rows: list[int], *fields: str) -> int:
        return sum(policy_rows[i][field] for i in rows for field in fields)

    weights = {name: [len(part) for part in parts] for name in EXAMPLE_MEAN_METRICS}
    weights["logits/chosen"] = [tokens(part, "chosen_scored_tokens") for part in parts]
    weights["mean_token_accuracy"] = weights["logits/chosen"]
    weights["logits/rejected"] = [tokens(part, "rejected_scored_tokens") for part in parts]
    weights["entropy"] = [tokens(part, "chosen_scored_tokens", "rejected_scored_tokens") for part in parts]
    if config.loss_type == ("sft",):
        weights["loss"] = weights["logits/chosen"]
    part_metrics = [
        metrics.aggregate(build(permuted(policy_rows, part), permuted(reference_rows, part), config)) for part in parts
    ]
    for name in DENSE_METRICS:
        total = sum(weights[name])
        if total == 0:  # e.g. no scored token anywhere: TRL's 0.0
            assert whole[name] == 0.0, name
            continue
        combined = math.fsum(w * m[name] for w, m in zip(weights[name], part_metrics) if w) / total
        scale = 1.0 + max(abs(m[name]) for m in part_metrics)
        assert_close(whole[name], combined, 1e-5, 1e-6 * scale, f"{name}: whole vs combined over {parts}")


# --------------------------------------------------------------------------------------------
# f-divergences, WPO weights, LD-DPO
# --------------------------------------------------------------------------------------------

F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
RAW_LOG_RATIO_LOSS_TYPES = tuple(t for t in PER_EXAMPLE_LOSS_TYPES if t not in F_DIVERGENCE_LOSS_TYPES)
# Away from TRL's coef -> 1 fallback window, and small enough that exp() stays far from its clamp on [-30, 30].
alpha_coefs = st.floats(-1.5, 2.5).filter(lambda coef: abs(coef - 1.0) > 1e-3)


def closed_form_f_divergence(x: float, f_divergence_type: str, coef: float) -> float:
    """TRL's f'(t) at t = exp(x), x the log-ratio."""
    if f_divergence_type == "forward_kl":
        return 1 - math.exp(-x)  # f'(t) = 1 - 1/t
    if f_divergence_type == "js_divergence":
        return math.log(2) + logsigmoid(x)  # f'(t) = log(2t / (t + 1))
    if f_divergence_type == "alpha_divergence":
        return (math.exp(min((coef - 1) * x, 80.0)) - 1) / (coef - 1)  # f'(t) = (t^(a-1) - 1) / (a - 1)
    return x


@st.composite
def rows_with_sums(draw: st.DrawFn, n: int) -> list[dict[str, float]]:
    """`score_rows` with the WPO and LD-DPO sums: the shorter completion's shared sum is its whole sum."""
    rows = draw(score_rows(n))
    for row in rows:
        shared = min(row["chosen_scored_tokens"], row["rejected_scored_tokens"])
        for side in ("chosen", "rejected"):
            scored, logps = row[f"{side}_scored_tokens"], row[f"{side}_logps"]
            row[f"{side}_log_sum_sq_probs"] = -draw(st.integers(0, 32 * scored)) / 8
            row[f"{side}_shared_logps"] = logps if scored == shared else draw(st.integers(round(logps * 8), 0)) / 8
    return rows


@st.composite
def pair_with_sums(draw: st.DrawFn) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    n = draw(st.integers(1, 12))
    return draw(rows_with_sums(n)), draw(rows_with_sums(n))


@settings(max_examples=100, deadline=None)
@given(
    x=st.lists(logratio, min_size=1, max_size=16),
    f_divergence_type=st.sampled_from(F_DIVERGENCE_TYPES),
    coef=alpha_coefs,
)
def test_f_divergence_scores_match_closed_forms(x: list[float], f_divergence_type: str, coef: float) -> None:
    got = metrics.f_divergence_scores(torch.tensor(x, dtype=torch.float32), f_divergence_type, coef)
    for i, value in enumerate(x):
        expected = closed_form_f_divergence(value, f_divergence_type, coef)
        assert_close(got[i].item(), expected, 1e-5, 1e-5, f"{f_divergence_type}({value})")


@settings(max_examples=100, deadline=None)
@given(
    x=st.lists(logratio, min_size=2, max_size=16, unique=True),
    f_divergence_type=st.sampled_from(F_DIVERGENCE_TYPES),
    coef=alpha_coefs,
)
def test_f_divergence_scores_rise_with_the_log_ratio_and_vanish_at_zero(
    x: list[float], f_divergence_type: str, coef: float
) -> None:
    """f' is increasing with f'(1) = 0: a policy that matches the reference scores 0 under every divergence."""
    ordered = torch.tensor(sorted(x) + [0.0], dtype=torch.float32)
    got = metrics.f_divergence_scores(ordered, f_divergence_type, coef)
    assert bool((got[1:-1] >= got[:-2]).all()), got
    assert got[-1].item() == 0.0


@settings(max_examples=60, deadline=None)
@given(pair=pair_with_sums(), config=dpo_settings(loss_types=F_DIVERGENCE_LOSS_TYPES), offset=st.floats(-9e-7, 9e-7))
def test_alpha_divergence_near_one_is_reverse_kl(
    pair: tuple[list[dict[str, float]], list[dict[str, float]]], config: DPOSettings, offset: float
) -> None:
    """TRL's limit case: within 1e-6 of coef 1, alpha_divergence is exactly standard DPO (reverse_kl)."""
    alpha = dataclasses.replace(config, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0 + offset)
    explicit = dataclasses.replace(config, f_divergence_type="reverse_kl")
    standard = build(*pair, config)
    for variant in (alpha, explicit):
        torch.testing.assert_close(build(*pair, variant).losses, standard.losses, rtol=0, atol=0, equal_nan=True)


@settings(max_examples=60, deadline=None)
@given(
    x=st.lists(st.integers(-4 * 1024, 4 * 1024).map(lambda k: k / 1024), min_size=1, max_size=16),
    side=st.sampled_from((-1, 1)),
)
def test_alpha_divergence_tends_to_reverse_kl_as_coef_tends_to_one(x: list[float], side: int) -> None:
    """(e^((a-1)x) - 1) / (a-1) = x + (a-1) x^2 / 2 + ...: outside TRL's fallback window it still approaches x."""
    logratios = torch.tensor(x, dtype=torch.float32)
    for distance in (1e-1, 1e-2, 1e-3):
        got = metrics.f_divergence_scores(logratios, "alpha_divergence", 1.0 + side * distance).double()
        bound = distance * logratios.double() ** 2 + 1e-4 * (1 + logratios.double().abs())
        assert bool(((got - logratios.double()).abs() <= bound).all()), (distance, got, logratios)


@pytest.mark.parametrize("loss_type", RAW_LOG_RATIO_LOSS_TYPES)
@pytest.mark.parametrize("f_divergence_type", F_DIVERGENCE_TYPES[1:])
@settings(max_examples=20, deadline=None)
@given(data=loss_inputs(), beta=betas)
def test_raw_log_ratio_losses_ignore_the_f_divergence(
    loss_type: str, f_divergence_type: str, data: dict[str, Any], beta: float
) -> None:
    """TRL feeds these losses the log-ratios themselves (and refuses a non-default f-divergence with them)."""
    keys = ("c", "r", "c_tokens", "r_tokens", "lp", "scored")
    arguments = [torch.tensor(data[key], dtype=torch.float32) for key in keys]
    standard = metrics.loss_per_example(loss_type, *arguments, beta=beta)
    diverged = metrics.loss_per_example(loss_type, *arguments, beta=beta, f_divergence_type=f_divergence_type)
    assert torch.equal(standard, diverged)
    with pytest.raises(SettingsError, match=f"does not apply to loss_type {loss_type}"):
        DPOSettings(loss_type=loss_type, f_divergence_type=f_divergence_type)


@settings(max_examples=60, deadline=None)
@given(
    pair=pair_with_sums(),
    config=dpo_settings(loss_types=F_DIVERGENCE_LOSS_TYPES),
    f_divergence_type=st.sampled_from(F_DIVERGENCE_TYPES),
    use_weighting=st.booleans(),
)
def test_f_divergence_and_weighting_change_only_the_loss(
    pair: tuple[list[dict[str, float]], list[dict[str, float]]],
    config: DPOSettings,
    f_divergence_type: str,
    use_weighting: bool,
) -> None:
    assume(not (use_weighting and config.loss_type == ("sft",)))
    standard = build(*pair, config)
    changed = dataclasses.replace(config, f_divergence_type=f_divergence_type, use_weighting=use_weighting)
    variant = build(*pair, changed)
    for field in dataclasses.fields(PerExample):
        if field.name != "losses":
            assert torch.equal(getattr(variant, field.name), getattr(standard, field.name)), field.name


@settings(max_examples=100, deadline=None)
@given(pair=pair_with_sums(), config=dpo_settings(loss_types=tuple(t for t in PER_EXAMPLE_LOSS_TYPES if t != "sft")))
def test_wpo_weights_are_the_closed_form_and_scale_each_loss(
    pair: tuple[list[dict[str, float]], list[dict[str, float]]], config: DPOSettings
) -> None:
    policy_rows, reference_rows = pair
    weights = metrics.wpo_weights(to_scores(policy_rows))
    unweighted = build(policy_rows, reference_rows, config).losses
    weighted = build(policy_rows, reference_rows, dataclasses.replace(config, use_weighting=True)).losses
    for i, row in enumerate(policy_rows):
        expected = math.exp(
            sum(
                (row[f"{side}_logps"] - row[f"{side}_log_sum_sq_probs"]) / max(row[f"{side}_scored_tokens"], 1)
                for side in ("chosen", "rejected")
            )
        )
        assert_close(weights[i].item(), expected, 1e-5, 0.0, f"weight {i}")
        assert 0.0 < weights[i].item() < math.inf
        assert_close(weighted[i].item(), unweighted[i].item() * weights[i].item(), 1e-5, 1e-30, f"loss {i}")


@settings(max_examples=60, deadline=None)
@given(pair=pair_with_sums(), config=dpo_settings(loss_types=tuple(t for t in PER_EXAMPLE_LOSS_TYPES if t != "sft")))
def test_wpo_weight_is_one_when_the_target_is_certain_or_the_distribution_uniform(
    pair: tuple[list[dict[str, float]], list[dict[str, float]]], config: DPOSettings
) -> None:
    """log p(target) = log sum_v p_v^2 in both cases (0, or -log vocab), so the weighting changes nothing."""
    policy_rows, reference_rows = pair
    for row in policy_rows:
        for side in ("chosen", "rejected"):
            row[f"{side}_log_sum_sq_probs"] = row[f"{side}_logps"]
    weighted = build(policy_rows, reference_rows, dataclasses.replace(config, use_weighting=True))
    assert torch.equal(weighted.losses, build(policy_rows, reference_rows, config).losses)


def test_wpo_weight_exceeds_one_when_the_target_is_the_likelier_token() -> None:
    """p = (0.6, 0.4), target at 0.6: p(target) / sum_v p_v^2 = 0.6 / 0.52, so WPO weights are not capped at 1."""
    one = torch.ones(1, dtype=torch.int64)
    scores = SequenceScores(
        *(torch.tensor([math.log(0.6)]),) * 2,
        **token_statistics(one, torch.zeros(1)) | {"chosen_top1": one},
        chosen_log_sum_sq_probs=torch.tensor([math.log(0.52)]),
        rejected_log_sum_sq_probs=torch.tensor([math.log(0.52)]),
    )
    assert metrics.wpo_weights(scores).item() == pytest.approx((0.6 / 0.52) ** 2)


def test_weighting_and_ld_alpha_need_the_sums_hand_built_scores_lack() -> None:
    scores = SequenceScores(torch.zeros(2), torch.zeros(2), **token_statistics(torch.zeros(2), torch.zeros(2)))
    for setting in ({"use_weighting": True}, {"ld_alpha": 0.5}):
        with pytest.raises(ValueError, match=f"{next(iter(setting))} needs per-sequence sums"):
            metrics.build_per_example(torch.arange(2), scores, scores, DPOSettings(**setting))


@settings(max_examples=100, deadline=None)
@given(pair=pair_with_sums(), config=dpo_settings())
def test_ld_alpha_one_is_standard_dpo(
    pair: tuple[list[dict[str, float]], list[dict[str, float]]], config: DPOSettings
) -> None:
    standard = build(*pair, config)
    desensitised = build(*pair, dataclasses.replace(config, ld_alpha=1.0))
    for name in ("policy_chosen_logps", "reference_rejected_logps", "chosen_rewards", "margins", "losses"):
        torch.testing.assert_close(
            getattr(desensitised, name), getattr(standard, name), rtol=1e-5, atol=1e-5, equal_nan=True
        )


@settings(max_examples=100, deadline=None)
@given(pair=pair_with_sums(), config=dpo_settings(), ld_alpha=st.floats(0.0, 1.0))
def test_ld_alpha_leaves_rows_of_equal_completion_lengths_alone(
    pair: tuple[list[dict[str, float]], list[dict[str, float]]], config: DPOSettings, ld_alpha: float
) -> None:
    """With equal scored lengths nothing lies beyond the shared length: every sum is the shared sum."""
    for rows in pair:
        for row in rows:
            row["rejected_scored_tokens"] = row["chosen_scored_tokens"]
            row["chosen_shared_logps"], row["rejected_shared_logps"] = row["chosen_logps"], row["rejected_logps"]
    standard = build(*pair, config)
    desensitised = build(*pair, dataclasses.replace(config, ld_alpha=ld_alpha))
    for field in dataclasses.fields(PerExample):
        torch.testing.assert_close(
            getattr(desensitised, field.name), getattr(standard, field.name), rtol=0, atol=0, equal_nan=True
        )


@settings(max_examples=100, deadline=None)
@given(pair=pair_with_sums(), low=st.floats(0.0, 1.0), high=st.floats(0.0, 1.0))
def test_ld_alpha_moves_each_sum_from_the_shared_part_to_the_whole(
    pair: tuple[list[dict[str, float]], list[dict[str, float]]], low: float, high: float
) -> None:
    """ld_alpha 0 keeps only the shared length; a larger ld_alpha adds more of the (non-positive) tail."""
    low, high = sorted((low, high))
    scores = to_scores(pair[0])
    at_zero = metrics.sequence_logps(scores, 0.0)
    at_low, at_high = metrics.sequence_logps(scores, low), metrics.sequence_logps(scores, high)
    for side, shared in enumerate((scores.chosen_shared_logps, scores.rejected_shared_logps)):
        assert torch.equal(at_zero[side], shared)
        assert bool((at_high[side] <= at_low[side] + 1e-5).all())


@settings(max_examples=60, deadline=None)
@given(pair=pair_with_sums(), ld_alpha=st.floats(0.0, 1.0))
def test_ld_alpha_leaves_the_sft_loss_on_the_plain_log_probs(
    pair: tuple[list[dict[str, float]], list[dict[str, float]]], ld_alpha: float
) -> None:
    """TRL's sft loss reads the per-token log-probs, not LD-DPO's sums."""
    config = DPOSettings(loss_type="sft")
    standard = build(*pair, config).losses
    assert torch.equal(build(*pair, dataclasses.replace(config, ld_alpha=ld_alpha)).losses, standard)


# --------------------------------------------------------------------------------------------
# DPOSettings validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": 0.0}, r"beta must be > 0, got 0\.0"),
        ({"beta": -0.5}, r"beta must be > 0"),
        ({"beta": float("nan")}, r"beta must be > 0"),
        ({"loss_type": ("sigmoid", "dpo")}, r"Unknown loss_type 'dpo'.*sigmoid"),
        ({"loss_type": "aot"}, r"loss_type 'aot' is not supported"),
        ({"loss_type": ("sigmoid", "aot_unpaired")}, r"loss_type 'aot_unpaired' is not supported"),
        ({"loss_type": ()}, r"loss_type is empty"),
        ({"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 0\.5\)"),
        ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0\.5\), got 0\.5"),
        ({"loss_type": "exo_pair"}, r"exo_pair.*label_smoothing > 0"),
        ({"loss_type": ("sigmoid", "sft"), "loss_weights": (1.0,)}, r"loss_weights has 1 values for 2 loss types"),
        ({"loss_type": "sigmoid", "loss_weights": (1.0, 2.0)}, r"loss_weights has 2 values for 1 loss types"),
        ({"truncation_mode": "keep_middle"}, r"Unknown truncation_mode 'keep_middle'.*keep_start"),
        ({"dtype": "float64"}, r"Unknown dtype 'float64'.*bfloat16"),
        ({"discopop_tau": 0.0}, r"discopop_tau must be > 0"),
        ({"max_length": 1}, r"max_length must be at least 2"),
        ({"batch_size": 0}, r"batch_size must be at least 1"),
        ({"ld_alpha": -0.1}, r"ld_alpha must be in \[0, 1\] \(or None for plain DPO\), got -0\.1"),
        ({"ld_alpha": 1.5}, r"ld_alpha must be in \[0, 1\]"),
        ({"ld_alpha": float("nan")}, r"ld_alpha must be in \[0, 1\]"),
        ({"f_divergence_type": "kl"},
         r"Unknown f_divergence_type 'kl'\. Choose from: reverse_kl, forward_kl, js_divergence, alpha_divergence"),
        ({"f_alpha_divergence_coef": float("inf")}, r"f_alpha_divergence_coef must be a finite number, got inf"),
        ({"f_alpha_divergence_coef": float("nan")}, r"f_alpha_divergence_coef must be a finite number"),
        ({"loss_type": ("sigmoid", "nca_pair", "bco_pair"), "f_divergence_type": "js_divergence"},
         r"f_divergence_type 'js_divergence' does not apply to loss_type nca_pair, bco_pair"),
        ({"loss_type": ("sigmoid", "sft"), "use_weighting": True}, r"use_weighting cannot weigh loss_type 'sft'"),
    ],
)
def test_settings_validation_names_the_setting(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(SettingsError, match=match):
        DPOSettings(**kwargs)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ({"ld_alpha": "0.25"}, {"ld_alpha": 0.25}),
        ({"ld_alpha": "None"}, {"ld_alpha": None}),
        ({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": "0.3"},
         {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
        ({"use_weighting": "true"}, {"use_weighting": True}),
        ({"use_weighting": "off"}, {"use_weighting": False}),
    ],
)
def test_settings_read_the_loss_variants_from_text(text: dict[str, str], expected: dict[str, Any]) -> None:
    config = DPOSettings.from_text(text)
    assert {name: getattr(config, name) for name in expected} == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [({"ld_alpha": "half"}, "give a number, or none"), ({"use_weighting": "maybe"}, "give true or false")],
)
def test_settings_name_what_a_loss_variant_text_should_be(text: dict[str, str], match: str) -> None:
    with pytest.raises(SettingsError, match=match):
        DPOSettings.from_text(text)


def test_settings_error_is_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [("sigmoid,sft", ("sigmoid", "sft")), (" ipo , hinge ,sft", ("ipo", "hinge", "sft")), ("sigmoid", ("sigmoid",))],
)
def test_settings_split_comma_separated_loss_type(loss_type: str, expected: tuple[str, ...]) -> None:
    config = DPOSettings(loss_type=loss_type)
    assert config.loss_type == expected
    assert config.weights == (1.0,) * len(expected)


def test_settings_normalise_sequences() -> None:
    config = DPOSettings(loss_type=["sigmoid", "sft"], loss_weights=[1, 0.5])  # type: ignore[arg-type]
    assert config.loss_type == ("sigmoid", "sft")
    assert config.loss_weights == (1.0, 0.5)
    assert config.weights == (1.0, 0.5)
    assert config.to_dict()["loss_type"] == ["sigmoid", "sft"]
    assert DPOSettings(loss_type="exo_pair", label_smoothing=1e-3).loss_type == ("exo_pair",)


def test_settings_defaults_follow_trl_dpo_config() -> None:
    import dataclasses

    from trl import DPOConfig

    # read the declared defaults: instantiating DPOConfig on a CPU-only machine fails on its bf16 default
    trl_defaults = {}
    for f in dataclasses.fields(DPOConfig):
        if f.default is not dataclasses.MISSING:
            trl_defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            trl_defaults[f.name] = f.default_factory()
    ours = DPOSettings()
    for name in TRAINING_SETTING_FIELDS:
        if name != "loss_type":
            assert getattr(ours, name) == trl_defaults[name], name
    assert list(ours.loss_type) == list(trl_defaults["loss_type"])
