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


class CheckpointScheduling(LoadScopeScheduling):
    """`LoadScopeScheduling` whose scope of a DPO test is its checkpoint."""

    def __init__(self, config: pytest.Config, log: Any, checkpoint_ids: Sequence[str]) -> None:
        super().__init__(config, log)
        # Longest first, so `checkpoint-20` is never taken for `checkpoint-2`.
        ordered = sorted(checkpoint_ids, key=len, reverse=True)
        self._patterns = [(cid, re.compile(rf"(?:\[|-){re.escape(cid)}(?:\]|-|: )")) for cid in ordered]

    def _split_scope(self, nodeid: str) -> str:
        for checkpoint_id, pattern in self._patterns:
            if pattern.search(nodeid):
                return f"dpo-checkpoint:{checkpoint_id}"
        return nodeid
