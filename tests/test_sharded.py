"""Sharded safetensors checkpoints (`model.safetensors.index.json`) score, fingerprint and publish like single files."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub  # noqa: F401
import peft  # noqa: F401
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from pytest_dpo import evaluate
from pytest_dpo.checkpoints import discover_checkpoints, fingerprint

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN
from .sharding import SHARDS, shard

pytest_plugins = ["pytester"]


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    checkpoint = tmp_path / "runs" / "checkpoint-4"
    shutil.copytree(FULL_RUN / "checkpoint-4", checkpoint)
    shard(checkpoint)
    return checkpoint


def test_a_sharded_checkpoint_scores_exactly_as_its_single_file(sharded: Path) -> None:
    (checkpoint,) = discover_checkpoints(sharded)
    assert checkpoint.kind == "model"
    single = evaluate(FULL_RUN / "checkpoint-4", EVAL_STANDARD, reference=BASE)
    split = evaluate(sharded, EVAL_STANDARD, reference=BASE)
    assert split.metrics == single.metrics
    assert torch.equal(split.per_example.policy_chosen_logps, single.per_example.policy_chosen_logps)


def test_the_fingerprint_covers_every_shard(sharded: Path) -> None:
    before = fingerprint(sharded)
    assert fingerprint(sharded) == before
    second = sharded / SHARDS[1]
    weights = load_file(second)
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, second, metadata={"format": "pt"})
    assert fingerprint(sharded) != before


def test_a_passing_sharded_checkpoint_is_saved_with_all_its_shards(pytester: pytest.Pytester, sharded: Path) -> None:
    pytester.makepyfile(test_m="def test_m(dpo_metrics):\n    assert dpo_metrics['rewards/margins'] > 0\n")
    result = pytester.runpytest(
        f"--dpo-checkpoint={sharded}", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}", "--dpo-save-dir=released"
    )
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    saved = pytester.path / "released" / "checkpoint-4"
    assert {*SHARDS, "model.safetensors.index.json", "config.json"} <= {path.name for path in saved.iterdir()}
    assert not (saved / "model.safetensors").exists() and not (saved / "training_args.bin").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    original = load_file(FULL_RUN / "checkpoint-4" / "model.safetensors")
    state = reloaded.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in original.items() if name in state)
