"""Reading TRL's training_args.bin without executing it, and mapping it to pytest-dpo's settings.

The real DPOConfig (torch.load of a trusted fixture) is the oracle for the values; crafted files
check that nothing outside the allow-list is ever imported or called.
"""

from __future__ import annotations

import builtins
import dataclasses
import enum
import io
import os
import pickle
import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
import trl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_dpo.training_args import (
    NO_EFFECT_ON_EVAL,
    TRAINING_SETTING_FIELDS,
    TrainingArgs,
    TrainingArgsError,
    find_training_args,
    read_training_args,
    training_settings,
    unreproducible_settings,
)

from .fixture_paths import FULL_RUN, LORA_RUN

FIXTURE_FILES = [
    FULL_RUN / "checkpoint-4" / "training_args.bin",
    LORA_RUN / "checkpoint-4" / "training_args.bin",
    FULL_RUN / "training_args.bin",
]
REAL_FILE = FIXTURE_FILES[0]
# Audit events that would mean the reader imported, compiled or ran something.
EXECUTION_EVENTS = frozenset(
    {
        "import",
        "exec",
        "compile",
        "pickle.find_class",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "subprocess.Popen",
    }
)


def dpo_config(output_dir: Path, **overrides: Any) -> trl.DPOConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return trl.DPOConfig(output_dir=str(output_dir), use_cpu=True, report_to="none", **overrides)


def saved(obj: Any, path: Path, *, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def zipped_pickle(pickle_bytes: bytes) -> bytes:
    """A torch.save-shaped zip archive around `pickle_bytes`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("training_args/data.pkl", pickle_bytes)
        archive.writestr("training_args/version", "3\n")
    return buffer.getvalue()


def plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


# --- the real fixture files -------------------------------------------------------------------


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda path: str(path.relative_to(path.parents[2])))
def test_fixture_values_match_torch_load(path: Path) -> None:
    expected = torch.load(path, weights_only=False)
    args = read_training_args(path)
    assert args.class_name == "DPOConfig"
    assert args.path == str(path)
    for name in (*TRAINING_SETTING_FIELDS, "learning_rate", "output_dir", "per_device_eval_batch_size", "seed", "bf16"):
        assert args.values[name] == plain(getattr(expected, name)), name
    assert args.values["lr_scheduler_type"] == expected.lr_scheduler_type.value
    assert args.values["accelerator_config"]["even_batches"] == expected.accelerator_config.even_batches
    assert args.values["distributed_state"]["device"] == str(expected.distributed_state.device)


def test_fixture_run_is_fully_reproducible() -> None:
    args = read_training_args(REAL_FILE)
    assert training_settings(args) == {
        "beta": 0.1,
        "loss_type": ("sigmoid",),
        "loss_weights": None,
        "label_smoothing": 0.0,
        "discopop_tau": 0.05,
        "max_length": 128,
        "truncation_mode": "keep_start",
        "ld_alpha": None,
        "f_divergence_type": "reverse_kl",
        "f_alpha_divergence_coef": 0.5,
        "use_weighting": False,
        "router_aux_loss_coef": None,
    }
    assert unreproducible_settings(args) == []


def test_find_training_args_looks_only_in_the_folder(tmp_path: Path) -> None:
    assert find_training_args(FULL_RUN / "checkpoint-4") == FULL_RUN / "checkpoint-4" / "training_args.bin"
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "training_args.bin").write_bytes(REAL_FILE.read_bytes())
    assert find_training_args(tmp_path / "checkpoint-1") is None
    (tmp_path / "checkpoint-2" / "training_args.bin").mkdir(parents=True)
    assert find_training_args(tmp_path / "checkpoint-2") is None


# --- settings round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_non_default_settings_round_trip(tmp_path: Path, legacy: bool) -> None:
    config = dpo_config(
        tmp_path,
        beta=0.05,
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, 0.5],
        max_length=64,
        truncation_mode="keep_end",
        ld_alpha=0.3,
        f_divergence_type="alpha_divergence",
        f_alpha_divergence_coef=0.7,
        use_weighting=True,
        router_aux_loss_coef=0.01,
    )
    args = read_training_args(saved(config, tmp_path / "training_args.bin", legacy=legacy))
    assert training_settings(args) == {
        "beta": 0.05,
        "loss_type": ("sigmoid", "sft"),
        "loss_weights": (1.0, 0.5),
        "label_smoothing": 0.0,
        "discopop_tau": 0.05,
        "max_length": 64,
        "truncation_mode": "keep_end",
        "ld_alpha": 0.3,
        "f_divergence_type": "alpha_divergence",
        "f_alpha_divergence_coef": 0.7,
        "use_weighting": True,
        "router_aux_loss_coef": 0.01,
    }
    assert unreproducible_settings(args) == []


def test_settings_objects_of_other_library_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Older TRL saved loss_type as a str and f_divergence_type as its FDivergenceType enum."""

    class FDivergenceType(enum.Enum):
        REVERSE_KL = "reverse_kl"
        JS_DIVERGENCE = "js_divergence"

    FDivergenceType.__module__ = "trl.trainer.dpo_config"
    FDivergenceType.__qualname__ = "FDivergenceType"
    monkeypatch.setattr(trl.trainer.dpo_config, "FDivergenceType", FDivergenceType, raising=False)
    config = dpo_config(tmp_path, debug="underflow_overflow", model_init_kwargs={"dtype": torch.bfloat16})
    config.loss_type = "ipo"
    config.f_divergence_type = FDivergenceType.JS_DIVERGENCE
    args = read_training_args(saved(config, tmp_path / "training_args.bin"))
    taken_over = training_settings(args)
    assert taken_over["loss_type"] == ("ipo",)
    assert taken_over["f_divergence_type"] == "js_divergence"
    assert args.values["debug"] == ["underflow_overflow"]
    assert args.values["model_init_kwargs"] == {"dtype": "bfloat16"}


def test_plain_training_arguments(tmp_path: Path) -> None:
    config = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    args = read_training_args(saved(config, tmp_path / "training_args.bin"))
    assert args.class_name == "TrainingArguments"
    assert training_settings(args) == {}
    assert unreproducible_settings(args) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("loss_type", 3), ("loss_type", [1, 2]), ("loss_weights", ["heavy"]), ("f_divergence_type", 3)],
)
def test_malformed_setting_values_are_refused(field: str, value: Any) -> None:
    args = TrainingArgs(path="run/training_args.bin", class_name="DPOConfig", values={field: value})
    with pytest.raises(TrainingArgsError, match=f"run/training_args.bin: {field} is"):
        training_settings(args)


