"""`DPOGateCallback`: the release gate, run on every checkpoint a transformers `Trainer` saves while it trains.

On each save the team's own pytest command (the one CI runs) gates the new checkpoint in a
subprocess (`gate_run`); the plugin in that subprocess saves and pushes the checkpoint only if
it passed. The verdict and the gate's main metrics go into the Trainer's logs (`dpo_gate/…`)
and into the checkpoint folder (`dpo_verdict.json`). Works with TRL's `DPOTrainer` and any
`Trainer`; `trl` is never imported.
"""

from __future__ import annotations

import atexit
import math
import os
import queue
import sys
import textwrap
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .gate_run import GATE_FOLDER, VERDICT_FILE, GateRunner, GateVerdict, hold
from .metric_table import SUMMARY_METRICS
from .spelling import spelled

LOG_PREFIX = "dpo_gate/"
CACHE_FOLDER = ".dpo-gate-cache"
HOLDING_FOLDER = ".dpo-gate-held"
TABLE_WIDTH = 80
_FLAGS = {name: spelled(name, "pytest") for name in ("checkpoint", "report", "device", "cache_dir", "no_cache")}
_SHOWN_TESTS = 3


class DPOGateCallback(TrainerCallback):
    """Run the pytest-dpo release gate on every checkpoint the Trainer saves; only passing ones get published.

    On each `on_save` (on the world's process zero only) it runs `python -m pytest *pytest_args
    --dpo-checkpoint=OUTPUT_DIR/checkpoint-STEP` in a subprocess, so the verdict is exactly the one
    CI would give, and the plugin's own publisher saves and pushes the checkpoint only if it
    passed (`--dpo-save-dir`, `--dpo-push-to` in `pytest_args` or the ini file). Give the Trainer
    `push_to_hub=False`: it would push every checkpoint, good or bad.

    Args:
        *pytest_args (`str`): the gate's pytest command line as CI has it, without `--dpo-checkpoint` and
            `--dpo-report` (test paths, `--dpo-eval-set=…`, `--dpo-gate=…`, `--dpo-push-to=…`, `-c release.ini`).
        device (`str`, *optional*): where the gate evaluates (`--dpo-device`). Defaults to `cpu` when the Trainer
            trains on the machine's only GPU (the gate's models would compete with training for its memory),
            else to the plugin's default (`cuda` if available, else `cpu`).
        blocking (`bool`, *optional*, defaults to `True`): wait for each verdict before training goes on. When
            False, gates run one at a time in a background thread, in save order, and training waits for the
            last of them at its end.
        stop_after_failures (`int`, *optional*): stop training after this many failed gates in a row (in the
            background: at the next step after the last of them is known).
        timeout (`float`, *optional*): seconds one gate may run; then pytest and every process it started are
            killed, and the gate fails.
        cache_dir (`str | os.PathLike`, *optional*): the score cache shared by every gate of the run
            (`--dpo-cache-dir`), so the reference is scored once. Defaults to `OUTPUT_DIR/.dpo-gate-cache`
            unless `pytest_args` give `--dpo-cache-dir` or `--dpo-no-cache`.
        env (`Mapping[str, str]`, *optional*): environment variables for the gate, on top of this process's.
        cwd (`str | os.PathLike`, *optional*): where pytest runs; defaults to the working directory at creation.

    Example:
        >>> gate = DPOGateCallback("release_tests", "--dpo-eval-set=data/eval.jsonl", "--dpo-push-to=org/model")
        >>> trainer = DPOTrainer(model=..., args=DPOConfig(..., push_to_hub=False), callbacks=[gate])
    """

    def __init__(
        self,
        *pytest_args: str | os.PathLike[str],
        device: str | None = None,
        blocking: bool = True,
        stop_after_failures: int | None = None,
        timeout: float | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.pytest_args = _checked_args(pytest_args)
        _check_options(self.pytest_args, device, blocking, stop_after_failures, timeout, cache_dir, env, cwd)
        self.device = device
        self.blocking = blocking
        self.stop_after_failures = stop_after_failures
        self.timeout = None if timeout is None else float(timeout)
        self.cache_dir = None if cache_dir is None else Path(cache_dir).resolve()
        self.env = dict(env or {})
        self.cwd = Path(cwd).resolve() if cwd is not None else Path.cwd()
        self.verdicts: list[GateVerdict] = []
        self._trainer: Trainer | None = None
        self._runner: GateRunner | None = None
        self._failures_in_a_row = 0
        self._stop = False
        self._jobs: queue.Queue[tuple[Path, int, Path | None] | None] = queue.Queue()
        self._finished: queue.Queue[GateVerdict] = queue.Queue()
        self._worker: threading.Thread | None = None

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        _refuse_trainer_push(args)
        self._trainer = self._trainer or _calling_trainer(self)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        _refuse_trainer_push(args)
        self._trainer = self._trainer or _calling_trainer(self)
        if self._trainer is None:
            raise RuntimeError(
                "DPOGateCallback: no transformers Trainer holding this callback fired on_train_begin, so the gate "
                "cannot log its verdicts. Give it to the Trainer: `callbacks=[gate]` or `trainer.add_callback(gate)`."
            )
        self._runner = GateRunner(self.gate_args(args), cwd=self.cwd, env=self.env, timeout=self.timeout)
        self._failures_in_a_row, self._stop = 0, False

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir).resolve() / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if self.blocking:
                self._record(self._gate_runner().run(checkpoint, state.global_step))
            else:
                self._enqueue(checkpoint, state.global_step, args)
                # The last save: log every verdict before on_train_end, where reporting integrations close their runs.
                if control.should_training_stop:
                    self._wait_for_gates()
        if self.blocking:
            self._apply_stop(args, state, control)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.blocking:
            return
        if state.is_world_process_zero:
            self._record_finished()
        self._apply_stop(args, state, control)
        # Training ends after this step and saves nothing more: log the last verdicts now, as at the last save.
        if state.is_world_process_zero and control.should_training_stop and not control.should_save:
            self._wait_for_gates()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._wait_for_gates()
            tqdm.write(verdict_table(self.verdicts))

    def gate_args(self, args: TrainingArguments) -> list[str]:
        """The gate's pytest arguments for this training run: `pytest_args` plus the run's cache and device."""
        extra = []
        if not _gives(self.pytest_args, "cache_dir", "no_cache"):
            cache_dir = self.cache_dir or Path(args.output_dir).resolve() / CACHE_FOLDER
            extra.append(f"{_FLAGS['cache_dir']}={cache_dir}")
        device = self.device or (None if _gives(self.pytest_args, "device") else _default_device(args))
        if device is not None:
            extra.append(f"{_FLAGS['device']}={device}")
        return [*self.pytest_args, *extra]

    def _gate_runner(self) -> GateRunner:
        if self._runner is None:
            raise RuntimeError("DPOGateCallback: on_save came before on_train_begin; add the callback to a Trainer.")
        return self._runner

    def _enqueue(self, checkpoint: Path, step: int, args: TrainingArguments) -> None:
        # Rotation (save_total_limit) may delete a checkpoint before its turn: gate a hard-linked copy instead.
        held = hold(checkpoint, Path(args.output_dir).resolve() / HOLDING_FOLDER) if args.save_total_limit else None
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="dpo-gate", daemon=True)
            self._worker.start()
            # A training process that exits without on_train_end kills the running gate and starts no other.
            atexit.register(self._gate_runner().cancel)
        self._jobs.put((checkpoint, step, held))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            checkpoint, step, held = job
            self._finished.put(self._gate_runner().run(checkpoint, step, held=held))

    def _wait_for_gates(self) -> None:
        """Wait for every queued background gate, then record their verdicts."""
        if self._worker is not None:
            self._jobs.put(None)
            try:
                self._worker.join()
            except BaseException:
                self._gate_runner().cancel()
                raise
            self._worker = None
            atexit.unregister(self._gate_runner().cancel)
        self._record_finished()

    def _record_finished(self) -> None:
        while not self._finished.empty():
            self._record(self._finished.get())

    def _record(self, verdict: GateVerdict) -> None:
        self.verdicts.append(verdict)
        # Trainer.log itself, not an override: TRL's DPOTrainer.log folds in and clears the training metrics it
        # has collected since the last logging step, which belong to that next regular log, not to the gate's.
        Trainer.log(self._trainer, log_values(verdict))
        tqdm.write(_verdict_line(verdict))
        self._failures_in_a_row = 0 if verdict.passed else self._failures_in_a_row + 1
        if self.stop_after_failures is not None and self._failures_in_a_row >= self.stop_after_failures:
            self._stop = True

    def _apply_stop(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        if self.stop_after_failures is None or not _rank_zero_decides(self._stop, args):
            return
        if state.is_world_process_zero and not control.should_training_stop:
            tqdm.write(
                f"dpo gate: stopping training at step {state.global_step}: {self.stop_after_failures} failed gates in a "
                "row (stop_after_failures)"
            )
        control.should_training_stop = True


def log_values(verdict: GateVerdict) -> dict[str, float]:
    """What a gate puts into the Trainer's logs: `dpo_gate/passed` (1.0 or 0.0), the checkpoint's `dpo_gate/step`
    and its summary metrics (`dpo_gate/loss`, `dpo_gate/rewards/margins`, …) where they are finite."""
    values = {f"{LOG_PREFIX}passed": float(verdict.passed), f"{LOG_PREFIX}step": float(verdict.step)}
    for metric in SUMMARY_METRICS:
        value = verdict.metrics.get(metric.name)
        if value is not None and math.isfinite(value):
            values[LOG_PREFIX + metric.name] = float(value)
    return values


def verdict_table(verdicts: list[GateVerdict], width: int = TABLE_WIDTH) -> str:
    """The run's gates, `width` wide: a row per checkpoint (step, verdict, outcome), then what was published, or
    the tests that failed, indented below it."""
    header = f"{'checkpoint':<20}{'step':>6}  {'verdict':<9}outcome"
    lines = [" DPO gate ".center(width, "="), header]
    for verdict in verdicts:
        if verdict.passed:
            outcome = "published" if verdict.publication else (
                f"not published: no {spelled('save_dir', 'pytest')} or {spelled('push_to', 'pytest')} given"
            )
            details = verdict.publication
        else:
            more = len(verdict.failed_tests) - _SHOWN_TESTS
            outcome = f"not published: {verdict.summary}"
            details = verdict.failed_tests[:_SHOWN_TESTS] + [f"… {more} more"] * (more > 0)
        row = f"{_fit(verdict.checkpoint, 19):<20}{verdict.step:>6}  {'passed' if verdict.passed else 'FAILED':<9}"
        text = textwrap.wrap(outcome, width - len(row), break_on_hyphens=False) or [""]
        lines += [row + text[0], *(" " * len(row) + line for line in text[1:])]
        for detail in details:
            lines.append("    " + _shorten(detail, width - 4))
    if not verdicts:
        lines.append("no checkpoint was saved, so none was gated")
    return "\n".join(lines)


def _verdict_line(verdict: GateVerdict) -> str:
    """The line printed as a verdict comes: what was published, or why not and which tests failed, in full."""
    if verdict.passed:
        return f"dpo gate: {verdict.checkpoint} passed" + "".join(f"; {line}" for line in verdict.publication)
    tests = ", ".join(verdict.failed_tests[:_SHOWN_TESTS]) + (", …" if len(verdict.failed_tests) > _SHOWN_TESTS else "")
    return f"dpo gate: {verdict.checkpoint} FAILED: {verdict.summary}" + (f" ({tests})" if tests else "")


def _fit(text: str, size: int) -> str:
    return text if len(text) <= size else "…" + text[-(size - 1) :]


def _shorten(text: str, size: int) -> str:
    """`text` cut in the middle to `size` characters: a path keeps its start and its end."""
    if len(text) <= size:
        return text
    head = (size - 1) // 3
    return text[:head] + "…" + text[-(size - 1 - head) :]


def _calling_trainer(callback: TrainerCallback) -> Trainer | None:
    """The Trainer, found up the call stack, whose event is running `callback`; None if there is none.

    transformers hands callbacks the model, optimizer and dataloaders but never the Trainer, and
    only `Trainer.log` reaches `state.log_history` and every reporting integration (their
    `on_log`). The first event a callback gets (on_init_end, or on_train_begin when it was added
    later) is fired by a method of the Trainer holding it, so that Trainer is the `self` of a frame
    up the stack: found once, with no binding step for the user to forget.
    """
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer) and any(held is callback for held in owner.callback_handler.callbacks):
            return owner
        frame = frame.f_back
    return None


