"""Forward passes: per-sequence sums of completion log-probs, logits, entropy and top-1 hits.

The LM head runs only on completion positions, a bounded number of tokens at
a time, and each chunk of logits is reduced at once (what TRL 1.16's fused LM
head does), so the full `batch x length x vocab` logits never exist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .evalset import TokenizedEvalSet, TokenizedRow
from .results import SequenceScores

# Elements of fp32 logits alive at once in the chunked LM head (64 MiB).
LOGITS_BUDGET = 1 << 24


@dataclass(frozen=True)
class LogitTransform:
    """The per-family scaling transformers and TRL apply to the LM head's output.

    `logits = softcap * tanh(logit_scale * raw / softcap)` when the model has a
    final soft cap, else `logit_scale * raw`.
    """

    logit_scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def from_config(cls, config: object) -> LogitTransform:
        """Read the scaling from a model config the way TRL 1.16's `add_fused_lm_head` does."""
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        scale = getattr(text_config, "logit_scale", None)
        if scale is None:
            scale = getattr(text_config, "output_multiplier", None)
        if scale is None:
            scale = getattr(text_config, "lm_head_multiplier", None)
        logits_scaling = getattr(text_config, "logits_scaling", None)
        if scale is None and logits_scaling is not None:
            # Granite and MiniCPM3 divide by it; HyperCLOVA X multiplies.
            scale = logits_scaling if getattr(text_config, "model_type", "") == "hyperclovax" else 1 / logits_scaling
        return cls(
            logit_scale=1.0 if scale is None else float(scale),
            softcap=getattr(text_config, "final_logit_softcapping", None),
        )

    def __call__(self, raw_logits: torch.Tensor) -> torch.Tensor:
        logits = raw_logits * self.logit_scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


def sequence_pair(row: TokenizedRow, max_length: int | None, truncation_mode: str) -> tuple[list[int], list[int], list[int], list[int]]:
    """Token ids and completion masks of a row's chosen and rejected sequences, truncated as TRL's collator does."""
    chosen = row.prompt_ids + row.chosen_ids
    rejected = row.prompt_ids + row.rejected_ids
    chosen_mask = [0] * len(row.prompt_ids) + [1] * len(row.chosen_ids)
    rejected_mask = [0] * len(row.prompt_ids) + [1] * len(row.rejected_ids)
    if max_length is not None:
        window = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
        chosen, rejected, chosen_mask, rejected_mask = (
            chosen[window],
            rejected[window],
            chosen_mask[window],
            rejected_mask[window],
        )
    return chosen, chosen_mask, rejected, rejected_mask


