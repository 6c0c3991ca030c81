"""One sequence per row: its prompt, then its chosen and its rejected completion, under a tree-shaped mask.

The row `prompt + chosen + rejected` runs through the backbone once. Position ids restart the rejected
completion where the chosen one started, and the attention mask lets each completion see the prompt and
itself, never the other completion, so every token's hidden state is what it would be in its own sequence
`prompt + completion`: each distinct token is computed once, and a batch is padded only to its longest
row (rows are batched by this length). This module builds those tensors; `scoring` runs them.

The mask is 4D, which transformers passes to the attention as given: boolean (True: attend) for `sdpa`,
additive (0 or the dtype's minimum) for `eager`. A padding position attends to itself, so no attention
row is empty (an empty one would give NaN, and a NaN value reaches every query through a zero weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tokenization import TokenizedRow

# Where a token sits in its row's packed sequence.
PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, 3
# The attention implementations that take a custom 4D mask as given, and the mask each takes.
MASK_KINDS = ("sdpa", "eager")


def packed_length(row: TokenizedRow) -> int:
    """The tokens of a row's packed sequence: its prompt and both completions, once each."""
    return len(row.prompt_ids) + len(row.chosen_ids) + len(row.rejected_ids)


@dataclass(frozen=True)
class PackedBatch:
    """A batch of packed rows.

    Attributes:
        input_ids, position_ids (`torch.Tensor`): (rows, length), right-padded.
        segments (`torch.Tensor`): (rows, length), each token's `PROMPT`, `CHOSEN`, `REJECTED` or `PADDING`.
        predicting (`torch.Tensor`): (2 rows, completion length) positions in the packed row whose hidden
            state predicts each completion token, sequences interleaved (row 0 chosen, row 0 rejected, ...):
            the prompt's last token for a completion's first token, else the completion's previous token.
        completion_ids, completion_attention (`torch.Tensor`): (2 rows, completion length), the completions
            right-padded in the same interleaved order, and which of their positions are real.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    predicting: torch.Tensor
    completion_ids: torch.Tensor
    completion_attention: torch.Tensor

    def attention_mask(self, implementation: str, dtype: torch.dtype) -> torch.Tensor:
        """The (rows, 1, length, length) mask in the form `implementation` (`sdpa` or `eager`) takes."""
        segments = self.segments
        length = segments.shape[1]
        order = torch.arange(length, device=segments.device)
        causal = order.unsqueeze(1) >= order.unsqueeze(0)
        query, key = segments.unsqueeze(2), segments.unsqueeze(1)
        allowed = causal & ((key == query) | (key == PROMPT)) & (query != PADDING) & (key != PADDING)
        allowed |= torch.eye(length, dtype=torch.bool, device=segments.device) & (query == PADDING)
        allowed = allowed.unsqueeze(1)
        if implementation == "sdpa":
            return allowed
        additive = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
        return additive.masked_fill_(~allowed, torch.finfo(dtype).min)


def pack(rows: list[TokenizedRow], device: torch.device | str) -> PackedBatch:
    """The packed tensors of rows that each have a prompt and are not truncated."""
    length = max(packed_length(row) for row in rows)
    width = max(max(len(row.chosen_ids), len(row.rejected_ids)) for row in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    position_ids = torch.zeros(len(rows), length, dtype=torch.long)
    segments = torch.full((len(rows), length), PADDING, dtype=torch.long)
    predicting = torch.zeros(2 * len(rows), width, dtype=torch.long)
    completion_ids = torch.zeros(2 * len(rows), width, dtype=torch.long)
    completion_attention = torch.zeros(2 * len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        prompt, chosen, rejected = len(row.prompt_ids), len(row.chosen_ids), len(row.rejected_ids)
        input_ids[index, : prompt + chosen + rejected] = torch.tensor(row.prompt_ids + row.chosen_ids + row.rejected_ids)
        position_ids[index, : prompt + chosen] = torch.arange(prompt + chosen)
        position_ids[index, prompt + chosen : prompt + chosen + rejected] = torch.arange(prompt, prompt + rejected)
        segments[index, :prompt] = PROMPT
        segments[index, prompt : prompt + chosen] = CHOSEN
        segments[index, prompt + chosen : prompt + chosen + rejected] = REJECTED
        for side, (start, ids) in enumerate(((prompt, row.chosen_ids), (prompt + chosen, row.rejected_ids))):
            sequence = 2 * index + side
            # The first completion token is predicted from the prompt's last position, the others from their own.
            predicting[sequence, : len(ids)] = torch.tensor([prompt - 1, *range(start, start + len(ids) - 1)])
            completion_ids[sequence, : len(ids)] = torch.tensor(ids)
            completion_attention[sequence, : len(ids)] = 1
    return PackedBatch(
        *(tensor.to(device) for tensor in (input_ids, position_ids, segments, predicting, completion_ids, completion_attention))
    )
