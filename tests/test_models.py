"""Checkpoint discovery, reference resolution and fingerprints on the TRL-trained fixture runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_dpo.checkpoints import (
    CheckpointError,
    checkpoint_ids,
    discover_checkpoints,
    fingerprint,
)
from pytest_dpo.loading import choose_device, choose_dtype
from pytest_dpo.references import resolve_reference
from pytest_dpo.spelling import spelled_for

from .fixture_paths import BASE, FULL_RUN, LORA_RUN, PROMPT_TUNING_RUN


def test_checkpoints_module_imports_no_heavy_library() -> None:
    """Discovery, fingerprints and reference resolution stay standard-library only: no torch & co. on import."""
    code = (
        "import pytest_dpo.checkpoints, pytest_dpo.references, sys; "
        "heavy = {'torch', 'transformers', 'peft', 'safetensors'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_output_dir_expands_to_checkpoints_in_step_order() -> None:
    found = discover_checkpoints(FULL_RUN)
    assert [c.name for c in found] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert [c.step for c in found] == [2, 4, 6]
    assert all(c.kind == "model" for c in found)


def test_final_model_at_root_is_kept_when_it_differs_from_the_last_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(FULL_RUN, run)
    # Pretend training went on after the last checkpoint: the root weights differ from checkpoint-6.
    shutil.copy(run / "checkpoint-2" / "model.safetensors", run / "model.safetensors")
    found = discover_checkpoints(run)
    assert [c.name for c in found] == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "run"]
    assert found[-1].step is None


def test_lora_run_expands_to_adapters_with_their_base() -> None:
    found = discover_checkpoints(LORA_RUN)
    assert [c.name for c in found] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert all(c.kind == "adapter" and c.base_model == "fixtures/base" for c in found)


def test_prompt_tuning_run_expands_to_adapters_each_with_its_own_fingerprint_and_id() -> None:
    found = discover_checkpoints(PROMPT_TUNING_RUN)
    assert [c.name for c in found] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert all(c.kind == "adapter" and c.base_model == "fixtures/base" for c in found)
    assert len({fingerprint(c.path) for c in found}) == 3
    ids = checkpoint_ids(discover_checkpoints(LORA_RUN) + found)
    assert ids[3:] == [f"dpo-prompt-tuning/checkpoint-{step}" for step in (2, 4, 6)]


def test_glob_expands_and_reaches_each_checkpoint_once() -> None:
    found = discover_checkpoints(f"{FULL_RUN}/checkpoint-[46]")
    assert [c.name for c in found] == ["checkpoint-4", "checkpoint-6"]
    assert len(discover_checkpoints(f"{FULL_RUN}/checkpoint-*")) == 3


def test_a_single_model_folder_is_one_checkpoint() -> None:
    (checkpoint,) = discover_checkpoints(FULL_RUN / "checkpoint-4")
    assert (checkpoint.name, checkpoint.step, checkpoint.kind) == ("checkpoint-4", 4, "model")


def test_missing_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope: checkpoint not found"):
        discover_checkpoints(tmp_path / "nope")


def test_glob_matching_nothing_says_so(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="matches nothing"):
        discover_checkpoints(f"{tmp_path}/checkpoint-*")


def test_folder_without_weights_names_the_folder_and_the_expected_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no weights found \(expected model.safetensors\)"):
        discover_checkpoints(tmp_path)


def test_pickle_only_weights_are_refused_with_the_file_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: weights are stored only as a pickle"):
        discover_checkpoints(tmp_path)


def test_adapter_without_weights_is_refused(tmp_path: Path) -> None:
    shutil.copy(LORA_RUN / "checkpoint-2" / "adapter_config.json", tmp_path)
    with pytest.raises(CheckpointError, match="expected adapter_model.safetensors"):
        discover_checkpoints(tmp_path)


def test_adapter_reference_defaults_to_its_base_found_from_any_working_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (checkpoint,) = discover_checkpoints(LORA_RUN / "checkpoint-2")
    reference = resolve_reference(checkpoint, None)
    assert reference.kind == "base"
    assert Path(reference.path).resolve() == BASE.resolve()


def test_explicit_reference_adapter_is_loaded_on_its_base() -> None:
    (checkpoint,) = discover_checkpoints(LORA_RUN / "checkpoint-6")
    reference = resolve_reference(checkpoint, LORA_RUN / "checkpoint-2")
    assert reference.kind == "adapter"
    assert Path(reference.base or "").resolve() == BASE.resolve()


def test_full_model_without_reference_says_how_to_pass_one() -> None:
    (checkpoint,) = discover_checkpoints(FULL_RUN / "checkpoint-2")
    with pytest.raises(CheckpointError, match="started from with --dpo-reference$"):
        resolve_reference(checkpoint, None)
    with spelled_for("python"), pytest.raises(CheckpointError, match="started from with reference=$"):
        resolve_reference(checkpoint, None)
    with spelled_for("cli"), pytest.raises(CheckpointError, match="started from with --reference$"):
        resolve_reference(checkpoint, None)


def test_full_model_uses_the_model_card_base_model_when_it_exists(tmp_path: Path) -> None:
    checkpoint_dir = tmp_path / "checkpoint-3"
    shutil.copytree(FULL_RUN / "checkpoint-2", checkpoint_dir)
    (tmp_path / "README.md").write_text(f"---\nbase_model: {BASE}\nlibrary_name: transformers\n---\n# card\n")
    (checkpoint,) = discover_checkpoints(checkpoint_dir)
    assert resolve_reference(checkpoint, None).path == str(BASE)


def test_model_card_base_model_that_is_not_local_is_an_error(tmp_path: Path) -> None:
    shutil.copytree(FULL_RUN / "checkpoint-2", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "README.md").write_text("---\nbase_model: some-org/missing-model\n---\n")
    (checkpoint,) = discover_checkpoints(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="some-org/missing-model"):
        resolve_reference(checkpoint, None)


def test_fingerprint_changes_with_the_weights_and_only_with_them(tmp_path: Path) -> None:
    shutil.copytree(FULL_RUN / "checkpoint-2", tmp_path / "a")
    shutil.copytree(FULL_RUN / "checkpoint-2", tmp_path / "b")
    assert fingerprint(tmp_path / "a") == fingerprint(tmp_path / "b")
    assert fingerprint(FULL_RUN / "checkpoint-2") != fingerprint(FULL_RUN / "checkpoint-4")
    weights = tmp_path / "b" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert fingerprint(tmp_path / "a") != fingerprint(tmp_path / "b")


def test_cpu_defaults_to_float32() -> None:
    import torch

    assert choose_device("cpu") == "cpu"
    assert choose_dtype(None, "cpu") is torch.float32
    assert choose_dtype("bfloat16", "cpu") is torch.bfloat16


def test_dropped_models_are_collected_once_their_weights_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full collection per small model costs more than the memory it returns; a large one is collected at once."""
    import gc

    from pytest_dpo import loading

    collections: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(1) or 0)
    monkeypatch.setattr(loading, "_uncollected_bytes", 0)
    monkeypatch.setattr(loading, "COLLECT_AT_BYTES", 100)
    loading.free_memory(60)
    assert collections == []
    loading.free_memory(60)
    assert len(collections) == 1
    loading.free_memory(10)
    assert len(collections) == 1
    loading.free_memory(500)
    assert len(collections) == 2
    loading.free_memory()  # a released model: always at once
    assert len(collections) == 3


def test_weight_bytes_count_parameters_and_buffers_once() -> None:
    import torch

    from pytest_dpo.loading import weight_bytes

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model.append(model[0])  # the same weights twice count once
    parameters = 4 * (4 * 3 + 3 + 3 + 3)  # float32: linear weight and bias, batch norm weight and bias
    buffers = 4 * (3 + 3) + 8  # float32 running mean and variance, int64 batches tracked
    assert weight_bytes(model) == parameters + buffers
