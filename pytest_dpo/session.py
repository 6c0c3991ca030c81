"""One pytest session's DPO state: the checkpoints, and a memo of their evaluations and results.

Knows nothing about pytest; the plugin holds one `DPOSession` per run. The model
work is `evaluation.CheckpointEvaluation`'s; this module only remembers what was
computed (and what failed) per checkpoint id. It imports torch (the cached
scores are tensors); transformers and peft only when a model or tokenizer loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cache import ScoreCache
from .checkpoints import (
    Checkpoint,
    CheckpointError,
    checkpoint_ids,
    discover_all,
    discover_checkpoints,
)
from .config import RunConfig
from .eval_sets import DEFAULT_EVAL_SET, EvalSetSpec
from .evalset import HUB_PREFIX, EvalSet, EvalSetError, load_eval_set
from .options import ConfigError, option_spec, setting_error
from .prefetch import Prefetcher
from .settings import SettingsError

if TYPE_CHECKING:
    from .distributed import World
    from .evaluation import CheckpointEvaluation
    from .publish import Release
    from .results import EvalResult, Sample
    from .run_settings import CheckpointSettings
    from .verdicts import CheckpointVerdict


class EvaluationFailed(RuntimeError):
    """A checkpoint could not be evaluated; raised for every later test of that checkpoint."""


def explained_failure(error: BaseException) -> bool:
    """Whether `error` already says what is wrong and what to do (bad input, a failed rank), so its
    traceback would only bury the message."""
    from .distributed import RankFailed

    return isinstance(error, (CheckpointError, EvalSetError, SettingsError, EvaluationFailed, RankFailed))


class DPOSession:
    """The checkpoints of a run and everything computed for them.

    Args:
        config (`RunConfig`): what the plugin was told.
        worker_index (`int`, *optional*): the pytest-xdist worker number, to give each worker its own GPU.
        default_cache_dir (`Path`, *optional*): the score cache's folder unless the options name one;
            scores are always shared in memory within the session (a sweep scores its reference once).
        world (`World`, *optional*): the torchrun ranks, started; each rank scores a shard of every
            checkpoint on `cuda:LOCAL_RANK`, and only rank 0 reads and writes the on-disk cache and the lock.

    Raises:
        ConfigError: a checkpoint, the reference or the eval set cannot be used.
    """

    def __init__(
        self,
        config: RunConfig,
        worker_index: int | None = None,
        default_cache_dir: Path | None = None,
        world: World | None = None,
    ) -> None:
        self.config = config
        self.world = world
        self.worker_index = worker_index if world is None else world.local_rank
        self.checkpoints = _discover(config.checkpoints, config.settings.allow_pickle)
        self.ids = checkpoint_ids(self.checkpoints)
        self._checkpoints = dict(zip(self.ids, self.checkpoints))
        self.eval_set_specs = {spec.name: spec for spec in config.eval_sets}
        self.eval_sets: dict[str, EvalSet] = {spec.name: _load(spec, config.subset_column) for spec in config.eval_sets}
        # `dpo_result`, `--dpo-baseline` and the samples use this set: `default`, else the first one given.
        self.default_set = DEFAULT_EVAL_SET if DEFAULT_EVAL_SET in self.eval_sets else config.eval_sets[0].name
        _check_subsets(config, self.eval_sets)
        # Per checkpoint id, each eval set's result (in the run's set order).
        self.results: dict[str, dict[str, EvalResult]] = {}
        self._evaluations: dict[tuple[str, str], CheckpointEvaluation] = {}
        self._settings: dict[str, CheckpointSettings] = {}
        self.timings: dict[str, float] = {}
        self._failures: dict[str, str] = {}
        self._device: str | None = None
        self._baseline: EvalResult | None = None
        self.lock_status: str | None = None
        self.samples: dict[str, list[Sample]] = {}
        self._reference_completions: dict[Any, list[str]] = {}
        self.progress: Callable[[], ContextManager[Any]] | None = None
        # An xdist worker does not know which checkpoint it gets next; a single process or a torchrun rank does.
        self.prefetcher = Prefetcher() if worker_index is None or world is not None else None
        cache_dir = (config.cache_dir or default_cache_dir) if config.use_cache else None
        self.cache = ScoreCache(cache_dir if world is None or world.is_main else None)
        if world is not None:
            world.check_same("checkpoints or eval sets", (self.ids, [data.sha256 for data in self.eval_sets.values()]))
        if config.settings.device is not None:
            from .loading import check_device

            try:
                check_device(config.settings.device)
            except SettingsError as error:
                raise setting_error(error) from None
        self._baseline_checkpoint = self._check_baseline() if config.baseline else None
        if config.samples:
            from .samples import GenerationError

            try:
                config.generation.generation_config(option_spec("generation").both)
            except GenerationError as error:
                raise ConfigError(str(error)) from None

    def check_lock(self, root: Path) -> str:
        """Compare the eval set and the tokenizer with the lock file (relative paths resolve from `root`).

        Returns what happened (`created`, `unchanged`, `updated`); raises
        `ConfigError` with the drift and the fix when they changed. Under torchrun
        rank 0 checks (and writes) the lock and every rank gets its answer.
        """
        if self.world is not None:
            return self.world.on_main(lambda: self._check_lock(root))
        return self._check_lock(root)

    def _check_lock(self, root: Path) -> str:
        from .lock import LockError, build_lock, check_locks
        from .references import tokenizer_folder

        path = root / (self.config.lock or "")
        if path.is_dir():
            raise ConfigError(
                f"{option_spec('lock').both}: {path} is a folder. Give the lock file's path (default: "
                f"{option_spec('lock').default} in the rootdir), or none to turn the lock off."
            )
        first = self.ids[0]
        try:
            reference = self.evaluation(first).reference
        except (CheckpointError, EvaluationFailed):
            reference = None  # reported when the checkpoint is evaluated; the tokenizer may still be its own
        tokenizer_dir = tokenizer_folder(self.checkpoint(first), reference)
        try:
            current = {
                name: dataclasses.replace(build_lock(data, tokenizer_dir), eval_set_path=_relative(data.path, root))
                for name, data in self.eval_sets.items()
            }
            return check_locks(path, current, update=self.config.update_lock)
        except LockError as error:
            raise ConfigError(str(error)) from None

    def failure(self, checkpoint_id: str) -> str | None:
        """Why the checkpoint could not be evaluated (`checkpoint-4: evaluation failed: …`), None if it was not."""
        return self._failures.get(checkpoint_id)

    def checkpoint(self, checkpoint_id: str) -> Checkpoint:
        return self._checkpoints[checkpoint_id]

    def id_of(self, checkpoint: Checkpoint) -> str:
        """The unique id (`checkpoint-500`, or `run-a/checkpoint-500`) of one of this session's checkpoints."""
        return self.ids[self.checkpoints.index(checkpoint)]

    @property
    def device(self) -> str:
        if self._device is None:
            from .loading import choose_device

            self._device = choose_device(self.config.settings.device, self.worker_index)
        return self._device

    def checkpoint_settings(self, checkpoint_id: str) -> CheckpointSettings:
        """The settings the checkpoint is scored with (its run's, unless given explicitly), with their sources.

        Raises:
            EvaluationFailed: the run's saved settings cannot be combined with the explicit ones.
        """
        if checkpoint_id not in self._settings:
            self._settings[checkpoint_id] = self._resolve_settings(self.checkpoint(checkpoint_id))
        return self._settings[checkpoint_id]

    def _resolve_settings(self, checkpoint: Checkpoint) -> CheckpointSettings:
        from .run_settings import resolve_settings

        try:
            return resolve_settings(self.config.settings, self.config.explicit_settings, checkpoint.path)
        except SettingsError as error:
            raise EvaluationFailed(str(error)) from None

    @property
    def eval_set(self) -> EvalSet:
        """The default eval set (see `default_set`)."""
        return self.eval_sets[self.default_set]

    def evaluation(self, checkpoint_id: str, eval_set: str | None = None) -> CheckpointEvaluation:
        """The checkpoint's `CheckpointEvaluation` on one eval set (default: the default set), made once.

        Raises:
            EvaluationFailed: the run's saved settings cannot be combined with the explicit ones, or with the
                eval set's own.
            CheckpointError: the reference cannot be resolved.
        """
        key = (checkpoint_id, eval_set or self.default_set)
        if key not in self._evaluations:
            settings = self.checkpoint_settings(checkpoint_id).settings
            self._evaluations[key] = self._evaluation_of(self.checkpoint(checkpoint_id), settings, self.world, key[1])
        return self._evaluations[key]

    def _evaluation_of(
        self, checkpoint: Checkpoint, settings: Any, world: World | None, eval_set: str
    ) -> CheckpointEvaluation:
        from .eval_sets import parsed_options
        from .evaluation import CheckpointEvaluation

        try:
            settings = dataclasses.replace(settings, device=self.device, **parsed_options(self.eval_set_specs[eval_set]))
        except SettingsError as error:
            raise EvaluationFailed(f"eval set {eval_set!r}: {error}") from None
        data = self.eval_sets[eval_set]
        return CheckpointEvaluation(checkpoint, data, self.config.reference, settings, self.cache, world, eval_set)

    def result(self, checkpoint_id: str, eval_set: str | None = None) -> EvalResult:
        """The checkpoint's `EvalResult` on one eval set (default: the default set); see `results_of`."""
        return self.results_of(checkpoint_id)[eval_set or self.default_set]

    def results_of(self, checkpoint_id: str) -> dict[str, EvalResult]:
        """The checkpoint's result on every eval set, computed on first use with each model loaded once for all
        sets; a failure is remembered and raised again."""
        if checkpoint_id in self.results:
            return self.results[checkpoint_id]
        if checkpoint_id in self._failures:
            raise EvaluationFailed(self._failures[checkpoint_id])
        from .evaluation import score_together

        started = time.perf_counter()
        self._prefetch_after(checkpoint_id)
        try:
            evaluations = [self.evaluation(checkpoint_id, name) for name in self.eval_sets]
            with self.progress() if self.progress else contextlib.nullcontext():
                scored = score_together(evaluations, progress=self.progress is not None)
        except Exception as error:
            self._failures[checkpoint_id] = f"{checkpoint_id}: evaluation failed: {type(error).__name__}: {error}"
            raise
        self.results[checkpoint_id] = dict(zip(self.eval_sets, scored, strict=True))
        self.timings[checkpoint_id] = time.perf_counter() - started
        if self.config.samples and (self.world is None or self.world.is_main):
            self.generate_samples(checkpoint_id)
        return self.results[checkpoint_id]

    def _prefetch_after(self, checkpoint_id: str) -> None:
        """Start reading the weights of the checkpoint after this one while this one is scored."""
        position = self.ids.index(checkpoint_id) + 1
        if self.prefetcher is not None and position < len(self.ids):
            self.prefetcher.start(self.checkpoints[position])

    def generate_samples(self, checkpoint_id: str) -> list[Sample]:
        """Completions of the policy and the reference for the first `--dpo-samples` prompts (memoized).

        The reference's completions are generated once per reference and
        prompt list, so a sweep does not repeat them for every checkpoint.
        """
        if checkpoint_id not in self.samples:
            evaluation = self.evaluation(checkpoint_id)
            self.samples[checkpoint_id] = evaluation.samples(
                self.config.samples, self.config.generation, self._reference_completions
            )
        return self.samples[checkpoint_id]

    def _check_baseline(self) -> Checkpoint | None:
        """Refuse a `--dpo-baseline` that is missing, unreadable or of another eval set before anything is scored.

        Returns the baseline checkpoint to evaluate, or None when it is a saved report (loaded here).
        """
        from .report_files import REPORT_JSON_FILE, ReportError, baseline_from_report

        path = Path(self.config.baseline or "")
        where = option_spec("baseline").both
        if not path.exists():
            raise ConfigError(
                f"{where}: {path}: not found (resolved from {Path.cwd()}). Give the last release's checkpoint folder, "
                f"or the {REPORT_JSON_FILE} (or its folder) that a run with {option_spec('report').flag} wrote."
            )
        if path.is_file() or (path / REPORT_JSON_FILE).exists():

            try:
                self._baseline = baseline_from_report(path)
            except ReportError as error:
                raise ConfigError(f"{where}: {error}") from None
            if self._baseline.eval_set_sha256 != self.eval_set.sha256:
                raise ConfigError(
                    f"{where}: {path} was scored on another eval set (sha256 {self._baseline.eval_set_sha256[:12]}, "
                    f"this run's {self.eval_set.path} is {self.eval_set.sha256[:12]}), so its rows cannot be paired. "
                    "Point it at a report of this eval set, or at the release's checkpoint folder to score it here."
                )
            return None
        try:
            return discover_checkpoints(path, allow_pickle=self.config.settings.allow_pickle)[-1]
        except CheckpointError as error:
            raise ConfigError(f"{where}: {error}") from None

    def baseline(self) -> EvalResult:
        """The result to compare with (`--dpo-baseline`): a checkpoint evaluated like the others, or a saved report."""
        if self._baseline is None:
            checkpoint = self._baseline_checkpoint
            settings = self._resolve_settings(checkpoint).settings
            # Unsharded on every rank: ranks may first need the baseline at different tests, and a
            # collective needs all ranks at the same call.
            self._baseline = self._evaluation_of(checkpoint, settings, None, self.default_set).score()
        return self._baseline

    def release(self, checkpoint_id: str, results: dict[str, EvalResult], verdict: CheckpointVerdict) -> Release:
        """What publishing needs to know about a checkpoint that passed: every eval set's result and record."""
        from .checkpoints import locate
        from .publish import Release
        from .references import tokenizer_folder
        from .report import named_eval_set_records

        checkpoint = self.checkpoint(checkpoint_id)
        base = checkpoint.base_model
        hub_base = base if base and not Path(locate(base, checkpoint.path)).exists() else None
        return Release(
            checkpoint_id=checkpoint_id,
            checkpoint=checkpoint,
            result=results[self.default_set],
            passed_tests=verdict.tests("passed"),
            eval_set_name=Path(self.eval_set.path).name,
            tokenizer_dir=tokenizer_folder(checkpoint, self.evaluation(checkpoint_id).reference),
            base_model=hub_base,
            results=results,
            eval_sets=named_eval_set_records(self.eval_sets, self.eval_set_specs),
        )


