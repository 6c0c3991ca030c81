"""Hooks pytest-dpo adds to pytest, for a team's conftest.py to implement."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .checkpoints import Checkpoint
    from .publish import PublicationReport
    from .results import EvalResult
    from .verdicts import CheckpointVerdict


@pytest.hookspec
def pytest_dpo_checkpoint_verdict(
    checkpoint: Checkpoint, verdict: CheckpointVerdict, result: EvalResult | None, results: dict[str, EvalResult] | None
) -> None:
    """Called once per checkpoint at the end of the session, on the controller only.

    Under torchrun it is called on every rank, with the same verdicts (merged
    across ranks); check `os.environ["RANK"] == "0"` to react once.

    Args:
        checkpoint (`Checkpoint`): the checkpoint (name, path, kind, step).
        verdict (`CheckpointVerdict`): `.passed`, `.summary` and the node ids per outcome.
        result (`EvalResult`, *optional*): its evaluation on the default eval set, or None if it was never evaluated.
        results (`dict[str, EvalResult]`, *optional*): its evaluation on every eval set, by name, or None.

    Example (conftest.py):
        def pytest_dpo_checkpoint_verdict(checkpoint, verdict, result):
            if verdict.passed:
                notify_slack(f"{checkpoint.name} passed: {result.metrics['rewards/accuracies']:.2f}")
    """


@pytest.hookspec
def pytest_dpo_published(publication: PublicationReport) -> None:
    """Called once after the passing checkpoints were saved and pushed (`--dpo-save-dir`, `--dpo-push-to`),
    on the process that publishes (the controller; rank 0 under torchrun).

    Args:
        publication (`PublicationReport`): `.lines`, what was saved and pushed where, and `.error`, what
            stopped publishing, or None.

    Example (conftest.py):
        def pytest_dpo_published(publication):
            if publication.error is None:
                notify_slack("\n".join(publication.lines))
    """
