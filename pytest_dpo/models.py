"""Checkpoints: discovery, reference resolution, fingerprints, device/dtype choice and loading.

Discovery and fingerprints need only the standard library; torch, transformers
and peft are imported when a model or tokenizer is actually loaded.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .settings import AUTOCAST_PREFIX, SettingsError
from .spelling import flag, option

if TYPE_CHECKING:
    import torch

MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_PICKLE_WEIGHTS = "adapter_model.bin"
# What a Trainer checkpoint keeps to resume training: pickles too, but never weights, so never loaded or copied.
TRAINING_STATE = re.compile(r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth)$")
REMOTE_CODE_KEY = "auto_map"
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
GLOB_CHARS = re.compile(r"[*?\[]")
_SAMPLES = 8
_SAMPLE_BYTES = 1 << 16


class CheckpointError(ValueError):
    """A checkpoint or reference cannot be found or used; the message names the path and the fix."""


@dataclass(frozen=True)
class LoadOptions:
    """How far loading may relax its safe defaults; each field is the `DPOSettings` field of the same name.

    Attributes:
        allow_pickle (`bool`): also load weights stored only as pickle (`pytorch_model.bin`,
            `adapter_model.bin`); safetensors are still preferred where both exist.
        trust_remote_code (`bool`): run the code a folder's `auto_map` points to.
        device_map (`str | None`): shard each model over the visible GPUs with accelerate (`"auto"`, …)
            instead of loading it whole on one device.
    """

    allow_pickle: bool = False
    trust_remote_code: bool = False
    device_map: str | None = None

    @classmethod
    def of(cls, settings: Any) -> LoadOptions:
        """The load options of a `DPOSettings`."""
        return cls(**{option.name: getattr(settings, option.name) for option in fields(cls)})


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint to evaluate.

    Attributes:
        path (`Path`): its folder.
        name (`str`): its folder name (`checkpoint-500`, or the run's name for
            the final model saved at a TRL `output_dir` root).
        kind (`str`): `"model"` (full weights) or `"adapter"` (a PEFT adapter).
        step (`int | None`): the training step of a `checkpoint-N` folder.
        base_model (`str | None`): the adapter's base model, or the base model
            recorded in the TRL model card of a full model.
    """

    path: Path
    name: str
    kind: str
    step: int | None
    base_model: str | None

    @property
    def is_adapter(self) -> bool:
        return self.kind == "adapter"


@dataclass(frozen=True)
class Reference:
    """What the policy is compared with.

    `kind` is `"model"` (a full model at `path`), `"adapter"` (the base model
    `base` with the adapter at `path`), or `"base"` (the policy's own base
    model, i.e. its adapter disabled, as TRL does for a fresh LoRA run).
    """

    kind: str
    path: str
    base: str | None = None

    def describe(self) -> str:
        if self.kind == "base":
            return f"{self.path} (the adapter's base, adapter disabled)"
        if self.kind == "adapter":
            return f"{self.path} (adapter on {self.base})"
        return self.path


def discover_checkpoints(spec: str | Path, *, allow_pickle: bool = False) -> list[Checkpoint]:
    """Expand a path into the checkpoints it names.

    `spec` may be a model folder, a PEFT adapter folder, a glob, or a TRL
    `output_dir`, which expands to its `checkpoint-N` folders in step order
    plus the final model at its root when that differs from the last one.
    `allow_pickle` also accepts folders whose weights are only pickles
    (the `allow_pickle` setting).

    Raises:
        CheckpointError: nothing there, or folders without usable weights.
    """
    text = str(spec)
    if GLOB_CHARS.search(text):
        matches = sorted(glob.glob(text))
        if not matches:
            raise CheckpointError(f"{text}: the glob matches nothing. Check the pattern and the working directory ({Path.cwd()}).")
        found: list[Checkpoint] = []
        for match in matches:
            found.extend(discover_checkpoints(match, allow_pickle=allow_pickle))
        return _unique(found)
    path = Path(text)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found. Check the path (resolved from {Path.cwd()}).")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a checkpoint is a folder (model or adapter), not a file. Pass its folder.")
    steps = sorted(
        (int(match.group(1)), child)
        for child in path.iterdir()
        if child.is_dir() and (match := CHECKPOINT_DIR.match(child.name))
    )
    if not steps:
        return [_checkpoint(path, allow_pickle)]
    found = [_checkpoint(child, allow_pickle) for _, child in steps]
    if _has_weights(path, allow_pickle):
        final = _checkpoint(path, allow_pickle)
        if fingerprint(final.path) != fingerprint(found[-1].path):
            found.append(final)
    return found


