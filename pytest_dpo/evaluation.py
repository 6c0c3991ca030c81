"""`evaluate()`: TRL's DPO eval metrics for one checkpoint, without pytest (module named `evaluation` so it never shadows the function on the package)."""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .cache import ScoreCache, cache_key, tokens_digest
from .evalset import EvalSet, EvalSetError, load_eval_set
from .metrics import aggregate, build_per_example
from .moe import enabled_aux_loss, refuse_coef_without_router
from .checkpoints import (
    Checkpoint,
    CheckpointError,
    discover_checkpoints,
    policy_fingerprint,
    reference_fingerprint,
    resolve_reference,
)
from .loading import (
    LoadOptions,
    autocast_dtype,
    choose_device,
    choose_dtype,
    load_policy,
    load_reference,
    load_tokenizer,
)
from .results import EvalResult, SequenceScores
from .run_settings import ARGUMENT, FROM_RUN, FromRun, resolve_settings
from .scoring import score
from .settings import DPOSettings
from .spelling import option, spelled_for
from .tokenization import TokenizedEvalSet, TokenizedRow, check_tokenizer, tokenize_eval_set

if TYPE_CHECKING:
    from .distributed import World

PROMPT_SNIPPET_CHARS = 120


def evaluate(
    checkpoint: str | Path | Checkpoint,
    eval_set: str | Path | EvalSet | Sequence[dict[str, Any]],
    reference: str | Path | None = None,
    *,
    beta: float | FromRun = FROM_RUN,
    loss_type: str | Sequence[str] | FromRun = FROM_RUN,
    loss_weights: Sequence[float] | None | FromRun = FROM_RUN,
    max_length: int | None | FromRun = FROM_RUN,
    truncation_mode: str | FromRun = FROM_RUN,
    label_smoothing: float | FromRun = FROM_RUN,
    discopop_tau: float | FromRun = FROM_RUN,
    ld_alpha: float | None | FromRun = FROM_RUN,
    f_divergence_type: str | FromRun = FROM_RUN,
    f_alpha_divergence_coef: float | FromRun = FROM_RUN,
    use_weighting: bool | FromRun = FROM_RUN,
    router_aux_loss_coef: float | None | FromRun = FROM_RUN,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str | None = None,
    cache_dir: str | Path | None = None,
    share_prompt: bool = True,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    device_map: str | None = None,
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
        ld_alpha (`float`, *optional*): LD-DPO's weight of the completion
            tokens beyond the shorter completion's length, in [0, 1]; changes
            the log-probs, rewards and losses. None: standard DPO.
        f_divergence_type (`str`, *optional*): the f-DPO regularizer
            (`reverse_kl`, `forward_kl`, `js_divergence`, `alpha_divergence`);
            non-default only with the loss types built on the chosen-rejected
            reward difference, as in TRL.
        f_alpha_divergence_coef (`float`, *optional*): alpha of the `alpha_divergence`.
        use_weighting (`bool`, *optional*): WPO weighting of each pair's loss by
            the policy's length-normalized probabilities.
        router_aux_loss_coef (`float`, *optional*): for a mixture-of-experts
            policy, the weight of its load-balancing `aux_loss` in `loss`. None:
            the model config's coefficient; 0.0 leaves it out. TRL's formula is
            applied with the whole eval set as one batch.

            Each of these training settings defaults to `FROM_RUN`: the value the
            checkpoint's run trained with (its TRL `training_args.bin`, read
            without executing it), else TRL's default (`beta=0.1`,
            `loss_type="sigmoid"`, `max_length=1024`, `truncation_mode="keep_start"`,
            `label_smoothing=0.0`, `discopop_tau=0.05`, `ld_alpha=None`,
            `f_divergence_type="reverse_kl"`, `f_alpha_divergence_coef=0.5`,
            `use_weighting=False`, `router_aux_loss_coef=None`). A value given
            here wins. Training settings whose effect cannot be reproduced are
            reported with `warnings.warn`.
        batch_size (`int`, *optional*, defaults to 8): rows per forward pass.
        device (`str`, *optional*): default cuda if available, else cpu.
        dtype (`str`, *optional*): `float32`, `bfloat16` or `float16`; default
            bfloat16 on CUDA devices that support it, else float32.
        cache_dir (`str` or `Path`, *optional*): keep each model's per-example
            scores here, keyed by weights fingerprint and the exact token ids, and
            reuse them instead of running the model again.
        share_prompt (`bool`, *optional*, defaults to True): run each row's
            prompt once and score both completions from its KV cache (same
            numbers up to float rounding; False runs the prompt twice, as TRL).
        allow_pickle (`bool`, *optional*, defaults to False): also load weights
            stored only as pickle (`pytorch_model.bin`, `adapter_model.bin`),
            which can run arbitrary code when loaded; only for trusted checkpoints.
        trust_remote_code (`bool`, *optional*, defaults to False): run the code a
            checkpoint, reference or tokenizer ships (`auto_map`); only for trusted repos.
        device_map (`str`, *optional*): `"auto"` shards each model over all
            visible GPUs with accelerate (models larger than one GPU); default:
            the whole model on `device`.

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
    training = {
        "beta": beta,
        "loss_type": loss_type,
        "loss_weights": loss_weights,
        "max_length": max_length,
        "truncation_mode": truncation_mode,
        "label_smoothing": label_smoothing,
        "discopop_tau": discopop_tau,
        "ld_alpha": ld_alpha,
        "f_divergence_type": f_divergence_type,
        "f_alpha_divergence_coef": f_alpha_divergence_coef,
        "use_weighting": use_weighting,
        "router_aux_loss_coef": router_aux_loss_coef,
    }
    given = {name: value for name, value in training.items() if value is not FROM_RUN}
    if isinstance(given.get("loss_weights"), Sequence):
        given["loss_weights"] = tuple(given["loss_weights"])
    with spelled_for("python"):
        base = DPOSettings(
            **given,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            share_prompt=share_prompt,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            device_map=device_map,
        )
        options = LoadOptions.of(base)
        target = checkpoint if isinstance(checkpoint, Checkpoint) else _single_checkpoint(checkpoint, options)
        resolved = resolve_settings(base, dict.fromkeys(given, ARGUMENT), target.path)
        for warning in resolved.warnings:
            warnings.warn(warning, UserWarning, stacklevel=2)
        cache = ScoreCache(cache_dir) if cache_dir is not None else None
        return evaluate_with_settings(target, eval_set, reference, resolved.settings, cache)


