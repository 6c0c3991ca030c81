"""Gated saving on the fixture run: only passing checkpoints, whole folders, cards huggingface_hub can read."""

from __future__ import annotations

import errno
import json
import os
import shutil
import textwrap
from pathlib import Path

import huggingface_hub  # noqa: F401
import peft  # noqa: F401
import pytest
import torch
import transformers  # noqa: F401
import yaml

from pytest_dpo import evaluate, publish

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN, LORA_RUN, PROMPT_TUNING_RUN

pytest_plugins = ["pytester"]

MARGIN_TEST = """
    from pytest_dpo import assert_margin_positive

    def test_margin(dpo_result):
        assert_margin_positive(dpo_result)
"""
RUN = [f"--dpo-checkpoint={FULL_RUN}", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}"]


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(test_release=textwrap.dedent(MARGIN_TEST))
    return pytester


def saved(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def test_only_passing_checkpoints_are_saved(suite: pytest.Pytester) -> None:
    result = suite.runpytest(*RUN, "--dpo-save-dir=released")
    result.assert_outcomes(passed=2, failed=1)
    assert saved(suite.path / "released") == ["checkpoint-4", "checkpoint-6"]
    result.stdout.fnmatch_lines(["*= DPO publishing =*", "saved checkpoint-4 into *released/checkpoint-4"])


def test_saved_checkpoint_is_complete_and_scores_the_same(suite: pytest.Pytester) -> None:
    suite.runpytest(*RUN, "--dpo-save-dir=released")
    folder = suite.path / "released" / "checkpoint-6"
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "dpo_eval.json"} <= set(saved(folder))
    assert not (folder / "training_args.bin").exists(), "TRL's pickles are never released"
    original = evaluate(FULL_RUN / "checkpoint-6", EVAL_STANDARD, reference=BASE)
    reloaded = evaluate(folder, EVAL_STANDARD, reference=BASE)
    assert torch.equal(original.per_example.policy_chosen_logps, reloaded.per_example.policy_chosen_logps)
    report = json.loads((folder / "dpo_eval.json").read_text())
    assert report["schema"] == 1 and report["verdict"]["passed"] is True
    assert report["metrics"]["rewards/margins"] == pytest.approx(original.metrics["rewards/margins"])
    assert report["eval_set"]["sha256"] == original.eval_set_sha256
    assert report["verdict"]["tests"] == ["test_release.py::test_margin[checkpoint-6]"]


def test_model_card_and_eval_results_parse_with_huggingface_hub(suite: pytest.Pytester) -> None:
    from huggingface_hub import ModelCard, parse_eval_result_entries

    suite.runpytest(*RUN, "--dpo-save-dir=released")
    folder = suite.path / "released" / "checkpoint-4"
    card = ModelCard.load(folder / "README.md")
    by_metric = {entry.metric_type: entry for entry in card.data.eval_results}
    report = json.loads((folder / "dpo_eval.json").read_text())
    assert by_metric["rewards/accuracies"].metric_value == pytest.approx(report["metrics"]["rewards/accuracies"])
    assert by_metric["loss"].dataset_revision == report["eval_set"]["sha256"]
    assert card.data.library_name == "transformers" and "dpo" in card.data.tags
    assert "test_release.py::test_margin[checkpoint-4]" in card.text
    entries = parse_eval_result_entries(yaml.safe_load((folder / ".eval_results" / "dpo.yaml").read_text()))
    assert {entry.task_id for entry in entries} >= {"rewards/accuracies", "rewards/margins", "loss"}


@pytest.mark.parametrize("run", [LORA_RUN, PROMPT_TUNING_RUN], ids=["lora", "prompt-tuning"])
def test_adapter_checkpoint_is_saved_as_an_adapter(pytester: pytest.Pytester, run: Path) -> None:
    pytester.makepyfile(test_any="def test_ok(dpo_metrics):\n    assert dpo_metrics['loss'] > 0\n")
    pytester.runpytest(f"--dpo-checkpoint={run}/checkpoint-6", f"--dpo-eval-set={EVAL_STANDARD}", "--dpo-save-dir=out")
    folder = pytester.path / "out" / "checkpoint-6"
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(saved(folder))
    assert "model.safetensors" not in saved(folder)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (folder / name).read_bytes() == (run / "checkpoint-6" / name).read_bytes(), name
    from huggingface_hub import ModelCard

    assert ModelCard.load(folder / "README.md").data.library_name == "peft"


def test_push_which_last_saves_only_the_last_passing_checkpoint(suite: pytest.Pytester) -> None:
    suite.runpytest(*RUN, "--dpo-save-dir=released", "--dpo-push-which=last")
    assert saved(suite.path / "released") == ["checkpoint-6"]


