"""Faults survived: a crashed xdist worker, Ctrl-C while scoring, and errors in fixtures and hooks publish nothing.

Each test runs real pytest sessions of the plugin on the bundled fixture run, saving into a folder and
pushing to the local Hub test server, and asserts that no checkpoint touched by the fault was published.
(Random SIGKILLs during scoring, saving and pushing live in `test_faults_kill.py`.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub  # noqa: F401
import peft  # noqa: F401
import pytest
import torch  # noqa: F401
import transformers  # noqa: F401

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN
from .hub_server import HubServer, hub_environment

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>'.*:DeprecationWarning")
# The heavy libraries above are imported before any in-process pytester run: pytester removes modules first
# imported during a run, and importing torch's C extensions a second time crashes the interpreter.

TOKEN = "hf_faults_test_token"
REPO = "tester/dpo-faults"
RUN = [f"--dpo-checkpoint={FULL_RUN}", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}"]
PUBLISH = ["--dpo-save-dir=released", f"--dpo-push-to={REPO}"]
# checkpoint-2 fails this test (negative mean margin); checkpoints 4 and 6 pass it.
MARGIN_TEST = """
    from pytest_dpo import assert_margin_positive

    def test_margin(dpo_result):
        assert_margin_positive(dpo_result)
"""


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    with HubServer(tmp_path / "hub-storage", tokens={TOKEN: "tester"}) as server:
        with hub_environment(server, tmp_path / "hf-home", TOKEN):
            yield server


@pytest.fixture(scope="module")
def scores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One score cache for the module: its runs score the fixture run once, not once per test."""
    return tmp_path_factory.mktemp("scores")


@pytest.fixture
def suite(pytester: pytest.Pytester, scores: Path) -> pytest.Pytester:
    pytester.makepyfile(test_release=textwrap.dedent(MARGIN_TEST))
    pytester.makeini(f"[pytest]\ndpo_cache_dir = {scores}\n")
    return pytester


def saved(pytester: pytest.Pytester) -> list[str]:
    folder = pytester.path / "released"
    return sorted(path.name for path in folder.iterdir() if not path.name.startswith(".")) if folder.exists() else []


def pushed(hub: HubServer) -> list[str]:
    """The checkpoints with a release commit on the Hub repo (none when the repo was never created)."""
    if REPO not in hub.repos:
        return []
    return [commit.summary.split(" ")[1] for commit in hub.repo(REPO).commits if commit.summary.startswith("Release")]


def test_control_without_a_fault_checkpoints_4_and_6_are_published(suite: pytest.Pytester, hub: HubServer) -> None:
    """The baseline the tests below depart from: without their fault, 4 and 6 would be saved and pushed."""
    result = suite.runpytest(*RUN, *PUBLISH)
    result.assert_outcomes(passed=2, failed=1)
    assert saved(suite) == ["checkpoint-4", "checkpoint-6"]
    assert pushed(hub) == ["checkpoint-4", "checkpoint-6"]


