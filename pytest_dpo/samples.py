"""Sample completions: what the policy and the reference write for the first eval prompts, side by side.

TRL's `generate_during_eval` logs such a table to W&B, Comet or MLflow; here it
goes into the report (`dpo_report.json`, `dpo_summary.md`). Prompts are the
eval set's own prompt token ids, exactly as scoring sees them (chat template,
BOS), so a conversational prompt ends with the assistant turn's header.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .spelling import option

if TYPE_CHECKING:
    from .results import Sample

DEFAULT_MAX_NEW_TOKENS = 64


class GenerationError(ValueError):
    """A generation setting cannot be used; the message names the option and the fix."""


@dataclass(frozen=True)
class GenerationSettings:
    """How completions are generated: transformers' `generate()` keyword arguments, greedy by default.

    Attributes:
        options (`dict`): `GenerationConfig` fields, e.g. `{"max_new_tokens": 64, "do_sample": True, "top_p": 0.9}`.
        seed (`int`): seeds torch before each prompt's generation, so sampling is repeatable.
    """

    options: dict[str, Any] = field(default_factory=lambda: {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "do_sample": False})
    seed: int = 0

    @classmethod
    def from_lines(cls, lines: Sequence[str], source: str) -> GenerationSettings:
        """Settings from `key=value` lines (`max_new_tokens=32`, `do_sample=true`, `temperature=0.7`, `seed=1`).

        Values are read as JSON (numbers, `true`/`false`, `null`), otherwise as text.
        Raises `GenerationError` naming `source` for a malformed line.
        """
        options: dict[str, Any] = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "do_sample": False}
        seed = 0
        for line in lines:
            key, equals, text = (part.strip() for part in line.partition("="))
            if not equals or not key.isidentifier():
                raise GenerationError(
                    f"{source}: {line!r} is not key=value. Write a transformers GenerationConfig field, "
                    "e.g. max_new_tokens=32 or do_sample=true."
                )
            value = _value(text)
            if key == "seed":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise GenerationError(f"{source}: seed={text} is not an integer.")
                seed = value
            else:
                options[key] = value
        return cls(options, seed)

    def generation_config(self, source: str) -> Any:
        """The transformers `GenerationConfig`; raises `GenerationError` naming `source` for an unknown or invalid field."""
        from transformers import GenerationConfig

        config = GenerationConfig()
        unknown = sorted(key for key in self.options if not hasattr(config, key))
        if unknown:
            raise GenerationError(
                f"{source}: {', '.join(unknown)} is not a transformers GenerationConfig field "
                "(e.g. max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty)."
            )
        try:
            config = GenerationConfig(**self.options)
            config.validate(strict=True)
        except ValueError as error:
            raise GenerationError(f"{source}: {error}") from None
        return config


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def generate_completions(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], settings: GenerationSettings) -> list[str]:
    """Each prompt's completion (new tokens only, special tokens dropped), one prompt at a time, so no padding
    changes what a greedy decode writes."""
    import torch

    config = settings.generation_config(option('generation'))
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    completions = []
    for prompt in prompts:
        torch.manual_seed(settings.seed)
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        with torch.inference_mode():
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        completions.append(tokenizer.decode(output[0, ids.shape[1] :].tolist(), skip_special_tokens=True))
    return completions


def pair_samples(rows: Sequence[Any], tokenizer: Any, policy: Sequence[str], reference: Sequence[str]) -> list[Sample]:
    """`Sample`s from the rows and both models' completions, in row order."""
    # Imported here: results imports torch, and the plugin reads generation settings without it.
    from .results import Sample

    return [
        Sample(row.row, tokenizer.decode(row.prompt_ids, skip_special_tokens=True), policy_text, reference_text)
        for row, policy_text, reference_text in zip(rows, policy, reference, strict=True)
    ]
