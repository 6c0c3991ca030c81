"""Split a fixture checkpoint's weights into shards, as `save_pretrained` does for models over its shard size."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def shard(checkpoint: Path) -> None:
    """Replace `checkpoint/model.safetensors` by two shards and `model.safetensors.index.json`."""
    weights = load_file(checkpoint / "model.safetensors")
    names = sorted(weights)
    parts = dict(zip(SHARDS, (names[: len(names) // 2], names[len(names) // 2 :])))
    for file, part in parts.items():
        save_file({name: weights[name] for name in part}, checkpoint / file, metadata={"format": "pt"})
    size = sum(tensor.numel() * tensor.element_size() for tensor in weights.values())
    index = {"metadata": {"total_size": size}, "weight_map": {name: file for file, part in parts.items() for name in part}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (checkpoint / "model.safetensors").unlink()