def _relative(source: str, root: Path) -> str:
    """A local eval set's path relative to `root`, so a committed lock file holds no machine-specific path."""
    if source.startswith(HUB_PREFIX):
        return source
    return Path(os.path.relpath(Path(source).resolve(), root.resolve())).as_posix()


def _load(spec: EvalSetSpec, subset_column: str | None) -> EvalSet:
    try:
        return load_eval_set(spec.source, subset_column)
    except EvalSetError as error:
        named = "" if spec.name == DEFAULT_EVAL_SET else f"eval set {spec.name!r}: "
        raise ConfigError(f"{option_spec('eval_set').both}: {named}{error}") from None


def _check_subsets(config: RunConfig, eval_sets: dict[str, EvalSet]) -> None:
    """The subset column is in some eval set, and every subset gate names a subset its set has."""
    column = config.subset_column
    if column is not None and all(data.subsets is None for data in eval_sets.values()):
        columns = sorted({str(key) for data in eval_sets.values() for key in data.ignored_columns})
        raise ConfigError(
            f"{option_spec('subset_column').both}: no eval set has a column {column!r}. Their other columns: "
            f"{', '.join(columns) or 'none'}. Name one of them, or add the column to the sets it splits."
        )
    for gate in config.gates:
        if gate.subset is None or gate.eval_set is None:
            continue
        subsets = eval_sets[gate.eval_set].subsets
        if column is None:
            raise ConfigError(
                f"{gate.where}: gate {str(gate)!r} is on subset {gate.subset!r}, but no column splits the eval sets "
                f"into subsets. Name it with {option_spec('subset_column').both}, e.g. --dpo-subset-column=subset."
            )
        if subsets is None:
            raise ConfigError(
                f"{gate.where}: gate {str(gate)!r} is on subset {gate.subset!r}, but eval set {gate.eval_set!r} has "
                f"no column {column!r}, so it has no subsets. Add the column to it, or gate another set's subset."
            )
        if gate.subset not in subsets:
            known = ", ".join(dict.fromkeys(subsets))
            raise ConfigError(
                f"{gate.where}: gate {str(gate)!r} is on subset {gate.subset!r}, which eval set {gate.eval_set!r} "
                f"does not have. Its subsets ({config.subset_column}): {known}."
            )


def _discover(specs: tuple[str, ...], allow_pickle: bool) -> list[Checkpoint]:
    try:
        return discover_all(specs, allow_pickle=allow_pickle)
    except CheckpointError as error:
        raise ConfigError(f"{option_spec('checkpoint').both}: {error}") from None
