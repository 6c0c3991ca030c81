"""Forward passes: per-sequence sums of completion log-probs, logits, entropy, log sum p^2 and top-1 hits.

The LM head runs only on completion positions, a bounded number of tokens at
a time, and each chunk of logits is reduced at once (what TRL 1.16's fused LM
head does), so the full `batch x length x vocab` logits never exist.

With prompt sharing, each row's prompt runs once instead of twice (once before
the chosen, once before the rejected completion). Where the model's attention
takes a custom mask (`sdpa`, `eager`) over every layer, a row's prompt and both
completions run as one packed sequence (`packing`): each distinct token is
computed once and a batch is padded only to its longest row; the first packed
batch of each model is checked against the KV-cache path. Elsewhere a batch's
prompts run once and both completions of each row continue from the prompt's
KV cache, for models whose cache is a plain `DynamicCache` (no sliding-window
or linear-attention layers). Truncated rows, and other models, take the
two-sequence path. All give the same numbers up to float rounding.

A mixture-of-experts model (one whose config has `output_router_logits`) also
returns its router logits, and each row keeps its routing sums over the real
tokens of both sequences (`moe.routing_sums`); with prompt sharing, a prompt's
tokens count once for each of its row's two sequences, as in TRL's batch.

A prompt-learning PEFT adapter (prompt tuning, p-tuning, prefix tuning) adds
its virtual tokens only in the PEFT model's own forward, so such a model runs
through that forward, always on the two-sequence path, and is scored on the
real tokens' positions, as TRL does.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .moe import RouterSetup, router_request, router_setup, router_totals, routing_sums
from .packing import MASK_KINDS, pack, packed_length
from .results import SequenceScores
from .tokenization import TokenizedEvalSet, TokenizedRow

# Elements of fp32 logits alive at once in the chunked LM head (256 MiB): with a 150k vocab, chunks of ~220
# tokens, large enough for the head's matmul to run at full speed.
LOGITS_BUDGET = 1 << 26


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
        """The scaled logits, computed in place (no second vocab-sized tensor)."""
        if self.logit_scale != 1.0:
            raw_logits.mul_(self.logit_scale)
        if self.softcap is not None:
            raw_logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return raw_logits


@dataclass(frozen=True)
class Head:
    """The LM head as scoring reduces it: the module, its family's logit scaling, and whether each token's
    log sum p^2 is summed too (WPO's weights need it for the policy only; it costs a pass over the vocabulary)."""

    module: torch.nn.Module
    transform: LogitTransform
    sum_sq_probs: bool = True

    @functools.cached_property
    def logit_sum_weights(self) -> torch.Tensor | None:
        """For a plain fp32 `Linear` head whose logits are only scaled: the sum of its weight rows times the
        scale, so a token's sum of logits is one dot product with its hidden state (a pass over the vocabulary
        less per token). None for other heads and for soft-capped logits."""
        if not _plain_fp32_head(self.module) or self.transform.softcap is not None:
            return None
        return self.module.weight.sum(dim=0) * self.transform.logit_scale

    @functools.cached_property
    def sum_names(self) -> tuple[str, ...]:
        """The float per-sequence sums it is reduced to: `_SUM_NAMES`, less log sum p^2 without `sum_sq_probs`."""
        return _SUM_NAMES if self.sum_sq_probs else tuple(name for name in _SUM_NAMES if name != "log_sum_sq_probs")


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
    share_prompt: bool = True,
    sum_sq_probs: bool = True,
) -> SequenceScores:
    """Score every row's chosen and rejected completion with `model`.

    Rows are sorted by length so batches carry little padding; a row's chosen
    and rejected sequences share a batch. Results come back in the order of
    `tokenized.rows` and do not depend on `batch_size` beyond float rounding.

    Args:
        model: a transformers causal LM, or a PEFT model wrapping one (scored
            with whichever adapter is active; a prompt-learning adapter through
            the PEFT model's own forward, without prompt sharing).
        tokenized: the eval set as `tokenize_eval_set` returns it.
        batch_size: rows per forward pass.
        max_length, truncation_mode: TRL's truncation of prompt + completion.
        on_batch: called with the number of rows after each batch (progress).
        share_prompt: run each row's prompt once and continue both completions
            from its KV cache, where the model and the row allow it.
        sum_sq_probs: also sum each token's log sum p^2 (`*_log_sum_sq_probs`, None
            without it): WPO's weights read the policy's.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    head = Head(causal_lm.get_output_embeddings(), LogitTransform.from_config(causal_lm.config), sum_sq_probs)
    device = head.module.weight.device
    prompt_learning = _is_prompt_learning(model)
    setup = router_setup(causal_lm.config)
    if prompt_learning and setup is not None:
        raise NotImplementedError(
            "a prompt-learning adapter on a mixture-of-experts model: TRL's load-balancing loss also routes the "
            "virtual tokens, which pytest-dpo does not count yet."
        )
    # Prefix tuning's virtual keys and values are the KV cache itself: no cache of ours can continue from them.
    share_prompt = share_prompt and not prompt_learning
    packing = _packing_implementation(causal_lm.config) if share_prompt and setup is None else None
    packing_checked = False
    pairs = [sequence_pair(row, max_length, truncation_mode) for row in tokenized.rows]
    n = len(pairs)
    out = {f"{side}_{name}": torch.zeros(n, dtype=torch.float32) for name in head.sum_names for side in ("chosen", "rejected")}
    counts = {name: torch.zeros(n, dtype=torch.int64) for name in _COUNTS}
    routes = router_totals(n, setup)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch_rows in _batches_by_length(pairs, batch_size, tokenized.rows if share_prompt else None):
                batch = [tokenized.rows[i] for i in batch_rows]
                shared = None
                if packing is not None and _packable(batch, max_length):
                    shared = _packed_sums(backbone, batch, head, device, packing)
                    if not packing_checked:
                        packing, shared = _checked_packing(shared, packing, backbone, batch, head, device)
                        packing_checked = True
                elif share_prompt:
                    shared = _shared_prompt_sums(backbone, batch, head, device, max_length, setup)
                if shared is _NOT_SHAREABLE_MODEL:
                    share_prompt, packing, shared = False, None, None
                if shared is not None:
                    sums, completion = shared
                    layout = _INTERLEAVED
                    scored = completion
                else:
                    ids, attention, completion = _collate([pairs[i] for i in batch_rows], device)
                    routing = {}
                    if prompt_learning:
                        hidden = _real_token_hidden_states(model, backbone, ids, attention)
                    else:
                        outputs = backbone(input_ids=ids, attention_mask=attention, use_cache=False, **router_request(setup))
                        hidden = outputs.last_hidden_state
                        routing = _routing(outputs, attention, setup)
                    layout = _halves(len(batch_rows))
                    scored = completion[:, 1:]
                    shared_lengths = _shared_lengths(scored.sum(dim=1), layout)
                    sums = _completion_sums(hidden[:, :-1], ids[:, 1:], scored.bool(), shared_lengths, head)
                    sums |= routing
                index = torch.tensor(batch_rows)
                for side, part in zip(("chosen", "rejected"), layout):
                    for name in head.sum_names:
                        out[f"{side}_{name}"][index] = sums[name][part].cpu()
                    counts[f"{side}_tokens"][index] = completion[part].sum(dim=1).cpu()
                    counts[f"{side}_scored_tokens"][index] = scored[part].sum(dim=1).cpu()
                counts["chosen_top1"][index] = sums["top1"][layout[0]].cpu()
                for name, totals in routes.items():
                    totals[index] = (sums[name][layout[0]] + sums[name][layout[1]]).cpu()
                if on_batch is not None:
                    on_batch(len(batch_rows))
    finally:
        model.train(was_training)
    return SequenceScores(**out, **counts, **routes)


# The float per-sequence sums of `_completion_sums`, by their `SequenceScores` names without the side.
_SUM_NAMES = ("logps", "logits_sum", "entropy_sum", "log_sum_sq_probs", "shared_logps")
_COUNTS = ("chosen_tokens", "rejected_tokens", "chosen_scored_tokens", "rejected_scored_tokens", "chosen_top1")
# Where a batch's chosen and rejected sequences sit: interleaved on the shared-prompt path (row 0 chosen, row 0
# rejected, row 1 chosen, ...), in two halves on the two-sequence path.
_INTERLEAVED = (slice(0, None, 2), slice(1, None, 2))


def _routing(outputs: Any, attention: torch.Tensor, setup: RouterSetup | None) -> dict[str, torch.Tensor]:
    """Per sequence, the router sums of a backbone forward over `attention`'s tokens; none without router logits."""
    return {} if setup is None else routing_sums(outputs.router_logits, attention, setup)


