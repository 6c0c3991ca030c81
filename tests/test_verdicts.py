"""Verdicts: gate identity is registered with each gate item and travels with the verdicts between processes."""

from __future__ import annotations

import json

from pytest_dpo.verdicts import Verdicts, gate_nodeid

GATE = "rewards/accuracies >= 0.6 @95%"


def worker_verdicts(outcome: str) -> Verdicts:
    """What one worker recorded for `checkpoint-2`: a gate item and an ordinary test."""
    verdicts = Verdicts(["checkpoint-2"])
    verdicts.expect("checkpoint-2", gate_nodeid("checkpoint-2", GATE), gate=GATE)
    verdicts.expect("checkpoint-2", "t.py::test_m[checkpoint-2]")
    verdicts.record("checkpoint-2", gate_nodeid("checkpoint-2", GATE), "call", outcome)
    verdicts.record("checkpoint-2", "t.py::test_m[checkpoint-2]", "call", "passed")
    return verdicts


def test_a_gate_item_is_registered_with_the_gate_it_checks() -> None:
    verdict = worker_verdicts("passed")["checkpoint-2"]
    assert gate_nodeid("checkpoint-2", GATE) == "dpo-gate[checkpoint-2: rewards/accuracies >= 0.6 @95%]"
    assert verdict.gates == {"dpo-gate[checkpoint-2: rewards/accuracies >= 0.6 @95%]": GATE}
    assert verdict.passed


def test_gate_identity_survives_to_json_and_merge_json() -> None:
    # A controller that never collected learns the gates from its workers, through JSON as execnet carries it.
    controller = Verdicts(["checkpoint-2"])
    for outcome in ("passed", "failed"):
        controller.merge_json(json.loads(json.dumps(worker_verdicts(outcome).to_json())))
    verdict = controller["checkpoint-2"]
    assert verdict.gates == {gate_nodeid("checkpoint-2", GATE): GATE}
    assert verdict.tests("failed") == [gate_nodeid("checkpoint-2", GATE)] and not verdict.passed
    again = Verdicts(["checkpoint-2"])
    again.merge_json(json.loads(json.dumps(controller.to_json())))
    assert again.to_json() == controller.to_json()
