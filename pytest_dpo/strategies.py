"""Hypothesis strategies for a team's own property tests of DPO evaluations.

They generate what the package consumes and produces: preference rows in TRL's
three formats, per-example log-probs, and real `EvalResult`s built through
`metrics.build_per_example` and `metrics.aggregate`, so every metric is what an
evaluation of those scores would report. Needs `hypothesis` (a dev dependency);
nothing in the package imports this module.
"""

from __future__ import annotations

from typing import Any

try:
    from hypothesis import strategies as st
except ImportError as error:
    raise ImportError(
        "pytest_dpo.strategies needs hypothesis. Install it with `pip install hypothesis` "
        "(or `pip install 'pytest-dpo[dev]'`)."
    ) from error
import torch

from .evalset import canonical_sha256
from .metrics import aggregate, build_per_example
from .results import EvalResult, SequenceScores
from .settings import DPOSettings

__all__ = ["eval_results", "per_example_logps", "preference_rows"]

ROW_FORMATS = ("standard", "conversational", "implicit")
LOGP_KEYS = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")

# Short words with a few non-ASCII letters, so canonical hashing and tokenization see more than ASCII.
_WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789éüßñ中文", min_size=1, max_size=8)
_TEXT = st.lists(_WORD, min_size=1, max_size=6).map(" ".join)
_PUNCTUATION = st.sampled_from(("", ".", "?", "!"))
_MAX_COMPLETION_TOKENS = 64
# Mean log-prob per completion token of a small language model on plausible text.
_MAX_MEAN_TOKEN_LOGP = -0.0625
_MEAN_TOKEN_LOGP = st.floats(min_value=-8.0, max_value=_MAX_MEAN_TOKEN_LOGP, allow_nan=False, width=32)
_POLICY_SHIFT = st.floats(min_value=-1.0, max_value=1.0, allow_nan=False, width=32)


def preference_rows(format: str = "standard", min_size: int = 1, max_size: int = 20) -> st.SearchStrategy[list[dict[str, Any]]]:
    """Lists of preference rows that `pytest_dpo.evalset.load_eval_set` accepts.

    Every row has a non-empty `chosen` and `rejected` that differ; texts are a
    few short words.

    Args:
        format (`str`, *optional*, defaults to `"standard"`): `"standard"` (prompt,
            chosen and rejected strings), `"conversational"` (lists of role/content
            messages: an optional system message and a user turn as the prompt, one
            assistant turn per completion) or `"implicit"` (no prompt: chosen and
            rejected strings begin with the same prompt text).
        min_size (`int`, *optional*, defaults to `1`): fewest rows, at least 1.
        max_size (`int`, *optional*, defaults to `20`): most rows.

    Example:
        ```py
        from hypothesis import given

        from pytest_dpo.evalset import load_eval_set
        from pytest_dpo.strategies import preference_rows


        @given(preference_rows(format="conversational", max_size=5))
        def test_my_eval_set_loads(rows):
            eval_set = load_eval_set(rows)
            assert eval_set.conversational and len(eval_set) == len(rows)
        ```
    """
    if format not in ROW_FORMATS:
        raise ValueError(f"Unknown format '{format}' for preference_rows. Choose from: {', '.join(ROW_FORMATS)}.")
    if not 1 <= min_size <= max_size:
        raise ValueError(f"preference_rows needs 1 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}.")
    row = {"standard": _standard_row(), "conversational": _conversational_row(), "implicit": _implicit_row()}[format]
    return st.lists(row, min_size=min_size, max_size=max_size)


def per_example_logps(
    n: int | None = None, min_value: float = -200.0, max_value: float = -0.01
) -> st.SearchStrategy[dict[str, torch.Tensor]]:
    """Per-example completion log-probs of a policy and a reference, as float32 tensors of one length.

    Keys: `policy_chosen_logps`, `policy_rejected_logps`, `reference_chosen_logps`,
    `reference_rejected_logps` (sums of completion-token log-probs, so <= 0).

    Args:
        n (`int`, *optional*): the number of examples; drawn from 1 to 64 when not given.
        min_value (`float`, *optional*, defaults to `-200.0`): the lowest log-prob.
        max_value (`float`, *optional*, defaults to `-0.01`): the highest log-prob, at most 0.

    Example:
        ```py
        import torch
        from hypothesis import given

        from pytest_dpo.strategies import per_example_logps


        @given(per_example_logps(n=8))
        def test_rewards_scale_with_beta(logps):
            chosen_logratios = logps["policy_chosen_logps"] - logps["reference_chosen_logps"]
            torch.testing.assert_close(0.2 * chosen_logratios, 2 * (0.1 * chosen_logratios))
        ```
    """
    if n is not None and n < 1:
        raise ValueError(f"per_example_logps needs n >= 1 examples (or None to draw it), got {n}.")
    if not min_value <= max_value <= 0:
        raise ValueError(
            f"per_example_logps needs min_value <= max_value <= 0 (log-probs are <= 0), got {min_value} and {max_value}."
        )
    low, high = _float32_inside(min_value, max_value)
    value = st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False, width=32)
    sizes = st.just(n) if n is not None else st.integers(min_value=1, max_value=64)

    def arrays(size: int) -> st.SearchStrategy[dict[str, torch.Tensor]]:
        column = st.lists(value, min_size=size, max_size=size).map(lambda values: torch.tensor(values, dtype=torch.float32))
        return st.fixed_dictionaries({key: column for key in LOGP_KEYS})

    return sizes.flatmap(arrays)


