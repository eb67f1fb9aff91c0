"""Opening checkpoint files with errors that name the file: a truncated or corrupt `.safetensors` shard is a
`ValueError` naming it (not safetensors' own `SafetensorError`, which names no file), and invalid JSON in
`config.json` or the index names the file and the line/column (`dsv3.config.read_json`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from dsv3.config import read_json

__all__ = ["open_shard", "read_json", "read_weight_map"]


def open_shard(file: str | Path) -> Any:
    """`safe_open(file, framework="pt")`, with an unreadable file reported as one ValueError naming it."""
    try:
        return safe_open(file, framework="pt")
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def read_weight_map(index: str | Path) -> dict[str, str]:
    """The `weight_map` (tensor name -> shard file name) of a `model.safetensors.index.json`."""
    data = read_json(index)
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        raise ValueError(f"{index}: has no \"weight_map\" object")
    return data["weight_map"]
