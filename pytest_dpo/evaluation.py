"""`evaluate()`: TRL's DPO eval metrics for one checkpoint, without pytest (module named `evaluation` so it never shadows the function on the package)."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .cache import ScoreCache, cache_key, tokens_digest
from .evalset import EvalSet, EvalSetError, check_tokenizer, load_eval_set, tokenize_eval_set
from .metrics import aggregate, build_per_example
from .models import (
    Checkpoint,
    CheckpointError,
    choose_device,
    choose_dtype,
    discover_checkpoints,
    load_policy,
    load_reference,
    load_tokenizer,
    policy_fingerprint,
    reference_fingerprint,
    resolve_reference,
)
from .results import EvalResult, SequenceScores
from .scoring import score
from .settings import DPOSettings

PROMPT_SNIPPET_CHARS = 120


def evaluate(
    checkpoint: str | Path | Checkpoint,
    eval_set: str | Path | EvalSet | Sequence[dict[str, Any]],
    reference: str | Path | None = None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    max_length: int | None = 1024,
    truncation_mode: str = "keep_start",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str | None = None,
    cache_dir: str | Path | None = None,
) -> EvalResult:
    """Compute TRL's DPO eval metrics for one checkpoint over a preference eval set.

    The numbers are those of TRL 1.16 `DPOTrainer.evaluate()` with the same
    settings, except that they are averaged once over the whole eval set
    instead of per batch, so they do not change with `batch_size`.

    Args:
        checkpoint (`str`, `Path` or `Checkpoint`): a model folder (safetensors)
            or a PEFT adapter folder.
        eval_set (`str`, `Path`, `EvalSet` or list of rows): the preference eval
            set (`.jsonl`, `.json`, `.parquet`, `.csv`, a `save_to_disk` folder).
        reference (`str` or `Path`, *optional*): the reference model folder, a
            reference adapter folder (for a LoRA run that continued an existing
            adapter), or a Hub id in the local cache. Default: the adapter's base
            with the adapter disabled, or the `base_model` of the TRL model card.
        beta, loss_type, loss_weights, max_length, truncation_mode,
        label_smoothing, discopop_tau: as in TRL's `DPOConfig`.
        batch_size (`int`, *optional*, defaults to 8): rows per forward pass.
        device (`str`, *optional*): default cuda if available, else cpu.
        dtype (`str`, *optional*): `float32`, `bfloat16` or `float16`; default
            bfloat16 on CUDA devices that support it, else float32.
        cache_dir (`str` or `Path`, *optional*): keep each model's per-example
            scores here, keyed by weights fingerprint and the exact token ids, and
            reuse them instead of running the model again.

    Returns:
        `EvalResult` with `.metrics` (TRL names, no `eval_` prefix),
        `.per_example` arrays and `.dropped_rows`.

    Raises:
        SettingsError, EvalSetError, CheckpointError: bad input, with a message
            that names the file, row or setting and the fix.

    Example:
        >>> result = evaluate("runs/dpo/checkpoint-500", "eval.jsonl", reference="models/sft")
        >>> result.metrics["rewards/accuracies"]
        0.71875
    """
    settings = DPOSettings(
        beta=beta,
        loss_type=loss_type,
        loss_weights=None if loss_weights is None else tuple(loss_weights),
        max_length=max_length,
        truncation_mode=truncation_mode,
        label_smoothing=label_smoothing,
        discopop_tau=discopop_tau,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
    )
    cache = ScoreCache(cache_dir) if cache_dir is not None else None
    return evaluate_with_settings(checkpoint, eval_set, reference, settings, cache)


def evaluate_with_settings(
    checkpoint: str | Path | Checkpoint,
    eval_set: str | Path | EvalSet | Sequence[dict[str, Any]],
    reference: str | Path | None,
    settings: DPOSettings,
    cache: ScoreCache | None = None,
    progress: bool = False,
) -> EvalResult:
    """`evaluate()` with the settings already gathered in a `DPOSettings`, an optional score cache, and
    optionally a progress bar on stderr (rows/s, ETA) while models score."""
    data = eval_set if isinstance(eval_set, EvalSet) else load_eval_set(eval_set)
    target = checkpoint if isinstance(checkpoint, Checkpoint) else _single_checkpoint(checkpoint)
    ref = resolve_reference(target, reference)
    tokenizer, tokenizer_source = load_tokenizer(target, ref)
    check_tokenizer(tokenizer, data, tokenizer_source)
    tokenized = tokenize_eval_set(data, tokenizer, settings.max_length, settings.truncation_mode)
    if not tokenized.rows:
        raise EvalSetError(
            f"{data.path}: every row's prompt alone fills max_length={settings.max_length} tokens, so TRL would drop "
            "them all and nothing is left to score. Raise max_length or shorten the prompts."
        )
    device = choose_device(settings.device)
    dtype = choose_dtype(settings.dtype, device)
    scoring = {
        "batch_size": settings.batch_size,
        "max_length": settings.max_length,
        "truncation_mode": settings.truncation_mode,
    }

    tokens = tokens_digest(tokenized, settings.max_length, settings.truncation_mode)
    keys = {
        "policy": cache_key(policy_fingerprint(target), str(dtype), device, tokens),
        "reference": cache_key(reference_fingerprint(ref), str(dtype), device, tokens),
    }
    cached = {role: cache.get(key, len(tokenized.rows)) if cache else None for role, key in keys.items()}
    policy, reference_scores = cached["policy"], cached["reference"]
    missing = sum(scores is None for scores in cached.values())
    bar = _progress_bar(target.name, missing * len(tokenized.rows)) if progress and missing else None
    scoring["on_batch"] = bar.update if bar is not None else None
    try:
        if ref.kind == "base" and (policy is None or reference_scores is None):
            policy, reference_scores = _score_adapter_and_base(
                target, tokenized, device, dtype, scoring, policy, reference_scores
            )
        if policy is None:
            policy = _score_model(load_policy, target, tokenized, device, dtype, scoring)
        if reference_scores is None:
            reference_scores = _score_model(load_reference, ref, tokenized, device, dtype, scoring)
    finally:
        if bar is not None:
            bar.close()
    if cache is not None:
        for role, scores in (("policy", policy), ("reference", reference_scores)):
            if cached[role] is None:
                cache.put(keys[role], scores)

    rows = torch.tensor([row.row for row in tokenized.rows], dtype=torch.int64)
    per_example = build_per_example(rows, policy, reference_scores, settings)
    return EvalResult(
        checkpoint=target.name,
        checkpoint_path=str(target.path),
        reference=ref.describe(),
        metrics=aggregate(per_example),
        per_example=per_example,
        dropped_rows=tokenized.dropped_rows,
        eval_set_sha256=data.sha256,
        settings={**settings.to_dict(), "device": device, "dtype": str(dtype).removeprefix("torch.")},
        prompts=[data.prompt_text(index)[:PROMPT_SNIPPET_CHARS] for index in range(len(data))],
    )


def _single_checkpoint(spec: str | Path) -> Checkpoint:
    found = discover_checkpoints(spec)
    if len(found) != 1:
        names = ", ".join(checkpoint.name for checkpoint in found)
        raise CheckpointError(
            f"{spec}: evaluate() scores one checkpoint, but this holds {len(found)} ({names}). "
            "Pass one of them, or loop over pytest_dpo.discover_checkpoints(...)."
        )
    return found[0]


def _score_model(loader: Any, source: Any, tokenized: Any, device: str, dtype: torch.dtype, scoring: dict[str, Any]) -> SequenceScores:
    """Load one model, score the eval set, and free the model before returning."""
    model = loader(source, device=device, dtype=dtype)
    scores = score(model, tokenized, **scoring)
    del model
    _free_memory()
    return scores


def _score_adapter_and_base(
    checkpoint: Checkpoint,
    tokenized: Any,
    device: str,
    dtype: torch.dtype,
    scoring: dict[str, Any],
    policy: SequenceScores | None,
    base: SequenceScores | None,
) -> tuple[SequenceScores, SequenceScores]:
    """Score a PEFT checkpoint and, with its adapter disabled, its base (whichever is missing): one model for both."""
    model = load_policy(checkpoint, device=device, dtype=dtype)
    if policy is None:
        policy = score(model, tokenized, **scoring)
    if base is None:
        with model.disable_adapter():
            base = score(model, tokenized, **scoring)
    del model
    _free_memory()
    return policy, base


def _progress_bar(name: str, rows: int) -> Any:
    import sys

    from tqdm import tqdm

    return tqdm(total=rows, desc=f"scoring {name}", unit="rows", file=sys.stderr, leave=False, dynamic_ncols=True)


def _free_memory() -> None:
    """Return a freed model's memory before the next one is loaded (a 7B model is never held twice)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