def eval_results(
    min_size: int = 1, max_size: int = 64, beta: float | None = None, loss_type: str | tuple[str, ...] = "sigmoid"
) -> st.SearchStrategy[EvalResult]:
    """Real `EvalResult`s of a generated eval set, built the way an evaluation builds them.

    Token counts, log-prob sums (a per-token mean times the tokens), logit,
    entropy and top-1 sums are drawn per row; `metrics.build_per_example` and
    `metrics.aggregate` turn them into the per-example arrays and TRL's
    metrics. A few eval-set rows may be dropped (as TRL drops rows whose prompt
    fills `max_length`); `prompts` and `eval_set_sha256` come from generated
    standard preference rows.

    Args:
        min_size (`int`, *optional*, defaults to `1`): fewest scored rows, at least 1.
        max_size (`int`, *optional*, defaults to `64`): most scored rows.
        beta (`float`, *optional*): DPO beta; drawn from 0.01 to 1 when not given.
        loss_type (`str` or `tuple[str, ...]`, *optional*, defaults to `"sigmoid"`):
            TRL loss type(s), as in `DPOSettings`.

    Example:
        ```py
        import math

        from hypothesis import given

        from pytest_dpo.strategies import eval_results


        @given(eval_results(max_size=16))
        def test_margin_is_chosen_minus_rejected(result):
            metrics = result.metrics
            expected = metrics["rewards/chosen"] - metrics["rewards/rejected"]
            assert math.isclose(metrics["rewards/margins"], expected, rel_tol=1e-6, abs_tol=1e-4)
        ```
    """
    if not 1 <= min_size <= max_size:
        raise ValueError(f"eval_results needs 1 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}.")
    loss_types = tuple(part.strip() for part in loss_type.split(",")) if isinstance(loss_type, str) else tuple(loss_type)
    # TRL refuses exo_pair without label smoothing; 1e-3 is the EXO paper's value.
    label_smoothing = 1e-3 if "exo_pair" in loss_types else 0.0
    # Built once here so that a bad argument fails where the strategy is defined, not in every example.
    DPOSettings(beta=beta if beta is not None else 0.1, loss_type=loss_types, label_smoothing=label_smoothing)
    betas = st.just(beta) if beta is not None else st.floats(min_value=0.01, max_value=1.0, allow_nan=False)
    return _eval_result(min_size, max_size, betas, loss_types, label_smoothing)


@st.composite
def _eval_result(
    draw: st.DrawFn,
    min_size: int,
    max_size: int,
    betas: st.SearchStrategy[float],
    loss_types: tuple[str, ...],
    label_smoothing: float,
) -> EvalResult:
    settings = DPOSettings(beta=draw(betas), loss_type=loss_types, label_smoothing=label_smoothing)
    size = draw(st.integers(min_value=min_size, max_value=max_size))
    dropped_count = draw(st.integers(min_value=0, max_value=2))
    rows = draw(preference_rows("standard", min_size=size + dropped_count, max_size=size + dropped_count))
    dropped_rows = sorted(draw(st.sets(st.integers(0, len(rows) - 1), min_size=dropped_count, max_size=dropped_count)))
    scored_rows = torch.tensor([row for row in range(len(rows)) if row not in dropped_rows], dtype=torch.int64)

    chosen_tokens = torch.tensor(draw(_token_counts(size)), dtype=torch.int64)
    rejected_tokens = torch.tensor(draw(_token_counts(size)), dtype=torch.int64)
    reference = draw(_sequence_scores(chosen_tokens, rejected_tokens))
    policy = draw(_sequence_scores(chosen_tokens, rejected_tokens, reference))
    per_example = build_per_example(scored_rows, policy, reference, settings)
    step = draw(st.integers(min_value=1, max_value=100_000))
    return EvalResult(
        checkpoint=f"checkpoint-{step}",
        checkpoint_path=f"outputs/dpo/checkpoint-{step}",
        reference="base-model",
        metrics=aggregate(per_example),
        per_example=per_example,
        dropped_rows=dropped_rows,
        eval_set_sha256=canonical_sha256(rows),
        settings=settings.to_dict(),
        prompts=[row["prompt"] for row in rows],
    )


