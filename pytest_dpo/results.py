"""Result records: plain dataclasses, no I/O, no models."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import Any

import torch

from .diagnostics import diagnose
from .eval_sets import DEFAULT_EVAL_SET


@dataclass(frozen=True, kw_only=True)
class TokenStatistics:
    """Per-row token counts and sums behind TRL's token-weighted metrics, for the chosen and rejected completions.

    `*_tokens` count the completion tokens in the (possibly truncated)
    sequence; `*_scored_tokens` count those that have a preceding token and so
    get a log-prob (they differ only when a completion starts the sequence).
    The logit, entropy and top-1 sums feed `logits/*`, `entropy` and
    `mean_token_accuracy`. Keyword-only in the records built on it.
    """

    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    chosen_scored_tokens: torch.Tensor
    rejected_scored_tokens: torch.Tensor
    chosen_logits_sum: torch.Tensor
    rejected_logits_sum: torch.Tensor
    chosen_entropy_sum: torch.Tensor
    rejected_entropy_sum: torch.Tensor
    chosen_top1: torch.Tensor

    def token_statistics(self) -> dict[str, torch.Tensor]:
        """These fields by name, to carry them into another record built on `TokenStatistics`."""
        return {f.name: getattr(self, f.name) for f in fields(TokenStatistics)}


@dataclass(frozen=True)
class SequenceScores(TokenStatistics):
    """What one model says about the completions of the scored rows, one entry per row.

    `*_logps` are sums of completion-token log-probs, as TRL computes them;
    the token counts and sums are `TokenStatistics`'.

    `*_log_sum_sq_probs` sum `log sum_v p_v^2` of each scored token's
    next-token distribution (WPO's weights, read from the policy's scores
    only): None where `scoring.score` was told to skip them (a reference, a
    policy evaluated without `use_weighting`). `*_shared_logps` sum the
    log-probs of the first K scored completion tokens, K the smaller of the
    row's two scored-token counts (LD-DPO's shared part), always filled by
    `scoring.score`. Scores without them cannot be evaluated with
    `use_weighting` or `ld_alpha`.

    The `router_*` sums are a mixture-of-experts model's routing over every
    real token (prompt included) of the row's chosen and rejected sequences,
    in every MoE layer: `router_expert_counts` (rows x experts) how often each
    expert is among a token's top-k, `router_prob_sums` (rows x experts) its
    router probabilities, and `router_tokens` how many (token, layer) pairs
    were summed. TRL's load-balancing `aux_loss` is computed from their totals
    (`metrics.router_aux_loss`). None for models without router logits.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_log_sum_sq_probs: torch.Tensor | None = None
    rejected_log_sum_sq_probs: torch.Tensor | None = None
    chosen_shared_logps: torch.Tensor | None = None
    rejected_shared_logps: torch.Tensor | None = None
    router_expert_counts: torch.Tensor | None = None
    router_prob_sums: torch.Tensor | None = None
    router_tokens: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.chosen_logps)


# The `SequenceScores` fields only a model with router logits has: all of them, or none.
ROUTER_FIELDS = ("router_expert_counts", "router_prob_sums", "router_tokens")
# The `SequenceScores` fields WPO's weights need, computed only when asked for: both of them, or neither.
WPO_FIELDS = ("chosen_log_sum_sq_probs", "rejected_log_sum_sq_probs")


@dataclass(frozen=True)
class PerExample(TokenStatistics):
    """Per-example arrays, one entry per scored row, in eval-set order.

    `rows` holds each entry's row index in the eval set (rows TRL drops are
    absent, see `EvalResult.dropped_rows`). These arrays are the source of
    truth: every aggregate in `EvalResult.metrics` but a mixture-of-experts
    policy's `aux_loss` is computed from them.
    The log-probs, and the rewards made of them, are those TRL logs: with
    `ld_alpha`, LD-DPO's sums. For a mixture-of-experts policy whose
    load-balancing loss is enabled, each of `losses` includes the same
    `router_aux_loss_coef * aux_loss` (an eval-set-wide term), as TRL adds it
    to its batch's loss, so their mean is TRL's `loss`.
    """

    rows: torch.Tensor
    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    reference_chosen_logps: torch.Tensor
    reference_rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    losses: torch.Tensor

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, positions: torch.Tensor) -> PerExample:
        """The entries at `positions` (indices into these arrays), in that order."""
        return type(self)(**{f.name: getattr(self, f.name)[positions] for f in fields(self)})

    def to_dict(self) -> dict[str, list]:
        """Every array as a plain list, keyed by field name."""
        return {f.name: getattr(self, f.name).tolist() for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, list]) -> PerExample:
        """The inverse of `to_dict`: integer fields come back as int64, the others as float32."""
        return cls(
            **{
                f.name: torch.tensor(data[f.name], dtype=torch.int64 if f.name in _INTEGER_FIELDS else torch.float32)
                for f in fields(cls)
            }
        )


_INTEGER_FIELDS = {
    "rows",
    "chosen_tokens",
    "rejected_tokens",
    "chosen_scored_tokens",
    "rejected_scored_tokens",
    "chosen_top1",
}


