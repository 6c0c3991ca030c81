"""Hand-built `TokenStatistics` fields for tests that build `SequenceScores` directly."""

from __future__ import annotations

import torch


def token_statistics(counts: torch.Tensor, sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every token count (chosen/rejected, all and scored) `counts`; every logit, entropy and top-1 sum `sums`."""
    return {
        "chosen_tokens": counts,
        "rejected_tokens": counts,
        "chosen_scored_tokens": counts,
        "rejected_scored_tokens": counts,
        "chosen_logits_sum": sums,
        "rejected_logits_sum": sums,
        "chosen_entropy_sum": sums,
        "rejected_entropy_sum": sums,
        "chosen_top1": sums,
    }
