"""pytest-xdist scheduling that keeps each checkpoint's tests on one worker (imported only under xdist).

Work units are checkpoints: all tests and gates of a checkpoint go to the same
worker, so its model is loaded and scored once. Other tests are scheduled one
by one, as with `--dist load`. (xdist's own `loadgroup` relies on rewriting
node ids, which pytest 9.2 no longer honours: pytest-xdist#1386.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pytest
from xdist.scheduler.loadscope import LoadScopeScheduling

from .verdicts import gate_nodeid


class CheckpointScheduling(LoadScopeScheduling):
    """`LoadScopeScheduling` whose scope of a DPO test is its checkpoint.

    The controller never collects, so it knows tests by node id only: a gate item by
    the exact node id `gate_nodeid` gives it, a parametrized test by its param id.
    """

    def __init__(self, config: pytest.Config, log: Any, checkpoint_ids: Sequence[str], gates: Sequence[str]) -> None:
        super().__init__(config, log)
        self._gate_checkpoints = {
            gate_nodeid(checkpoint_id, gate): checkpoint_id for checkpoint_id in checkpoint_ids for gate in gates
        }
        # pytest writes a test's param ids in brackets, joined by `-`; longest id first, so that
        # `test[checkpoint-20]` is never taken for `checkpoint-2`.
        ordered = sorted(checkpoint_ids, key=len, reverse=True)
        self._param_patterns = [(cid, re.compile(rf"[\[-]{re.escape(cid)}[\]-]")) for cid in ordered]

    def _split_scope(self, nodeid: str) -> str:
        checkpoint_id = self._gate_checkpoints.get(nodeid) or next(
            (cid for cid, pattern in self._param_patterns if pattern.search(nodeid)), None
        )
        return nodeid if checkpoint_id is None else f"dpo-checkpoint:{checkpoint_id}"
