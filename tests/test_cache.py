"""The score cache: hit when nothing that changes the scores changed, miss otherwise, never trust a bad entry."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import huggingface_hub  # noqa: F401
import peft  # noqa: F401
import pytest
import torch
import transformers  # noqa: F401

from pytest_dpo import cache as cache_module
from pytest_dpo.cache import CACHE_FORMAT, ScoreCache, cache_key
from pytest_dpo.checkpoints import discover_checkpoints
from pytest_dpo.evalset import load_eval_set
from pytest_dpo.evaluation import CheckpointEvaluation
from pytest_dpo.settings import DPOSettings

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN, LORA_RUN

pytest_plugins = ["pytester"]
# What entries written before CACHE_FORMAT 2 lack.
OLD_FORMAT_MISSING = (
    "chosen_log_sum_sq_probs", "rejected_log_sum_sq_probs", "chosen_shared_logps", "rejected_shared_logps"
)  # fmt: skip


def run(checkpoint: Path, cache: ScoreCache, eval_set: Path = EVAL_STANDARD, reference: Path | None = BASE, **settings: object):
    [found] = discover_checkpoints(checkpoint)
    return CheckpointEvaluation(found, load_eval_set(eval_set), reference, DPOSettings(**settings), cache).score()


def test_second_evaluation_reads_both_models_from_the_cache_and_gives_the_same_numbers(tmp_path: Path) -> None:
    first = run(FULL_RUN / "checkpoint-4", ScoreCache(tmp_path))
    cache = ScoreCache(tmp_path)
    second = run(FULL_RUN / "checkpoint-4", cache)
    assert (cache.stats.hits, cache.stats.misses) == (2, 0)
    assert first.metrics == second.metrics
    uncached = run(FULL_RUN / "checkpoint-4", ScoreCache(None))
    assert torch.equal(uncached.per_example.policy_chosen_logps, second.per_example.policy_chosen_logps)


def test_a_sweep_scores_the_shared_reference_once(tmp_path: Path) -> None:
    cache = ScoreCache(None)
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6"):
        run(FULL_RUN / name, cache)
    assert (cache.stats.hits, cache.stats.misses) == (2, 4)


def test_lora_adapter_and_its_base_are_cached_separately(tmp_path: Path) -> None:
    run(LORA_RUN / "checkpoint-4", ScoreCache(tmp_path), reference=None)
    cache = ScoreCache(tmp_path)
    run(LORA_RUN / "checkpoint-6", cache, reference=None)
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)


def _changed_weights(tmp_path: Path) -> Path:
    copy = tmp_path / "edited" / "checkpoint-4"
    shutil.copytree(FULL_RUN / "checkpoint-4", copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    return copy


def _changed_row(tmp_path: Path) -> Path:
    lines = EVAL_STANDARD.read_text().splitlines()
    row = json.loads(lines[10])
    row["chosen"] += " Indeed."
    lines[10] = json.dumps(row)
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join(lines) + "\n")
    return edited


def _changed_tokenizer(tmp_path: Path) -> Path:
    copy = tmp_path / "retokenized" / "checkpoint-4"
    shutil.copytree(FULL_RUN / "checkpoint-4", copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|im_end|>"
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    ("change", "expected_misses"),
    [
        pytest.param(lambda tmp: {"checkpoint": _changed_weights(tmp)}, 1, id="one-weight"),
        pytest.param(lambda tmp: {"eval_set": _changed_row(tmp)}, 2, id="one-eval-row"),
        pytest.param(lambda tmp: {"max_length": 40}, 2, id="max-length"),
        pytest.param(lambda tmp: {"checkpoint": _changed_tokenizer(tmp)}, 2, id="tokenizer"),
        pytest.param(lambda tmp: {"truncation_mode": "keep_end", "max_length": 40}, 2, id="truncation-mode"),
        pytest.param(lambda tmp: {"dtype": "bfloat16"}, 2, id="dtype"),
    ],
)
def test_anything_that_changes_the_scores_misses(tmp_path: Path, change, expected_misses: int) -> None:
    run(FULL_RUN / "checkpoint-4", ScoreCache(tmp_path / "cache"))
    arguments = {"checkpoint": FULL_RUN / "checkpoint-4", "eval_set": EVAL_STANDARD} | change(tmp_path)
    cache = ScoreCache(tmp_path / "cache")
    run(arguments.pop("checkpoint"), cache, arguments.pop("eval_set"), **arguments)
    assert cache.stats.misses == expected_misses


def test_beta_and_loss_type_reuse_the_cached_scores_and_still_change_the_metrics(tmp_path: Path) -> None:
    first = run(FULL_RUN / "checkpoint-4", ScoreCache(tmp_path), beta=0.1)
    cache = ScoreCache(tmp_path)
    second = run(FULL_RUN / "checkpoint-4", cache, beta=0.5, loss_type="ipo")
    assert (cache.stats.hits, cache.stats.misses) == (2, 0)
    assert second.metrics["rewards/margins"] == pytest.approx(5 * first.metrics["rewards/margins"])
    assert second.settings["loss_type"] == ["ipo"] and second.metrics["loss"] != first.metrics["loss"]


@pytest.mark.parametrize(
    "variant",
    [
        {"ld_alpha": 0.5},
        {"f_divergence_type": "js_divergence"},
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.7},
        {"use_weighting": True},
    ],
    ids=["ld-alpha", "js-divergence", "alpha-divergence", "use-weighting"],
)
def test_loss_variants_reuse_the_cached_scores_and_give_the_uncached_numbers(tmp_path: Path, variant: dict) -> None:
    """The entry holds the sums LD-DPO is computed from, so these settings act in the metrics only; WPO's log
    sum p^2 is computed only for a policy evaluated with `use_weighting`, so the first such run scores the
    policy again (never the reference) and stores it for the next."""
    plain = run(FULL_RUN / "checkpoint-4", ScoreCache(tmp_path))
    cache = ScoreCache(tmp_path)
    cached = run(FULL_RUN / "checkpoint-4", cache, **variant)
    weighting = variant.get("use_weighting", False)
    assert (cache.stats.hits, cache.stats.misses) == ((1, 1) if weighting else (2, 0))
    assert cached.metrics["loss"] != plain.metrics["loss"]
    uncached = run(FULL_RUN / "checkpoint-4", ScoreCache(None), **variant)
    assert cached.metrics == uncached.metrics
    cache = ScoreCache(tmp_path)
    again = run(FULL_RUN / "checkpoint-4", cache, **variant)
    assert (cache.stats.hits, cache.stats.misses) == (2, 0)
    assert again.metrics == uncached.metrics
    assert run(FULL_RUN / "checkpoint-4", cache).metrics == plain.metrics  # the entry with log sum p^2 serves all


def test_log_sum_sq_probs_are_scored_only_for_a_weighted_policy(tmp_path: Path) -> None:
    from safetensors import safe_open

    run(FULL_RUN / "checkpoint-4", ScoreCache(tmp_path), use_weighting=True)
    stored = {}
    for entry in tmp_path.glob("*.safetensors"):
        with safe_open(str(entry), framework="pt") as handle:
            stored[entry.name] = set(handle.keys())
    assert sorted("chosen_log_sum_sq_probs" in names for names in stored.values()) == [False, True]


def _rewrite_entries(directory: Path, drop: tuple[str, ...], format_version: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    for entry in directory.glob("*.safetensors"):
        with safe_open(str(entry), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys() if name not in drop}
        save_file(tensors, str(entry), metadata={"format": format_version})


@pytest.mark.parametrize(
    ("drop", "format_version"),
    [
        pytest.param(OLD_FORMAT_MISSING, "1", id="format-1-entry"),
        pytest.param(OLD_FORMAT_MISSING, str(CACHE_FORMAT), id="current-format-without-the-new-sums"),
        pytest.param((), "1", id="format-1-label-on-a-full-entry"),
    ],
)
def test_entries_without_the_new_sums_are_rebuilt_never_misread(
    tmp_path: Path, drop: tuple[str, ...], format_version: str
) -> None:
    reference = run(FULL_RUN / "checkpoint-4", ScoreCache(tmp_path), ld_alpha=0.5, use_weighting=True)
    _rewrite_entries(tmp_path, drop, format_version)
    cache = ScoreCache(tmp_path)
    rebuilt = run(FULL_RUN / "checkpoint-4", cache, ld_alpha=0.5, use_weighting=True)
    assert (cache.stats.rebuilt, cache.stats.misses) == (2, 2)
    assert rebuilt.metrics == reference.metrics


def test_an_older_format_lives_under_other_keys() -> None:
    key = cache_key("weights", "torch.float32", "cpu", "tokens")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cache_module, "CACHE_FORMAT", CACHE_FORMAT - 1)
        assert cache_key("weights", "torch.float32", "cpu", "tokens") != key


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_corrupt_entry_is_rebuilt_not_used(tmp_path: Path, damage: str) -> None:
    reference = run(FULL_RUN / "checkpoint-4", ScoreCache(tmp_path))
    for entry in tmp_path.glob("*.safetensors"):
        data = entry.read_bytes()
        entry.write_bytes({"garbage": b"\x00not safetensors", "truncated": data[: len(data) // 2], "empty": b""}[damage])
    cache = ScoreCache(tmp_path)
    rebuilt = run(FULL_RUN / "checkpoint-4", cache)
    assert (cache.stats.rebuilt, cache.stats.misses) == (2, 2)
    assert rebuilt.metrics == reference.metrics
    assert (ScoreCache(tmp_path).get(next(iter(p.stem for p in tmp_path.glob("*.safetensors"))), 24)) is not None


def test_no_partial_files_are_left_in_the_cache(tmp_path: Path) -> None:
    run(FULL_RUN / "checkpoint-4", ScoreCache(tmp_path))
    assert sorted(path.suffix for path in tmp_path.iterdir()) == [".json", ".safetensors", ".safetensors"]


def test_second_pytest_run_scores_nothing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_m=textwrap.dedent("def test_m(dpo_metrics):\n    assert dpo_metrics['loss'] > 0\n"))
    options = [f"--dpo-checkpoint={FULL_RUN}", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}", "--dpo-cache-dir=scores"]
    pytester.runpytest(*options).stdout.fnmatch_lines(["score cache: 2 hits, 4 misses, 0 rebuilt (*scores)"])
    pytester.runpytest(*options).stdout.fnmatch_lines(["score cache: 6 hits, 0 misses, 0 rebuilt (*scores)"])
    pytester.runpytest(*options, "--dpo-no-cache").stdout.fnmatch_lines(["score cache: 2 hits, 4 misses, 0 rebuilt (memory only)"])


LOADED_MODULES = """
import json, sys


