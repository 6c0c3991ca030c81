"""Loading models and tokenizers, with the safety refusals, and choosing their device and dtype.

Owns `load_causal_lm`, `load_policy`, `load_reference` and `load_tokenizer`
(with `LoadOptions`, how far they may relax their safe defaults), the checks
made at load time (pickle-only weights, remote code, damaged or partly copied
files, weights that do not fit their config, NaN/inf weights), and the
device/dtype choice (`choose_device`, `check_device`, `choose_dtype`,
`autocast_dtype`).

torch, transformers, peft and safetensors are imported inside the functions
that need them, never at module level, so importing this module stays cheap.
Which checkpoints exist and what they are compared with is
`pytest_dpo.checkpoints`'s job; this module must not decide either.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoints import (
    MODEL_WEIGHTS,
    Checkpoint,
    CheckpointError,
    has_adapter_weights,
    has_model_weights,
    has_tokenizer,
    json_object,
    locate,
    refuse_missing_weights,
)
from .references import Reference, tokenizer_candidates
from .settings import AUTOCAST_PREFIX, SettingsError
from .spelling import flag, option

if TYPE_CHECKING:
    import torch

REMOTE_CODE_KEY = "auto_map"


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


# A transformers model sits in reference cycles: only a garbage collection frees a dropped one. A full
# `gc.collect()` costs ~0.15 s once transformers is loaded (more than a small model's load), so dropped models
# are collected once their weights add up to this; a 7B model is still never held twice.
COLLECT_AT_BYTES = 512 << 20
_uncollected_bytes = 0


def weight_bytes(model: Any) -> int:
    """The bytes of a model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def free_memory(dropped_bytes: int | None = None) -> None:
    """Return dropped models' memory before the next one is loaded.

    Args:
        dropped_bytes (`int`, *optional*): the weights of the model just dropped; while the dropped models'
            weights stay under `COLLECT_AT_BYTES` they are left to Python's own collections. None: collect now.
    """
    import gc

    import torch

    global _uncollected_bytes
    _uncollected_bytes += dropped_bytes or 0
    if dropped_bytes is not None and _uncollected_bytes < COLLECT_AT_BYTES:
        return
    gc.collect()
    _uncollected_bytes = 0
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def release_model(model: Any) -> None:
    """Free a model's memory now, even while a test still holds a reference to the object."""
    model.to("meta")
    free_memory()


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
    """The reference model on its own: a model, a base with a reference adapter, or (kind `base`) a fresh adapter's base."""
    if reference.kind == "adapter":
        return _with_adapter(reference.base or "", Path(reference.path), device, dtype, options)
    return load_causal_lm(reference.path, device=device, dtype=dtype, options=options)


def _with_adapter(base: str, adapter: Path, device: str, dtype: torch.dtype, options: LoadOptions) -> Any:
    from peft import PeftModel

    if not has_adapter_weights(adapter, options.allow_pickle):
        refuse_missing_weights(adapter, adapter=True)
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
        if not has_model_weights(folder, options.allow_pickle):
            refuse_missing_weights(folder, adapter=False)
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


def _refuse_damaged(folder: Path) -> None:
    """Name a model folder's damaged JSON file or missing weight shard before from_pretrained fails on it vaguely."""
    if (folder / "config.json").is_file():
        json_object(folder / "config.json")
    index = folder / MODEL_WEIGHTS[1]
    if not index.is_file():
        return
    weight_map = json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: has no weight_map. Copy the checkpoint again from where it was saved.")
    for shard in sorted(set(map(str, weight_map.values()))):
        if not (folder / shard).is_file():
            raise CheckpointError(
                f"{folder / shard}: missing, but {index.name} lists it: the checkpoint was copied only in part. "
                "Copy the checkpoint again from where it was saved."
            )


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


def load_tokenizer(checkpoint: Checkpoint, reference: Reference, options: LoadOptions = LoadOptions()) -> tuple[Any, str]:
    """The tokenizer saved with the checkpoint, else the one of its base or reference; and where it came from.

    Raises:
        CheckpointError: no tokenizer found, or the one found asks to run its repo's code (`auto_map`)
            and `options` do not trust remote code.
    """
    from transformers import AutoTokenizer

    candidates = tokenizer_candidates(checkpoint, reference)
    for candidate in candidates:
        folder = Path(candidate)
        if folder.is_dir() and not has_tokenizer(folder):
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