@dataclass(frozen=True, repr=False)
class EvalResult:
    """The evaluation of one checkpoint on one eval set.

    Attributes:
        checkpoint (`str`): the checkpoint's name, e.g. `checkpoint-500`.
        checkpoint_path (`str`): where it was loaded from.
        reference (`str`): what served as the reference model.
        metrics (`dict[str, float]`): TRL's eval metrics without the `eval_` prefix
            (`loss`, `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
            `rewards/accuracies`, `logps/chosen`, `logps/rejected`, `logits/chosen`,
            `logits/rejected`, `entropy`, `mean_token_accuracy`, and `aux_loss`
            for a mixture-of-experts policy whose load-balancing loss is
            enabled), computed once over the whole eval set.
        per_example (`PerExample`): the arrays the metrics come from.
        dropped_rows (`list[int]`): eval-set rows TRL drops because the prompt
            alone fills `max_length`; never scored.
        eval_set_sha256 (`str`): canonical content hash of the eval set.
        settings (`dict`): the `DPOSettings` used, as plain values.
        prompts (`list[str]`): a short text of each eval-set row's prompt, for messages.
        eval_set_name (`str`): the eval set's name in the run (`default` for a set given as a bare path).
        subset_labels (`list[str]`, *optional*): each eval-set row's subset (the `--dpo-subset-column`
            value), None without a subset column; see `subset()`.
        subset_name (`str`, *optional*): for a result made by `subset()`, the subset it holds.

    pytest-dpo's own failure-mode diagnostics are apart from TRL's metrics, in `diagnostics`.
    """

    checkpoint: str
    checkpoint_path: str
    reference: str
    metrics: dict[str, float]
    per_example: PerExample
    dropped_rows: list[int]
    eval_set_sha256: str
    settings: dict[str, Any]
    prompts: list[str] = field(default_factory=list, repr=False)
    eval_set_name: str = DEFAULT_EVAL_SET
    subset_labels: list[str] | None = field(default=None, repr=False)
    subset_name: str | None = None

    @property
    def scope(self) -> str:
        """The checkpoint with the eval set and subset, as messages name them: `checkpoint-4 (helpful/math)`."""
        if self.subset_name is not None:
            return f"{self.checkpoint} ({self.eval_set_name}/{self.subset_name})"
        return self.checkpoint if self.eval_set_name == DEFAULT_EVAL_SET else f"{self.checkpoint} ({self.eval_set_name})"

    @property
    def subsets(self) -> list[str]:
        """The subset names of the eval set, in order of first appearance; empty without a subset column."""
        return list(dict.fromkeys(self.subset_labels or ()))

    def subset(self, name: str) -> EvalResult:
        """The result on the rows of one subset: its own metrics, per-example arrays and intervals, so every
        assertion helper and gate works on it.

        A mixture-of-experts policy's `aux_loss` is a whole-eval-set statistic and stays the set's.

        Raises:
            ValueError: no subset column was given, the subset does not exist, or TRL drops all its rows.

        Example:
            >>> dpo_result.subset("math").metrics["rewards/accuracies"]
            0.75
        """
        from .metrics import aggregate

        if self.subset_labels is None:
            raise ValueError(
                f"{self.scope}: the eval set has no subsets. Name the column that splits it with "
                "--dpo-subset-column (ini dpo_subset_column), e.g. --dpo-subset-column=subset."
            )
        if name not in self.subsets:
            raise ValueError(f"{self.scope}: no subset {name!r}. Its subsets: {', '.join(self.subsets)}.")
        positions = torch.tensor(
            [index for index, row in enumerate(self.per_example.rows.tolist()) if self.subset_labels[row] == name],
            dtype=torch.int64,
        )
        if len(positions) == 0:
            raise ValueError(
                f"{self.scope}: every row of subset {name!r} is dropped (its prompts alone fill max_length), so "
                "nothing of it was scored. Raise max_length for this eval set."
            )
        per_example = self.per_example.select(positions)
        return replace(
            self,
            metrics=aggregate(per_example, self.metrics.get("aux_loss")),
            per_example=per_example,
            dropped_rows=[row for row in self.dropped_rows if self.subset_labels[row] == name],
            subset_name=name,
        )

    @property
    def num_examples(self) -> int:
        """How many rows were scored."""
        return len(self.per_example)

    @cached_property
    def diagnostics(self) -> dict[str, float]:
        """pytest-dpo's failure-mode diagnostics (`diagnostics/…`, see `metric_table.DIAGNOSTICS`), computed
        from `per_example`, so a result read back from a report has them too."""
        return diagnose(self.per_example)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={self.metrics[name]:.4g}" for name in ("rewards/accuracies", "rewards/margins", "loss") if name in self.metrics
        )
        return f"EvalResult({self.scope}: {shown}, N={self.num_examples})"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable values (how results travel from pytest-xdist workers)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "per_example"} | {
            "per_example": self.per_example.to_dict()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        """The inverse of `to_dict`."""
        return cls(**{**data, "per_example": PerExample.from_dict(data["per_example"])})


@dataclass(frozen=True)
class Sample:
    """One eval-set prompt with the policy's and the reference's completion."""

    row: int
    prompt: str
    policy: str
    reference: str

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "prompt": self.prompt, "policy": self.policy, "reference": self.reference}
