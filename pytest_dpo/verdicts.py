"""Per-checkpoint verdicts: which DPO tests passed, failed, errored or never ran, and the pass rule.

Plain data, mergeable across pytest-xdist workers (`to_json` / `merge_json`). A verdict
also knows which of its tests are built-in gates and which gate each checks, so nothing
downstream has to read that back out of a node id. No pytest, no models, no files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PASSED, FAILED, ERROR, SKIPPED = "passed", "failed", "error", "skipped"
_BAD = (FAILED, ERROR)


def gate_nodeid(checkpoint_id: str, gate: str) -> str:
    """The node id of the built-in gate item checking `gate` (its text) for a checkpoint.

    Example:
        >>> gate_nodeid("checkpoint-500", "rewards/accuracies >= 0.6 @95%")
        'dpo-gate[checkpoint-500: rewards/accuracies >= 0.6 @95%]'
    """
    return f"dpo-gate[{checkpoint_id}: {gate}]"


@dataclass
class CheckpointVerdict:
    """The outcome of one checkpoint's DPO tests.

    A checkpoint *passes* only if at least one of its DPO tests passed and
    none failed, errored or was left unrun (cut short by `-x`, `--maxfail`,
    Ctrl-C or a crashed worker), and nothing else went wrong (`problems`).
    Skipped tests count neither way.

    `gates` maps the node id of each built-in gate item to the text of the gate it
    checks, e.g. `rewards/accuracies >= 0.6 @95%`; other tests are not in it.
    """

    checkpoint: str
    expected: set[str] = field(default_factory=set)
    outcomes: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    gates: dict[str, str] = field(default_factory=dict)

    @property
    def not_run(self) -> list[str]:
        return sorted(self.expected - self.outcomes.keys())

    def tests(self, outcome: str) -> list[str]:
        """Node ids of the tests with this outcome (`passed`, `failed`, `error`, `skipped`)."""
        return sorted(nodeid for nodeid, value in self.outcomes.items() if value == outcome)

    @property
    def passed(self) -> bool:
        return (
            bool(self.tests(PASSED))
            and not any(value in _BAD for value in self.outcomes.values())
            and not self.not_run
            and not self.problems
        )

    @property
    def summary(self) -> str:
        """`passed`, or what kept the checkpoint from passing, e.g. `2 failed, 1 not run`."""
        if self.passed:
            return "passed"
        parts = [_count(len(self.tests(kind)), kind) for kind in _BAD if self.tests(kind)]
        if self.not_run:
            parts.append(f"{len(self.not_run)} not run")
        parts.extend(self.problems)
        if not parts:
            parts.append("no DPO test ran")
        return ", ".join(parts)


def _count(number: int, kind: str) -> str:
    """`2 failed`, `1 error`, `3 errors` (pytest's own wording)."""
    if kind == ERROR:
        return f"{number} error" + ("" if number == 1 else "s")
    return f"{number} {kind}"


class Verdicts:
    """The verdicts of every checkpoint of a session, in checkpoint order."""

    def __init__(self, checkpoints: list[str]) -> None:
        self._verdicts = {name: CheckpointVerdict(name) for name in checkpoints}

    def __getitem__(self, checkpoint: str) -> CheckpointVerdict:
        return self._verdicts[checkpoint]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._verdicts.values())

    def expect(self, checkpoint: str, nodeid: str, gate: str | None = None) -> None:
        """Register a DPO test of `checkpoint` that is meant to run; `gate` is the gate's text for a gate item."""
        verdict = self._verdicts[checkpoint]
        verdict.expected.add(nodeid)
        if gate is not None:
            verdict.gates[nodeid] = gate

    def record(self, checkpoint: str, nodeid: str, when: str, outcome: str) -> None:
        """Fold one phase report (`setup`/`call`/`teardown`, `passed`/`failed`/`skipped`) into the test's outcome."""
        outcomes = self._verdicts[checkpoint].outcomes
        current = outcomes.get(nodeid)
        if outcome == FAILED:
            outcomes[nodeid] = FAILED if when == "call" else ERROR
        elif outcome == SKIPPED and current not in _BAD:
            outcomes[nodeid] = SKIPPED
        elif outcome == PASSED and when == "call" and current is None:
            outcomes[nodeid] = PASSED

    def add_problem(self, checkpoint: str, problem: str) -> None:
        self._verdicts[checkpoint].problems.append(problem)

    def passed_checkpoints(self) -> list[str]:
        return [name for name, verdict in self._verdicts.items() if verdict.passed]

    def to_json(self) -> dict[str, Any]:
        return {
            name: {"expected": sorted(v.expected), "outcomes": v.outcomes, "problems": v.problems, "gates": v.gates}
            for name, v in self._verdicts.items()
        }

    def merge_json(self, data: dict[str, Any]) -> None:
        """Merge what a worker recorded: expected tests and gates unite; a bad outcome wins over a good one."""
        for name, record in data.items():
            verdict = self._verdicts.setdefault(name, CheckpointVerdict(name))
            verdict.expected.update(record["expected"])
            verdict.gates.update(record["gates"])
            for nodeid, outcome in record["outcomes"].items():
                if verdict.outcomes.get(nodeid) not in _BAD:
                    verdict.outcomes[nodeid] = outcome
            verdict.problems.extend(p for p in record["problems"] if p not in verdict.problems)