def test_dry_run_lists_what_would_happen_and_changes_nothing(suite: pytest.Pytester) -> None:
    result = suite.runpytest(*RUN, "--dpo-save-dir=released", "--dpo-push-to=me/model", "--dpo-dry-run")
    assert not (suite.path / "released").exists()
    result.stdout.fnmatch_lines(
        [
            "dry run: nothing is saved or pushed",
            "checkpoint-4: Release checkpoint-4 (rewards/accuracies=0.6667*",
            "  would save into released/checkpoint-4",
            "  would push one commit to me/model (branch main, tag checkpoint-4)",
            "    model.safetensors",
        ]
    )
    result.stdout.no_fnmatch_line("*checkpoint-2: Release*")


def test_exitfirst_saves_nothing_for_checkpoints_cut_short(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_order="""
        def test_fails_on_checkpoint_4(dpo_checkpoint):
            assert dpo_checkpoint.name != "checkpoint-4"
        """
    )
    suite.runpytest(f"--dpo-checkpoint={FULL_RUN}/checkpoint-4", f"--dpo-checkpoint={FULL_RUN}/checkpoint-6",
                    *RUN[1:], "-x", "--dpo-save-dir=released")
    assert saved(suite.path / "released") == []


def test_interrupted_session_saves_nothing(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_interrupt="""
        def test_stop(dpo_checkpoint):
            if dpo_checkpoint.name == "checkpoint-6":
                raise KeyboardInterrupt
        """
    )
    # A subprocess: in-process, the KeyboardInterrupt would stop this test session too.
    result = suite.runpytest_subprocess(*RUN, "--dpo-save-dir=released")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert saved(suite.path / "released") == []


def test_unwritable_save_dir_fails_the_run_with_the_folder_named(suite: pytest.Pytester) -> None:
    (suite.path / "blocked").write_text("a file where the save dir should be")
    result = suite.runpytest(*RUN, "--dpo-save-dir=blocked/released")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["error: cannot write to save dir blocked/released*Choose a writable --dpo-save-dir."])


def _release(tmp_path: Path) -> publish.Release:
    result = evaluate(FULL_RUN / "checkpoint-4", EVAL_STANDARD, reference=BASE)
    from pytest_dpo.checkpoints import discover_checkpoints

    (checkpoint,) = discover_checkpoints(FULL_RUN / "checkpoint-4")
    return publish.Release("checkpoint-4", checkpoint, result, ["t"], "eval_standard.jsonl", None)


def test_disk_full_while_saving_leaves_no_partial_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = _release(tmp_path)
    real_copy = shutil.copyfile
    calls = []

    def copy_until_full(source: str, destination: str) -> object:
        calls.append(source)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(source, destination)

    monkeypatch.setattr(publish.shutil, "copyfile", copy_until_full)
    with pytest.raises(publish.PublishError, match="No space left on device. Nothing was left under that name"):
        publish.save_release(release, tmp_path / "released")
    assert list((tmp_path / "released").iterdir()) == []


def test_saving_again_replaces_the_old_save_only_when_the_new_one_is_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = _release(tmp_path)
    first = publish.save_release(release, tmp_path)
    (first / "marker").write_text("old save")
    monkeypatch.setattr(publish.shutil, "copyfile", lambda *args: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(publish.PublishError):
        publish.save_release(release, tmp_path)
    assert (first / "marker").read_text() == "old save"
    monkeypatch.undo()
    second = publish.save_release(release, tmp_path)
    assert second == first and not (second / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_leftovers_of_killed_saves_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    import subprocess
    import sys

    release = _release(tmp_path)
    save_dir = tmp_path / "released"
    save_dir.mkdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    this_host = publish._owner().split("-")[1]
    killed_save = save_dir / f".checkpoint-4.partial-{dead_pid}-{this_host}-abc123"
    killed_swap = save_dir / f".checkpoint-4.replaced-{dead_pid}-{this_host}"
    running_save = save_dir / f".checkpoint-4.partial-{os.getppid()}-{this_host}-def456"
    other_host = save_dir / f".checkpoint-4.partial-{dead_pid}-00000000-ghi789"
    other_checkpoint = save_dir / f".checkpoint-6.partial-{dead_pid}-{this_host}-jkl012"
    for folder in (killed_save, killed_swap, running_save, other_host, other_checkpoint):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half a checkpoint")
    publish.save_release(release, save_dir)
    assert sorted(p.name for p in save_dir.iterdir()) == sorted(
        ["checkpoint-4", running_save.name, other_host.name, other_checkpoint.name]
    )