def pytest_unconfigure(config):
    with open("loaded.json", "w") as handle:
        json.dump(sorted(name for name in ("torch", "transformers", "peft") if name in sys.modules), handle)
"""


@pytest.mark.parametrize("run_folder", [FULL_RUN, LORA_RUN])
def test_a_run_whose_scores_are_all_cached_loads_neither_transformers_nor_peft(
    pytester: pytest.Pytester, run_folder: Path
) -> None:
    pytester.makeconftest(LOADED_MODULES)
    pytester.makepyfile(test_m="def test_m(dpo_metrics):\n    assert dpo_metrics['loss'] > 0\n")
    options = [f"--dpo-checkpoint={run_folder}", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}"]
    options += ["--dpo-cache-dir=scores", "-p", "no:cacheprovider"]
    cold = pytester.runpytest_subprocess(*options)
    cold.assert_outcomes(passed=len(discover_checkpoints(run_folder)))
    assert "transformers" in json.loads((pytester.path / "loaded.json").read_text())

    warm = pytester.runpytest_subprocess(*options)
    warm.assert_outcomes(passed=len(discover_checkpoints(run_folder)))
    warm.stdout.fnmatch_lines(["score cache: * hits, 0 misses, 0 rebuilt (*scores)"])
    assert json.loads((pytester.path / "loaded.json").read_text()) == ["torch"]


def test_tokenized_rows_are_cached_by_eval_set_tokenizer_and_truncation(tmp_path: Path) -> None:
    first = run(FULL_RUN / "checkpoint-4", ScoreCache(tmp_path))
    token_files = sorted(tmp_path.glob("tokens-*.json"))
    assert len(token_files) == 1
    cache = ScoreCache(tmp_path)
    assert run(FULL_RUN / "checkpoint-4", cache).metrics == first.metrics
    run(FULL_RUN / "checkpoint-4", cache, max_length=64)
    assert len(sorted(tmp_path.glob("tokens-*.json"))) == 2
    token_files[0].write_text("{broken")
    assert run(FULL_RUN / "checkpoint-4", ScoreCache(tmp_path)).metrics == first.metrics


def test_an_entry_with_half_of_the_wpo_sums_is_rebuilt(tmp_path: Path) -> None:
    reference = run(FULL_RUN / "checkpoint-4", ScoreCache(tmp_path), use_weighting=True)
    _rewrite_entries(tmp_path, ("chosen_log_sum_sq_probs",), str(CACHE_FORMAT))
    cache = ScoreCache(tmp_path)
    rebuilt = run(FULL_RUN / "checkpoint-4", cache, use_weighting=True)
    assert (cache.stats.hits, cache.stats.rebuilt, cache.stats.misses) == (1, 1, 1)
    assert rebuilt.metrics == reference.metrics
