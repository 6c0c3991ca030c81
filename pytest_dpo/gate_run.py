"""One gate run: the team's pytest command on one saved checkpoint, in a subprocess, and its verdict read back.

The subprocess is the release gate exactly as CI runs it, and the plugin inside it saves and
pushes the checkpoint only if it passed. Its outcome is read from its JSON report, its exit
status and what its publisher recorded (`gate_publication`); anything short of a clean pass
(a failed test, a crash, a timeout, a kill, a missing report) is a failed gate. No torch, no
transformers: `training_gate` holds everything that knows about the Trainer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .gate_publication import PUBLICATION_FILE_ENV
from .report_files import REPORT_JSON_FILE, ReportError, load_report
from .spelling import spelled

VERDICT_FILE = "dpo_verdict.json"
VERDICT_SCHEMA = 1
GATE_FOLDER = "dpo_gate"
LOG_FILE = "pytest.log"
PUBLICATION_FILE = "dpo_publication.json"
_LAST_LINE_LENGTH = 300
CHECKPOINT_FLAG = spelled("checkpoint", "pytest")
REPORT_FLAG = spelled("report", "pytest")
# What torchrun sets for each rank of the training: a gate that inherited it would take itself for a rank of that
# world (pytest-dpo's torchrun mode) and wait for peers that never come.
DISTRIBUTED_ENV = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
)


@dataclass(frozen=True)
class GateVerdict:
    """What one gate run decided about one saved checkpoint; `dpo_verdict.json` holds it.

    Attributes:
        checkpoint (`str`): the folder's name, e.g. `checkpoint-500`.
        path (`str`): the checkpoint folder.
        step (`int`): the training step it was saved at.
        passed (`bool`): pytest exited 0 and the plugin's verdict for the checkpoint is *passed*.
        summary (`str`): `passed`, or why not: the plugin's verdict (`2 failed`), a timeout, a kill, a missing
            report, a failed push; several joined with `; `.
        failed_tests (`list[str]`): node ids of the DPO tests that failed, errored or did not run.
        metrics (`dict[str, float | None]`): TRL's eval metrics from the gate's report (None: NaN or infinite);
            empty when the report is missing or the checkpoint was not evaluated.
        publication (`list[str]`): what the plugin's publisher reported, line by line (`saved … into …`,
            `pushed … to …`, `no checkpoint passed: nothing saved or pushed`); empty when it did not run.
        publish_error (`str`, *optional*): why publishing stopped, if it did.
        command (`list[str]`): the pytest command that was run.
        exit_code (`int`, *optional*): pytest's exit status; negative: killed by that signal; None: never started.
        seconds (`float`): how long the gate took.
    """

    checkpoint: str
    path: str
    step: int
    passed: bool
    summary: str
    failed_tests: list[str]
    metrics: dict[str, float | None]
    publication: list[str]
    publish_error: str | None
    command: list[str]
    exit_code: int | None
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"schema": VERDICT_SCHEMA, **asdict(self)}


class GateRunner:
    """Runs gates one at a time: `pytest_args` plus the checkpoint and report options, in `cwd`, within `timeout`.

    Args:
        pytest_args (`Sequence[str]`): the gate's pytest arguments, without `--dpo-checkpoint` and `--dpo-report`.
        cwd (`Path`): where pytest runs (test paths and `-c` files are relative to it).
        env (`Mapping[str, str]`): variables set on top of this process's environment.
        timeout (`float`, *optional*): seconds a gate may run before its whole process group is killed.
    """

    def __init__(self, pytest_args: Sequence[str], *, cwd: Path, env: Mapping[str, str], timeout: float | None) -> None:
        self.pytest_args = list(pytest_args)
        self.cwd = cwd
        self.env = dict(env)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._cancelled = False

    def command(self, checkpoint: Path, report_dir: Path) -> list[str]:
        """The pytest command that gates `checkpoint` and writes its report into `report_dir`."""
        return [
            sys.executable, "-m", "pytest", *self.pytest_args,
            f"{CHECKPOINT_FLAG}={checkpoint}", f"{REPORT_FLAG}={report_dir}", "-p", "pytest_dpo.gate_publication",
        ]

    def run(self, checkpoint: Path, step: int, *, held: Path | None = None) -> GateVerdict:
        """Gate `checkpoint`, saved at `step`; write `dpo_verdict.json` and the gate's report folder into it.

        `held` is a hard-linked copy of the checkpoint (`hold`) to gate instead, so that the Trainer may delete the
        original meanwhile; the results then move into the original if it is still there, and the copy is removed.
        """
        gated = held or checkpoint
        report_dir = gated / GATE_FOLDER
        command = self.command(gated, report_dir)
        started = time.monotonic()
        try:
            shutil.rmtree(report_dir, ignore_errors=True)
            report_dir.mkdir()
            exit_code, stopped = self._run_process(command, report_dir)
            verdict = read_verdict(
                checkpoint, gated, step, command=command, exit_code=exit_code, stopped=stopped,
                seconds=time.monotonic() - started,
            )
        except Exception as error:  # noqa: BLE001 - whatever stops a gate fails its checkpoint; training goes on
            verdict = GateVerdict(
                checkpoint=checkpoint.name, path=str(checkpoint), step=step, passed=False,
                summary=f"the gate could not run: {type(error).__name__}: {error}", failed_tests=[], metrics={},
                publication=[], publish_error=None, command=command, exit_code=None,
                seconds=round(time.monotonic() - started, 3),
            )
        _store(verdict, checkpoint, held)
        return verdict

    def cancel(self) -> None:
        """Kill the running gate and start no other: the training process is going away."""
        with self._lock:
            self._cancelled = True
            if self._process is not None:
                _kill_group(self._process)

    def _run_process(self, command: list[str], report_dir: Path) -> tuple[int | None, str | None]:
        """pytest's exit status, and why the gate was stopped, if it was."""
        environment = {name: value for name, value in os.environ.items() if not _is_distributed(name)}
        environment |= self.env | {PUBLICATION_FILE_ENV: str(report_dir / PUBLICATION_FILE)}
        with open(report_dir / LOG_FILE, "wb") as log:
            with self._lock:
                if self._cancelled:
                    return None, "not run: the training process was exiting"
                # A session of its own: the timeout kills pytest and everything it started, as one group.
                process = subprocess.Popen(
                    command, cwd=self.cwd, env=environment, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )
                self._process = process
            try:
                return process.wait(timeout=self.timeout), None
            except subprocess.TimeoutExpired:
                _kill_group(process)
                return process.wait(), f"timed out after {self.timeout:g} s: pytest and its processes were killed"
            except BaseException:
                _kill_group(process)
                process.wait()
                raise
            finally:
                with self._lock:
                    self._process = None


