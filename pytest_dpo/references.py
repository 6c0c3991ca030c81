"""What a checkpoint is compared with: resolving its reference, the reference's fingerprint, and where the
tokenizer is read from. Standard library only (like `checkpoints`, which finds the checkpoints themselves).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import (
    ADAPTER_CONFIG,
    Checkpoint,
    CheckpointError,
    fingerprint,
    has_adapter_weights,
    has_tokenizer,
    has_weights,
    json_object,
    locate,
    refuse_missing_weights,
    source_fingerprint,
)
from .spelling import option


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
            if not has_adapter_weights(path, allow_pickle):
                refuse_missing_weights(path, adapter=True)
            base = json_object(path / ADAPTER_CONFIG).get("base_model_name_or_path")
            return Reference("adapter", str(path), _adapter_base(path, base))
        if path.exists() and not has_weights(path, allow_pickle):
            refuse_missing_weights(path, adapter=False)
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


def reference_fingerprint(reference: Reference) -> str:
    """What identifies the reference model (a fresh adapter's reference is its base)."""
    if reference.kind == "adapter":
        return f"{fingerprint(reference.path)}+{source_fingerprint(reference.base or '')}"
    return source_fingerprint(reference.path)


def tokenizer_candidates(checkpoint: Checkpoint, reference: Reference | None) -> list[str]:
    candidates = [str(checkpoint.path)]
    if checkpoint.base_model:
        candidates.append(locate(checkpoint.base_model, checkpoint.path))
    if reference is not None:
        candidates.append(reference.base or reference.path)
    return candidates


def tokenizer_folder(checkpoint: Checkpoint, reference: Reference | None) -> Path | None:
    """The local folder the checkpoint's tokenizer is read from: its own, else its base's or the reference's."""
    for candidate in tokenizer_candidates(checkpoint, reference):
        folder = Path(candidate)
        if folder.is_dir() and has_tokenizer(folder):
            return folder
    return None
