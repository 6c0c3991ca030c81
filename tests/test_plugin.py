"""The plugin as users run it: real pytest sessions (pytester) on the TRL-trained fixture checkpoints."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap

import huggingface_hub  # noqa: F401
import peft  # noqa: F401
import pyarrow  # noqa: F401
import pytest
import torch  # noqa: F401
import transformers  # noqa: F401

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN, LORA_RUN

pytest_plugins = ["pytester"]
# The heavy libraries above are imported before any in-process pytester run: pytester removes modules first
# imported during a run, and importing torch's C extensions a second time crashes the interpreter.

# The bundled full run: checkpoint-2 has a negative mean margin, checkpoints 4 and 6 positive ones.
RUN_OPTIONS = [f"--dpo-checkpoint={FULL_RUN}", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}"]

MARGIN_TEST = """
    from pytest_dpo import assert_margin_positive

    def test_margin(dpo_result):
        assert_margin_positive(dpo_result)

    def test_metrics_are_trl_names(dpo_metrics):
        assert "rewards/accuracies" in dpo_metrics
"""

# A conftest that writes every verdict the plugin announces, for the test to read back.
VERDICT_RECORDER = """
    import json, pathlib

    def pytest_dpo_checkpoint_verdict(checkpoint, verdict, result):
        path = pathlib.Path("verdicts.jsonl")
        with path.open("a") as handle:
            handle.write(json.dumps({
                "checkpoint": checkpoint.name,
                "passed": verdict.passed,
                "summary": verdict.summary,
                "not_run": verdict.not_run,
                "margin": None if result is None else result.metrics["rewards/margins"],
                "beta": None if result is None else result.settings["beta"],
            }) + "\\n")
