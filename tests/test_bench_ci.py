"""`benchmarks/bench_ci.py`'s pure helpers: the lower bound's batches, padded positions, parity, the breakdown,
ratios against targets, the score-cache line and the options. Nothing is timed and no process is started."""

from __future__ import annotations

from types import ModuleType

import pytest

from pytest_dpo.tokenization import TokenizedRow

from .benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("bench_ci")


def rows() -> list[TokenizedRow]:
    return [
        TokenizedRow(0, [1, 2, 3], [4, 5], [6]),
        TokenizedRow(1, [1], [4, 5, 6, 7], [8, 9]),
        TokenizedRow(2, [1, 2], [4], [5, 6, 7]),
    ]


def test_bound_batches_cover_every_token_once_sorted_by_length(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench, "SETTINGS", bench.SETTINGS.__class__(batch_size=2))
    batches = bench.bound_batches(rows())
    prompts, completions = batches["prompts"], batches["completions"]
    assert [batch["rows"].tolist() for batch in prompts] == [[1, 2], [0]]
    assert [batch["mask"].sum(dim=1).tolist() for batch in prompts] == [[1, 2], [3]]
    pairs = [(r, s) for batch in completions for r, s in zip(batch["rows"].tolist(), batch["sides"].tolist())]
    assert sorted(pairs) == [(r, s) for r in range(3) for s in (0, 1)]
    lengths = [n for batch in completions for n in batch["mask"].sum(dim=1).tolist()]
    assert lengths == sorted(lengths)
    for batch in completions:
        for ids, mask, r, s in zip(batch["ids"], batch["mask"], batch["rows"].tolist(), batch["sides"].tolist()):
            assert ids[mask.bool()].tolist() == (rows()[r].rejected_ids if s else rows()[r].chosen_ids)


def test_packed_positions_pad_each_batch_to_its_longest_row_and_count_the_check(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench, "SETTINGS", bench.SETTINGS.__class__(batch_size=3))
    packed = 3 * max(len(row.prompt_ids) + len(row.chosen_ids) + len(row.rejected_ids) for row in rows())
    # The check: the first batch's two shortest rows (0 and 2), prompts padded to 3, four completions to 3.
    assert bench.packed_positions(rows()) == packed + 2 * (3 + 2 * 3)


def metrics(loss: float, chosen: float) -> dict[str, float]:
    return {
        "loss": loss,
        "rewards/chosen": chosen,
        "rewards/rejected": -chosen,
        "rewards/margins": 2 * chosen,
        "rewards/accuracies": 0.5,
        "logps/chosen": -100.0,
        "logps/rejected": -120.0,
    }


def test_parity_is_relative_with_a_floor(bench: ModuleType) -> None:
    trl = {"checkpoint-1": metrics(0.7, 0.5)}
    assert bench.parity({"checkpoint-1": metrics(0.70001, 0.5)}, trl, {}, rows=256)["match"]
    off = bench.parity({"checkpoint-1": metrics(0.7002, 0.5)}, trl, {}, rows=256)
    assert not off["match"]
    assert off["worst"] == "checkpoint-1 loss"
    # Below the floor the difference is relative to the floor: 1e-6 on a value of 1e-3 is within 1e-4 of 0.1.
    small = bench.parity({"checkpoint-1": metrics(0.7, 0.001001)}, {"checkpoint-1": metrics(0.7, 0.001)}, {}, rows=256)
    assert small["match"]


def test_parity_excuses_accuracy_flips_of_rounding_level_ties(bench: ModuleType) -> None:
    trl = {"checkpoint-1": metrics(0.7, 0.5)}
    one_row_off = {"checkpoint-1": {**metrics(0.7, 0.5), "rewards/accuracies": 0.5 + 1 / 256}}
    assert not bench.parity(one_row_off, trl, {"checkpoint-1": 0}, rows=256)["match"]
    excused = bench.parity(one_row_off, trl, {"checkpoint-1": 1}, rows=256)
    assert excused["match"]
    assert excused["excused_rows"] == {"checkpoint-1 rewards/accuracies": 1}


