"""`benchmarks/bench_prefetch.py` on the bundled fixture run: both modes load every checkpoint but the first, and
the table reports them."""

from __future__ import annotations

from types import ModuleType

import pytest

from .benchmark_modules import load_benchmark
from .fixture_paths import FULL_RUN


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("bench_prefetch")


def test_each_later_checkpoint_is_loaded_in_both_modes(bench: ModuleType) -> None:
    seconds = bench.measure(FULL_RUN, scoring_seconds=0.0, repeats=2)
    assert {mode: len(values) for mode, values in seconds.items()} == {"cold": 4, "prefetched": 4}
    assert all(value > 0 for values in seconds.values() for value in values)
    table = bench.render(FULL_RUN, seconds, 0.0)
    assert f"run {FULL_RUN}: 3 checkpoints" in table
    assert "page cache evicted" in table and "evicted, then prefetched" in table and "gain per checkpoint" in table


def test_a_run_of_one_checkpoint_is_refused(bench: ModuleType) -> None:
    with pytest.raises(SystemExit, match="two checkpoints or more"):
        bench.measure(FULL_RUN / "checkpoint-2", scoring_seconds=0.0, repeats=1)


def test_the_default_run_is_the_head_workload_where_built_else_the_fixtures(bench: ModuleType) -> None:
    assert bench.default_run() in (bench.HEAD_WORKLOAD_RUN, bench.FIXTURE_RUN)
    assert bench.parse_args([str(FULL_RUN)]).run == FULL_RUN.resolve()
