"""Checkpoints on disk: discovery, ids, weights files and fingerprints.

Owns what can be decided by reading a checkpoint folder's files: which
checkpoints a path names (`discover_checkpoints`), their short ids, their
weights and tokenizer files, and the cheap weights fingerprints the score
cache keys on. What each is compared with is `pytest_dpo.references`'s job.

Standard library only: this module must not import torch, transformers, peft
or safetensors (nor anything that does) at module level, so that discovery,
`pytest --collect-only` and the CLI stay fast; only reading a TRL model card
imports huggingface_hub, inside the function. Loading models and tokenizers
is `pytest_dpo.loading`'s job.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .spelling import flag

MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_PICKLE_WEIGHTS = "adapter_model.bin"
# What a Trainer checkpoint keeps to resume training: pickles too, but never weights, so never loaded or copied.
TRAINING_STATE = re.compile(r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth)$")
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
    if has_weights(path, allow_pickle):
        final = _checkpoint(path, allow_pickle)
        if fingerprint(final.path) != fingerprint(found[-1].path):
            found.append(final)
    return found


def discover_all(specs: Sequence[str | Path], *, allow_pickle: bool = False) -> list[Checkpoint]:
    """`discover_checkpoints` of each spec, in order.

    Raises:
        CheckpointError: a spec names nothing usable, or two specs name the same checkpoint.
    """
    found: dict[Path, tuple[str | Path, Checkpoint]] = {}
    for spec in specs:
        for checkpoint in discover_checkpoints(spec, allow_pickle=allow_pickle):
            key = checkpoint.path.resolve()
            if key in found:
                raise CheckpointError(
                    f"{checkpoint.path} is given twice (through {str(found[key][0])!r} and {str(spec)!r}). "
                    "Give each checkpoint once."
                )
            found[key] = (spec, checkpoint)
    return [checkpoint for _, checkpoint in found.values()]


def _unique(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    seen, unique = set(), []
    for checkpoint in checkpoints:
        key = checkpoint.path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(checkpoint)
    return unique


def has_model_weights(path: Path, allow_pickle: bool) -> bool:
    names = MODEL_WEIGHTS + (MODEL_PICKLE_WEIGHTS if allow_pickle else ())
    return any((path / name).exists() for name in names)


def has_adapter_weights(path: Path, allow_pickle: bool) -> bool:
    return (path / ADAPTER_WEIGHTS).exists() or (allow_pickle and (path / ADAPTER_PICKLE_WEIGHTS).exists())


def has_weights(path: Path, allow_pickle: bool = False) -> bool:
    return has_model_weights(path, allow_pickle) or has_adapter_weights(path, allow_pickle)


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
        if not has_adapter_weights(path, allow_pickle):
            refuse_missing_weights(path, adapter=True)
        config = json_object(path / ADAPTER_CONFIG)
        return Checkpoint(path, path.name, "adapter", step, config.get("base_model_name_or_path"))
    if not has_model_weights(path, allow_pickle):
        refuse_missing_weights(path, adapter=False)
    return Checkpoint(path, path.name, "model", step, _model_card_base_model(path))


def json_object(path: Path) -> dict[str, Any]:
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


def refuse_missing_weights(path: Path, *, adapter: bool) -> None:
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
    for folder in (path, path.parent):
        card = folder / "README.md"
        if card.exists():
            from huggingface_hub.repocard import metadata_load  # ~0.1 s: only where there is a card

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


def has_tokenizer(folder: Path) -> bool:
    """Whether a folder holds a saved tokenizer (`tokenizer.json` or `tokenizer_config.json`)."""
    return any((folder / name).exists() for name in TOKENIZER_FILES[:2])
