"""DPO math on per-example tensors: rewards, margins, accuracies, losses, aggregates.

Pure functions, no models or files. Formulas follow TRL 1.16
`DPOTrainer._compute_loss`; the difference is where the averaging happens: TRL
averages per batch and then averages the batch means, we average once over
the whole eval set, so the numbers do not depend on batch size or order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .metric_table import METRIC_NAMES, METRICS
from .results import PerExample, SequenceScores
from .settings import DPOSettings


def sequence_logps(scores: SequenceScores, ld_alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A model's chosen and rejected completion log-probs as TRL sums them.

    Without `ld_alpha`, the sum over all completion tokens. With it (LD-DPO),
    the tokens within the shorter completion's length count fully and those
    beyond it `ld_alpha` times.
    """
    if ld_alpha is None:
        return scores.chosen_logps, scores.rejected_logps
    chosen_shared = _computed(scores.chosen_shared_logps, "ld_alpha")
    rejected_shared = _computed(scores.rejected_shared_logps, "ld_alpha")
    return (
        chosen_shared + ld_alpha * (scores.chosen_logps - chosen_shared),
        rejected_shared + ld_alpha * (scores.rejected_logps - rejected_shared),
    )


def wpo_weights(policy: SequenceScores) -> torch.Tensor:
    """TRL's WPO weight of each pair: for each completion exp(mean over its scored tokens of
    log p(token) - log sum_v p_v^2), the chosen's times the rejected's."""
    chosen_sq = _computed(policy.chosen_log_sum_sq_probs, "use_weighting")
    rejected_sq = _computed(policy.rejected_log_sum_sq_probs, "use_weighting")
    chosen = _wpo_weight(policy.chosen_logps, chosen_sq, policy.chosen_scored_tokens)
    rejected = _wpo_weight(policy.rejected_logps, rejected_sq, policy.rejected_scored_tokens)
    return chosen * rejected


def _wpo_weight(logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, scored_tokens: torch.Tensor) -> torch.Tensor:
    return torch.exp((logps - log_sum_sq_probs) / scored_tokens.clamp(min=1))


def _computed(values: torch.Tensor | None, setting: str) -> torch.Tensor:
    if values is None:
        raise ValueError(
            f"{setting} needs per-sequence sums these SequenceScores do not have (hand-built scores); "
            "score the model with pytest_dpo.scoring.score."
        )
    return values