def _store(verdict: GateVerdict, checkpoint: Path, held: Path | None) -> None:
    """Write `dpo_verdict.json` beside the gate's folder; from a held copy, move both into the checkpoint if it is there."""
    gated = held or checkpoint
    try:
        write_atomic(gated / VERDICT_FILE, (json.dumps(verdict.to_json(), indent=2) + "\n").encode("utf-8"))
        if held is not None and checkpoint.is_dir():
            shutil.rmtree(checkpoint / GATE_FOLDER, ignore_errors=True)
            shutil.move(held / GATE_FOLDER, checkpoint / GATE_FOLDER)
            shutil.move(held / VERDICT_FILE, checkpoint / VERDICT_FILE)
    except OSError as error:
        print(f"dpo gate: cannot write the verdict of {checkpoint.name} into {gated}: {error}", file=sys.stderr)
    finally:
        if held is not None:
            shutil.rmtree(held, ignore_errors=True)


def hold(checkpoint: Path, holding_dir: Path) -> Path | None:
    """A hard-linked copy of `checkpoint` under `holding_dir`, or None where this filesystem cannot link.

    The copy costs no space while the original exists, and keeps the files whole when the Trainer's
    rotation (`save_total_limit`) deletes the original before its gate has run.
    """
    target = holding_dir / checkpoint.name
    shutil.rmtree(target, ignore_errors=True)
    try:
        shutil.copytree(checkpoint, target, copy_function=os.link)
    except (OSError, shutil.Error):
        shutil.rmtree(target, ignore_errors=True)
        return None
    return target


def read_verdict(
    checkpoint: Path, gated: Path, step: int, *, command: list[str], exit_code: int | None, stopped: str | None,
    seconds: float,
) -> GateVerdict:
    """The verdict of a finished gate run on `gated` (the checkpoint or its held copy), from the files it left."""
    report_dir = gated / GATE_FOLDER
    entry, missing = _report_entry(report_dir / REPORT_JSON_FILE, gated)
    publication = _publication(report_dir / PUBLICATION_FILE)
    reasons = []
    if stopped is not None:
        reasons.append(stopped)
    elif exit_code is not None and exit_code < 0:
        reasons.append(f"killed by {_signal_name(-exit_code)}")
    elif entry is None:
        reasons.append(f"pytest exited with status {exit_code} and {missing}: {_last_line(report_dir / LOG_FILE)}")
    elif not entry["verdict"]["passed"]:
        reasons.append(str(entry["verdict"]["summary"]))
    if publication["error"]:
        reasons.append(f"publishing failed: {publication['error']}")
    if exit_code != 0 and not reasons:
        reasons.append(f"pytest exited with status {exit_code}: {_last_line(report_dir / LOG_FILE)}")
    return GateVerdict(
        checkpoint=checkpoint.name,
        path=str(checkpoint),
        step=step,
        passed=not reasons,
        summary="; ".join(reasons) or "passed",
        failed_tests=_failed_tests(entry["verdict"]) if entry else [],
        metrics=dict(entry["metrics"]) if entry else {},
        publication=list(publication["lines"]),
        publish_error=publication["error"],
        command=command,
        exit_code=exit_code,
        seconds=round(seconds, 3),
    )


def _report_entry(path: Path, gated: Path) -> tuple[dict[str, Any] | None, str]:
    """The report's entry for the gated folder, or None and why there is none."""
    if not path.exists():
        return None, "wrote no report"
    try:
        report = load_report(path)
    except ReportError as error:
        return None, f"its report is unreadable ({error})"
    for entry in report["checkpoints"]:
        if Path(entry["path"]).resolve() == gated.resolve():
            return entry, ""
    return None, f"its report has no entry for {gated}"


def _last_line(log: Path) -> str:
    """The last line pytest printed (a usage error's `ERROR: …`), cut to a readable length."""
    try:
        lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    last = lines[-1].strip() if lines else "it printed nothing"
    return last if len(last) <= _LAST_LINE_LENGTH else last[: _LAST_LINE_LENGTH - 1] + "…"


def _publication(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {"lines": [], "error": None}


def _failed_tests(verdict: Mapping[str, Any]) -> list[str]:
    tests = verdict["tests"]
    return [*tests.get("failed", []), *tests.get("error", []), *tests.get("not_run", [])]


def _is_distributed(name: str) -> bool:
    return name in DISTRIBUTED_ENV or name.startswith("TORCHELASTIC_")


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