"""


def read_verdicts(pytester: pytest.Pytester) -> dict[str, dict]:
    lines = (pytester.path / "verdicts.jsonl").read_text().splitlines()
    return {entry["checkpoint"]: entry for entry in map(json.loads, lines)}


@pytest.fixture
def margin_suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(test_release=textwrap.dedent(MARGIN_TEST))
    pytester.makeconftest(textwrap.dedent(VERDICT_RECORDER))
    return pytester


def test_tests_are_parametrized_over_checkpoints_with_their_names_as_ids(margin_suite: pytest.Pytester) -> None:
    result = margin_suite.runpytest("--collect-only", "-q", *RUN_OPTIONS)
    result.stdout.fnmatch_lines(
        [
            "test_release.py::test_margin[[]checkpoint-2[]]",
            "test_release.py::test_metrics_are_trl_names[[]checkpoint-2[]]",
            "test_release.py::test_margin[[]checkpoint-4[]]",
            "test_release.py::test_metrics_are_trl_names[[]checkpoint-4[]]",
            "test_release.py::test_margin[[]checkpoint-6[]]",
            "test_release.py::test_metrics_are_trl_names[[]checkpoint-6[]]",
        ]
    )
    result.stdout.no_fnmatch_line("*DPO checkpoints*")


def test_checkpoints_sharing_a_name_get_ids_with_their_run_folder(pytester: pytest.Pytester) -> None:
    for run in ("run-a", "run-b"):
        shutil.copytree(FULL_RUN / "checkpoint-2", pytester.path / run / "checkpoint-2")
    pytester.makepyfile(test_ids="def test_x(dpo_checkpoint):\n    pass\n")
    result = pytester.runpytest(
        "--collect-only", "-q", "--dpo-checkpoint=run-a/checkpoint-2", "--dpo-checkpoint=run-b/checkpoint-2",
        f"--dpo-eval-set={EVAL_STANDARD}",
    )
    result.stdout.fnmatch_lines(["test_ids.py::test_x[[]run-a/checkpoint-2[]]", "test_ids.py::test_x[[]run-b/checkpoint-2[]]"])


def test_failing_checkpoint_is_held_back_and_passing_ones_pass(margin_suite: pytest.Pytester) -> None:
    result = margin_suite.runpytest("-p", "no:randomly", *RUN_OPTIONS)
    result.assert_outcomes(passed=5, failed=1)
    verdicts = read_verdicts(margin_suite)
    assert {name: v["passed"] for name, v in verdicts.items()} == {
        "checkpoint-2": False, "checkpoint-4": True, "checkpoint-6": True,
    }
    assert verdicts["checkpoint-2"]["summary"] == "1 failed"
    assert verdicts["checkpoint-2"]["margin"] < 0 < verdicts["checkpoint-4"]["margin"]
    result.stdout.fnmatch_lines(
        [
            "*= DPO checkpoints =*",
            "checkpoint*loss*margins*accuracy*chosen*rejected*verdict",
            "checkpoint-2 * -0.00* FAILED",
            "checkpoint-4 * PASSED",
            "checkpoint-6 * PASSED",
            "checkpoint-2: 1 failed",
            "  failed: test_release.py::test_margin[[]checkpoint-2[]]",
        ]
    )
    assert all(len(line) <= 80 for line in result.stdout.lines if line.startswith("checkpoint"))


def test_tests_of_one_checkpoint_run_together(margin_suite: pytest.Pytester) -> None:
    margin_suite.makepyfile(test_other="def test_plain():\n    pass\n")
    result = margin_suite.runpytest("-v", *RUN_OPTIONS)
    ran = [line.split(" ")[0] for line in result.stdout.lines if "::" in line and ("PASSED" in line or "FAILED" in line)]
    checkpoints = [nodeid.split("[")[1].rstrip("]") for nodeid in ran if "[" in nodeid]
    assert checkpoints == ["checkpoint-2"] * 2 + ["checkpoint-4"] * 2 + ["checkpoint-6"] * 2
    assert ran[0] == "test_other.py::test_plain"


def test_ini_gates_become_one_item_per_gate_per_checkpoint(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        f"""
        [pytest]
        dpo_eval_set = {EVAL_STANDARD}
        dpo_reference = {BASE}
        dpo_gates =
            rewards/accuracies >= 0.6
            eval_rewards/margins > 0
        """
    )
    pytester.makeconftest(textwrap.dedent(VERDICT_RECORDER))
    result = pytester.runpytest("-v", f"--dpo-checkpoint={FULL_RUN}")
    result.stdout.fnmatch_lines(
        [
            "dpo-gate[[]checkpoint-2: rewards/accuracies >= 0.6[]] FAILED*",
            "dpo-gate[[]checkpoint-2: rewards/margins > 0[]] FAILED*",
            "dpo-gate[[]checkpoint-4: rewards/accuracies >= 0.6[]] PASSED*",
            "dpo-gate[[]checkpoint-6: rewards/margins > 0[]] PASSED*",
        ]
    )
    result.stdout.fnmatch_lines(["checkpoint-2: gate failed: rewards/margins = -0.00* is not above 0 (N=24 rows scored)"])
    result.assert_outcomes(passed=4, failed=2)
    assert [v["passed"] for v in read_verdicts(pytester).values()] == [False, True, True]


@pytest.mark.parametrize(
    ("gate_line", "message"),
    [
        ("rewards/acc >= 0.6", "dpo_gates line 2: unknown metric 'rewards/acc' in gate 'rewards/acc >= 0.6'"),
        ("rewards/margins => 0", "dpo_gates line 2: cannot read gate 'rewards/margins => 0'"),
        ("loss <= low", "dpo_gates line 2: cannot read gate 'loss <= low'"),
    ],
)
def test_bad_gate_line_is_a_usage_error_naming_the_line(pytester: pytest.Pytester, gate_line: str, message: str) -> None:
    pytester.makeini(f"[pytest]\ndpo_gates =\n    loss <= 0.7\n    {gate_line}\n")
    result = pytester.runpytest(*RUN_OPTIONS)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}*"])


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--dpo-beta=0", "ERROR: --dpo-beta / dpo_beta: beta must be > 0, got 0.0*"),
        ("--dpo-beta=high", "ERROR: --dpo-beta / dpo_beta: cannot read 'high' as a value for beta: give a number*"),
        ("--dpo-loss-type=sigmoidd", "ERROR: --dpo-loss-type / dpo_loss_type: Unknown loss_type 'sigmoidd'*"),
        ("--dpo-max-length=ten", "ERROR: --dpo-max-length / dpo_max_length: cannot read 'ten'*"),
        ("--dpo-batch-size=0", "ERROR: --dpo-batch-size / dpo_batch_size: batch_size must be at least 1*"),
        ("--dpo-dtype=fp8", "ERROR: --dpo-dtype / dpo_dtype: Unknown dtype 'fp8'*"),
        ("--dpo-checkpoint=nowhere", "ERROR: --dpo-checkpoint / dpo_checkpoint: nowhere: checkpoint not found*"),
        ("--dpo-eval-set=other=missing.jsonl", "ERROR: --dpo-eval-set / dpo_eval_sets: eval set 'other': missing.jsonl: eval set not found*"),
    ],
)
def test_bad_option_values_are_usage_errors_naming_the_option(pytester: pytest.Pytester, option: str, message: str) -> None:
    pytester.makepyfile(test_x="def test_x(dpo_result):\n    pass\n")
    result = pytester.runpytest(*RUN_OPTIONS, option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_missing_eval_set_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(f"--dpo-checkpoint={FULL_RUN}")
    result.stderr.fnmatch_lines(["ERROR: --dpo-eval-set / dpo_eval_sets: no eval set given.*"])


def test_the_same_checkpoint_twice_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(*RUN_OPTIONS, f"--dpo-checkpoint={FULL_RUN}/checkpoint-4")
    result.stderr.fnmatch_lines(["ERROR: --dpo-checkpoint / dpo_checkpoint: *checkpoint-4 is given twice*"])


def test_a_damaged_checkpoint_fails_its_tests_with_the_message_alone(margin_suite: pytest.Pytester) -> None:
    checkpoint = margin_suite.path / "runs" / "checkpoint-4"
    shutil.copytree(FULL_RUN / "checkpoint-4", checkpoint)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = margin_suite.runpytest(
        f"--dpo-checkpoint={checkpoint}", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}",
        "--dpo-gate=rewards/margins > 0",
    )
    result.assert_outcomes(failed=1, errors=2)
    message = "checkpoint-4: evaluation failed: CheckpointError: *model.safetensors: cannot read the safetensors weights*"
    result.stdout.fnmatch_lines(["*ERROR at setup of test_margin*", message, "*dpo-gate[[]checkpoint-4: *", message])
    # No traceback through pytest-dpo's and transformers' frames above the message.
    assert "def _pretrained" not in result.stdout.str() and "evaluation.py" not in result.stdout.str()
    assert read_verdicts(margin_suite)["checkpoint-4"]["passed"] is False


def test_command_line_wins_over_ini(margin_suite: pytest.Pytester) -> None:
    margin_suite.makeini(f"[pytest]\ndpo_beta = 0.5\ndpo_eval_set = {EVAL_STANDARD}\n")
    margin_suite.runpytest(f"--dpo-checkpoint={FULL_RUN}/checkpoint-4", f"--dpo-reference={BASE}", "--dpo-beta=0.2")
    assert read_verdicts(margin_suite)["checkpoint-4"]["beta"] == 0.2
    (margin_suite.path / "verdicts.jsonl").unlink()
    margin_suite.runpytest(f"--dpo-checkpoint={FULL_RUN}/checkpoint-4", f"--dpo-reference={BASE}")
    assert read_verdicts(margin_suite)["checkpoint-4"]["beta"] == 0.5


def test_exitfirst_leaves_later_checkpoints_unpassed(margin_suite: pytest.Pytester) -> None:
    result = margin_suite.runpytest("-x", *RUN_OPTIONS)
    result.assert_outcomes(failed=1)
    verdicts = read_verdicts(margin_suite)
    assert not any(v["passed"] for v in verdicts.values())
    assert verdicts["checkpoint-4"]["summary"] == "2 not run"
    assert verdicts["checkpoint-6"]["not_run"] == [
        "test_release.py::test_margin[checkpoint-6]",
        "test_release.py::test_metrics_are_trl_names[checkpoint-6]",
    ]


def test_a_checkpoint_with_no_dpo_test_does_not_pass_and_fails_the_session(margin_suite: pytest.Pytester) -> None:
    result = margin_suite.runpytest(*RUN_OPTIONS, "-k", "not checkpoint-6")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert read_verdicts(margin_suite)["checkpoint-6"]["summary"] == "no DPO test ran"


def test_without_checkpoints_dpo_tests_are_skipped_with_the_reason(margin_suite: pytest.Pytester) -> None:
    result = margin_suite.runpytest("-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*no DPO checkpoint: pass --dpo-checkpoint=PATH*"])
    assert not (margin_suite.path / "verdicts.jsonl").exists()


def test_metrics_go_into_junit_xml(margin_suite: pytest.Pytester) -> None:
    margin_suite.runpytest(*RUN_OPTIONS, "--junitxml=report.xml")
    xml = (margin_suite.path / "report.xml").read_text()
    assert '<property name="dpo_checkpoint" value="checkpoint-4"' in xml
    assert '<property name="dpo/rewards/accuracies" value="0.66' in xml


def test_model_fixtures_load_the_checkpoint_and_free_it_before_the_next(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_models="""
        import torch

        SEEN = []

        def test_model(dpo_checkpoint, dpo_model, dpo_reference_model, dpo_tokenizer, dpo_eval_set):
            for earlier in SEEN:
                assert next(earlier.parameters()).device.type == "meta", "previous checkpoint's model still held"
            SEEN.append(dpo_model)
            assert next(dpo_model.parameters()).device.type == "cpu"
            ids = dpo_tokenizer(dpo_eval_set.rows[0]["prompt"], return_tensors="pt").input_ids
            with torch.no_grad():
                policy, reference = dpo_model(ids).logits, dpo_reference_model(ids).logits
            assert not torch.allclose(policy, reference)
        """
    )
    result = pytester.runpytest(f"--dpo-checkpoint={LORA_RUN}", f"--dpo-eval-set={EVAL_STANDARD}")
    result.assert_outcomes(passed=3)


def test_xdist_keeps_checkpoints_on_one_worker_and_merges_verdicts(margin_suite: pytest.Pytester) -> None:
    margin_suite.makeini(
        f"[pytest]\ndpo_gates =\n    rewards/margins > 0\ndpo_eval_set = {EVAL_STANDARD}\ndpo_reference = {BASE}\n"
    )
    result = margin_suite.runpytest_subprocess("-n", "2", "-v", "-p", "no:cacheprovider", f"--dpo-checkpoint={FULL_RUN}")
    result.assert_outcomes(passed=7, failed=2)
    workers: dict[str, set[str]] = {}
    for line in result.stdout.lines:
        if line.startswith("[gw") and "checkpoint-" in line:
            checkpoint = line.split("[checkpoint-")[-1].split("]")[0].split(":")[0]
            workers.setdefault(checkpoint, set()).add(line.split("]")[0])
    assert sorted(workers) == ["2", "4", "6"]
    assert all(len(ran_on) == 1 for ran_on in workers.values()), workers
    result.stdout.fnmatch_lines(["score cache: 1 hits, 5 misses, 0 rebuilt (memory only)"])
    verdicts = read_verdicts(margin_suite)
    assert {name: v["passed"] for name, v in verdicts.items()} == {
        "checkpoint-2": False, "checkpoint-4": True, "checkpoint-6": True,
    }
    assert verdicts["checkpoint-2"]["summary"] == "2 failed"
    result.stdout.fnmatch_lines(["checkpoint-4 * 0.40* PASSED"])


def test_plugin_does_not_import_torch_when_unused(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_plain="""
        import sys

        def test_plain():
            heavy = [name for name in ("torch", "transformers", "peft") if name in sys.modules]
            assert heavy == [], heavy
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "dpo" in pytester.runpytest_subprocess("--help").stdout.str()


def test_plugin_is_registered_through_its_entry_point() -> None:
    from importlib.metadata import entry_points

    (entry,) = [ep for ep in entry_points(group="pytest11") if ep.name == "dpo"]
    assert entry.value == "pytest_dpo.plugin"
    assert sys.modules.get("pytest_dpo.plugin") is not None