def evaluate_with_settings(
    checkpoint: str | Path | Checkpoint,
    eval_set: str | Path | EvalSet | Sequence[dict[str, Any]],
    reference: str | Path | None,
    settings: DPOSettings,
    cache: ScoreCache | None = None,
    progress: bool = False,
    world: World | None = None,
) -> EvalResult:
    """`evaluate()` with the settings already gathered in a `DPOSettings`, an optional score cache, and
    optionally a progress bar on stderr (rows/s, ETA) while models score.

    With a torchrun `world`, every rank must call this with the same arguments: rank 0's cache decides what
    is scored, each rank scores its shard of the rows, and every rank returns the same full result.
    """
    data = eval_set if isinstance(eval_set, EvalSet) else load_eval_set(eval_set)
    options = LoadOptions.of(settings)
    target = checkpoint if isinstance(checkpoint, Checkpoint) else _single_checkpoint(checkpoint, options)
    ref = resolve_reference(target, reference, allow_pickle=options.allow_pickle)
    refuse_coef_without_router(settings.router_aux_loss_coef, target, options)
    tokenizer, tokenizer_source = load_tokenizer(target, ref, options)
    check_tokenizer(tokenizer, data, tokenizer_source)
    tokenized = tokenize_eval_set(data, tokenizer, settings.max_length, settings.truncation_mode)
    if not tokenized.rows:
        raise EvalSetError(
            f"{data.path}: every row's prompt alone fills max_length={settings.max_length} tokens, so TRL would drop "
            f"them all and nothing is left to score. Raise max_length ({option('max_length')}) or shorten the prompts."
        )
    device = choose_device(settings.device)
    dtype = choose_dtype(settings.dtype, device)
    plan = _ScoringPlan(device, dtype, options, settings)

    tokens = tokens_digest(tokenized, settings.max_length, settings.truncation_mode)
    keys = {
        "policy": cache_key(policy_fingerprint(target), plan.precision, device, tokens),
        "reference": cache_key(reference_fingerprint(ref), plan.precision, device, tokens),
    }
    cached = {role: cache.get(key, len(tokenized.rows)) if cache else None for role, key in keys.items()}
    if world is not None:
        cached = world.on_main(lambda: cached)
    missing = {role for role, scores in cached.items() if scores is None}

    def score_rows(positions: list[int]) -> dict[str, SequenceScores]:
        shard = TokenizedEvalSet([tokenized.rows[position] for position in positions], tokenized.dropped_rows)
        bar = _progress_bar(target.name, len(missing) * len(positions)) if progress else None
        try:
            return _score_missing(target, ref, shard, missing, plan, bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()

    fresh: dict[str, SequenceScores] = {}
    if missing and world is None:
        fresh = score_rows(list(range(len(tokenized.rows))))
    elif missing and world is not None:
        fresh = world.score_shards([_scored_length(row, settings.max_length) for row in tokenized.rows], score_rows)
    if cache is not None:
        for role, scores in fresh.items():
            cache.put(keys[role], scores)
    scores = cached | fresh
    policy, reference_scores = scores["policy"], scores["reference"]

    rows = torch.tensor([row.row for row in tokenized.rows], dtype=torch.int64)
    aux_loss = enabled_aux_loss(policy, settings.router_aux_loss_coef, target, options)
    per_example = build_per_example(rows, policy, reference_scores, settings, aux_loss.term if aux_loss else 0.0)
    return EvalResult(
        checkpoint=target.name,
        checkpoint_path=str(target.path),
        reference=ref.describe(),
        metrics=aggregate(per_example, aux_loss.value if aux_loss else None),
        per_example=per_example,
        dropped_rows=tokenized.dropped_rows,
        eval_set_sha256=data.sha256,
        settings={**settings.to_dict(), "device": device, "dtype": plan.precision},
        prompts=[data.prompt_text(index)[:PROMPT_SNIPPET_CHARS] for index in range(len(data))],
    )


def _single_checkpoint(spec: str | Path, options: LoadOptions) -> Checkpoint:
    found = discover_checkpoints(spec, allow_pickle=options.allow_pickle)
    if len(found) != 1:
        names = ", ".join(checkpoint.name for checkpoint in found)
        raise CheckpointError(
            f"{spec}: evaluate() scores one checkpoint, but this holds {len(found)} ({names}). "
            "Pass one of them, or loop over pytest_dpo.discover_checkpoints(...)."
        )
    return found[0]


def _scored_length(row: TokenizedRow, max_length: int | None) -> int:
    length = len(row.prompt_ids) + max(len(row.chosen_ids), len(row.rejected_ids))
    return length if max_length is None else min(length, max_length)


@dataclass(frozen=True)
class _ScoringPlan:
    """How models are loaded and run for one evaluation."""

    device: str
    dtype: torch.dtype
    options: LoadOptions
    settings: DPOSettings

    @property
    def precision(self) -> str:
        """`float32`, `bfloat16`, … (the weights' dtype), or `autocast-bfloat16` / `autocast-float16`."""
        if autocast_dtype(self.settings.dtype) is not None:
            return str(self.settings.dtype)
        return str(self.dtype).removeprefix("torch.")

    def load(self, loader: Callable[..., Any], source: Any) -> Any:
        return loader(source, device=self.device, dtype=self.dtype, options=self.options)

    def score(self, model: Any, tokenized: TokenizedEvalSet, on_batch: Callable[[int], None] | None) -> SequenceScores:
        settings = self.settings
        autocast = autocast_dtype(settings.dtype)
        device_type = torch.device(self.device).type
        with torch.autocast(device_type, dtype=autocast) if autocast is not None else contextlib.nullcontext():
            return score(
                model,
                tokenized,
                batch_size=settings.batch_size,
                max_length=settings.max_length,
                truncation_mode=settings.truncation_mode,
                share_prompt=settings.share_prompt,
                on_batch=on_batch,
            )


def _score_missing(
    target: Checkpoint,
    ref: Any,
    tokenized: TokenizedEvalSet,
    roles: set[str],
    plan: _ScoringPlan,
    on_batch: Callable[[int], None] | None,
) -> dict[str, SequenceScores]:
    """Score the `roles` (`policy`, `reference`) the cache did not have, one model in memory at a time.

    A PEFT checkpoint whose reference is its base is one model for both: the
    base is scored with the adapter disabled.
    """
    scores = {}
    if ref.kind == "base":
        model = plan.load(load_policy, target)
        if "policy" in roles:
            scores["policy"] = plan.score(model, tokenized, on_batch)
        if "reference" in roles:
            with model.disable_adapter():
                scores["reference"] = plan.score(model, tokenized, on_batch)
        del model
        _free_memory()
        return scores
    sources = {"policy": (load_policy, target), "reference": (load_reference, ref)}
    for role in sorted(roles):
        model = plan.load(*sources[role])
        scores[role] = plan.score(model, tokenized, on_batch)
        del model
        _free_memory()
    return scores


def _progress_bar(name: str, rows: int) -> Any:
    import sys

    from tqdm import tqdm

    return tqdm(total=rows, desc=f"scoring {name}", unit="rows", file=sys.stderr, leave=False, dynamic_ncols=True)


def _free_memory() -> None:
    """Return a freed model's memory before the next one is loaded (a 7B model is never held twice)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
