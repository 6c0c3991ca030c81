"""Mixture-of-experts routing: the router statistics TRL's load-balancing `aux_loss` is made of.

TRL 1.16 asks a MoE policy (a model whose text config has `output_router_logits`)
for its router logits and adds `router_aux_loss_coef * aux_loss` to the DPO loss,
`aux_loss` being transformers' Mixtral `load_balancing_loss_func` over its batch:
every real token of the chosen and the rejected sequences, prompt tokens included,
in every MoE layer. Here each row keeps the sums that function is made of
(`routing_sums`), and `metrics.router_aux_loss` applies it once to their totals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .metrics import router_aux_loss
from .results import ROUTER_FIELDS, SequenceScores
from .settings import SettingsError

if TYPE_CHECKING:
    from .checkpoints import Checkpoint
    from .loading import LoadOptions


@dataclass(frozen=True)
class RouterSetup:
    """What TRL passes `load_balancing_loss_func` about the model: its experts, and how many each token uses."""

    num_experts: int
    top_k: int


def router_setup(config: Any) -> RouterSetup | None:
    """The routing of a model with this config, or None when TRL computes no aux loss for it (no
    `output_router_logits` in its text config)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not hasattr(text_config, "output_router_logits"):
        return None
    num_experts = getattr(text_config, "num_experts", None) or text_config.num_local_experts
    return RouterSetup(num_experts=num_experts, top_k=text_config.num_experts_per_tok)


def router_request(setup: RouterSetup | None) -> dict[str, bool]:
    """The backbone keyword that makes a MoE model return its router logits; nothing for other models."""
    return {"output_router_logits": True} if setup is not None else {}


def router_totals(rows: int, setup: RouterSetup | None) -> dict[str, torch.Tensor]:
    """Zeroed `ROUTER_FIELDS` for `rows` rows of a model with router logits; none for other models."""
    if setup is None:
        return {}
    counts = torch.zeros(rows, setup.num_experts, dtype=torch.int64)
    probs = torch.zeros(rows, setup.num_experts, dtype=torch.float64)
    return dict(zip(ROUTER_FIELDS, (counts, probs, torch.zeros(rows, dtype=torch.int64))))


def routing_sums(
    router_logits: Sequence[torch.Tensor], attention: torch.Tensor, setup: RouterSetup
) -> dict[str, torch.Tensor]:
    """Per sequence of a batch, its `ROUTER_FIELDS`: top-k hits and router probabilities per expert summed over
    the sequence's real tokens (`attention`) in every MoE layer, and the number of (token, layer) pairs summed.

    Each layer's probabilities and top-k experts are computed as `load_balancing_loss_func` computes them.

    Args:
        router_logits: one `(sequences * width, num_experts)` tensor per MoE layer, as the backbone returns them.
        attention: the batch's `(sequences, width)` attention mask.
        setup: the model's routing.
    """
    sequences, width = attention.shape
    device = router_logits[0].device
    real = attention.to(device).reshape(-1, 1)
    # Each token's counter slot of expert e is `sequence * num_experts + e`: no tokens x top_k x experts tensor.
    owner_slot = torch.arange(sequences, device=device).repeat_interleave(width).unsqueeze(1) * setup.num_experts
    counts = torch.zeros(sequences, setup.num_experts, dtype=torch.int64, device=device)
    probs = torch.zeros(sequences, setup.num_experts, dtype=torch.float64, device=device)
    for layer_logits in router_logits:
        routing = F.softmax(layer_logits.to(device), dim=-1)
        _, selected = torch.topk(routing, setup.top_k, dim=-1)
        counts.view(-1).scatter_add_(0, (owner_slot + selected).flatten(), real.expand_as(selected).flatten())
        probs += (routing.double() * real).view(sequences, width, -1).sum(dim=1)
    tokens = attention.sum(dim=1).to(device) * len(router_logits)
    return dict(zip(ROUTER_FIELDS, (counts, probs, tokens)))


@dataclass(frozen=True)
class RouterAuxLoss:
    """A MoE policy's load-balancing loss over the eval set, and the weight TRL adds it to the loss with."""

    value: float
    coef: float

    @property
    def term(self) -> float:
        """What TRL adds to the DPO loss."""
        return self.coef * self.value


def enabled_aux_loss(
    policy: SequenceScores, setting: float | None, checkpoint: Checkpoint, options: LoadOptions
) -> RouterAuxLoss | None:
    """The policy's aux loss when TRL enables it (router logits and a nonzero weight), else None.

    Args:
        policy: the policy's scores; they hold router sums only for a model that returns router logits.
        setting: the `router_aux_loss_coef` setting; None means the coefficient the policy's config declares
            (0.0 when it declares none).
        checkpoint, options: where the policy's config is read from, and how.
    """
    value = router_aux_loss(policy)
    if value is None:
        return None
    coef = setting
    if coef is None:
        coef = float(getattr(_policy_text_config(checkpoint, options), "router_aux_loss_coef", 0.0))
    return RouterAuxLoss(value, coef) if coef != 0.0 else None


def refuse_coef_without_router(setting: float | None, checkpoint: Checkpoint, options: LoadOptions) -> None:
    """Refuse a nonzero `router_aux_loss_coef` for a policy without router logits before it is scored, as TRL
    refuses it.

    Raises:
        SettingsError: the setting is nonzero and the policy's config has no `output_router_logits`.
    """
    if setting and router_setup(_policy_text_config(checkpoint, options)) is None:
        raise SettingsError(
            "router_aux_loss_coef",
            f"router_aux_loss_coef is {setting}, but {checkpoint.path} is not a mixture-of-experts model that returns "
            "router logits, so there is no load-balancing loss to weigh (TRL refuses this too). Leave it unset.",
        )


def _policy_text_config(checkpoint: Checkpoint, options: LoadOptions) -> Any:
    """The text config of the checkpoint's model (an adapter's: its base's), read without loading weights."""
    from transformers import AutoConfig

    from .checkpoints import locate

    source = locate(checkpoint.base_model or "", checkpoint.path) if checkpoint.is_adapter else str(checkpoint.path)
    return AutoConfig.from_pretrained(source, trust_remote_code=options.trust_remote_code).get_text_config()
