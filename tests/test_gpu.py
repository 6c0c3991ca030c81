"""GPU paths: CUDA device and bf16 defaults, memory freed between checkpoints. Skipped without CUDA."""

from __future__ import annotations

import textwrap

import pytest
import torch

from pytest_dpo import evaluate

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN, LORA_RUN

pytestmark = pytest.mark.gpu
pytest_plugins = ["pytester"]


def test_defaults_to_cuda_and_bf16_where_supported() -> None:
    result = evaluate(FULL_RUN / "checkpoint-6", EVAL_STANDARD, reference=BASE)
    assert result.settings["device"] == "cuda"
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    assert result.settings["dtype"] == expected


def test_fp32_on_cuda_matches_cpu() -> None:
    on_cpu = evaluate(FULL_RUN / "checkpoint-6", EVAL_STANDARD, reference=BASE, device="cpu")
    on_gpu = evaluate(FULL_RUN / "checkpoint-6", EVAL_STANDARD, reference=BASE, device="cuda", dtype="float32")
    for name in ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps"):
        assert torch.allclose(getattr(on_cpu.per_example, name), getattr(on_gpu.per_example, name), atol=1e-3), name


def test_bf16_stays_close_to_fp32() -> None:
    fp32 = evaluate(LORA_RUN / "checkpoint-6", EVAL_STANDARD, device="cuda", dtype="float32")
    bf16 = evaluate(LORA_RUN / "checkpoint-6", EVAL_STANDARD, device="cuda", dtype="bfloat16")
    assert abs(fp32.metrics["logps/chosen"] - bf16.metrics["logps/chosen"]) < 0.05 * abs(fp32.metrics["logps/chosen"])


def test_evaluation_frees_gpu_memory() -> None:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    evaluate(FULL_RUN / "checkpoint-6", EVAL_STANDARD, reference=BASE, device="cuda")
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


def test_plugin_frees_each_checkpoints_model_before_the_next(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_gpu_models=textwrap.dedent(
            """
            import torch

            PEAKS = []

            def test_model(dpo_model):
                assert next(dpo_model.parameters()).device.type == "cuda"
                PEAKS.append(torch.cuda.memory_allocated())
                # one checkpoint's model at a time: memory does not grow from checkpoint to checkpoint
                assert PEAKS[-1] <= PEAKS[0] * 1.05 + 2**20
            """
        )
    )
    result = pytester.runpytest_subprocess(
        f"--dpo-checkpoint={FULL_RUN}", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}"
    )
    result.assert_outcomes(passed=3)


def test_device_map_auto_on_cuda_matches_one_device() -> None:
    whole = evaluate(FULL_RUN / "checkpoint-6", EVAL_STANDARD, reference=BASE, device="cuda", dtype="float32")
    mapped = evaluate(FULL_RUN / "checkpoint-6", EVAL_STANDARD, reference=BASE, dtype="float32", device_map="auto")
    for name in ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps"):
        assert torch.allclose(getattr(whole.per_example, name), getattr(mapped.per_example, name), atol=1e-3), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs to split a model across")
def test_device_map_spreads_a_model_over_two_gpus() -> None:
    from pytest_dpo.loading import LoadOptions, load_causal_lm

    model = load_causal_lm(
        str(BASE), device="cuda", dtype=torch.float32,
        options=LoadOptions(device_map="balanced"),
    )
    assert {parameter.device.index for parameter in model.parameters()} == {0, 1}
