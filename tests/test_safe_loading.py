"""The flags that relax safe loading (--dpo-allow-pickle, --dpo-trust-remote-code), and NaN/inf never passing.

The refusals themselves are rows of tests/test_bad_input.py; here: what the flags allow, that they reach
every loader, and that non-finite numbers fail gates and helpers with the cause named.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import textwrap
from pathlib import Path
from typing import Any

import huggingface_hub  # noqa: F401
import peft  # noqa: F401
import pyarrow  # noqa: F401
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from pytest_dpo import assert_accuracy_above, assert_loss_below, assert_margin_positive, checkpoints, evaluate, loading
from pytest_dpo.__main__ import main
from pytest_dpo.gates import parse_gate
from pytest_dpo.checkpoints import CheckpointError, discover_checkpoints, fingerprint
from pytest_dpo.results import EvalResult

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN, LORA_RUN

pytest_plugins = ["pytester"]
# The heavy libraries above are imported before any in-process pytester run (see tests/test_plugin.py).

MARGIN_TEST = """
    from pytest_dpo import assert_margin_positive

    def test_margin(dpo_result):
        assert_margin_positive(dpo_result)
"""


def pickled_copy(source: Path, destination: Path, weights: str, pickle_name: str) -> Path:
    """A copy of a fixture checkpoint whose weights exist only as a torch pickle (TRL's training_args.bin kept)."""
    shutil.copytree(source, destination)
    torch.save(load_file(destination / weights), destination / pickle_name)
    (destination / weights).unlink()
    return destination


@pytest.fixture(scope="module")
def reference_result() -> EvalResult:
    return evaluate(FULL_RUN / "checkpoint-4", EVAL_STANDARD, reference=BASE)


@pytest.fixture
def pickle_checkpoint(tmp_path: Path) -> Path:
    return pickled_copy(FULL_RUN / "checkpoint-4", tmp_path / "checkpoint-4", "model.safetensors", "pytorch_model.bin")


def test_pickle_weights_load_with_the_flag_and_score_like_the_safetensors(
    pickle_checkpoint: Path, reference_result: EvalResult
) -> None:
    with pytest.raises(CheckpointError, match="pytorch_model.bin: .*pass allow_pickle=True to load it"):
        evaluate(pickle_checkpoint, EVAL_STANDARD, reference=BASE)
    result = evaluate(pickle_checkpoint, EVAL_STANDARD, reference=BASE, allow_pickle=True)
    assert torch.equal(result.per_example.policy_chosen_logps, reference_result.per_example.policy_chosen_logps)
    assert torch.equal(result.per_example.policy_rejected_logps, reference_result.per_example.policy_rejected_logps)
    assert result.settings["allow_pickle"] is True and result.settings["trust_remote_code"] is False


def test_pickle_adapter_loads_with_the_flag(tmp_path: Path) -> None:
    adapter = pickled_copy(LORA_RUN / "checkpoint-6", tmp_path / "checkpoint-6", "adapter_model.safetensors", "adapter_model.bin")
    original = evaluate(LORA_RUN / "checkpoint-6", EVAL_STANDARD)
    pickled = evaluate(adapter, EVAL_STANDARD, allow_pickle=True)
    assert torch.equal(original.per_example.policy_chosen_logps, pickled.per_example.policy_chosen_logps)


def test_pickle_weights_are_fingerprinted_so_cached_scores_never_mix_up(tmp_path: Path) -> None:
    first = pickled_copy(FULL_RUN / "checkpoint-2", tmp_path / "a", "model.safetensors", "pytorch_model.bin")
    second = pickled_copy(FULL_RUN / "checkpoint-4", tmp_path / "b", "model.safetensors", "pytorch_model.bin")
    assert fingerprint(first) != fingerprint(second)


def test_training_state_pickles_are_neither_weights_nor_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(FULL_RUN / "checkpoint-4", checkpoint)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (checkpoint / name).write_bytes(b"never unpickled")
    assert [found.kind for found in discover_checkpoints(checkpoint)] == ["model"]
    assert checkpoints.weight_files(checkpoint) == ["model.safetensors"]


def test_plugin_flag_loads_pickles_and_publishes_them_without_trl_pickles(
    pytester: pytest.Pytester, pickle_checkpoint: Path
) -> None:
    pytester.makepyfile(test_release=textwrap.dedent(MARGIN_TEST))
    options = [f"--dpo-checkpoint={pickle_checkpoint}", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}"]
    refused = pytester.runpytest(*options, "--dpo-save-dir=released")
    assert refused.ret == pytest.ExitCode.USAGE_ERROR
    refused.stderr.fnmatch_lines(["*pytorch_model.bin: weights are stored only as a pickle*--dpo-allow-pickle*"])
    pytester.makeini("[pytest]\ndpo_allow_pickle = true\n")
    accepted = pytester.runpytest(*options, "--dpo-save-dir=released")
    accepted.assert_outcomes(passed=1)
    released = pytester.path / "released" / "checkpoint-4"
    assert (released / "pytorch_model.bin").read_bytes() == (pickle_checkpoint / "pytorch_model.bin").read_bytes()
    assert not (released / "training_args.bin").exists()
    assert json.loads((released / "dpo_eval.json").read_text())["settings"]["allow_pickle"] is True


def test_command_line_flag_loads_pickles(pickle_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["evaluate", str(pickle_checkpoint), "--eval-set", str(EVAL_STANDARD), "--reference", str(BASE)]
    assert main(arguments) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main([*arguments, "--allow-pickle"]) == 0
    assert "checkpoint-4" in capsys.readouterr().out


def with_auto_map(tmp_path: Path) -> Path:
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(FULL_RUN / "checkpoint-4", checkpoint)
    for name, auto_map in (
        ("config.json", {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}),
        ("tokenizer_config.json", {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}),
    ):
        config = json.loads((checkpoint / name).read_text())
        config["auto_map"] = auto_map
        (checkpoint / name).write_text(json.dumps(config))
    return checkpoint


def test_trust_remote_code_reaches_every_from_pretrained_and_only_with_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = with_auto_map(tmp_path)
    calls: list[tuple[str, Any]] = []

    def spy(auto_class: Any) -> Any:
        real = auto_class.from_pretrained

        def from_pretrained(name: str, *args: Any, trust_remote_code: bool, **kwargs: Any) -> Any:
            calls.append((Path(name).name, trust_remote_code))
            # The custom code does not exist; the fixture is a plain Llama, which transformers loads natively.
            return real(name, *args, trust_remote_code=False, **kwargs)

        monkeypatch.setattr(auto_class, "from_pretrained", from_pretrained)

    spy(transformers.AutoModelForCausalLM)
    spy(transformers.AutoTokenizer)
    with pytest.raises(CheckpointError, match="tokenizer_config.json: its auto_map .*Pass trust_remote_code=True if"):
        evaluate(checkpoint, EVAL_STANDARD, reference=BASE)
    assert calls == []
    evaluate(checkpoint, EVAL_STANDARD, reference=BASE, trust_remote_code=True)
    assert sorted(calls) == [("base", True), ("checkpoint-4", True), ("checkpoint-4", True)]


def test_trust_remote_code_flag_reaches_transformers_in_a_pytest_run(pytester: pytest.Pytester, tmp_path: Path) -> None:
    checkpoint = with_auto_map(tmp_path)
    pytester.makepyfile(test_release=textwrap.dedent(MARGIN_TEST))
    options = [f"--dpo-checkpoint={checkpoint}", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}"]
    refused = pytester.runpytest(*options)
    refused.assert_outcomes(errors=1)
    refused.stdout.fnmatch_lines(["*tokenizer_config.json: its auto_map (AutoTokenizer) asks to run Python code*"])
    # With the flag transformers itself goes for the (here missing) custom code: proof that the flag got through.
    trusted = pytester.runpytest(*options, "--dpo-trust-remote-code")
    trusted.assert_outcomes(errors=1)
    trusted.stdout.no_fnmatch_line("*its auto_map*")
    trusted.stdout.fnmatch_lines(["*checkpoint-4: cannot load the model (*does not appear to have a file named modeling_custom.py*"])


# -- NaN and inf never pass -------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_metrics_fail_every_helper_naming_the_cause(reference_result: EvalResult, value: float) -> None:
    metrics = {**reference_result.metrics, "rewards/margins": value, "rewards/accuracies": value, "loss": value}
    broken = dataclasses.replace(reference_result, metrics=metrics)
    shown = "NaN" if math.isnan(value) else str(value)
    for check, metric in (
        (lambda: assert_margin_positive(broken), "rewards/margins"),
        (lambda: assert_accuracy_above(broken, 0.5), "rewards/accuracies"),
        (lambda: assert_accuracy_above(broken, 0.5, confidence=0.9), "rewards/accuracies"),
        (lambda: assert_loss_below(broken, 0.7), "loss"),
    ):
        with pytest.raises(AssertionError) as excinfo:
            check()
        first_line = str(excinfo.value).splitlines()[0]
        assert f"{metric} is {shown}, not " in first_line
        assert "the checkpoint's weights or logits contain NaN/inf" in first_line


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_metrics_fail_every_gate_naming_the_cause(reference_result: EvalResult, value: float) -> None:
    broken = dataclasses.replace(reference_result, metrics={**reference_result.metrics, "rewards/margins": value})
    for line in ("rewards/margins > 0", "rewards/margins < 1", "rewards/margins != 0", "rewards/margins >= -1e9"):
        failure = parse_gate(line, "dpo_gates line 1").check(broken)
        assert failure is not None
        assert failure.startswith(f"rewards/margins is {'NaN' if math.isnan(value) else value}, not ")
        assert "weights or logits contain NaN/inf" in failure.splitlines()[0]


def test_nan_weights_that_got_past_loading_still_fail_the_gates_and_publish_nothing(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = pytester.path / "checkpoint-4"
    shutil.copytree(FULL_RUN / "checkpoint-4", checkpoint)
    weights = load_file(checkpoint / "model.safetensors")
    weights["lm_head.weight"][7, 3] = math.nan
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(loading, "refuse_non_finite", lambda model, folders: None)
    pytester.makepyfile(test_release=textwrap.dedent(MARGIN_TEST))
    pytester.makeini("[pytest]\ndpo_gates =\n    rewards/accuracies >= 0.6\n    rewards/margins > 0\n    loss <= 0.75\n")
    result = pytester.runpytest(
        "--dpo-checkpoint=checkpoint-4", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}", "--dpo-save-dir=released"
    )
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines(
        [
            "checkpoint-4: gate failed: rewards/margins is NaN, not above 0: the checkpoint's weights or logits contain*",
            "checkpoint-4: gate failed: loss is NaN, not at most 0.75: *",
        ],
        consecutive=False,
    )
    result.stdout.fnmatch_lines(["*checkpoint-4: rewards/margins is NaN, not above 0: the checkpoint's weights*"])
    assert not (pytester.path / "released").exists()