def _refuse_trainer_push(args: TrainingArguments) -> None:
    if getattr(args, "push_to_hub", False):
        raise ValueError(
            "DPOGateCallback: this Trainer is set to push to the Hub (push_to_hub=True), so it would publish every "
            "checkpoint it saves, good or bad, and defeat the gate. Set push_to_hub=False in your DPOConfig / "
            f"TrainingArguments, and let the gate push the checkpoints that pass: give {spelled('push_to', 'pytest')}"
            "=ORG/NAME in its pytest arguments."
        )


def _default_device(args: TrainingArguments) -> str | None:
    """`cpu` when training holds the machine's only GPU; else None (the plugin's default)."""
    return "cpu" if args.device.type == "cuda" and torch.cuda.device_count() == 1 else None


def _rank_zero_decides(stop: bool, args: TrainingArguments) -> bool:
    """Rank 0's decision on every rank of a distributed run: a rank that stopped alone would hang the others."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return stop
    if torch.distributed.get_world_size() == 1:
        return stop
    flag = torch.tensor([int(stop)], device=args.device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def _gives(pytest_args: list[str], *names: str) -> bool:
    """Whether the arguments give one of these plugin options (`--dpo-x` or `--dpo-x=…`)."""
    return any(arg == _FLAGS[name] or arg.startswith(_FLAGS[name] + "=") for arg in pytest_args for name in names)


def _checked_args(pytest_args: tuple[Any, ...]) -> list[str]:
    for arg in pytest_args:
        if not isinstance(arg, (str, os.PathLike)):
            raise TypeError(f"DPOGateCallback: pytest arguments are text, as typed in CI; got {arg!r}.")
    args = [os.fspath(arg) for arg in pytest_args]
    if _gives(args, "checkpoint"):
        raise ValueError(
            f"DPOGateCallback: the pytest arguments give {_FLAGS['checkpoint']}, but the gate passes each checkpoint "
            f"the Trainer saves as {_FLAGS['checkpoint']}=OUTPUT_DIR/checkpoint-STEP itself. Remove it."
        )
    if _gives(args, "report"):
        raise ValueError(
            f"DPOGateCallback: the pytest arguments give {_FLAGS['report']}, but the gate writes each checkpoint's "
            f"report into that checkpoint's folder ({GATE_FOLDER}/, next to {VERDICT_FILE}). Remove it."
        )
    return args


def _check_options(
    pytest_args: list[str], device: Any, blocking: Any, stop_after_failures: Any, timeout: Any, cache_dir: Any,
    env: Any, cwd: Any,
) -> None:
    if device is not None and (not isinstance(device, str) or not device):
        raise TypeError(f"DPOGateCallback: device must be a torch device name such as 'cpu' or 'cuda:1'; got {device!r}.")
    if device is not None and _gives(pytest_args, "device"):
        raise ValueError(f"DPOGateCallback: give the device once: device={device!r} or {_FLAGS['device']}, not both.")
    if not isinstance(blocking, bool):
        raise TypeError(f"DPOGateCallback: blocking must be True or False; got {blocking!r}.")
    if stop_after_failures is not None and (
        isinstance(stop_after_failures, bool) or not isinstance(stop_after_failures, int) or stop_after_failures < 1
    ):
        raise ValueError(
            f"DPOGateCallback: stop_after_failures must be a whole number >= 1 (or None: never stop); "
            f"got {stop_after_failures!r}."
        )
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0
    ):
        raise ValueError(f"DPOGateCallback: timeout must be a number of seconds > 0 (or None: no limit); got {timeout!r}.")
    if cache_dir is not None and _gives(pytest_args, "cache_dir", "no_cache"):
        raise ValueError(
            f"DPOGateCallback: give the score cache once: cache_dir= or {_FLAGS['cache_dir']} / {_FLAGS['no_cache']}, "
            "not both."
        )
    if env is not None and not isinstance(env, Mapping):
        raise TypeError(f"DPOGateCallback: env must map variable names to text values; got a {type(env).__name__}.")
    for name, value in (env or {}).items():
        if not isinstance(name, str) or not isinstance(value, str):
            # The value is not shown: environments carry tokens.
            raise TypeError(f"DPOGateCallback: env[{name!r}] must be text, as environment variables are.")
    if cwd is not None and not Path(cwd).is_dir():
        raise ValueError(f"DPOGateCallback: cwd={os.fspath(cwd)!r} is not a folder; pass the folder pytest should run in.")