def score(
    model: torch.nn.Module,
    tokenized: TokenizedEvalSet,
    *,
    batch_size: int,
    max_length: int | None,
    truncation_mode: str,
    on_batch: Callable[[int], None] | None = None,
) -> SequenceScores:
    """Score every row's chosen and rejected completion with `model`.

    Rows are sorted by length so batches carry little padding; a row's chosen
    and rejected sequences share a batch. Results come back in the order of
    `tokenized.rows` and do not depend on `batch_size` beyond float rounding.

    Args:
        model: a transformers causal LM, or a PEFT model wrapping one (scored
            with whichever adapter is active).
        tokenized: the eval set as `tokenize_eval_set` returns it.
        batch_size: rows per forward pass.
        max_length, truncation_mode: TRL's truncation of prompt + completion.
        on_batch: called with the number of rows after each batch (progress).
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    head = causal_lm.get_output_embeddings()
    transform = LogitTransform.from_config(causal_lm.config)
    device = head.weight.device
    pairs = [sequence_pair(row, max_length, truncation_mode) for row in tokenized.rows]
    n = len(pairs)
    out = {name: torch.zeros(n, dtype=torch.float32) for name in _SUMS}
    counts = {name: torch.zeros(n, dtype=torch.int64) for name in _COUNTS}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch_rows in _batches_by_length(pairs, batch_size):
                ids, attention, completion = _collate([pairs[i] for i in batch_rows], device)
                hidden = backbone(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
                sums = _completion_sums(hidden[:, :-1], ids[:, 1:], completion[:, 1:].bool(), head, transform)
                index = torch.tensor(batch_rows)
                half = len(batch_rows)
                for side, part in (("chosen", slice(None, half)), ("rejected", slice(half, None))):
                    out[f"{side}_logps"][index] = sums["logps"][part].cpu()
                    out[f"{side}_logits_sum"][index] = sums["logits"][part].cpu()
                    out[f"{side}_entropy_sum"][index] = sums["entropy"][part].cpu()
                    counts[f"{side}_tokens"][index] = completion[part].sum(dim=1).cpu()
                    counts[f"{side}_scored_tokens"][index] = completion[part, 1:].sum(dim=1).cpu()
                counts["chosen_top1"][index] = sums["top1"][:half].cpu()
                if on_batch is not None:
                    on_batch(half)
    finally:
        model.train(was_training)
    return SequenceScores(**out, **counts)


_SUMS = (
    "chosen_logps",
    "rejected_logps",
    "chosen_logits_sum",
    "rejected_logits_sum",
    "chosen_entropy_sum",
    "rejected_entropy_sum",
)
_COUNTS = ("chosen_tokens", "rejected_tokens", "chosen_scored_tokens", "rejected_scored_tokens", "chosen_top1")


def _batches_by_length(pairs: list[tuple[list[int], ...]], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(pairs)), key=lambda i: -max(len(pairs[i][0]), len(pairs[i][2])))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _collate(pairs: list[tuple[list[int], ...]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and completion mask: all chosen sequences, then all rejected."""
    sequences = [pair[0] for pair in pairs] + [pair[2] for pair in pairs]
    masks = [pair[1] for pair in pairs] + [pair[3] for pair in pairs]
    width = max(len(sequence) for sequence in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for i, (sequence, mask) in enumerate(zip(sequences, masks)):
        ids[i, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention[i, : len(sequence)] = 1
        completion[i, : len(mask)] = torch.tensor(mask, dtype=torch.long)
    return ids.to(device), attention.to(device), completion.to(device)


def _completion_sums(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    head: torch.nn.Module,
    transform: LogitTransform,
) -> dict[str, torch.Tensor]:
    """Per-sequence sums over completion tokens, with the LM head applied in bounded chunks."""
    sequences = hidden.shape[0]
    hidden = hidden.to(head.weight.device)
    positions = mask.nonzero(as_tuple=True)
    token_hidden = hidden[positions]
    targets = labels[positions]
    owner = positions[0]
    vocab = head.weight.shape[0]
    # Two chunk x vocab fp32 tensors are alive at once (logits, softmax): at most LOGITS_BUDGET elements, and
    # at most 1/8 of the batch's full (batch x length x vocab) logits.
    chunk = max(1, min(LOGITS_BUDGET // (2 * vocab), hidden.shape[0] * hidden.shape[1] // 16))
    sums = {name: torch.zeros(sequences, dtype=torch.float32, device=hidden.device) for name in ("logps", "logits", "entropy")}
    top1 = torch.zeros(sequences, dtype=torch.int64, device=hidden.device)
    for start in range(0, len(targets), chunk):
        part = slice(start, start + chunk)
        logits = transform(head(token_hidden[part]).float())
        log_norm = torch.logsumexp(logits, dim=-1)
        target_logits = logits.gather(-1, targets[part].unsqueeze(-1)).squeeze(-1)
        entropy = log_norm - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
        sums["logps"].index_add_(0, owner[part], target_logits - log_norm)
        sums["logits"].index_add_(0, owner[part], logits.sum(dim=-1) / vocab)
        sums["entropy"].index_add_(0, owner[part], entropy)
        top1.index_add_(0, owner[part], (logits.argmax(dim=-1) == targets[part]).long())
    return {**sums, "top1": top1}