def _halves(rows: int) -> tuple[slice, slice]:
    return slice(None, rows), slice(rows, None)


def _shared_lengths(scored_counts: torch.Tensor, layout: tuple[slice, slice]) -> torch.Tensor:
    """Per sequence, the smaller scored-token count of its row's two sequences: LD-DPO's shared length."""
    chosen, rejected = layout
    shorter = torch.minimum(scored_counts[chosen], scored_counts[rejected])
    lengths = torch.empty_like(scored_counts)
    lengths[chosen] = shorter
    lengths[rejected] = shorter
    return lengths


def _batches_by_length(
    pairs: list[tuple[list[int], ...]], batch_size: int, packed: list[TokenizedRow] | None = None
) -> Iterator[list[int]]:
    """Row indices in batches of similar length: of the longer sequence, or with `packed` rows of the packed row."""
    if packed is not None:
        order = sorted(range(len(pairs)), key=lambda i: -packed_length(packed[i]))
    else:
        order = sorted(range(len(pairs)), key=lambda i: -max(len(pairs[i][0]), len(pairs[i][2])))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _is_prompt_learning(model: torch.nn.Module) -> bool:
    """Whether `model` is a PEFT model whose active adapter is prompt tuning, p-tuning or prefix tuning."""
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))


def _real_token_hidden_states(
    model: torch.nn.Module, backbone: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor
) -> torch.Tensor:
    """The backbone's last hidden states at the positions of `ids`, from the PEFT model's own forward.

    Prompt tuning and p-tuning prepend their virtual tokens to the inputs (prefix tuning to each layer's keys and
    values), so like TRL this keeps the last `ids.shape[1]` positions. With the adapter disabled the forward is the
    base model's and there is nothing to drop. The backbone's output is caught with a hook: the tensor TRL's fused LM
    head reads, post final norm, without the hidden states of every layer.
    """
    caught = []
    hook = backbone.register_forward_hook(lambda module, args, output: caught.append(output.last_hidden_state))
    own_logits = _one_position_of_logits(type(model.get_base_model()))
    try:
        model(input_ids=ids, attention_mask=attention, use_cache=False, **own_logits)
    finally:
        hook.remove()
    (hidden,) = caught
    return hidden[:, -ids.shape[1] :]


