"""`benchmarks/bench_gpu.py`'s pure helpers: token counting, the table, the parity line, pytest's summary and the
options. No model is built or run, no process is started."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from pytest_dpo.tokenization import TokenizedRow

from .benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("bench_gpu")


def measurement(bench: ModuleType, contestant: str, batch_size: int, seconds: float, peak: float | None) -> object:
    return bench.Measurement(contestant, "checkpoint-1", batch_size, seconds, 1000, peak, {})


def test_scored_tokens_count_prompt_and_both_completions_for_policy_and_reference(bench: ModuleType) -> None:
    rows = [TokenizedRow(0, [1, 2, 3], [4, 5], [6]), TokenizedRow(1, [1], [4, 5, 6, 7], [8, 9])]
    assert bench.scored_tokens(rows) == 2 * ((3 + 2 + 1) + (1 + 4 + 2))
    assert bench.scored_tokens([]) == 0


def test_table_rows_sum_seconds_over_checkpoints_and_keep_the_highest_peak(bench: ModuleType) -> None:
    measurements = [
        measurement(bench, "pytest-dpo", 8, 1.0, 2.0),
        measurement(bench, "pytest-dpo", 8, 3.0, 5.0),
        measurement(bench, "TRL", 8, 4.0, 9.0),
        measurement(bench, "TRL", 8, 4.0, 7.0),
        measurement(bench, "pytest-dpo", 4, 1.0, None),
        measurement(bench, "TRL", 4, 2.0, None),
    ]
    rows = bench.table_rows(measurements)
    assert [row.batch_size for row in rows] == [4, 8]
    eight = rows[1]
    assert eight.dpo_tokens_per_s == pytest.approx(2000 / 4.0)
    assert eight.trl_tokens_per_s == pytest.approx(2000 / 8.0)
    assert eight.speed_up == pytest.approx(2.0)
    assert (eight.dpo_peak_gib, eight.trl_peak_gib) == (5.0, 9.0)
    assert (rows[0].dpo_peak_gib, rows[0].trl_peak_gib) == (None, None)


def test_format_table_is_markdown_with_one_line_per_batch_size(bench: ModuleType) -> None:
    rows = [bench.TableRow(4, 12345.6, 4115.2, 3.5, 11.25), bench.TableRow(16, 2000.0, 1000.0, None, None)]
    lines = bench.format_table(rows).splitlines()
    assert lines[0] == (
        "| batch size | pytest-dpo tokens/s | TRL tokens/s | speed-up | pytest-dpo peak GiB | TRL peak GiB |"
    )
    assert lines[1] == "|---:|---:|---:|---:|---:|---:|"
    assert lines[2] == "| 4 | 12,346 | 4,115 | 3.00× | 3.50 | 11.25 |"
    assert lines[3] == "| 16 | 2,000 | 1,000 | 2.00× | n/a | n/a |"


def test_parity_tolerates_accuracy_flips_only_on_near_ties(bench: ModuleType) -> None:
    close = bench.Parity("checkpoint-1", 8, loss_relative=1e-3, accuracy_difference=0.002, near_tie_fraction=0.004)
    flipped = bench.Parity("checkpoint-2", 8, loss_relative=1e-3, accuracy_difference=0.01, near_tie_fraction=0.004)
    loss_off = bench.Parity("checkpoint-2", 16, loss_relative=0.05, accuracy_difference=0.0, near_tie_fraction=0.0)
    assert close.within_tolerance
    assert not flipped.within_tolerance
    assert not loss_off.within_tolerance
    line = bench.format_parity([close, loss_off])
    assert line.startswith("parity with TRL ✗ (max over 2 checkpoint x batch size runs)")
    assert "loss rel diff 5.0e-02" in line and "rewards/accuracies diff 0.0020" in line
    assert bench.format_parity([close]).startswith("parity with TRL ✓")


def test_pytest_summary_and_failures(bench: ModuleType) -> None:
    failure = "FAILED tests/test_gpu.py::test_x - assert 1 == 2"
    output = f"..F.s\n{failure}\n1 failed, 3 passed, 1 skipped, 90 deselected in 4.2s\n"
    assert bench.pytest_summary(output) == "1 failed, 3 passed, 1 skipped, 90 deselected in 4.2s"
    assert bench.pytest_summary("===== 7 skipped in 1.0s =====\n\n") == "7 skipped in 1.0s"
    assert bench.pytest_summary("") == "no output"
    assert bench.failed_tests(output) == [failure]
    tests = bench.GpuTests("1 failed in 1s", ["FAILED tests/test_gpu.py::test_x"], 1)
    assert bench.format_tests(tests) == "gpu tests: 1 failed in 1s\n  FAILED tests/test_gpu.py::test_x"


def test_options_make_the_plan(bench: ModuleType, tmp_path: Path) -> None:
    full = bench.parse_args(["--workdir", str(tmp_path)])
    assert (full.device, full.dtype, full.shape_name) == ("cuda", "bfloat16", "qwen2-0.5b")
    assert (full.checkpoints, full.rows, full.batch_sizes, full.vocab_size) == (2, 512, (4, 8, 16), 151_936)
    quick = bench.parse_args(["--quick", "--batch-sizes", "2,32"])
    assert (quick.checkpoints, quick.rows, quick.batch_sizes) == (1, 64, (2, 32))
    tiny = bench.parse_args(["--device", "cpu", "--tiny"])
    assert (tiny.dtype, tiny.shape["hidden_size"], tiny.shape["num_hidden_layers"]) == ("float32", 64, 2)
    assert (tiny.checkpoints, tiny.rows, tiny.batch_sizes) == (1, 16, (4, 8, 16))
    assert tiny.vocab_size <= 151_936


@pytest.mark.parametrize("text", ["", "4,x", "0,8", "-4"])
def test_bad_batch_sizes_name_the_option(bench: ModuleType, text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch-sizes", text])
    assert "--batch-sizes" in capsys.readouterr().err


def test_missing_cuda_exits_with_what_to_do(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA is unavailable.*--device cpu --tiny"):
        bench.refuse_missing_cuda("cuda")
    bench.refuse_missing_cuda("cpu")