def _float32_inside(low: float, high: float) -> tuple[float, float]:
    """The float32 values closest to `low` and `high` that still lie within [low, high]."""
    low32, high32 = torch.tensor(low, dtype=torch.float32), torch.tensor(high, dtype=torch.float32)
    if low32.item() < low:
        low32 = torch.nextafter(low32, high32)
    if high32.item() > high:
        high32 = torch.nextafter(high32, low32)
    if low32.item() > high32.item():
        raise ValueError(f"No float32 value lies in [{low}, {high}]. Widen the range.")
    return low32.item(), high32.item()


def _token_counts(size: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(min_value=1, max_value=_MAX_COMPLETION_TOKENS), min_size=size, max_size=size)


@st.composite
def _sequence_scores(
    draw: st.DrawFn, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, reference: SequenceScores | None = None
) -> SequenceScores:
    """One model's scores: each sum is a per-token mean times the completion's token count.

    Given the reference's scores, the per-token log-probs stay within one nat of
    the reference's, as a DPO policy stays close to its reference.
    """
    size = len(chosen_tokens)

    def per_token(strategy: st.SearchStrategy[float]) -> torch.Tensor:
        return torch.tensor(draw(st.lists(strategy, min_size=size, max_size=size)), dtype=torch.float32)

    chosen, rejected = chosen_tokens.float(), rejected_tokens.float()
    logit = st.floats(min_value=-20.0, max_value=20.0, allow_nan=False, width=32)
    entropy = st.floats(min_value=0.0, max_value=10.0, allow_nan=False, width=32)
    top1_share = per_token(st.floats(min_value=0.0, max_value=1.0, allow_nan=False))
    if reference is None:
        chosen_mean, rejected_mean = per_token(_MEAN_TOKEN_LOGP), per_token(_MEAN_TOKEN_LOGP)
    else:
        chosen_mean = (reference.chosen_logps / chosen + per_token(_POLICY_SHIFT)).clamp(max=_MAX_MEAN_TOKEN_LOGP)
        rejected_mean = (reference.rejected_logps / rejected + per_token(_POLICY_SHIFT)).clamp(max=_MAX_MEAN_TOKEN_LOGP)
    return SequenceScores(
        chosen_logps=chosen_mean * chosen,
        rejected_logps=rejected_mean * rejected,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
        # A non-empty prompt precedes every completion, so each completion token gets a log-prob.
        chosen_scored_tokens=chosen_tokens,
        rejected_scored_tokens=rejected_tokens,
        chosen_logits_sum=per_token(logit) * chosen,
        rejected_logits_sum=per_token(logit) * rejected,
        chosen_entropy_sum=per_token(entropy) * chosen,
        rejected_entropy_sum=per_token(entropy) * rejected,
        chosen_top1=(top1_share * chosen).round().to(torch.int64),
    )


def _standard_row() -> st.SearchStrategy[dict[str, Any]]:
    return st.tuples(_TEXT, _PUNCTUATION, _distinct_pair()).map(
        lambda parts: {"prompt": parts[0] + parts[1], "chosen": parts[2][0], "rejected": parts[2][1]}
    )


def _implicit_row() -> st.SearchStrategy[dict[str, Any]]:
    return st.tuples(_TEXT, _distinct_pair()).map(
        lambda parts: {"chosen": f"{parts[0]}? {parts[1][0]}", "rejected": f"{parts[0]}? {parts[1][1]}"}
    )


def _conversational_row() -> st.SearchStrategy[dict[str, Any]]:
    def messages(parts: tuple[str | None, str, tuple[str, str]]) -> dict[str, Any]:
        system, question, (chosen, rejected) = parts
        prompt = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": question}
        ]
        return {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }

    return st.tuples(st.none() | _TEXT, _TEXT, _distinct_pair()).map(messages)


def _distinct_pair() -> st.SearchStrategy[tuple[str, str]]:
    """A chosen and a rejected completion that differ.

    Hypothesis often draws two equal short texts; a filter would reject those
    draws (and abort examples), so an equal rejected text is extended instead.
    """
    return st.tuples(_TEXT, _TEXT).map(lambda pair: pair if pair[0] != pair[1] else (pair[0], f"{pair[1]} not"))
