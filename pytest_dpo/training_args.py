"""A TRL run's training settings, read from `training_args.bin` without executing anything in it.

TRL's `DPOTrainer` saves its `DPOConfig` into every checkpoint folder with
`torch.save`, which is a pickle: loading it the usual way imports and calls
whatever the file names. Here the pickle is read by an unpickler that only
knows an allow-list of plain settings classes and enums of TRL, transformers
and accelerate, and hands back inert stand-ins of its own for them: the file's
values are recorded, no class it names is imported and no function it names
is called. Anything else (`os.system`, `builtins.eval`, tensors) is refused
with a `TrainingArgsError`.

`training_settings` picks the `DPOConfig` fields that pytest-dpo takes over as
its evaluation settings; `unreproducible_settings` names the training settings
whose effect on `DPOTrainer.evaluate()`'s numbers pytest-dpo cannot reproduce.
`NO_EFFECT_ON_EVAL` lists the TRL 1.16 `DPOConfig` fields that change nothing
`evaluate()` reports. Importing this module is cheap: no torch, no TRL.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .settings import BATCH_DEPENDENT_LOSS_TYPES, PER_EXAMPLE_LOSS_TYPES

TRAINING_SETTING_FIELDS: tuple[str, ...] = (
    "beta",
    "loss_type",
    "loss_weights",
    "label_smoothing",
    "discopop_tau",
    "max_length",
    "truncation_mode",
    "ld_alpha",
    "f_divergence_type",
    "f_alpha_divergence_coef",
    "use_weighting",
    "router_aux_loss_coef",
)
NO_EFFECT_ON_EVAL: tuple[str, ...] = (
    "trust_remote_code",
    "disable_dropout",
    "dataset_num_proc",
    "padding_free",
    "pad_to_multiple_of",
    "precompute_ref_log_probs",
    "precompute_ref_batch_size",
    "activation_offloading",
    "pad_token",
)

_SETTINGS_CLASSES = frozenset(
    {
        ("trl.trainer.dpo_config", "DPOConfig"),
        ("transformers.training_args", "TrainingArguments"),
        ("transformers.trainer_pt_utils", "AcceleratorConfig"),
        ("transformers.integrations.deepspeed", "HfTrainerDeepSpeedConfig"),
        ("transformers.integrations.deepspeed", "HfDeepSpeedConfig"),
        ("transformers.utils.quantization_config", "BitsAndBytesConfig"),
        ("accelerate.state", "PartialState"),
        ("accelerate.parallelism_config", "ParallelismConfig"),
        ("accelerate.utils.dataclasses", "DeepSpeedPlugin"),
        ("accelerate.utils.dataclasses", "TorchContextParallelConfig"),
        ("accelerate.utils.dataclasses", "TorchTensorParallelConfig"),
        ("accelerate.utils.deepspeed", "HfDeepSpeedConfig"),
    }
)
_ENUMS = frozenset(
    {
        ("trl.trainer.dpo_config", "FDivergenceType"),
        ("transformers.trainer_utils", "SchedulerType"),
        ("transformers.trainer_utils", "IntervalStrategy"),
        ("transformers.trainer_utils", "SaveStrategy"),
        ("transformers.trainer_utils", "HubStrategy"),
        ("transformers.trainer_utils", "FSDPOption"),
        ("transformers.training_args", "OptimizerNames"),
        ("transformers.debug_utils", "DebugOption"),
        ("transformers.utils.quantization_config", "QuantizationMethod"),
        ("accelerate.utils.dataclasses", "DistributedType"),
        ("accelerate.utils.dataclasses", "PrecisionType"),
        ("accelerate.utils.dataclasses", "DynamoBackend"),
    }
)
# A torch dtype pickles as the global `torch.<name>` itself, never as a call.
_TORCH_DTYPES = frozenset(
    {
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
    }
)
_PLAIN_TYPES = (str, int, float, bool, bytes, type(None))
_QUANTIZATION_KEYS = ("quantization_config", "load_in_4bit", "load_in_8bit")
# training_args.bin is a few kilobytes; anything far bigger is not one.
_MAX_FILE_BYTES = 16 * 1024 * 1024
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001


class TrainingArgsError(Exception):
    """A `training_args.bin` that cannot be read, or that asks for something outside the allow-list.

    The message names the file and, for a refusal, the global the pickle asked
    for (`posix.system`); nothing in the file has been executed.
    """


@dataclass(frozen=True)
class TrainingArgs:
    """The settings object a training run saved, as plain values.

    Args:
        path (`str`): the `training_args.bin` it was read from.
        class_name (`str`): the saved class, e.g. `"DPOConfig"` or `"TrainingArguments"`.
        values (`dict[str, Any]`): its saved attributes: the dataclass fields and
            what `__post_init__` set. Enums are their `.value`, torch devices and
            dtypes strings (`"cpu"`, `"bfloat16"`), nested settings objects dicts.
    """

    path: str
    class_name: str
    values: dict[str, Any]


class _SettingsObject:
    """Stand-in for an allow-listed settings class: records the state the pickle gives it, nothing more."""

    __slots__ = ("state",)
    class_name = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _enum_value(value: Any) -> Any:
    """Stand-in for an allow-listed enum, which pickle rebuilds as `EnumClass(value)`: the value is all we keep."""
    return value


def _torch_device(device_type: str, index: int | None = None) -> str:
    if not isinstance(device_type, str) or not (index is None or isinstance(index, int)):
        raise ValueError(f"torch.device({device_type!r}, {index!r}) is not a device")
    return device_type if index is None else f"{device_type}:{index}"


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """The Python 3 name of a global; torch.save's protocol 2 pickles spell some the Python 2 way (`__builtin__`)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, source: Path) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        module, name = _python3_name(module, name)
        if (module, name) in _SETTINGS_CLASSES:
            return type(name, (_SettingsObject,), {"__slots__": (), "class_name": name})
        if (module, name) in _ENUMS:
            return _enum_value
        if module == "torch" and name == "device":
            return _torch_device
        if module == "torch" and name in _TORCH_DTYPES:
            return name
        raise TrainingArgsError(
            f"{self._source}: refused to load the global `{module}.{name}`: it is not one of the plain settings "
            "classes of TRL, transformers or accelerate that a training_args.bin holds. Nothing in the file was "
            "executed."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise TrainingArgsError(
            f"{self._source}: refused a tensor storage (persistent id {pid!r}): a training_args.bin holds settings, "
            "not tensors. Nothing in the file was executed."
        )


def read_training_args(path: str | Path) -> TrainingArgs:
    """Read a `training_args.bin` (`torch.save` zip or legacy format) without executing anything in it.

    Args:
        path (`str` or `Path`): the file, e.g. `runs/dpo/checkpoint-500/training_args.bin`.

    Returns:
        `TrainingArgs` with the saved class's name and its values.

    Raises:
        `TrainingArgsError`: the file is missing, empty, truncated, not a
            `torch.save` file, does not hold a settings object, or asks for a
            global outside the allow-list (named in the message).
    """
    source = Path(path)
    try:
        root = _unpickle(source)
        if not isinstance(root, _SettingsObject):
            raise ValueError(f"it holds a {type(root).__name__}, not a training-arguments object")
        return TrainingArgs(path=str(source), class_name=root.class_name, values=_plain(root))
    except TrainingArgsError:
        raise
    except Exception as error:
        raise TrainingArgsError(
            f"{source}: not a readable training_args.bin ({type(error).__name__}: {error}). Nothing in the file was "
            "executed."
        ) from error


def find_training_args(checkpoint_folder: Path) -> Path | None:
    """The `training_args.bin` TRL saved into `checkpoint_folder`, or None if it has none.

    Args:
        checkpoint_folder (`Path`): a checkpoint folder (or a run's `output_dir`);
            only this folder is looked in.
    """
    candidate = Path(checkpoint_folder) / "training_args.bin"
    return candidate if candidate.is_file() else None


def training_settings(args: TrainingArgs) -> dict[str, Any]:
    """The `TRAINING_SETTING_FIELDS` the run set, normalised for pytest-dpo's settings.

    Args:
        args (`TrainingArgs`): what `read_training_args` returned.

    Returns:
        Those of the fields that are present: `loss_type` always a tuple of
        str (TRL accepts one str or a list), `loss_weights` a tuple of float or
        None, `f_divergence_type` its string value; the others as saved.

    Raises:
        `TrainingArgsError`: `loss_type`, `loss_weights` or `f_divergence_type`
            has a value TRL could not have saved.
    """
    settings = {name: args.values[name] for name in TRAINING_SETTING_FIELDS if name in args.values}
    if "loss_type" in settings:
        settings["loss_type"] = _loss_types(args)
    if "loss_weights" in settings:
        settings["loss_weights"] = _loss_weights(args)
    if "f_divergence_type" in settings and not isinstance(settings["f_divergence_type"], str):
        raise _bad_value(args, "f_divergence_type", "a string")
    return settings


def unreproducible_settings(args: TrainingArgs) -> list[str]:
    """One sentence per training setting whose effect on TRL's eval numbers pytest-dpo cannot reproduce.

    Covers TRL 1.16's `DPOConfig` and the fields older TRL versions saved
    (`rpo_alpha`, `reference_free`, `use_liger_loss`, `max_prompt_length`,
    `max_completion_length`). Empty for a run whose eval numbers pytest-dpo
    reproduces with `training_settings(args)`.

    Args:
        args (`TrainingArgs`): what `read_training_args` returned.

    Returns:
        Sentences such as `"loss_type 'aot' (sorted across a batch, no per-example value)"`.

    Raises:
        `TrainingArgsError`: `loss_type` is neither a string nor a list of strings.
    """
    values = args.values
    sentences = []
    for loss_type in _loss_types(args) if "loss_type" in values else ():
        if loss_type in BATCH_DEPENDENT_LOSS_TYPES:
            sentences.append(f"loss_type {loss_type!r} (sorted across a batch, no per-example value)")
        elif loss_type not in PER_EXAMPLE_LOSS_TYPES:
            sentences.append(f"loss_type {loss_type!r} (not a TRL 1.16 loss type pytest-dpo computes)")
    if values.get("sync_ref_model"):
        sentences.append(
            f"sync_ref_model=True (the reference drifted during training: ref_model_mixup_alpha="
            f"{values.get('ref_model_mixup_alpha')} of the policy mixed in every ref_model_sync_steps="
            f"{values.get('ref_model_sync_steps')} steps; pytest-dpo scores against the fixed reference)"
        )
    model_init_kwargs = values.get("model_init_kwargs")
    if isinstance(model_init_kwargs, dict):
        for key in _QUANTIZATION_KEYS:
            if model_init_kwargs.get(key):
                sentences.append(
                    f"model_init_kwargs[{key!r}] (TRL scored a quantized model; pytest-dpo loads the saved "
                    "weights unquantized)"
                )
    if values.get("rpo_alpha") is not None:
        sentences.append(
            f"rpo_alpha={values['rpo_alpha']} (TRL added a weighted NLL term to the loss; add 'sft' to loss_type "
            "with that weight in loss_weights to reproduce it)"
        )
    if values.get("reference_free"):
        sentences.append(
            "reference_free=True (TRL scored against a reference that gives every completion log-prob 0; "
            "pytest-dpo scores against the reference model)"
        )
    if values.get("use_liger_loss"):
        sentences.append(
            "use_liger_loss=True (Liger's fused DPO loss computed the loss and metrics; pytest-dpo follows "
            "DPOTrainer's own loss)"
        )
    for field_name in ("max_prompt_length", "max_completion_length"):
        if values.get(field_name) is not None:
            sentences.append(
                f"{field_name}={values[field_name]} (TRL truncated prompts and completions separately; pytest-dpo "
                "truncates only prompt + completion, at max_length)"
            )
    return sentences


def _unpickle(source: Path) -> Any:
    with source.open("rb") as file:
        data = file.read(_MAX_FILE_BYTES + 1)
    if len(data) > _MAX_FILE_BYTES:
        raise ValueError(f"larger than {_MAX_FILE_BYTES} bytes")
    if data.startswith(_ZIP_MAGIC):
        return _load_pickle(io.BytesIO(_zip_pickle(data)), source)
    return _load_legacy(io.BytesIO(data), source)


def _zip_pickle(data: bytes) -> bytes:
    """The `<name>/data.pkl` of a `torch.save` zip archive."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for entry in archive.infolist():
            parts = PurePosixPath(entry.filename).parts
            if len(parts) == 2 and parts[1] == "data.pkl":
                if entry.file_size > _MAX_FILE_BYTES:
                    raise ValueError(f"{entry.filename} is larger than {_MAX_FILE_BYTES} bytes")
                return archive.read(entry)
    raise ValueError("a zip archive without the <name>/data.pkl of torch.save")


def _load_legacy(file: io.BytesIO, source: Path) -> Any:
    """`torch.save(..., _use_new_zipfile_serialization=False)`: magic number, protocol, system info, object."""
    if _load_pickle(file, source) != _LEGACY_MAGIC_NUMBER:
        raise ValueError("neither a torch.save zip archive nor a legacy torch.save file")
    protocol = _load_pickle(file, source)
    if protocol != _LEGACY_PROTOCOL_VERSION:
        raise ValueError(f"legacy torch.save protocol {protocol!r}, expected {_LEGACY_PROTOCOL_VERSION}")
    _load_pickle(file, source)
    return _load_pickle(file, source)


def _load_pickle(file: io.BytesIO, source: Path) -> Any:
    return _AllowListUnpickler(file, source).load()


def _plain(value: Any) -> Any:
    """`value` with every stand-in replaced by a dict of its state; raises on anything that is not plain data."""
    if isinstance(value, _SettingsObject):
        state = getattr(value, "state", {})
        if not isinstance(state, dict):
            raise ValueError(f"the saved state of {value.class_name} is a {type(state).__name__}, not a dict")
        return {key: _plain(item) for key, item in state.items()}
    if isinstance(value, dict):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(_plain(item) for item in value)
    if isinstance(value, _PLAIN_TYPES):
        return value
    raise ValueError(f"it holds a {type(value).__name__} where plain values were expected")


def _loss_types(args: TrainingArgs) -> tuple[str, ...]:
    loss_type = args.values["loss_type"]
    loss_types = (loss_type,) if isinstance(loss_type, str) else loss_type
    if not isinstance(loss_types, (list, tuple)) or not all(isinstance(item, str) for item in loss_types):
        raise _bad_value(args, "loss_type", "a string or a list of strings")
    return tuple(loss_types)


def _loss_weights(args: TrainingArgs) -> tuple[float, ...] | None:
    weights = args.values["loss_weights"]
    if weights is None:
        return None
    if not isinstance(weights, (list, tuple)) or not all(
        isinstance(item, (int, float)) and not isinstance(item, bool) for item in weights
    ):
        raise _bad_value(args, "loss_weights", "a list of numbers or None")
    return tuple(float(item) for item in weights)


def _bad_value(args: TrainingArgs, field_name: str, expected: str) -> TrainingArgsError:
    return TrainingArgsError(f"{args.path}: {field_name} is {args.values[field_name]!r}, expected {expected}.")
