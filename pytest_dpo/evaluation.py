"""`evaluate()`: TRL's DPO eval metrics for one checkpoint, without pytest (module named `evaluation` so it never shadows the function on the package)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from .cache import ScoreCache, cache_key, tokenization_key, tokens_digest
from .checkpoints import (
    Checkpoint,
    CheckpointError,
    discover_checkpoints,
    policy_fingerprint,
)
from .eval_sets import DEFAULT_EVAL_SET
from .evalset import EvalSet, EvalSetError, load_eval_set
from .loading import (
    LoadOptions,
    autocast_dtype,
    choose_device,
    choose_dtype,
    free_memory,
    load_policy,
    load_reference,
    load_tokenizer,
    weight_bytes,
)
from .lock import tokenizer_fingerprint
from .metrics import aggregate, build_per_example
from .moe import enabled_aux_loss, refuse_coef_without_router
from .references import reference_fingerprint, resolve_reference, tokenizer_folder
from .results import WPO_FIELDS, EvalResult, Sample, SequenceScores
from .run_settings import ARGUMENT, FROM_RUN, FromRun, resolve_settings
from .samples import GenerationSettings, generate_completions, pair_samples
from .scoring import score
from .settings import DPOSettings
from .spelling import option, spelled_for
from .tokenization import TokenizedEvalSet, check_tokenizer, tokenize_eval_set

if TYPE_CHECKING:
    from .distributed import World

PROMPT_SNIPPET_CHARS = 120
T = TypeVar("T")


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
            prompt once, with both completions packed after it in one sequence
            or continuing from its KV cache (same numbers up to float rounding;
            False runs the prompt twice, as TRL).
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
        data = eval_set if isinstance(eval_set, EvalSet) else load_eval_set(eval_set)
        return CheckpointEvaluation(target, data, reference, resolved.settings, cache).score()


class CheckpointEvaluation:
    """One checkpoint scored on one eval set with one set of settings: the orchestrator of every model run.

    It resolves the reference once, and holds the tokenizer, the tokenized rows and the scoring plan
    (device, dtype, autocast). `score()` gives the `EvalResult`, `load(role)` a model on its own (for
    tests), `samples(n)` generated completions. Whether a role's model is the checkpoint, a reference
    model, or (for a fresh adapter) the checkpoint's base with its adapter disabled is decided in
    `_for_each_model` alone.

    Args:
        checkpoint (`Checkpoint`): the policy.
        eval_set (`EvalSet`): the preference eval set.
        reference (`str` or `Path`, *optional*): the reference as given; see `evaluate()`.
        settings (`DPOSettings`): the settings, with `device` chosen.
        cache (`ScoreCache`, *optional*): per-example scores to reuse and to add to.
        world (`World`, *optional*): the torchrun ranks; every rank must build this with the same
            arguments, rank 0's cache decides what is scored, and each rank scores a shard of the rows.
        eval_set_name (`str`, *optional*): the eval set's name in the run, carried into the result.

    Raises:
        CheckpointError: the reference cannot be resolved, or the settings ask for what the model lacks.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        eval_set: EvalSet,
        reference: str | Path | None,
        settings: DPOSettings,
        cache: ScoreCache | None = None,
        world: World | None = None,
        eval_set_name: str = DEFAULT_EVAL_SET,
    ) -> None:
        self.checkpoint = checkpoint
        self.eval_set = eval_set
        self.eval_set_name = eval_set_name
        self.settings = settings
        self.options = LoadOptions.of(settings)
        self.reference = resolve_reference(checkpoint, reference, allow_pickle=self.options.allow_pickle)
        refuse_coef_without_router(settings.router_aux_loss_coef, checkpoint, self.options)
        self.cache = cache
        self.world = world
        self.device = choose_device(settings.device)
        self.dtype = choose_dtype(settings.dtype, self.device)

    @property
    def precision(self) -> str:
        """`float32`, `bfloat16`, … (the weights' dtype), or `autocast-bfloat16` / `autocast-float16`."""
        if autocast_dtype(self.settings.dtype) is not None:
            return str(self.settings.dtype)
        return str(self.dtype).removeprefix("torch.")

    @cached_property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer (or its base's), checked against the eval set's format."""
        tokenizer, source = load_tokenizer(self.checkpoint, self.reference, self.options)
        check_tokenizer(tokenizer, self.eval_set, source)
        return tokenizer

    @cached_property
    def tokenized(self) -> TokenizedEvalSet:
        """The rows TRL scores, tokenized as TRL does, and the rows it drops; from the cache when it has them
        (then no tokenizer is loaded).

        Raises:
            EvalSetError: TRL would drop every row.
        """
        settings = self.settings
        key = self._tokenization_key()
        tokenized = self.cache.get_tokens(key) if self.cache is not None and key is not None else None
        if tokenized is None:
            tokenized = tokenize_eval_set(self.eval_set, self.tokenizer, settings.max_length, settings.truncation_mode)
            if self.cache is not None and key is not None:
                self.cache.put_tokens(key, tokenized)
        if not tokenized.rows:
            raise EvalSetError(
                f"{self.eval_set.path}: every row's prompt alone fills max_length={settings.max_length} tokens, so TRL "
                f"would drop them all and nothing is left to score. Raise max_length ({option('max_length')}) or "
                "shorten the prompts."
            )
        return tokenized

    def _tokenization_key(self) -> str | None:
        """The tokenized rows' cache key, or None where the tokenizer's files do not say all it does (one read
        from the Hub by name, or one that runs its repo's code)."""
        folder = tokenizer_folder(self.checkpoint, self.reference)
        if folder is None or self.options.trust_remote_code:
            return None
        settings = self.settings
        return tokenization_key(
            self.eval_set.sha256, tokenizer_fingerprint(folder), settings.max_length, settings.truncation_mode
        )

    def score(self, progress: bool = False) -> EvalResult:
        """TRL's metrics and the per-example arrays; models run only for scores the cache lacks.

        With `progress`, a bar on stderr (rows/s, ETA) while models score.
        """
        return score_together([self], progress)[0]

    def _cached(self) -> tuple[dict[str, str], dict[str, SequenceScores | None]]:
        """Each role's cache key, and its scores where the cache has them (rank 0's cache decides for all ranks)."""
        tokenized, settings = self.tokenized, self.settings
        tokens = tokens_digest(tokenized, settings.max_length, settings.truncation_mode)
        keys = {
            "policy": cache_key(policy_fingerprint(self.checkpoint), self.precision, self.device, tokens),
            "reference": cache_key(reference_fingerprint(self.reference), self.precision, self.device, tokens),
        }
        cache = self.cache
        cached = {
            role: cache.get(key, len(tokenized.rows), WPO_FIELDS if self._sums_sq_probs(role) else ()) if cache else None
            for role, key in keys.items()
        }
        if self.world is not None:
            cached = self.world.on_main(lambda: cached)
        return keys, cached

    def load(self, role: str) -> Any:
        """The `policy` or `reference` model on its own, on the evaluation's device (free it with `release_model`).

        A fresh adapter's reference is its base model, loaded without the adapter.
        """
        if role == "policy":
            return self._load(load_policy, self.checkpoint)
        return self._load(load_reference, self.reference)

    def samples(self, count: int, generation: GenerationSettings, reference_memo: dict[Any, list[str]]) -> list[Sample]:
        """The policy's and the reference's completions of the first `count` scored prompts.

        `reference_memo` keeps the reference's completions by reference and prompts, so a sweep
        generates them once, not once per checkpoint.
        """
        rows = self.tokenized.rows[:count]
        prompts = [row.prompt_ids for row in rows]
        memo_key = (self.reference.describe(), *map(tuple, prompts))
        roles = ["policy"] if memo_key in reference_memo else ["policy", "reference"]
        texts = self._for_each_model(
            roles, lambda role, model: generate_completions(model, self.tokenizer, prompts, generation)
        )
        reference_memo.setdefault(memo_key, texts.get("reference", []))
        return pair_samples(rows, self.tokenizer, texts["policy"], reference_memo[memo_key])

    def _for_each_model(self, roles: Sequence[str], use: Callable[[str, Any], T]) -> dict[str, T]:
        """`use(role, model)` for each role (`policy`, `reference`), one model in memory at a time.

        A PEFT checkpoint whose reference is its base is one model for both:
        the base is used with the adapter disabled.
        """
        done: dict[str, T] = {}
        if self.reference.kind == "base":
            model = self._load(load_policy, self.checkpoint)
            if "policy" in roles:
                done["policy"] = use("policy", model)
            if "reference" in roles:
                with model.disable_adapter():
                    done["reference"] = use("reference", model)
            dropped = weight_bytes(model)
            del model
            free_memory(dropped)
            return done
        for role in roles:
            model = self.load(role)
            done[role] = use(role, model)
            dropped = weight_bytes(model)
            del model
            free_memory(dropped)
        return done

    def rows_at(self, positions: list[int]) -> TokenizedEvalSet:
        """The tokenized rows at `positions` (indices into `tokenized.rows`)."""
        tokenized = self.tokenized
        return TokenizedEvalSet([tokenized.rows[position] for position in positions], tokenized.dropped_rows)

    def _load(self, loader: Callable[..., Any], source: Any) -> Any:
        return loader(source, device=self.device, dtype=self.dtype, options=self.options)

    def _sums_sq_probs(self, role: str) -> bool:
        """Whether `role`'s scores need WPO's log sum p^2: the policy's, with `use_weighting`."""
        return role == "policy" and self.settings.use_weighting

    def _score(
        self, model: Any, role: str, tokenized: TokenizedEvalSet, on_batch: Callable[[int], None] | None
    ) -> SequenceScores:
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
                sum_sq_probs=self._sums_sq_probs(role),
            )

    def _result(self, scores: dict[str, SequenceScores]) -> EvalResult:
        tokenized, settings, data = self.tokenized, self.settings, self.eval_set
        policy = scores["policy"]
        rows = torch.tensor([row.row for row in tokenized.rows], dtype=torch.int64)
        aux_loss = enabled_aux_loss(policy, settings.router_aux_loss_coef, self.checkpoint, self.options)
        per_example = build_per_example(rows, policy, scores["reference"], settings, aux_loss.term if aux_loss else 0.0)
        return EvalResult(
            checkpoint=self.checkpoint.name,
            checkpoint_path=str(self.checkpoint.path),
            reference=self.reference.describe(),
            metrics=aggregate(per_example, aux_loss.value if aux_loss else None),
            per_example=per_example,
            dropped_rows=tokenized.dropped_rows,
            eval_set_sha256=data.sha256,
            settings={**settings.to_dict(), "device": self.device, "dtype": self.precision},
            prompts=[data.prompt_text(index)[:PROMPT_SNIPPET_CHARS] for index in range(len(data))],
            eval_set_name=self.eval_set_name,
            subset_labels=None if data.subsets is None else list(data.subsets),
        )


def score_together(evaluations: Sequence[CheckpointEvaluation], progress: bool = False) -> list[EvalResult]:
    """The results of one checkpoint on several eval sets (one `CheckpointEvaluation` each, same checkpoint and
    reference), each model loaded once for all of them; models run only for scores the cache lacks.

    Under torchrun every rank scores a shard of every set's rows with one load per model.
    """
    first = evaluations[0]
    planned = [evaluation._cached() for evaluation in evaluations]
    missing = {index: [role for role, scores in cached.items() if scores is None] for index, (_, cached) in enumerate(planned)}
    roles = [role for role in ("policy", "reference") if any(role in wanted for wanted in missing.values())]

    def score_parts(positions: dict[int, list[int]]) -> dict[int, dict[str, SequenceScores]]:
        jobs = [(index, role) for index, rows in positions.items() if rows for role in missing[index]]
        total = sum(len(positions[index]) for index, _ in jobs)
        bar = _progress_bar(first.checkpoint.name, total) if progress else None

        def use(role: str, model: Any) -> dict[int, SequenceScores]:
            on_batch = bar.update if bar is not None else None
            return {
                index: evaluations[index]._score(model, role, evaluations[index].rows_at(positions[index]), on_batch)
                for index, wanted in jobs
                if wanted == role
            }

        try:
            by_role = first._for_each_model(roles, use)
        finally:
            if bar is not None:
                bar.close()
        return {index: {role: by_role[role][index] for role in roles if index in by_role[role]} for index in positions}

    fresh: dict[int, dict[str, SequenceScores]] = {}
    if roles and first.world is None:
        fresh = score_parts({index: list(range(len(evaluation.tokenized.rows))) for index, evaluation in enumerate(evaluations)})
    elif roles and first.world is not None:
        lengths = {
            index: [row.length(evaluation.settings.max_length) for row in evaluation.tokenized.rows]
            for index, evaluation in enumerate(evaluations)
            if missing[index]
        }
        fresh = first.world.score_parts(lengths, score_parts)
    results = []
    for index, (evaluation, (keys, cached)) in enumerate(zip(evaluations, planned, strict=True)):
        scored = fresh.get(index, {})
        if evaluation.cache is not None:
            for role, scores in scored.items():
                evaluation.cache.put(keys[role], scores)
        results.append(evaluation._result({**cached, **scored}))
    return results


def _single_checkpoint(spec: str | Path, options: LoadOptions) -> Checkpoint:
    found = discover_checkpoints(spec, allow_pickle=options.allow_pickle)
    if len(found) != 1:
        names = ", ".join(checkpoint.name for checkpoint in found)
        raise CheckpointError(
            f"{spec}: evaluate() scores one checkpoint, but this holds {len(found)} ({names}). "
            "Pass one of them, or loop over pytest_dpo.discover_checkpoints(...)."
        )
    return found[0]


def _progress_bar(name: str, rows: int) -> Any:
    import sys

    from tqdm import tqdm

    return tqdm(total=rows, desc=f"scoring {name}", unit="rows", file=sys.stderr, leave=False, dynamic_ncols=True)