def test_parity_needs_the_same_checkpoints(bench: ModuleType) -> None:
    trl = {"checkpoint-1": metrics(0.7, 0.5)}
    ours = {"checkpoint-1": metrics(0.7, 0.5), "checkpoint-2": metrics(0.7, 0.5)}
    assert not bench.parity(ours, trl, {}, rows=256)["match"]


def test_bound_check_compares_sums_with_means_times_rows(bench: ModuleType) -> None:
    ours = {"checkpoint-1": metrics(0.7, 0.5)}
    assert bench.bound_check(ours, {"checkpoint-1": [-400.0, -480.0], "base": [0.0, 0.0]}, rows=4)["match"]
    assert not bench.bound_check(ours, {"checkpoint-1": [-400.0, -481.0]}, rows=4)["match"]


def test_breakdown_splits_the_process_time(bench: ModuleType) -> None:
    probe = {
        "loaded_at": 101.0,
        "imports_s": 2.0,
        "finished_at": 115.0,
        "seconds": {"load": 1.0, "tokenize": 0.5, "scoring": 8.0, "backbone": 5.0, "head": 2.0},
    }
    measured = bench.Measured(seconds=16.0, peak_rss_mib=1.0, started_at=100.0, ended_at=116.0, output="")
    breakdown = bench.breakdown_of(probe, measured)
    assert breakdown["overhead"] == 16.0 - 1.0 - 0.5 - 5.0 - 2.0
    parts = [name for name in breakdown if name not in ("total", "load", "tokenize", "backbone", "head", "overhead")]
    assert sum(breakdown[name] for name in parts) == pytest.approx(breakdown["overhead"])
    assert breakdown["startup (python, pytest, plugins)"] == 1.0
    assert breakdown["exit"] == 1.0


def test_bound_breakdown_leaves_the_rest_as_overhead(bench: ModuleType) -> None:
    split = bench.bound_breakdown({"load": 1.0, "backbone": 4.0, "head": 2.0}, total=10.0)
    assert split == {"total": 10.0, "load": 1.0, "backbone": 4.0, "head": 2.0, "overhead": 3.0}
    lines = bench.render_breakdown({"total": 20.0, "load": 1.0, "tokenize": 0.5, "exit": 1.0}, split)
    assert [line.split()[0] for line in lines[1:]] == ["total", "load", "tokenize", "exit"]
    assert lines[2].split()[1:] == ["1.00", "5.0%", "1.00", "10.0%"]
    assert len(lines[3].split()) == 3  # the bound has no tokenize row


def test_ratios_and_verdicts(bench: ModuleType) -> None:
    contestants = {
        "pytest-dpo cold": {"seconds": 10.0, "peak_rss_mib": 500.0},
        "pytest-dpo warm": {"seconds": 1.0, "peak_rss_mib": 400.0},
        "TRL": {"seconds": 100.0, "peak_rss_mib": 1000.0},
        "lower bound": {"seconds": 8.0, "peak_rss_mib": 300.0},
    }
    figures = bench.ratios(contestants)
    assert figures == pytest.approx(
        {"cold/TRL": 0.1, "cold/bound": 1.25, "warm/TRL": 0.01, "warm seconds": 1.0, "peak RSS cold/TRL": 0.5}
    )
    assert set(figures) == set(bench.RATIOS)
    met = bench.verdicts(figures, bench.SHAPES["backbone"].targets)
    assert [name for name, ok in met.items() if not ok] == ["cold/bound"]
    assert bench.verdicts(figures, bench.SHAPES["head"].targets) == {"cold/TRL": False}


def test_cache_counts_read_the_plugin_summary(bench: ModuleType) -> None:
    assert bench.cache_counts("...\nscore cache: 3 hits, 2 misses, 0 rebuilt (/x)\n") == (3, 2)
    assert bench.cache_counts("no summary") is None


def test_quick_defaults_and_rows_must_fill_batches(bench: ModuleType) -> None:
    args = bench.parse_args(["--quick"])
    assert (args.checkpoints, args.rows, args.shape) == (2, 32, "both")
    assert (bench.parse_args([]).checkpoints, bench.parse_args([]).rows) == (4, 256)
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "30"])

