"""The xdist controller keeps every test and gate of a checkpoint in one work unit, knowing only node ids."""

from __future__ import annotations

import pytest

from pytest_dpo.verdicts import gate_nodeid
from pytest_dpo.xdist_scheduling import CheckpointScheduling

pytest_plugins = ["pytester"]

GATES = ["rewards/margins > 0", "loss < 0.7 @95%"]


@pytest.fixture
def scheduling(pytester: pytest.Pytester) -> CheckpointScheduling:
    config = pytester.parseconfig("-p", "xdist", "--tx=2*popen")
    return CheckpointScheduling(config, None, ["checkpoint-2", "checkpoint-20", "run: a]b"], GATES)


def test_gate_items_go_with_their_checkpoint_when_ids_are_prefixes_of_each_other(
    scheduling: CheckpointScheduling,
) -> None:
    for checkpoint_id in ("checkpoint-2", "checkpoint-20", "run: a]b"):
        scopes = {scheduling._split_scope(gate_nodeid(checkpoint_id, gate)) for gate in GATES}
        scopes.add(scheduling._split_scope(f"tests/test_m.py::test_margin[{checkpoint_id}]"))
        assert scopes == {f"dpo-checkpoint:{checkpoint_id}"}


def test_parametrized_tests_are_matched_by_their_param_id(scheduling: CheckpointScheduling) -> None:
    assert scheduling._split_scope("t.py::test_m[checkpoint-20-0.5]") == "dpo-checkpoint:checkpoint-20"
    assert scheduling._split_scope("t.py::test_m[0.5-checkpoint-2]") == "dpo-checkpoint:checkpoint-2"
    assert scheduling._split_scope("t.py::test_plain") == "t.py::test_plain"
    assert scheduling._split_scope("dpo-gate[checkpoint-3: loss < 0.7]") == "dpo-gate[checkpoint-3: loss < 0.7]"
