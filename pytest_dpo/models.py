"""Checkpoints: discovery, reference resolution, fingerprints, device/dtype choice and loading.

Discovery and fingerprints need only the standard library; torch, transformers
and peft are imported when a model or tokenizer is actually loaded.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
GLOB_CHARS = re.compile(r"[*?\[]")
_SAMPLES = 8
_SAMPLE_BYTES = 1 << 16


class CheckpointError(ValueError):
    """A checkpoint or reference cannot be found or used; the message names the path and the fix."""


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


def discover_checkpoints(spec: str | Path) -> list[Checkpoint]:
    """Expand a path into the checkpoints it names.

    `spec` may be a model folder, a PEFT adapter folder, a glob, or a TRL
    `output_dir`, which expands to its `checkpoint-N` folders in step order
    plus the final model at its root when that differs from the last one.

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
            found.extend(discover_checkpoints(match))
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
        return [_checkpoint(path)]
    found = [_checkpoint(child) for _, child in steps]
    if _has_weights(path):
        final = _checkpoint(path)
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


def _has_weights(path: Path) -> bool:
    return any((path / name).exists() for name in MODEL_WEIGHTS) or (path / ADAPTER_WEIGHTS).exists()


def _checkpoint(path: Path) -> Checkpoint:
    match = CHECKPOINT_DIR.match(path.name)
    step = int(match.group(1)) if match else None
    if (path / ADAPTER_CONFIG).exists():
        if not (path / ADAPTER_WEIGHTS).exists():
            _refuse_missing_weights(path, ADAPTER_WEIGHTS)
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        return Checkpoint(path, path.name, "adapter", step, config.get("base_model_name_or_path"))
    if not any((path / name).exists() for name in MODEL_WEIGHTS):
        _refuse_missing_weights(path, "model.safetensors")
    return Checkpoint(path, path.name, "model", step, _model_card_base_model(path))


def _refuse_missing_weights(path: Path, expected: str) -> None:
    pickles = [name for name in PICKLE_WEIGHTS if (path / name).exists()]
    if pickles:
        raise CheckpointError(
            f"{path / pickles[0]}: weights are stored only as a pickle, which can run arbitrary code when loaded. "
            "Re-save the checkpoint with `save_pretrained(..., safe_serialization=True)` to get safetensors."
        )
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


def resolve_reference(checkpoint: Checkpoint, reference: str | Path | None) -> Reference:
    """Decide what `checkpoint` is compared with.

    An explicit `reference` (model or adapter folder, or Hub id) wins. Else a
    PEFT adapter is compared with its base (adapter disabled, as TRL does for
    a fresh adapter), and a full model with the `base_model` of its TRL model
    card.

    Raises:
        CheckpointError: a full model with no reference given and none recorded.
    """
    if reference is not None:
        path = Path(reference)
        if (path / ADAPTER_CONFIG).exists():
            base = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
            return Reference("adapter", str(path), locate(base, path))
        if path.exists() and not _has_weights(path):
            _refuse_missing_weights(path, "model.safetensors")
        return Reference("model", str(reference))
    if checkpoint.is_adapter:
        if not checkpoint.base_model:
            raise CheckpointError(
                f"{checkpoint.path / ADAPTER_CONFIG}: no base_model_name_or_path, so the reference is unknown. "
                "Pass the base model as reference (--dpo-reference / reference=...)."
            )
        return Reference("base", locate(checkpoint.base_model, checkpoint.path))
    if checkpoint.base_model:
        located = locate(checkpoint.base_model, checkpoint.path)
        if Path(located).exists():
            return Reference("model", located)
        raise CheckpointError(
            f"{checkpoint.path}: its model card names base_model '{checkpoint.base_model}', which is not a local "
            "folder. Pass the reference (the model the DPO run started from) with --dpo-reference / reference=..."
        )
    raise CheckpointError(
        f"{checkpoint.path}: no reference model given and no base_model in a TRL model card (README.md). "
        "Pass the model the DPO run started from with --dpo-reference / reference=..."
    )


def fingerprint(path: str | Path) -> str:
    """A cheap content fingerprint of a checkpoint folder's weights.

    Hashes each weights file's name, size, safetensors header and bytes
    sampled at fixed offsets, plus the adapter config, so it changes when the
    weights change without reading gigabytes.
    """
    folder = Path(path)
    digest = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob(ADAPTER_CONFIG))
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
        return device
    if not torch.cuda.is_available():
        return "cpu"
    if worker_index is not None and torch.cuda.device_count() > 1:
        return f"cuda:{worker_index % torch.cuda.device_count()}"
    return "cuda"


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
    """`dtype` if given, else bfloat16 on CUDA devices that support it, else float32."""
    import torch

    if dtype is not None:
        return getattr(torch, dtype)
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_causal_lm(name_or_path: str, *, device: str, dtype: torch.dtype) -> Any:
    """Load a causal LM from safetensors, never running remote code."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=False, use_safetensors=True
        )
    except OSError as error:
        raise CheckpointError(
            f"{name_or_path}: cannot load the model ({str(error).splitlines()[0]}). Check that the folder holds a "
            "config.json and safetensors weights, or that the Hub id is in the local cache when offline."
        ) from None
    return model.to(device).eval()


def load_policy(checkpoint: Checkpoint, *, device: str, dtype: torch.dtype) -> Any:
    """The checkpoint's model: full weights, or its base with the adapter attached and active."""
    if not checkpoint.is_adapter:
        return load_causal_lm(str(checkpoint.path), device=device, dtype=dtype)
    return _with_adapter(locate(checkpoint.base_model or "", checkpoint.path), checkpoint.path, device, dtype)


def load_reference(reference: Reference, *, device: str, dtype: torch.dtype) -> Any:
    """The reference model of a `Reference` of kind `model` or `adapter`."""
    if reference.kind == "adapter":
        return _with_adapter(reference.base or "", Path(reference.path), device, dtype)
    return load_causal_lm(reference.path, device=device, dtype=dtype)


def _with_adapter(base: str, adapter: Path, device: str, dtype: torch.dtype) -> Any:
    from peft import PeftModel

    model = load_causal_lm(base, device=device, dtype=dtype)
    return PeftModel.from_pretrained(model, str(adapter), is_trainable=False).eval()


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


def load_tokenizer(checkpoint: Checkpoint, reference: Reference) -> tuple[Any, str]:
    """The tokenizer saved with the checkpoint, else the one of its base or reference; and where it came from."""
    from transformers import AutoTokenizer

    candidates = _tokenizer_candidates(checkpoint, reference)
    for candidate in candidates:
        folder = Path(candidate)
        if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES[:2]):
            continue
        try:
            return AutoTokenizer.from_pretrained(candidate, trust_remote_code=False), candidate
        except (OSError, ValueError):
            continue
    raise CheckpointError(
        f"{checkpoint.path}: no tokenizer found with the checkpoint, its base model or the reference "
        f"(looked in {', '.join(candidates)}). Save the tokenizer with the checkpoint (tokenizer.save_pretrained)."
    )