# --- what pytest-dpo cannot reproduce ---------------------------------------------------------

# DPOConfig overrides, per TRL 1.16 field that is neither taken over nor without effect on eval.
UNREPRODUCIBLE = {
    "loss_type": {"loss_type": ["sigmoid", "aot_unpaired"]},
    "sync_ref_model": {"sync_ref_model": True},
    "ref_model_mixup_alpha": {"sync_ref_model": True, "ref_model_mixup_alpha": 0.9},
    "ref_model_sync_steps": {"sync_ref_model": True, "ref_model_sync_steps": 64},
    "model_init_kwargs": {"model_init_kwargs": {"quantization_config": {"load_in_4bit": True}}},
}


def test_every_dpo_config_field_is_classified() -> None:
    trainer_fields = {field.name for field in dataclasses.fields(transformers.TrainingArguments)}
    dpo_fields = {field.name for field in dataclasses.fields(trl.DPOConfig)} - trainer_fields
    assert not set(TRAINING_SETTING_FIELDS) & set(NO_EFFECT_ON_EVAL)
    assert {*TRAINING_SETTING_FIELDS, *NO_EFFECT_ON_EVAL, *UNREPRODUCIBLE} == dpo_fields


@pytest.mark.parametrize("field", sorted(UNREPRODUCIBLE))
def test_unreproducible_settings_are_named(tmp_path: Path, field: str) -> None:
    config = dpo_config(tmp_path, **UNREPRODUCIBLE[field])
    sentences = unreproducible_settings(read_training_args(saved(config, tmp_path / "training_args.bin")))
    assert len(sentences) == 1
    assert field in sentences[0]


def test_aot_and_sync_ref_model(tmp_path: Path) -> None:
    aot = read_training_args(saved(dpo_config(tmp_path, loss_type=["aot"]), tmp_path / "aot.bin"))
    assert unreproducible_settings(aot) == ["loss_type 'aot' (sorted across a batch, no per-example value)"]
    synced = read_training_args(saved(dpo_config(tmp_path, sync_ref_model=True), tmp_path / "sync.bin"))
    [sentence] = unreproducible_settings(synced)
    assert sentence.startswith("sync_ref_model=True (the reference drifted during training")
    assert "pytest-dpo scores against the fixed reference" in sentence


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rpo_alpha", 1.0),
        ("reference_free", True),
        ("use_liger_loss", True),
        ("max_prompt_length", 512),
        ("max_completion_length", 256),
    ],
)
def test_fields_of_older_trl_versions_are_named(tmp_path: Path, field: str, value: Any) -> None:
    config = dpo_config(tmp_path)
    setattr(config, field, value)
    [sentence] = unreproducible_settings(read_training_args(saved(config, tmp_path / "training_args.bin")))
    assert sentence.startswith(f"{field}={value} (")


# --- refusals ---------------------------------------------------------------------------------


class RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {self.marker}",)


