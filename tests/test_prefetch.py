"""The next checkpoint's weights are asked for from disk while the current one is scored."""

from __future__ import annotations

import json
import os
from pathlib import Path

import peft  # noqa: F401
import pytest
import transformers  # noqa: F401

from pytest_dpo.checkpoints import discover_checkpoints
from pytest_dpo.prefetch import Prefetcher

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN, LORA_RUN

pytest_plugins = ["pytester"]
# The heavy libraries above are imported before any in-process pytester run: pytester removes modules first
# imported during a run, and importing torch's C extensions a second time crashes the interpreter.


def test_the_weight_files_are_handed_to_the_kernel_once_per_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    advised: list[tuple[str, int]] = []

    def record(descriptor: int, offset: int, length: int, advice: int) -> None:
        advised.append((os.readlink(f"/proc/self/fd/{descriptor}"), advice))

    monkeypatch.setattr(os, "posix_fadvise", record)
    full, adapter = discover_checkpoints(FULL_RUN)[1], discover_checkpoints(LORA_RUN)[0]
    prefetcher = Prefetcher()
    for checkpoint in (full, adapter, full):
        prefetcher.start(checkpoint)
        prefetcher.wait()
    assert advised == [
        (str((full.path / "model.safetensors").resolve()), os.POSIX_FADV_WILLNEED),
        (str((adapter.path / "adapter_model.safetensors").resolve()), os.POSIX_FADV_WILLNEED),
    ]


def test_without_posix_fadvise_nothing_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "posix_fadvise")
    prefetcher = Prefetcher()
    prefetcher.start(discover_checkpoints(FULL_RUN)[0])
    prefetcher.wait()
    assert prefetcher.requested == []


RECORD_ORDER = """
    import json
    import pytest_dpo.evaluation as evaluation
    import pytest_dpo.prefetch as prefetch

    EVENTS = []
    load = evaluation.load_policy
    start = prefetch.Prefetcher.start

    def loading(checkpoint, *args, **kwargs):
        EVENTS.append(["load", checkpoint.name])
        return load(checkpoint, *args, **kwargs)

    def prefetching(self, checkpoint):
        EVENTS.append(["prefetch", checkpoint.name])
        return start(self, checkpoint)

    evaluation.load_policy = loading
    prefetch.Prefetcher.start = prefetching

    def pytest_unconfigure(config):
        with open("events.json", "w") as handle:
            json.dump(EVENTS, handle)
"""


def test_a_sweep_asks_for_the_next_checkpoint_before_loading_the_current_one(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(RECORD_ORDER)
    pytester.makepyfile(test_m="def test_m(dpo_metrics):\n    pass\n")
    result = pytester.runpytest_subprocess(
        f"--dpo-checkpoint={FULL_RUN}", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}", "--dpo-no-cache",
        "-p", "no:cacheprovider",
    )
    result.assert_outcomes(passed=3)
    events = json.loads(Path(pytester.path / "events.json").read_text())
    assert events == [
        ["prefetch", "checkpoint-4"], ["load", "checkpoint-2"],
        ["prefetch", "checkpoint-6"], ["load", "checkpoint-4"],
        ["load", "checkpoint-6"],
    ]
