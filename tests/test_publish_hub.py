"""Gated pushing with the real huggingface_hub client over HTTP to the local Hub test server."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub  # noqa: F401
import peft  # noqa: F401
import pytest
import torch
import transformers  # noqa: F401

from pytest_dpo import evaluate

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN
from .hub_server import HubServer, hub_environment

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>'.*:DeprecationWarning")

# Recognisable, so a leak anywhere is found by a plain text search.
SECRET = "hf_SeCrEtToKeN_must_never_be_printed_0123456789"
REPO = "tester/dpo-model"
MARGIN_TEST = """
    from pytest_dpo import assert_margin_positive

    def test_margin(dpo_result):
        assert_margin_positive(dpo_result)
"""
RUN = [f"--dpo-checkpoint={FULL_RUN}", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}"]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    with HubServer(tmp_path / "hub-storage", tokens={SECRET: "tester"}) as server:
        with hub_environment(server, tmp_path / "hf-home", SECRET):
            yield server


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(test_release=textwrap.dedent(MARGIN_TEST))
    return pytester


def pushed_summaries(hub: HubServer) -> list[str]:
    return [commit.summary.split(" (")[0] for commit in hub.repo(REPO).commits if commit.summary.startswith("Release")]


def test_only_passing_checkpoints_are_pushed_one_commit_each_in_step_order(suite: pytest.Pytester, hub: HubServer) -> None:
    result = suite.runpytest(*RUN, f"--dpo-push-to={REPO}")
    result.assert_outcomes(passed=2, failed=1)
    assert pushed_summaries(hub) == ["Release checkpoint-4", "Release checkpoint-6"]
    repo = hub.repo(REPO)
    assert set(repo.tags) == {"checkpoint-4", "checkpoint-6"}
    weights = (FULL_RUN / "checkpoint-4" / "model.safetensors").read_bytes()
    assert hub.files_at(REPO, "checkpoint-4")["model.safetensors"] == weights
    assert hub.files_at(REPO, "main")["model.safetensors"] == (FULL_RUN / "checkpoint-6" / "model.safetensors").read_bytes()
    assert {"README.md", "dpo_eval.json", ".eval_results/dpo.yaml", "tokenizer.json"} <= set(hub.files_at(REPO))
    result.stdout.fnmatch_lines(["pushed checkpoint-4 to tester/dpo-model (main@*)", "pushed checkpoint-6 to *"])
    assert hub.errors == []


def test_pushed_checkpoint_loads_back_and_scores_the_same(suite: pytest.Pytester, hub: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    suite.runpytest(*RUN, f"--dpo-push-to={REPO}", "--dpo-push-which=last")
    assert pushed_summaries(hub) == ["Release checkpoint-6"]
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    for name, content in hub.files_at(REPO).items():
        (downloaded / name).parent.mkdir(parents=True, exist_ok=True)
        (downloaded / name).write_bytes(content)
    card = ModelCard.load(downloaded / "README.md")
    assert {entry.metric_type for entry in card.data.eval_results} >= {"rewards/accuracies", "loss"}
    original = evaluate(FULL_RUN / "checkpoint-6", EVAL_STANDARD, reference=BASE)
    reloaded = evaluate(downloaded, EVAL_STANDARD, reference=BASE)
    assert torch.equal(original.per_example.policy_chosen_logps, reloaded.per_example.policy_chosen_logps)


def test_push_as_pull_requests_leaves_the_branch_alone(suite: pytest.Pytester, hub: HubServer) -> None:
    suite.runpytest(*RUN, f"--dpo-push-to={REPO}", "--dpo-push-pr", "--dpo-no-tag")
    repo = hub.repo(REPO)
    assert hub.files_at(REPO, "main") == {}
    assert sorted(repo.pr_refs) == ["refs/pr/1", "refs/pr/2"]
    assert hub.files_at(REPO, "refs/pr/2")["model.safetensors"] == (FULL_RUN / "checkpoint-6" / "model.safetensors").read_bytes()
    assert repo.tags == {}


def test_server_error_mid_push_fails_the_run_and_keeps_the_remote_and_local_save(
    suite: pytest.Pytester, hub: HubServer
) -> None:
    hub.fail_next("POST", r"/api/models/tester/dpo-model/commit/", status=500, times=2)
    # The first commit POST fails: nothing of checkpoint-4 lands, and pushing stops there.
    result = suite.runpytest(*RUN, f"--dpo-push-to={REPO}", "--dpo-save-dir=released")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert pushed_summaries(hub) == []
    result.stdout.fnmatch_lines(
        ["error: pushing checkpoint-4 to tester/dpo-model failed: *the remote is as it was before it*local save stays in *"]
    )
    assert (suite.path / "released" / "checkpoint-6" / "model.safetensors").exists()


def test_a_commit_made_by_someone_else_during_the_push_is_not_overwritten(
    suite: pytest.Pytester, hub: HubServer
) -> None:
    suite.makeconftest(
        """
        from huggingface_hub import HfApi, CommitOperationAdd
        import pytest_dpo.publish as publish

        real_commit = publish._commit

        def racing_commit(api, repo_id, folder, release, config, head):
            if release.checkpoint_id == "checkpoint-6":
                HfApi().create_commit(repo_id, [CommitOperationAdd("NOTES.md", b"teammate")], commit_message="teammate")
            return real_commit(api, repo_id, folder, release, config, head)

        publish._commit = racing_commit
        """
    )
    result = suite.runpytest(*RUN, f"--dpo-push-to={REPO}")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert pushed_summaries(hub) == ["Release checkpoint-4"]
    assert hub.files_at(REPO)["NOTES.md"] == b"teammate"
    result.stdout.fnmatch_lines(["error: pushing checkpoint-6 to tester/dpo-model failed:*"])


def test_bad_token_fails_the_run_with_a_clear_message(suite: pytest.Pytester, hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_value")
    result = suite.runpytest(*RUN, f"--dpo-push-to={REPO}")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["error: cannot reach or create Hub repo tester/dpo-model: *Nothing was pushed."])
    assert REPO not in hub.repos
    assert "hf_wrong_token_value" not in result.stdout.str() + result.stderr.str()


def test_invalid_repo_id_is_a_usage_error(suite: pytest.Pytester) -> None:
    result = suite.runpytest(*RUN, "--dpo-push-to=not a repo")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --dpo-push-to / dpo_push_to: 'not a repo' is not a Hub repo id*"])


def test_the_token_never_appears_in_output_reports_or_published_files(suite: pytest.Pytester, hub: HubServer) -> None:
    hub.fail_next("POST", r"/commit/", status=500, times=1)
    result = suite.runpytest(
        *RUN, f"--dpo-push-to={REPO}", "--dpo-save-dir=released", "--dpo-report=report", "--dpo-samples=1",
        "--junitxml=junit.xml", "-v", "-rA",
    )
    texts = [result.stdout.str(), result.stderr.str(), (suite.path / "junit.xml").read_text()]
    written = [path for folder in ("released", "report", ".pytest_cache") for path in (suite.path / folder).rglob("*")]
    assert any(path.name == "dpo_report.json" for path in written)
    texts += [path.read_text(errors="replace") for path in written if path.is_file()]
    texts += [content.decode(errors="replace") for content in hub.files_at(REPO).values()]
    assert not [text for text in texts if SECRET in text]
    for request, body in zip(hub.requests, hub.request_bodies):
        assert SECRET not in request.path and SECRET.encode() not in body
        assert all(SECRET not in value for name, value in request.headers.items() if name.lower() != "authorization")


def test_dry_run_pushes_nothing(suite: pytest.Pytester, hub: HubServer) -> None:
    suite.runpytest(*RUN, f"--dpo-push-to={REPO}", "--dpo-dry-run")
    assert REPO not in hub.repos
    assert [request for request in hub.requests if request.method == "POST"] == []


def test_under_xdist_only_the_controller_saves_and_pushes(suite: pytest.Pytester, hub: HubServer) -> None:
    result = suite.runpytest_subprocess(
        "-n", "2", "-p", "no:cacheprovider", *RUN, f"--dpo-push-to={REPO}", "--dpo-save-dir=released"
    )
    result.assert_outcomes(passed=2, failed=1)
    assert pushed_summaries(hub) == ["Release checkpoint-4", "Release checkpoint-6"]
    assert sorted(path.name for path in (suite.path / "released").iterdir()) == ["checkpoint-4", "checkpoint-6"]