class Evaluates:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return builtins.eval, (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize(
    ("payload", "refused_global"),
    [
        (RunsShell, f"{os.system.__module__}.system"),
        (Evaluates, "builtins.eval"),
    ],
    ids=["os.system", "builtins.eval"],
)
def test_code_in_the_pickle_is_refused_not_run(
    tmp_path: Path, payload: type, refused_global: str, legacy: bool
) -> None:
    marker = tmp_path / "pwned"
    path = saved(payload(marker), tmp_path / "training_args.bin", legacy=legacy)
    with pytest.raises(TrainingArgsError) as refusal:
        read_training_args(path)
    assert str(path) in str(refusal.value)
    assert f"`{refused_global}`" in str(refusal.value)
    assert "Nothing in the file was executed" in str(refusal.value)
    assert not marker.exists()


def test_code_inside_a_real_config_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    config = dpo_config(tmp_path, model_init_kwargs={"revision": RunsShell(marker)})
    with pytest.raises(TrainingArgsError, match="system"):
        read_training_args(saved(config, tmp_path / "training_args.bin"))
    assert not marker.exists()


def test_tensors_are_refused(tmp_path: Path) -> None:
    config = dpo_config(tmp_path)
    config.weights = torch.zeros(2)
    path = saved(config, tmp_path / "training_args.bin")
    with pytest.raises(TrainingArgsError, match=r"`torch\._utils\._rebuild_tensor_v2`") as refusal:
        read_training_args(path)
    assert str(path) in str(refusal.value)


def test_storage_references_are_refused(tmp_path: Path) -> None:
    class WithStorageReference(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return ("storage", "0") if obj == "the storage" else None

    buffer = io.BytesIO()
    WithStorageReference(buffer, protocol=2).dump(["the storage"])
    path = tmp_path / "training_args.bin"
    path.write_bytes(zipped_pickle(buffer.getvalue()))
    with pytest.raises(TrainingArgsError, match="refused a tensor storage") as refusal:
        read_training_args(path)
    assert str(path) in str(refusal.value)


def _unreadable_files() -> dict[str, bytes]:
    real = REAL_FILE.read_bytes()
    legacy = io.BytesIO()
    torch.save(["not", "settings"], legacy, _use_new_zipfile_serialization=False)
    return {
        "empty": b"",
        "text": b"output_dir: runs/dpo\n",
        "truncated zip": real[: len(real) // 2],
        "zip without data.pkl": _zip_without_pickle(),
        "empty pickle in zip": zipped_pickle(b""),
        "list in zip": zipped_pickle(pickle.dumps(["not", "settings"], protocol=2)),
        "bare class in zip": zipped_pickle(pickle.dumps(trl.DPOConfig, protocol=2)),
        "legacy list": legacy.getvalue(),
        "truncated legacy": legacy.getvalue()[:30],
        "legacy wrong protocol": pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(7, protocol=2),
    }


def _zip_without_pickle() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("training_args/version", "3\n")
    return buffer.getvalue()


UNREADABLE_FILES = _unreadable_files()


@pytest.mark.parametrize("name", sorted(UNREADABLE_FILES))
def test_unreadable_files_raise_training_args_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / "training_args.bin"
    path.write_bytes(UNREADABLE_FILES[name])
    with pytest.raises(TrainingArgsError, match="Nothing in the file was executed") as error:
        read_training_args(path)
    assert str(path) in str(error.value)


def test_missing_file_and_folder_raise_training_args_error(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.bin", tmp_path):
        with pytest.raises(TrainingArgsError, match=re.escape(str(path))):
            read_training_args(path)


def test_module_imports_no_heavy_library() -> None:
    code = (
        "import pytest_dpo.training_args, sys; "
        "assert not {'torch', 'transformers', 'trl', 'accelerate'} & set(sys.modules), sys.modules.keys()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- fuzzing ----------------------------------------------------------------------------------


def _real_pickle() -> bytes:
    with zipfile.ZipFile(REAL_FILE) as archive:
        return archive.read("training_args/data.pkl")


def _legacy_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save(torch.load(REAL_FILE, weights_only=False), buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


@st.composite
def mutations(draw: st.DrawFn, original: bytes) -> bytes:
    """`original` with a few bytes replaced, and maybe cut short."""
    data = bytearray(original)
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.none() | st.integers(0, len(data)))])


candidate_files = st.one_of(
    st.binary(max_size=2048),
    mutations(REAL_FILE.read_bytes()),
    mutations(_real_pickle()).map(zipped_pickle),
    mutations(_legacy_bytes()),
)


class ExecutionWatch:
    """An audit hook that records, while `watching`, the events that mean code was imported, compiled or run."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.watching = False

    def __call__(self, event: str, _args: tuple[Any, ...]) -> None:
        if self.watching and event in EXECUTION_EVENTS:
            self.events.append(event)


@pytest.fixture(scope="module")
def execution_watch() -> ExecutionWatch:
    watch = ExecutionWatch()
    sys.addaudithook(watch)  # hooks cannot be removed; an idle one costs one attribute check per event
    return watch


@pytest.fixture(scope="module")
def fuzz_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "training_args.bin"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=candidate_files)
def test_any_bytes_give_training_args_or_training_args_error(
    fuzz_path: Path, execution_watch: ExecutionWatch, content: bytes
) -> None:
    fuzz_path.write_bytes(content)
    execution_watch.events.clear()
    execution_watch.watching = True
    try:
        args = read_training_args(fuzz_path)
        training_settings(args)
        unreproducible_settings(args)
    except TrainingArgsError:
        pass
    finally:
        execution_watch.watching = False
    assert execution_watch.events == []
