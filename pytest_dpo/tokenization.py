"""Tokenizing an eval set exactly as TRL 1.16 `DPOTrainer._prepare_dataset` does.

Owns `TokenizedRow`, `TokenizedEvalSet`, `check_tokenizer` (a tokenizer that
cannot tokenize the set as TRL does is refused), `tokenize_eval_set`,
`common_prefix_length`, and the refusal, naming the row, of a chat template
that fails on a row.

Must not read or validate eval sets (that is `evalset`; it takes a loaded
`EvalSet`) and must not score; never imports trl.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .evalset import EvalSet, EvalSetError, extract_prompt


@dataclass(frozen=True)
class TokenizedRow:
    """One eval-set row as TRL tokenizes it: the prompt and each completion, split at their common prefix."""

    row: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def length(self, max_length: int | None = None) -> int:
        """Tokens of the row's longer sequence (prompt + completion), at most `max_length`."""
        full = len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))
        return full if max_length is None else min(full, max_length)


@dataclass(frozen=True)
class TokenizedEvalSet:
    """The rows to score (in eval-set order) and the rows TRL drops."""

    rows: list[TokenizedRow]
    dropped_rows: list[int]


def common_prefix_length(ids: Sequence[int], other_ids: Sequence[int]) -> int:
    """Number of leading tokens two id lists share."""
    length = 0
    for token, other_token in zip(ids, other_ids):
        if token != other_token:
            break
        length += 1
    return length


def check_tokenizer(tokenizer: Any, eval_set: EvalSet, tokenizer_source: str) -> None:
    """Refuse a tokenizer that cannot tokenize this eval set the way TRL does."""
    if not eval_set.conversational and tokenizer.eos_token is None:
        raise EvalSetError(
            f"The tokenizer from {tokenizer_source} has no EOS token, but TRL appends it to every standard-format "
            "completion. Set `eos_token` in its tokenizer_config.json (the token the model ends answers with)."
        )
    if eval_set.conversational and not getattr(tokenizer, "chat_template", None):
        raise EvalSetError(
            f"{eval_set.path}: conversational rows need a chat template, but the tokenizer from {tokenizer_source} "
            "has none. Save the tokenizer with its chat template, or convert the rows to standard format."
        )


def tokenize_eval_set(
    eval_set: EvalSet, tokenizer: Any, max_length: int | None, truncation_mode: str
) -> TokenizedEvalSet:
    """Tokenize every row exactly as TRL 1.16 `DPOTrainer._prepare_dataset` does.

    Steps: extract implicit prompts; append the EOS string to standard-format
    completions that do not already end with it; tokenize prompt,
    prompt+chosen and prompt+rejected (through the chat template for
    conversations, with the row's `tools` and `chat_template_kwargs`); split at the common prefix of the tokenized prompt and
    both full sequences; drop rows whose prompt alone fills `max_length`
    (with `keep_start` truncation). Truncation of the remaining sequences
    happens when they are batched, as in TRL's collator.
    """
    scored, dropped = [], []
    for index, row in enumerate(eval_set.rows):
        prompt_ids, chosen_ids, rejected_ids = _tokenized_or_refused(eval_set, index, tokenizer)
        if max_length is not None and truncation_mode == "keep_start" and len(prompt_ids) >= max_length:
            dropped.append(index)
            continue
        scored.append(TokenizedRow(index, prompt_ids, chosen_ids, rejected_ids))
    return TokenizedEvalSet(rows=scored, dropped_rows=dropped)


def _tokenized_or_refused(eval_set: EvalSet, index: int, tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
    """The row's tokens; a chat template that fails on the row (as TRL's would) is an error naming the row."""
    try:
        return _tokenize_row(eval_set.rows[index], tokenizer, eval_set.conversational)
    except Exception as error:  # jinja2 raises TemplateError, templates raise whatever their code meets
        if not eval_set.conversational:
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EvalSetError(
            f"{eval_set.locations[index]}: the tokenizer's chat template fails on this row ({reason}), as it "
            "would in TRL. Fix the row (a role order, system message or tools the template does not accept), "
            "remove it, or use the tokenizer the model was trained with."
        ) from None


def _tokenize_row(row: dict[str, Any], tokenizer: Any, conversational: bool) -> tuple[list[int], list[int], list[int]]:
    if "prompt" in row:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    else:
        prompt, chosen, rejected = extract_prompt(row["chosen"], row["rejected"])
    if conversational:
        template_kwargs = {"tools": row.get("tools"), **row.get("chat_template_kwargs", {})}
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True, **template_kwargs)
        prompt_chosen_ids = _chat_ids(tokenizer, prompt + chosen, **template_kwargs)
        prompt_rejected_ids = _chat_ids(tokenizer, prompt + rejected, **template_kwargs)
    else:
        eos = tokenizer.eos_token
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = tokenizer(text=prompt)["input_ids"]
        prompt_chosen_ids = tokenizer(text=prompt + chosen)["input_ids"]
        prompt_rejected_ids = tokenizer(text=prompt + rejected)["input_ids"]
    prompt_length = min(
        common_prefix_length(prompt_ids, prompt_chosen_ids),
        common_prefix_length(prompt_ids, prompt_rejected_ids),
    )
    return (
        list(prompt_ids[:prompt_length]),
        list(prompt_chosen_ids[prompt_length:]),
        list(prompt_rejected_ids[prompt_length:]),
    )


def _chat_ids(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]