def _unique(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    seen, unique = set(), []
    for checkpoint in checkpoints:
        key = checkpoint.path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(checkpoint)
    return unique


def _has_model_weights(path: Path, allow_pickle: bool) -> bool:
    names = MODEL_WEIGHTS + (MODEL_PICKLE_WEIGHTS if allow_pickle else ())
    return any((path / name).exists() for name in names)


def _has_adapter_weights(path: Path, allow_pickle: bool) -> bool:
    return (path / ADAPTER_WEIGHTS).exists() or (allow_pickle and (path / ADAPTER_PICKLE_WEIGHTS).exists())


def _has_weights(path: Path, allow_pickle: bool = False) -> bool:
    return _has_model_weights(path, allow_pickle) or _has_adapter_weights(path, allow_pickle)


def weight_files(path: Path) -> list[str]:
    """Names of the files a checkpoint folder's weights are read from: its safetensors, else its pickle weights.

    Never TRL's training state (`training_args.bin`, `optimizer.pt`, ...), which is not weights.
    """
    safetensors = sorted(file.name for file in path.glob("*.safetensors"))
    if safetensors:
        return safetensors
    shards = sorted(file.name for file in path.glob("pytorch_model*.bin"))
    return [name for name in [*shards, "pytorch_model.bin.index.json", ADAPTER_PICKLE_WEIGHTS] if (path / name).exists()]


def _checkpoint(path: Path, allow_pickle: bool) -> Checkpoint:
    match = CHECKPOINT_DIR.match(path.name)
    step = int(match.group(1)) if match else None
    if (path / ADAPTER_CONFIG).exists():
        if not _has_adapter_weights(path, allow_pickle):
            _refuse_missing_weights(path, adapter=True)
        config = _json_object(path / ADAPTER_CONFIG)
        return Checkpoint(path, path.name, "adapter", step, config.get("base_model_name_or_path"))
    if not _has_model_weights(path, allow_pickle):
        _refuse_missing_weights(path, adapter=False)
    return Checkpoint(path, path.name, "model", step, _model_card_base_model(path))


def _json_object(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file (config, adapter config, weight index) as a dict, or an error naming the damage."""
    again = "Copy the checkpoint again from where it was saved."
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno}): the file is damaged "
            f"or was cut short. {again}"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read it ({error}). {again}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}. {again}")
    return data


def _refuse_damaged(folder: Path) -> None:
    """Name a model folder's damaged JSON file or missing weight shard before from_pretrained fails on it vaguely."""
    if (folder / "config.json").is_file():
        _json_object(folder / "config.json")
    index = folder / MODEL_WEIGHTS[1]
    if not index.is_file():
        return
    weight_map = _json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: has no weight_map. Copy the checkpoint again from where it was saved.")
    for shard in sorted(set(map(str, weight_map.values()))):
        if not (folder / shard).is_file():
            raise CheckpointError(
                f"{folder / shard}: missing, but {index.name} lists it: the checkpoint was copied only in part. "
                "Copy the checkpoint again from where it was saved."
            )


def _refuse_missing_weights(path: Path, *, adapter: bool) -> None:
    pickles = [name for name in ((ADAPTER_PICKLE_WEIGHTS,) if adapter else MODEL_PICKLE_WEIGHTS) if (path / name).exists()]
    if pickles:
        raise CheckpointError(
            f"{path / pickles[0]}: weights are stored only as a pickle, which can run arbitrary code when loaded. "
            "Re-save the checkpoint with `save_pretrained(..., safe_serialization=True)` to get safetensors, or, if "
            f"you trust where it came from, pass {flag('allow_pickle')} to load it anyway."
        )
    bare = sorted(file.name for file in path.glob("*.pt*") if file.suffix in (".pt", ".pth") and not TRAINING_STATE.match(file.name))
    if bare:
        raise CheckpointError(
            f"{path / bare[0]}: weights saved with torch.save, a pickle that from_pretrained cannot load (not even with "
            f"{flag('allow_pickle')}). Load them into the model and save it with `save_pretrained(..., "
            "safe_serialization=True)`."
        )
    expected = ADAPTER_WEIGHTS if adapter else "model.safetensors"
    raise CheckpointError(
        f"{path}: no weights found (expected {expected}) and no checkpoint-N folders. "
        "Point at a model or adapter folder saved with save_pretrained, or at a TRL output_dir."
    )


def _model_card_base_model(path: Path) -> str | None:
    """The `base_model` of the TRL model card in the folder or, for `checkpoint-N`, in the run folder."""
    from huggingface_hub.repocard import metadata_load

    for folder in (path, path.parent):
        card = folder / "README.md"
        if card.exists():
            base = (metadata_load(card) or {}).get("base_model")
            if isinstance(base, list):
                base = base[0] if base else None
            if base:
                return str(base)
    return None


def locate(name_or_path: str, near: Path | None = None) -> str:
    """Turn a recorded model path into one that exists: as given, or relative to the folders above `near`.

    TRL records the path the run was started with (often relative to the
    training directory). A name that is no local folder is returned unchanged,
    to be read from the Hugging Face cache as a Hub id.
    """
    candidate = Path(name_or_path)
    if candidate.exists() or candidate.is_absolute():
        return str(candidate)
    if near is not None:
        for folder in near.resolve().parents:
            if (folder / candidate).exists():
                return str(folder / candidate)
    return name_or_path


def resolve_reference(checkpoint: Checkpoint, reference: str | Path | None, *, allow_pickle: bool = False) -> Reference:
    """Decide what `checkpoint` is compared with.

    An explicit `reference` (model or adapter folder, or Hub id) wins. Else a
    PEFT adapter is compared with its base (adapter disabled, as TRL does for
    a fresh adapter), and a full model with the `base_model` of its TRL model
    card. `allow_pickle` accepts a reference folder whose weights are only
    pickles.

    Raises:
        CheckpointError: a full model with no reference given and none recorded,
            an adapter whose base model is missing, a reference without usable
            weights, or one with another vocabulary than the checkpoint.
    """
    resolved = _resolve_reference(checkpoint, reference, allow_pickle)
    _refuse_other_vocabulary(checkpoint, resolved)
    return resolved


def _refuse_other_vocabulary(checkpoint: Checkpoint, reference: Reference) -> None:
    """Refuse a reference whose config.json gives another vocab_size than the checkpoint's (local folders only)."""
    if reference.kind == "base":
        return
    policy = checkpoint.path if not checkpoint.is_adapter else Path(locate(checkpoint.base_model or "", checkpoint.path))
    other = Path(reference.base if reference.kind == "adapter" else reference.path)
    sizes = [_vocab_size(folder / "config.json") for folder in (policy, other)]
    if None not in sizes and sizes[0] != sizes[1]:
        raise CheckpointError(
            f"{other / 'config.json'}: the reference has vocab_size {sizes[1]}, but the checkpoint's "
            f"{policy / 'config.json'} has {sizes[0]}; log-probs over different vocabularies cannot be compared. "
            f"Pass as reference the model the DPO run started from ({option('reference')})."
        )


def _vocab_size(config_file: Path) -> int | None:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None
    if not isinstance(config, dict):
        return None
    size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) else None


def _resolve_reference(checkpoint: Checkpoint, reference: str | Path | None, allow_pickle: bool) -> Reference:
    if reference is not None:
        path = Path(reference)
        if (path / ADAPTER_CONFIG).exists():
            if not _has_adapter_weights(path, allow_pickle):
                _refuse_missing_weights(path, adapter=True)
            base = _json_object(path / ADAPTER_CONFIG).get("base_model_name_or_path")
            return Reference("adapter", str(path), _adapter_base(path, base))
        if path.exists() and not _has_weights(path, allow_pickle):
            _refuse_missing_weights(path, adapter=False)
        return Reference("model", str(reference))
    if checkpoint.is_adapter:
        if not checkpoint.base_model:
            raise CheckpointError(
                f"{checkpoint.path / ADAPTER_CONFIG}: no base_model_name_or_path, so the reference is unknown. "
                f"Pass the base model as reference ({option('reference')})."
            )
        return Reference("base", _adapter_base(checkpoint.path, checkpoint.base_model))
    if checkpoint.base_model:
        located = locate(checkpoint.base_model, checkpoint.path)
        if Path(located).exists():
            return Reference("model", located)
        raise CheckpointError(
            f"{checkpoint.path}: its model card names base_model '{checkpoint.base_model}', which is not a local "
            f"folder. Pass the reference (the model the DPO run started from) with {option('reference')}"
        )
    raise CheckpointError(
        f"{checkpoint.path}: no reference model given and no base_model in a TRL model card (README.md). "
        f"Pass the model the DPO run started from with {option('reference')}"
    )


def _adapter_base(adapter: Path, base: str | None) -> str:
    """The adapter's base model as a loadable path or Hub id; a recorded local path that is gone is an error."""
    if not base:
        raise CheckpointError(
            f"{adapter / ADAPTER_CONFIG}: no base_model_name_or_path, so the adapter's base model is unknown. "
            "Set it to the base model's folder or Hub id."
        )
    located = locate(base, adapter)
    if not Path(located).exists() and (Path(base).is_absolute() or base.startswith(".")):
        raise CheckpointError(
            f"{adapter / ADAPTER_CONFIG}: the base model '{base}' does not exist (a relative path is also tried from "
            "each folder above the adapter). Put the base model there, or set base_model_name_or_path to its "
            "folder or Hub id."
        )
    return located


def fingerprint(path: str | Path) -> str:
    """A cheap content fingerprint of a checkpoint folder's weights.

    Hashes each weights file's name, size, safetensors header and bytes
    sampled at fixed offsets, plus the adapter config, so it changes when the
    weights change without reading gigabytes.
    """
    folder = Path(path)
    digest = hashlib.sha256()
    files = [folder / name for name in weight_files(folder)] + sorted(folder.glob(ADAPTER_CONFIG))
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:
            if file.suffix == ".safetensors" and size >= 8:
                header_length = int.from_bytes(handle.read(8), "little")
                digest.update(handle.read(min(header_length, size - 8)))
            for sample in range(_SAMPLES):
                handle.seek(size * sample // _SAMPLES)
                digest.update(handle.read(_SAMPLE_BYTES))
            handle.seek(max(0, size - _SAMPLE_BYTES))
            digest.update(handle.read())
    return digest.hexdigest()


def source_fingerprint(name_or_path: str) -> str:
    """The weights fingerprint of a local model folder, or the Hub id itself for a model read from the cache."""
    path = Path(name_or_path)
    return fingerprint(path) if path.is_dir() else f"hub:{name_or_path}"


def policy_fingerprint(checkpoint: Checkpoint) -> str:
    """What identifies the checkpoint's model: its weights, and for an adapter also its base's."""
    own = fingerprint(checkpoint.path)
    if not checkpoint.is_adapter:
        return own
    return f"{own}+{source_fingerprint(locate(checkpoint.base_model or '', checkpoint.path))}"


def reference_fingerprint(reference: Reference) -> str:
    """What identifies the reference model (a fresh adapter's reference is its base)."""
    if reference.kind == "adapter":
        return f"{fingerprint(reference.path)}+{source_fingerprint(reference.base or '')}"
    return source_fingerprint(reference.path)


def choose_device(device: str | None, worker_index: int | None = None) -> str:
    """`device` if given, else `cuda` when available, else `cpu`.

    With several GPUs, pytest-xdist worker `gwN` gets GPU `N mod count`, so
    each worker uses its own.
    """
    import torch

    if device is not None:
        check_device(device)
        return device
    if not torch.cuda.is_available():
        return "cpu"
    if worker_index is not None and torch.cuda.device_count() > 1:
        return f"cuda:{worker_index % torch.cuda.device_count()}"
    return "cuda"


def check_device(device: str) -> None:
    """Refuse a device torch cannot name, or one this machine does not have, naming the setting and the fix.

    Raises:
        SettingsError: for the `device` setting.
    """
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise SettingsError(
            "device", f"{device!r} is not a torch device. Use cpu, cuda, cuda:N or mps."
        ) from None
    if parsed.type == "cpu" or parsed.type == "meta":
        return
    backend = getattr(torch, parsed.type, None)
    available = getattr(backend, "is_available", lambda: False)() if parsed.type != "mps" else torch.backends.mps.is_available()
    if not available:
        built = "" if parsed.type != "cuda" or torch.version.cuda else f" (this torch {torch.__version__} is built without CUDA)"
        raise SettingsError(
            "device",
            f"{device!r} asks for a {parsed.type} device, but this machine has none{built}. "
            f"Leave {option('device')} unset to use the best device found, or pass cpu.",
        )
    count = backend.device_count() if parsed.type != "mps" else 1
    if parsed.index is not None and parsed.index >= count:
        raise SettingsError(
            "device",
            f"{device!r} names {parsed.type} device {parsed.index}, but this machine has {count} "
            f"(indices 0 to {count - 1}). Pick an existing index, or leave {option('device')} unset.",
        )


def checkpoint_ids(checkpoints: list[Checkpoint]) -> list[str]:
    """Short unique names: the folder name, with as many parent folders as it takes to tell them apart.

    `checkpoint-500` alone; `run-a/checkpoint-500` and `run-b/checkpoint-500`
    when two runs each have one.
    """
    parts = [checkpoint.path.resolve().parts for checkpoint in checkpoints]
    ids = []
    for index, own in enumerate(parts):
        others = [other for position, other in enumerate(parts) if position != index]
        for depth in range(1, len(own) + 1):
            candidate = own[-depth:]
            if all(other[-depth:] != candidate for other in others):
                break
        ids.append("/".join(candidate))
    return ids


def choose_dtype(dtype: str | None, device: str) -> torch.dtype:
    """The dtype to load weights in: `dtype` if given (float32 for the autocast modes, see `autocast_dtype`),
    else bfloat16 on CUDA devices that support it, else float32."""
    import torch

    if dtype is not None:
        return torch.float32 if dtype.startswith(AUTOCAST_PREFIX) else getattr(torch, dtype)
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast_dtype(dtype: str | None) -> torch.dtype | None:
    """The dtype models run under `torch.autocast` in for an `autocast-*` dtype setting, else None."""
    import torch

    if dtype is None or not dtype.startswith(AUTOCAST_PREFIX):
        return None
    return getattr(torch, dtype.removeprefix(AUTOCAST_PREFIX))


def load_causal_lm(name_or_path: str, *, device: str, dtype: torch.dtype, options: LoadOptions = LoadOptions()) -> Any:
    """Load a causal LM: from safetensors and without running the repo's code, unless `options` allow them.

    Raises:
        CheckpointError: the folder asks to run code, has no usable or readable
            weights, its weights do not fit its config.json, or they hold NaN/inf.
    """
    model = _pretrained(name_or_path, device, dtype, options)
    refuse_non_finite(model, [Path(name_or_path)])
    return model


def load_policy(checkpoint: Checkpoint, *, device: str, dtype: torch.dtype, options: LoadOptions = LoadOptions()) -> Any:
    """The checkpoint's model: full weights, or its base with the adapter attached and active."""
    if not checkpoint.is_adapter:
        return load_causal_lm(str(checkpoint.path), device=device, dtype=dtype, options=options)
    base = locate(checkpoint.base_model or "", checkpoint.path)
    return _with_adapter(base, checkpoint.path, device, dtype, options)


def load_reference(reference: Reference, *, device: str, dtype: torch.dtype, options: LoadOptions = LoadOptions()) -> Any:
    """The reference model of a `Reference` of kind `model` or `adapter`."""
    if reference.kind == "adapter":
        return _with_adapter(reference.base or "", Path(reference.path), device, dtype, options)
    return load_causal_lm(reference.path, device=device, dtype=dtype, options=options)


def _with_adapter(base: str, adapter: Path, device: str, dtype: torch.dtype, options: LoadOptions) -> Any:
    from peft import PeftModel

    if not _has_adapter_weights(adapter, options.allow_pickle):
        _refuse_missing_weights(adapter, adapter=True)
    model = _pretrained(base, device, dtype, options)
    try:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False).eval()
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(
            f"{adapter}: cannot attach the adapter to its base {base} ({_first_line(error)}). Check that "
            "base_model_name_or_path in adapter_config.json names the model the adapter was trained on and that "
            "the adapter's weights file is whole."
        ) from None
    refuse_non_finite(model, [adapter, Path(base)])
    return model


def _pretrained(name_or_path: str, device: str, dtype: torch.dtype, options: LoadOptions) -> Any:
    """`from_pretrained` with our safety checks first and its errors turned into messages that say what to do."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    folder = Path(name_or_path)
    placement = {"device_map": options.device_map} if options.device_map else {}
    if placement:
        _require_accelerate()
    if folder.is_dir():
        _refuse_remote_code(folder / "config.json", options)
        if not _has_model_weights(folder, options.allow_pickle):
            _refuse_missing_weights(folder, adapter=False)
        _refuse_damaged(folder)
    try:
        with _quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path,
                dtype=dtype,
                trust_remote_code=options.trust_remote_code,
                use_safetensors=None if options.allow_pickle else True,
                **placement,
            )
    except SafetensorError as error:
        raise CheckpointError(
            f"{_unreadable_safetensors(folder) or folder}: cannot read the safetensors weights ({_first_line(error)}): "
            "the file is truncated or damaged. Copy the checkpoint again from where it was saved."
        ) from None
    except RuntimeError as error:
        mismatch = _shape_mismatch(folder, options) if folder.is_dir() else None
        if mismatch is None:
            raise CheckpointError(
                f"{name_or_path}: cannot load the model ({_first_line(error)}). Check that config.json and the "
                "weights were saved together by save_pretrained."
            ) from None
        raise CheckpointError(
            f"{folder / 'config.json'}: the weights do not fit this config ({mismatch}). Use the config.json that "
            "was saved with these weights."
        ) from None
    except (OSError, ValueError) as error:
        if not folder.exists() and _offline():
            raise CheckpointError(
                f"{name_or_path}: not a local folder, and this Hub id is not in the local Hugging Face cache while "
                "HF_HUB_OFFLINE=1. Download it first (hf download "
                f"{name_or_path}) where the Hub is reachable, or pass the model's local folder."
            ) from None
        raise CheckpointError(
            f"{name_or_path}: cannot load the model ({_first_line(error)}). Check that the folder holds a "
            "config.json and safetensors weights, or that the Hub id is in the local cache when offline."
        ) from None
    return (model if placement else model.to(device)).eval()


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' per-file "Loading weights" bars off: they would cut through pytest-dpo's scoring bar."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def _require_accelerate() -> None:
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise CheckpointError(
            f"{option('device_map')} needs accelerate to place the model over the GPUs: "
            "pip install 'pytest-dpo[big]' (or pip install accelerate)."
        )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _refuse_remote_code(file: Path, options: LoadOptions) -> None:
    """Refuse a config whose `auto_map` asks to run code from its repo, unless `trust_remote_code` is on."""
    if options.trust_remote_code or not file.is_file():
        return
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return  # transformers reports an unreadable config itself, with the file's name
    remote = config.get(REMOTE_CODE_KEY) if isinstance(config, dict) else None
    if remote:
        classes = ", ".join(sorted(remote)) if isinstance(remote, dict) else str(remote)
        raise CheckpointError(
            f"{file}: its auto_map ({classes}) asks to run Python code from the repo, which pytest-dpo never does "
            f"unless told. Pass {flag('trust_remote_code')} if you trust this repo's code, or use a model "
            "transformers supports natively."
        )


def _unreadable_safetensors(folder: Path) -> Path | None:
    """The first safetensors file in `folder` whose header cannot be read."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError):
            return file
    return None


def _shape_mismatch(folder: Path, options: LoadOptions) -> str | None:
    """`'name' is [a, b] in file but config.json makes it [c, d]` for the first tensor whose shapes differ, if any."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=options.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError):
        return None
    expected = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shape = list(handle.get_slice(name).get_shape())
                if name in expected and expected[name] != shape:
                    return f"'{name}' is {shape} in {file.name} but config.json makes it {expected[name]}"
    return None


def refuse_non_finite(model: Any, folders: Sequence[Path]) -> None:
    """Refuse a loaded model whose weights hold NaN or inf, naming the first such tensor and its file.

    Every score of such a model is NaN or meaningless, so it must never reach a
    gate. Two reductions per tensor: cheap next to scoring. Under a device map the
    tensors sit on several GPUs (their flags are gathered on the CPU), and weights
    offloaded to disk (`meta` here) are not read.
    """
    import torch

    parameters = [
        (name, tensor) for name, tensor in model.named_parameters() if tensor.numel() and tensor.device.type != "meta"
    ]
    if not parameters:
        return
    finite = torch.stack(
        [torch.isfinite(torch.stack([tensor.max(), tensor.min()])).all().cpu() for _, tensor in parameters]
    )
    if bool(finite.all()):
        return
    name, tensor = parameters[int((~finite).nonzero()[0])]
    bad = int((~torch.isfinite(tensor)).sum())
    key, file = _tensor_source(name, folders)
    raise CheckpointError(
        f"{file}: tensor '{key}' holds {bad} NaN/inf value(s) out of {tensor.numel()}, so every score of this model "
        "would be NaN. Use an earlier checkpoint (training diverged), or copy the file again if it was damaged."
    )


def _tensor_source(name: str, folders: Sequence[Path]) -> tuple[str, str]:
    """A loaded model's parameter as (key, file) in the folders' safetensors, else (its name, the first folder)."""
    from safetensors import safe_open

    # PEFT inserts the adapter name and `base_layer` into parameter names and drops them when saving.
    candidates = {name, name.replace(".default.", "."), name.removeprefix("base_model.model.").replace(".base_layer.", ".")}
    for folder in folders:
        for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            with safe_open(str(file), framework="pt") as handle:
                found = candidates & set(handle.keys())
            if found:
                return found.pop(), str(file)
    return name, str(folders[0])


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def _tokenizer_candidates(checkpoint: Checkpoint, reference: Reference | None) -> list[str]:
    candidates = [str(checkpoint.path)]
    if checkpoint.base_model:
        candidates.append(locate(checkpoint.base_model, checkpoint.path))
    if reference is not None:
        candidates.append(reference.base or reference.path)
    return candidates


def tokenizer_folder(checkpoint: Checkpoint, reference: Reference | None) -> Path | None:
    """The local folder the checkpoint's tokenizer is read from: its own, else its base's or the reference's."""
    for candidate in _tokenizer_candidates(checkpoint, reference):
        folder = Path(candidate)
        if folder.is_dir() and any((folder / name).exists() for name in TOKENIZER_FILES[:2]):
            return folder
    return None


def load_tokenizer(checkpoint: Checkpoint, reference: Reference, options: LoadOptions = LoadOptions()) -> tuple[Any, str]:
    """The tokenizer saved with the checkpoint, else the one of its base or reference; and where it came from.

    Raises:
        CheckpointError: no tokenizer found, or the one found asks to run its repo's code (`auto_map`)
            and `options` do not trust remote code.
    """
    from transformers import AutoTokenizer

    candidates = _tokenizer_candidates(checkpoint, reference)
    for candidate in candidates:
        folder = Path(candidate)
        if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES[:2]):
            continue
        if folder.is_dir():
            for config in ("tokenizer_config.json", "config.json"):
                _refuse_remote_code(folder / config, options)
        try:
            return AutoTokenizer.from_pretrained(candidate, trust_remote_code=options.trust_remote_code), candidate
        except (OSError, ValueError):
            continue
    raise CheckpointError(
        f"{checkpoint.path}: no tokenizer found with the checkpoint, its base model or the reference "
        f"(looked in {', '.join(candidates)}). Save the tokenizer with the checkpoint (tokenizer.save_pretrained)."
    )