def f_divergence_scores(logratios: torch.Tensor, f_divergence_type: str, alpha_coef: float = 0.5) -> torch.Tensor:
    """TRL's f-DPO scores f'(policy / reference) of the log-ratios, which replace them in the losses built on
    the chosen-rejected reward difference (reverse_kl: the log-ratios themselves)."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha_coef - 1.0) < 1e-6:  # TRL's limit case f'(t) -> log t: reverse_kl
            return logratios
        exponent = (alpha_coef - 1.0) * logratios
        # TRL clamps so that exp() stays representable after the cast back to the log-ratios' dtype.
        clamp_max = 11.0 if exponent.dtype == torch.float16 else 80.0
        return (torch.exp(exponent.float().clamp(max=clamp_max)) - 1.0).to(exponent.dtype) * (1.0 / (alpha_coef - 1.0))
    raise ValueError(f"Unknown f_divergence_type '{f_divergence_type}'.")


def loss_per_example(
    loss_type: str,
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    chosen_scored_tokens: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> torch.Tensor:
    """One TRL loss type, one value per example.

    `chosen_tokens`/`rejected_tokens` are the completion lengths TRL's length
    normalisation uses (ipo, sigmoid_norm). The losses built on the
    chosen-rejected reward difference (sigmoid, hinge, ipo, exo_pair, robust,
    discopop, sigmoid_norm) take the log-ratios through `f_divergence_scores`;
    the others take them as they are. For `sft`, TRL's loss is the
    token-weighted mean of the chosen completions' negative log-probs
    (`policy_chosen_logps`, plain sums); each example gets its token-weighted
    share, so the mean over examples is that loss exactly.
    """
    chosen_scores = f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    logits = beta * (chosen_scores - rejected_scores)
    chosen_rewards = beta * chosen_logratios
    rejected_rewards = beta * rejected_logratios
    if loss_type == "sigmoid":
        return -F.logsigmoid(logits)
    if loss_type == "hinge":
        return torch.relu(1 - logits)
    if loss_type in ("ipo", "sigmoid_norm"):
        chosen_avg = chosen_scores / chosen_tokens.clamp(min=1.0)
        rejected_avg = rejected_scores / rejected_tokens.clamp(min=1.0)
        avg_delta = chosen_avg - rejected_avg
        if loss_type == "ipo":
            return (avg_delta - 1 / (2 * beta)) ** 2
        return -F.logsigmoid(beta * avg_delta)
    if loss_type == "exo_pair":
        epsilon = torch.tensor(label_smoothing, dtype=logits.dtype)
        qw, log_qw = torch.sigmoid(logits), F.logsigmoid(logits)
        ql, log_ql = torch.sigmoid(-logits), F.logsigmoid(-logits)
        return qw * (log_qw - torch.log1p(-epsilon)) + ql * (log_ql - torch.log(epsilon))
    if loss_type == "nca_pair":
        return -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(logits)
        flipped = -label_smoothing * F.logsigmoid(-logits)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    if loss_type == "bco_pair":
        return -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(chosen_rewards)) + torch.sigmoid(rejected_rewards)
    if loss_type == "apo_down":
        return torch.sigmoid(chosen_rewards) + (1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))
    if loss_type == "discopop":
        modulation = torch.sigmoid(logits / discopop_tau)
        return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
    if loss_type == "sft":
        share = len(policy_chosen_logps) / chosen_scored_tokens.sum().clamp(min=1)
        return -policy_chosen_logps * share
    raise ValueError(f"Unknown loss type '{loss_type}'.")


def combined_losses(
    policy: SequenceScores,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    settings: DPOSettings,
) -> torch.Tensor:
    """The weighted sum of `settings.loss_type`'s losses, one value per example, times the pair's WPO weight
    with `use_weighting`.

    The reference log-probs are summed as TRL sums them (`sequence_logps` with `settings.ld_alpha`).
    """
    policy_chosen_logps, policy_rejected_logps = sequence_logps(policy, settings.ld_alpha)
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    total = torch.zeros_like(chosen_logratios)
    for loss_type, weight in zip(settings.loss_type, settings.weights, strict=True):
        total = total + weight * loss_per_example(
            loss_type,
            chosen_logratios,
            rejected_logratios,
            policy.chosen_tokens.to(chosen_logratios.dtype),
            policy.rejected_tokens.to(chosen_logratios.dtype),
            # TRL's sft loss reads the per-token log-probs, never the LD-DPO sums.
            policy.chosen_logps,
            policy.chosen_scored_tokens.to(chosen_logratios.dtype),
            beta=settings.beta,
            label_smoothing=settings.label_smoothing,
            discopop_tau=settings.discopop_tau,
            f_divergence_type=settings.f_divergence_type,
            f_alpha_divergence_coef=settings.f_alpha_divergence_coef,
        )
    return total * wpo_weights(policy) if settings.use_weighting else total


def build_per_example(
    rows: torch.Tensor,
    policy: SequenceScores,
    reference: SequenceScores,
    settings: DPOSettings,
    aux_loss_term: float = 0.0,
) -> PerExample:
    """Combine the policy's and the reference's scores into the per-example arrays.

    The log-probs (and so the rewards) are TRL's: with `settings.ld_alpha`, the LD-DPO sums of both models.
    `aux_loss_term` (a MoE policy's `router_aux_loss_coef * aux_loss`) is added to every example's loss, as
    TRL adds it to its batch's mean loss, so that confidence intervals of `loss` center on TRL's value.
    """
    policy_chosen_logps, policy_rejected_logps = sequence_logps(policy, settings.ld_alpha)
    reference_chosen_logps, reference_rejected_logps = sequence_logps(reference, settings.ld_alpha)
    chosen_rewards = settings.beta * (policy_chosen_logps - reference_chosen_logps)
    rejected_rewards = settings.beta * (policy_rejected_logps - reference_rejected_logps)
    return PerExample(
        rows=rows,
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=chosen_rewards - rejected_rewards,
        losses=combined_losses(policy, reference_chosen_logps, reference_rejected_logps, settings) + aux_loss_term,
        **policy.token_statistics(),
    )


def _mean(values: torch.Tensor) -> float:
    return values.double().mean().item() if len(values) else math.nan


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    total = denominator.double().sum().item()
    return numerator.double().sum().item() / total if total > 0 else 0.0


def router_aux_loss(scores: SequenceScores) -> float | None:
    """TRL's MoE load-balancing `aux_loss` with the whole eval set as its batch; None without router sums.

    transformers' `load_balancing_loss_func` takes two means over its batch, so the loss depends on which rows
    share one: it is applied here once to the sums over every row, which is TRL's value when its eval batch is
    the whole set.
    """
    if scores.router_expert_counts is None or scores.router_prob_sums is None or scores.router_tokens is None:
        return None
    return load_balancing_loss(scores.router_expert_counts, scores.router_prob_sums, scores.router_tokens)


def load_balancing_loss(expert_counts: torch.Tensor, prob_sums: torch.Tensor, tokens: torch.Tensor) -> float:
    """transformers' `load_balancing_loss_func` from router sums: `num_experts * sum_e f_e * P_e`.

    `f_e` is expert `e`'s top-k hits and `P_e` its router probabilities, each summed over all rows of
    `expert_counts` and `prob_sums` (rows x experts) and divided by the number of (real token, MoE layer)
    pairs they were summed over, the sum of `tokens`.
    """
    pairs = tokens.double().sum()
    hit_shares = expert_counts.double().sum(dim=0) / pairs
    mean_probs = prob_sums.double().sum(dim=0) / pairs
    return (expert_counts.shape[-1] * (hit_shares * mean_probs).sum()).item()


def aggregate(per_example: PerExample, aux_loss: float | None = None) -> dict[str, float]:
    """TRL's eval metrics (names without the `eval_` prefix), computed over all examples at once, in
    `metric_table.METRIC_NAMES` order.

    Example means of the per-example arrays the metric table names (rewards,
    margins, log-probs and the loss) and the share of examples whose chosen
    reward beats the rejected one (accuracy); token-weighted means for the
    logits, the entropy (chosen and rejected tokens) and the token accuracy
    (chosen tokens), as TRL weighs them. `aux_loss` (`router_aux_loss`), given
    for a MoE policy whose load-balancing loss is enabled, is reported as TRL
    logs it; its weighted term is already part of each example's loss
    (`build_per_example`).
    """
    p = per_example
    values = {metric.name: _mean(getattr(p, metric.field)) for metric in METRICS if metric.field is not None}
    values |= {
        "rewards/accuracies": _mean((p.chosen_rewards > p.rejected_rewards).double()),
        "logits/chosen": _ratio(p.chosen_logits_sum, p.chosen_scored_tokens),
        "logits/rejected": _ratio(p.rejected_logits_sum, p.rejected_scored_tokens),
        "entropy": _ratio(
            p.chosen_entropy_sum + p.rejected_entropy_sum, p.chosen_scored_tokens + p.rejected_scored_tokens
        ),
        "mean_token_accuracy": _ratio(p.chosen_top1, p.chosen_scored_tokens),
    }
    if aux_loss is not None:
        values["aux_loss"] = aux_loss
    return {name: values[name] for name in METRIC_NAMES if name in values}