def test_a_crashed_xdist_worker_taints_every_checkpoint(suite: pytest.Pytester, hub: HubServer) -> None:
    suite.makepyfile(
        test_crash="""
        import os, signal

        def test_worker_dies_on_checkpoint_4(dpo_result):
            if dpo_result.checkpoint == "checkpoint-4":
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = suite.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", *RUN, *PUBLISH)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    # checkpoint-6 ran on the other worker (or the crashed one's replacement) and passed all its tests:
    # only the crash keeps it back, because the crashed worker's outcomes never reached the controller.
    assert saved(suite) == []
    assert pushed(hub) == []
    result.stdout.fnmatch_lines(
        [
            "*worker*crashed*",
            "checkpoint-6 * FAILED",
            "checkpoint-6: *worker gw* crashed*",
            "no checkpoint passed: nothing saved or pushed",
        ]
    )


def test_ctrl_c_while_scoring_publishes_nothing_and_caches_no_partial_scores(
    suite: pytest.Pytester, hub: HubServer
) -> None:
    # A real SIGINT, delivered from inside checkpoint-6's forward pass, once checkpoints 2 and 4 have been judged.
    suite.makeconftest(
        """
        import os, signal
        import torch

        # Ctrl-C as at a terminal, even where this process was started with SIGINT ignored (inherited across exec).
        signal.signal(signal.SIGINT, signal.default_int_handler)

        def ctrl_c_in_checkpoint_6(module, args, output):
            name = str(getattr(getattr(module, "config", None), "_name_or_path", ""))
            if type(module).__name__ == "LlamaModel" and name.endswith("checkpoint-6"):
                os.kill(os.getpid(), signal.SIGINT)

        torch.nn.modules.module.register_module_forward_hook(ctrl_c_in_checkpoint_6)
        """
    )
    # A subprocess: in-process, the KeyboardInterrupt would stop this test session too.
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", *RUN, *PUBLISH, "--dpo-cache-dir=scores")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(
        [
            "checkpoint-4 * PASSED",
            "checkpoint-6 * -  FAILED",
            "checkpoint-6: 1 not run",
            "session interrupted: nothing saved or pushed",
            "*conftest.py:*: KeyboardInterrupt",
        ]
    )
    assert saved(suite) == []
    assert REPO not in hub.repos
    # Whole entries only: the base, checkpoint-2 and checkpoint-4; nothing of checkpoint-6's cut-short scoring.
    entries = sorted(path.name for path in (suite.path / "scores").iterdir())
    assert not [name for name in entries if name.startswith(".")]
    assert len([name for name in entries if name.endswith(".safetensors")]) == 3
    # and the tokenized eval set, written before any scoring (one tokenizer for the whole run).
    assert len([name for name in entries if name.startswith("tokens-") and name.endswith(".json")]) == 1


def test_an_error_in_a_fixture_setup_or_teardown_holds_its_checkpoint_back(
    suite: pytest.Pytester, hub: HubServer
) -> None:
    suite.makepyfile(
        test_notes="""
        import pytest

        @pytest.fixture
        def release_notes(dpo_result):
            if dpo_result.checkpoint == "checkpoint-4":
                raise RuntimeError("release-notes service down")
            yield "notes"
            if dpo_result.checkpoint == "checkpoint-6":
                raise RuntimeError("cleanup failed")

        def test_notes(release_notes):
            assert release_notes == "notes"
        """
    )
    result = suite.runpytest(*RUN, *PUBLISH)
    result.assert_outcomes(passed=4, failed=1, errors=2)
    assert saved(suite) == []
    assert pushed(hub) == []
    result.stdout.fnmatch_lines(
        [
            "checkpoint-4: 1 error*",
            "  error: test_notes.py::test_notes[[]checkpoint-4[]]",
            "checkpoint-6: 1 error*",
            "  error: test_notes.py::test_notes[[]checkpoint-6[]]",
            "no checkpoint passed: nothing saved or pushed",
        ]
    )


def test_a_verdict_hook_that_raises_holds_its_checkpoint_back(suite: pytest.Pytester, hub: HubServer) -> None:
    suite.makeconftest(
        """
        def pytest_dpo_checkpoint_verdict(checkpoint, verdict, result):
            if checkpoint.name == "checkpoint-6":
                raise ConnectionError("Slack is down")
        """
    )
    result = suite.runpytest(*RUN, *PUBLISH)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert saved(suite) == ["checkpoint-4"]
    assert pushed(hub) == ["checkpoint-4"]
    result.stdout.fnmatch_lines(
        [
            "checkpoint-6 * FAILED",
            "checkpoint-6: pytest_dpo_checkpoint_verdict hook raised ConnectionError: Slack is down",
        ]
    )


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["in-process", "xdist"])
def test_a_makereport_hookwrapper_that_raises_publishes_nothing(
    suite: pytest.Pytester, hub: HubServer, workers: list[str]
) -> None:
    # checkpoint-4's test passed its call phase before the hook broke on its teardown report.
    suite.makeconftest(
        """
        import pytest

        @pytest.hookimpl(wrapper=True)
        def pytest_runtest_makereport(item, call):
            report = yield
            if call.when == "teardown" and "checkpoint-4" in item.nodeid:
                raise RuntimeError("report plugin broke")
            return report
        """
    )
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", *workers, *RUN, *PUBLISH)
    # Under xdist the controller's exit status is 3 or, when the other worker finished first, 1.
    assert result.ret in (pytest.ExitCode.INTERNAL_ERROR, pytest.ExitCode.TESTS_FAILED)
    result.stdout.fnmatch_lines(["INTERNALERROR>*RuntimeError: report plugin broke"])
    assert saved(suite) == []
    assert pushed(hub) == []


def test_a_push_killed_after_a_tag_completes_when_run_again(
    suite: pytest.Pytester, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the second run re-committed checkpoint-4 over checkpoint-6's release and then failed on its tag."""
    runs: list[subprocess.Popen[bytes]] = []
    handle = hub._handle

    def tag_then_kill_the_client(request: Any) -> Any:
        response = handle(request)
        if request.method == "POST" and "/tag/" in request.path and json.loads(request.body)["tag"] == "checkpoint-4":
            runs[0].send_signal(signal.SIGKILL)  # the tag is made; the client never hears back
        return response

    monkeypatch.setattr(hub, "_handle", tag_then_kill_the_client)
    runs.append(
        subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *RUN, *PUBLISH],
            cwd=suite.path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    assert runs[0].wait(timeout=300) == -signal.SIGKILL
    assert pushed(hub) == ["checkpoint-4"] and list(hub.repo(REPO).tags) == ["checkpoint-4"]
    monkeypatch.setattr(hub, "_handle", handle)  # not undo(): pytester's chdir is on the same monkeypatch

    result = suite.runpytest(*RUN, *PUBLISH)
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # checkpoint-2 fails; publishing does not
    result.stdout.fnmatch_lines(
        [
            f"checkpoint-4 is already on {REPO} (tag checkpoint-4): not pushed again",
            f"pushed checkpoint-6 to {REPO} (main@*)",
        ]
    )
    assert pushed(hub) == ["checkpoint-4", "checkpoint-6"]
    assert sorted(hub.repo(REPO).tags) == ["checkpoint-4", "checkpoint-6"]
    assert hub.files_at(REPO)["model.safetensors"] == (FULL_RUN / "checkpoint-6" / "model.safetensors").read_bytes()


def test_a_tag_that_holds_other_weights_stops_the_push_before_its_commit(
    suite: pytest.Pytester, hub: HubServer
) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    api.create_repo(REPO)
    weights = CommitOperationAdd("model.safetensors", b"another run's weights")
    other = api.create_commit(REPO, [weights], commit_message="another run")
    api.create_tag(REPO, tag="checkpoint-4", revision=other.oid)
    result = suite.runpytest(*RUN, *PUBLISH)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            f"error: pushing checkpoint-4 to {REPO} failed: tag checkpoint-4 already exists on {REPO} and its "
            "model.safetensors is not this checkpoint's (commit *): delete that tag, push to another repo, or pass "
            "--dpo-no-tag. That checkpoint's commit was not made*"
        ]
    )
    assert pushed(hub) == [] and hub.head(REPO) == other.oid
