"""Prefetching's gain on a cold disk: how long a checkpoint takes to load when its weight files are not in the
page cache, with and without `pytest_dpo.prefetch` having asked for them while the checkpoint before it was scored.

    python benchmarks/bench_prefetch.py [RUN] [--scoring-seconds 2] [--repeats 3]

RUN is a folder of `checkpoint-N` folders (a TRL output_dir; default: bench_ci's head-shape workload where it was
built, else the bundled fixture run). Before each load, every weight file under RUN is evicted from the page cache
(`posix_fadvise(DONTNEED)`, which Linux honours for pages that are clean and not mapped; where it does not, both
rows read the cache and come out equal). Then each checkpoint but the first is loaded with `load_causal_lm`, as a
sweep does: "cold" straight away, "prefetched" after `Prefetcher.start` and `--scoring-seconds` of waiting, the time
scoring the previous checkpoint gives the kernel. The gain is the difference; on a disk faster than the scoring
needs, there is none to see.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_evaluate as shared  # noqa: E402  (sets the offline environment, puts the repo on sys.path)
import torch  # noqa: E402

from pytest_dpo.checkpoints import Checkpoint, discover_checkpoints, weight_files  # noqa: E402
from pytest_dpo.loading import load_causal_lm  # noqa: E402
from pytest_dpo.prefetch import Prefetcher  # noqa: E402

HEAD_WORKLOAD_RUN = shared.DEFAULT_WORKDIR / "ci" / "head" / "run"
FIXTURE_RUN = shared.REPO_ROOT / "fixtures" / "runs" / "dpo-full"
MODES = ("cold", "prefetched")


def default_run() -> Path:
    return HEAD_WORKLOAD_RUN if HEAD_WORKLOAD_RUN.is_dir() else FIXTURE_RUN


def weight_paths(checkpoint: Checkpoint) -> list[Path]:
    return [checkpoint.path / name for name in weight_files(checkpoint.path)]


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def timed_load(checkpoint: Checkpoint) -> float:
    started = time.perf_counter()
    model = load_causal_lm(str(checkpoint.path), device="cpu", dtype=torch.float32)
    seconds = time.perf_counter() - started
    del model
    return seconds


def measure(run: Path, scoring_seconds: float, repeats: int) -> dict[str, list[float]]:
    """Load seconds of every checkpoint but the first, `repeats` times in each mode, modes interleaved."""
    checkpoints = discover_checkpoints(run)
    if len(checkpoints) < 2:
        raise SystemExit(f"{run}: needs two checkpoints or more (the first is loaded once, untimed, for the imports)")
    everything = [path for checkpoint in checkpoints for path in weight_paths(checkpoint)]
    timed_load(checkpoints[0])  # imports and first-call costs, outside the timing
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for checkpoint in checkpoints[1:]:
            for mode in MODES:
                evict(everything)
                if mode == "prefetched":
                    prefetcher = Prefetcher()
                    prefetcher.start(checkpoint)
                    prefetcher.wait()
                    time.sleep(scoring_seconds)
                seconds[mode].append(timed_load(checkpoint))
    return seconds


def render(run: Path, seconds: dict[str, list[float]], scoring_seconds: float) -> str:
    checkpoints = discover_checkpoints(run)
    size = sum(path.stat().st_size for path in weight_paths(checkpoints[1])) / 2**20
    cold, prefetched = (statistics.median(seconds[mode]) for mode in MODES)
    lines = [
        f"run {run}: {len(checkpoints)} checkpoints, {size:.1f} MiB of weights each; "
        f"{scoring_seconds:g} s of scoring before each prefetched load",
        f"load seconds, median of {len(seconds['cold'])}:",
        f"{'page cache evicted':<34}{cold:8.3f}",
        f"{'evicted, then prefetched':<34}{prefetched:8.3f}",
        f"{'gain per checkpoint':<34}{cold - prefetched:8.3f}",
        f"cold read rate {size / cold:.0f} MiB/s (load included)",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", type=Path, default=None, help="a folder of checkpoint-N folders")
    parser.add_argument("--scoring-seconds", type=float, default=2.0, help="wait between prefetch and load")
    parser.add_argument("--repeats", type=int, default=3, help="loads per checkpoint and mode")
    args = parser.parse_args(argv)
    args.run = (args.run or default_run()).resolve()
    return args


def main(argv: list[str] | None = None) -> None:
    if not hasattr(os, "posix_fadvise"):
        raise SystemExit("posix_fadvise is not available here: nothing can be evicted or prefetched.")
    args = parse_args(argv)
    shared.quiet_libraries()
    print(render(args.run, measure(args.run, args.scoring_seconds, args.repeats), args.scoring_seconds))


if __name__ == "__main__":
    main()