@functools.cache
def _one_position_of_logits(causal_lm_class: type) -> dict[str, int]:
    """Forward arguments that keep the model's own LM head to one position (ours scores the completions), where the
    model has transformers' `logits_to_keep`; else it computes every position's logits, which are dropped."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(causal_lm_class.forward).parameters else {}


_NOT_SHAREABLE_MODEL = object()
# How far a packed batch's per-token log-probs may be from the KV-cache path's before packing is turned off
# for the model: rounding stays far below, a mask the model does not honour is far above.
_PACKING_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
_HALF_PRECISION_TOLERANCE = 5e-2
# Rows of a model's first packed batch run again on the KV-cache path to check the packed mask.
PACKING_CHECK_ROWS = 2


def _packing_implementation(config: Any) -> str | None:
    """The attention implementation packed rows run with (`sdpa` or `eager`), or None where the model's
    attention is not plain causal attention over every layer (sliding windows, linear attention, others)."""
    implementation = getattr(config, "_attn_implementation", None)
    layer_types = getattr(config, "layer_types", None) or ()
    windowed = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    if implementation not in MASK_KINDS or windowed or any(kind != "full_attention" for kind in layer_types):
        return None
    return implementation


def _packable(rows: list[TokenizedRow], max_length: int | None) -> bool:
    return all(row.prompt_ids and row.chosen_ids and row.rejected_ids and not _truncated(row, max_length) for row in rows)


def _packed_sums(
    backbone: torch.nn.Module,
    rows: list[TokenizedRow],
    head: Head,
    device: torch.device,
    implementation: str,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Completion sums of a batch with each row's prompt and both completions in one packed sequence
    (`packing`), sequences interleaved as on the KV-cache path, with their completion mask."""
    batch = pack(rows, device)
    dtype = next(backbone.parameters()).dtype
    hidden = backbone(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask(implementation, dtype),
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    owner = torch.arange(len(rows), device=hidden.device).repeat_interleave(2).unsqueeze(1)
    predicting = hidden[owner, batch.predicting.to(hidden.device)]
    attention = batch.completion_attention
    shared_lengths = _shared_lengths(attention.sum(dim=1), _INTERLEAVED)
    return _completion_sums(predicting, batch.completion_ids, attention.bool(), shared_lengths, head), attention


def _checked_packing(
    packed: tuple[dict[str, torch.Tensor], torch.Tensor],
    implementation: str,
    backbone: torch.nn.Module,
    rows: list[TokenizedRow],
    head: Head,
    device: torch.device,
) -> tuple[str | None, Any]:
    """Check a model's first packed batch against the KV-cache path: `(implementation or None, sums to use)`.

    A model whose attention does not honour the packed mask (an architecture that builds its own) gives other
    log-probs for every row; comparing the batch's `PACKING_CHECK_ROWS` shortest rows shows it at a small cost.
    Such a model keeps the KV-cache path, and this batch takes that path's sums.
    """
    checked = rows[-PACKING_CHECK_ROWS:]
    shared = _shared_prompt_sums(backbone, checked, head, device, None, None)
    if shared is _NOT_SHAREABLE_MODEL or shared is None:
        return None, shared
    sequences = slice(-2 * len(checked), None)  # interleaved chosen, rejected of each row
    tokens = packed[1][sequences].sum().clamp(min=1)
    difference = (packed[0]["logps"][sequences] - shared[0]["logps"]).abs().sum() / tokens
    dtype = next(backbone.parameters()).dtype
    half = torch.is_autocast_enabled(device.type) or dtype not in _PACKING_TOLERANCE
    tolerance = _HALF_PRECISION_TOLERANCE if half else _PACKING_TOLERANCE[dtype]
    if difference <= tolerance:
        return implementation, packed
    return None, _shared_prompt_sums(backbone, rows, head, device, None, None)


def _shared_prompt_sums(
    backbone: torch.nn.Module,
    rows: list[TokenizedRow],
    head: Head,
    device: torch.device,
    max_length: int | None,
    setup: RouterSetup | None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor] | object | None:
    """Completion sums of a batch with each prompt run once: sequences interleaved (row 0 chosen, row 0
    rejected, row 1 chosen, ...), with their completion mask. For a model with router logits (`setup`), the
    sums include each sequence's router sums, its prompt's tokens included.

    None when a row is truncated or has no prompt (the batch takes the
    two-sequence path); `_NOT_SHAREABLE_MODEL` when the model's KV cache is not
    a plain `DynamicCache`, whose positions would not line up across padding.
    """
    if any(not row.prompt_ids or _truncated(row, max_length) for row in rows):
        return None
    from transformers.cache_utils import DynamicCache, DynamicLayer

    prompt_ids, prompt_attention = _right_padded([row.prompt_ids for row in rows], device)
    prompt = backbone(input_ids=prompt_ids, attention_mask=prompt_attention, use_cache=True, **router_request(setup))
    cache = getattr(prompt, "cache", None) or getattr(prompt, "past_key_values", None)
    if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return _NOT_SHAREABLE_MODEL
    prompt_lengths = prompt_attention.sum(dim=1)
    # Under a device map the backbone's output may sit on another GPU than the head.
    prompt_hidden = prompt.last_hidden_state
    last_prompt_hidden = prompt_hidden[
        torch.arange(len(rows), device=prompt_hidden.device), (prompt_lengths - 1).to(prompt_hidden.device)
    ]
    completions = [ids for row in rows for ids in (row.chosen_ids, row.rejected_ids)]
    completion_ids, completion_attention = _right_padded(completions, device)
    cache.batch_repeat_interleave(2)
    positions = prompt_lengths.repeat_interleave(2).unsqueeze(1) + torch.arange(completion_ids.shape[1], device=device)
    continued = backbone(
        input_ids=completion_ids,
        attention_mask=torch.cat([prompt_attention.repeat_interleave(2, dim=0), completion_attention], dim=1),
        position_ids=positions,
        use_cache=True,
        **{_cache_argument(type(backbone)): cache},
        **router_request(setup),
    )
    hidden = continued.last_hidden_state
    # The first completion token is predicted from the prompt's last position, the others from the completion's.
    predicting = torch.cat(
        [last_prompt_hidden.repeat_interleave(2, dim=0).unsqueeze(1).to(hidden.device), hidden[:, :-1]], dim=1
    )
    # Every completion token follows a prompt token, so each is scored.
    shared_lengths = _shared_lengths(completion_attention.sum(dim=1), _INTERLEAVED)
    sums = _completion_sums(predicting, completion_ids, completion_attention.bool(), shared_lengths, head)
    prompt_routing = _routing(prompt, prompt_attention, setup)
    completion_routing = _routing(continued, completion_attention, setup)
    # TRL's batch holds each prompt twice, before the chosen and before the rejected completion.
    for name, prompt_sums in prompt_routing.items():
        sums[name] = prompt_sums.repeat_interleave(2, dim=0) + completion_routing[name]
    return sums, completion_attention


@functools.cache
def _cache_argument(backbone_class: type) -> str:
    """transformers 5 renamed `past_key_values` to `cache` (the old name goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(backbone_class.forward).parameters else "past_key_values"


def _truncated(row: TokenizedRow, max_length: int | None) -> bool:
    return row.length(max_length) < row.length()


def _right_padded(sequences: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(sequence) for sequence in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, sequence in enumerate(sequences):
        ids[i, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention[i, : len(sequence)] = 1
    return ids.to(device), attention.to(device)


def _collate(pairs: list[tuple[list[int], ...]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and completion mask: all chosen sequences, then all rejected."""
    ids, attention = _right_padded([pair[0] for pair in pairs] + [pair[2] for pair in pairs], device)
    completion, _ = _right_padded([pair[1] for pair in pairs] + [pair[3] for pair in pairs], device)
    return ids, attention, completion


def _completion_sums(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    shared_lengths: torch.Tensor,
    head: Head,
) -> dict[str, torch.Tensor]:
    """Per-sequence sums over the scored tokens (`mask`), with the LM head applied in bounded chunks.

    The float sums are keyed by `head.sum_names`; `shared_logps` sums the log-probs of each sequence's first
    `shared_lengths` scored tokens. `top1` counts the tokens that are the head's argmax, ties going to the lowest
    token id as in TRL's fused head.
    """
    sequences = hidden.shape[0]
    hidden = hidden.to(head.module.weight.device)
    positions = mask.nonzero(as_tuple=True)
    token_hidden = hidden[positions]
    targets = labels[positions]
    owner = positions[0]
    # 1-based position of each scored token among its sequence's scored tokens, as TRL's `comp_pos`.
    in_shared = mask.cumsum(dim=1)[positions] <= shared_lengths[owner]
    vocab = head.module.weight.shape[0]
    # Two chunk x vocab fp32 tensors are alive at once (logits, their exponentials): at most LOGITS_BUDGET
    # elements, and at most 1/8 of the batch's full (batch x length x vocab) logits.
    chunk = max(1, min(LOGITS_BUDGET // (2 * vocab), hidden.shape[0] * hidden.shape[1] // 16))
    sums = {name: torch.zeros(sequences, dtype=torch.float32, device=hidden.device) for name in head.sum_names}
    top1 = torch.zeros(sequences, dtype=torch.int64, device=hidden.device)
    # Reused across chunks: on CPU a fresh vocab-sized tensor per chunk costs more in page faults than the math.
    rows = min(chunk, len(targets))
    exponentials_buffer = torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device)
    # Under autocast the head must run through autocast as TRL's does (half-precision logits): no out= buffer.
    autocast = torch.is_autocast_enabled(hidden.device.type)
    logits_buffer = torch.empty_like(exponentials_buffer) if _plain_fp32_head(head.module) and not autocast else None
    logit_sum_weights = head.logit_sum_weights if logits_buffer is not None else None
    for start in range(0, len(targets), chunk):
        part = slice(start, start + chunk)
        logits = head.transform(_head_logits(head.module, token_hidden[part], logits_buffer))
        top = logits.amax(dim=-1)
        target_logits = logits.gather(-1, targets[part].unsqueeze(-1)).squeeze(-1)
        top1.index_add_(0, owner[part], _top1_hits(logits, targets[part], target_logits, top))
        logits_sum = logits.sum(dim=-1) if logit_sum_weights is None else token_hidden[part] @ logit_sum_weights
        sums["logits_sum"].index_add_(0, owner[part], logits_sum / vocab)
        # With s = logits - max and e = exp(s): log Z = max + log sum e, entropy = log sum e - sum(e * s) / sum e,
        # log sum p^2 = log sum e^2 - 2 log sum e.
        shifted = logits.sub_(top.unsqueeze(-1))
        exponentials = torch.exp(shifted, out=exponentials_buffer[: len(shifted)])
        total = exponentials.sum(dim=-1)
        log_total = torch.log(total)
        expected_shifted = _row_dots(exponentials, shifted) / total
        token_logps = target_logits - top - log_total
        sums["logps"].index_add_(0, owner[part], token_logps)
        sums["shared_logps"].index_add_(0, owner[part], token_logps * in_shared[part])
        sums["entropy_sum"].index_add_(0, owner[part], log_total - expected_shifted)
        if head.sum_sq_probs:
            log_sum_sq_probs = torch.log(_row_dots(exponentials, exponentials)) - 2 * log_total
            sums["log_sum_sq_probs"].index_add_(0, owner[part], log_sum_sq_probs)
    return {**sums, "top1": top1}


def _top1_hits(logits: torch.Tensor, targets: torch.Tensor, target_logits: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """1 where the target token is the argmax of its row of `logits` (`top` holds the row maxima), ties going to
    the lowest token id as in TRL's fused head.

    On CPU, `max` with indices costs about 3x `amax` over a vocabulary, so only the rows whose target sits at the
    maximum are checked for a tie at a lower id (the maximum of the ids before the target reaching `top`). Other
    devices take the argmax, where a per-row loop would cost a synchronisation per row.
    """
    if logits.device.type != "cpu":
        return (logits.argmax(dim=-1) == targets).long()
    hits = target_logits == top
    for row in hits.nonzero().flatten().tolist():
        target = int(targets[row])
        if target > 0 and logits[row, :target].amax() == top[row]:
            hits[row] = False
    return hits.long()


def _row_dots(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two (rows x vocab) tensors, without a third vocab-sized tensor.

    On CPU a BLAS dot per row is ~5x faster than the batched matmul, which has no fast kernel for 1 x vocab
    times vocab x 1; elsewhere the one batched call avoids a kernel launch per row.
    """
    if left.device.type == "cpu":
        return torch.stack([l_row.dot(r_row) for l_row, r_row in zip(left, right, strict=True)])
    return torch.bmm(left.unsqueeze(1), right.unsqueeze(2)).view(-1)


def _plain_fp32_head(head: torch.nn.Module) -> bool:
    return type(head) is torch.nn.Linear and head.bias is None and head.weight.dtype == torch.float32


def _head_logits(head: torch.nn.Module, hidden: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    """The LM head's fp32 logits for `hidden`: written into `buffer` for a plain fp32 `Linear` head, else
    the head's own output (hooks, adapters, quantized heads, bf16) cast to fp32."""
    if buffer is not None:
        return torch.matmul(hidden, head.weight.t(), out=buffer[: len(hidden)])
    return head(hidden).float()
