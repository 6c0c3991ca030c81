"""pytest-dpo's fixtures: the checkpoint, its result, metrics, baseline, samples, eval set, tokenizer and models.

Each is session-scoped and parametrized over the run's checkpoints (`plugin.pytest_generate_tests`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from .plugin import session_of

if TYPE_CHECKING:
    from .checkpoints import Checkpoint
    from .results import EvalResult
    from .session import DPOSession


@pytest.fixture(scope="session")
def dpo_target(request: pytest.FixtureRequest) -> tuple[str, str]:
    """The checkpoint id and eval set name this test runs for (`plugin.pytest_generate_tests` parametrizes it)."""
    return request.param


@pytest.fixture(scope="session")
def dpo_checkpoint(request: pytest.FixtureRequest, dpo_target: tuple[str, str]) -> Checkpoint:
    """The checkpoint this test runs for (name, path, kind, step)."""
    return session_of(request.config).checkpoint(dpo_target[0])


@pytest.fixture(scope="session")
def dpo_eval_set_name(dpo_target: tuple[str, str]) -> str:
    """The eval set `dpo_result`, `dpo_metrics` and `dpo_eval_set` are of: the default set, or the one a test's
    `@pytest.mark.dpo_eval_set("safety")` names."""
    return dpo_target[1]


@pytest.fixture(scope="session")
def dpo_results(request: pytest.FixtureRequest, dpo_checkpoint: Checkpoint) -> dict[str, EvalResult]:
    """The checkpoint's `EvalResult` on every eval set, by set name (`dpo_results["safety"]`); each model is
    loaded once for all sets."""
    dpo_session = session_of(request.config)
    return evaluated(dpo_session, dpo_session.id_of(dpo_checkpoint))


@pytest.fixture(scope="session")
def dpo_result(dpo_results: dict[str, EvalResult], dpo_eval_set_name: str) -> EvalResult:
    """The checkpoint's `EvalResult` on the default eval set (or the marker's), computed once and shared by all
    its tests."""
    return dpo_results[dpo_eval_set_name]


def evaluated(dpo_session: DPOSession, checkpoint_id: str) -> dict[str, EvalResult]:
    """The checkpoint's results by eval set; an explained failure (bad input) fails the test with its message alone."""
    from .session import explained_failure

    try:
        return dpo_session.results_of(checkpoint_id)
    except Exception as error:
        if not explained_failure(error):
            raise
        message = dpo_session.failure(checkpoint_id) or str(error)
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def dpo_baseline(request: pytest.FixtureRequest) -> EvalResult:
    """The last release's `EvalResult` (`--dpo-baseline`), for `assert_no_regression`; skips the test without one."""
    dpo_session = session_of(request.config)
    if not dpo_session.config.baseline:
        pytest.skip("no baseline: pass --dpo-baseline (a checkpoint, or a saved dpo_report.json)")
    return dpo_session.baseline()


@pytest.fixture(scope="session")
def dpo_metrics(dpo_result: EvalResult) -> dict[str, float]:
    """TRL's eval metrics of the checkpoint (`rewards/accuracies`, `loss`, …), without the `eval_` prefix."""
    return dpo_result.metrics


@pytest.fixture(scope="session")
def dpo_samples(
    request: pytest.FixtureRequest, dpo_checkpoint: Checkpoint, dpo_results: dict[str, EvalResult]
) -> list[Any]:
    """The checkpoint's sample completions (`Sample`: row, prompt, policy, reference) for the first
    `--dpo-samples` prompts of the default eval set; skips the test when no samples were asked for."""
    dpo_session = session_of(request.config)
    if not dpo_session.config.samples:
        pytest.skip("no samples: pass --dpo-samples N (or set dpo_samples) to generate completions")
    return dpo_session.generate_samples(dpo_session.id_of(dpo_checkpoint))


@pytest.fixture(scope="session")
def dpo_eval_set(request: pytest.FixtureRequest, dpo_checkpoint: Checkpoint, dpo_eval_set_name: str) -> Any:
    """The validated preference eval set (`EvalSet`): the default one, or the marker's."""
    return session_of(request.config).eval_sets[dpo_eval_set_name]


@pytest.fixture(scope="session")
def dpo_tokenizer(request: pytest.FixtureRequest, dpo_checkpoint: Checkpoint) -> Any:
    """The checkpoint's tokenizer (or its base's)."""
    dpo_session = session_of(request.config)
    return dpo_session.evaluation(dpo_session.id_of(dpo_checkpoint)).tokenizer


@pytest.fixture(scope="session")
def dpo_model(
    request: pytest.FixtureRequest, dpo_checkpoint: Checkpoint, dpo_results: dict[str, EvalResult]
) -> Iterator[Any]:
    """The checkpoint's model on the test device; freed before the next checkpoint's is loaded.

    Requesting it also evaluates the checkpoint first, so the model is never
    held twice at once (once here, once inside the evaluation).
    """
    yield from _loaded(request, dpo_checkpoint, "policy")


@pytest.fixture(scope="session")
def dpo_reference_model(
    request: pytest.FixtureRequest, dpo_checkpoint: Checkpoint, dpo_results: dict[str, EvalResult]
) -> Iterator[Any]:
    """The checkpoint's reference model (for a fresh LoRA adapter: its base); freed with the checkpoint."""
    yield from _loaded(request, dpo_checkpoint, "reference")


def _loaded(request: pytest.FixtureRequest, checkpoint: Checkpoint, role: str) -> Iterator[Any]:
    """The checkpoint's `policy` or `reference` model for a test; its memory is freed at teardown."""
    from .loading import release_model

    dpo_session = session_of(request.config)
    model = dpo_session.evaluation(dpo_session.id_of(checkpoint)).load(role)
    yield model
    release_model(model)

