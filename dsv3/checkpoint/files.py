"""Opening checkpoint files with errors that name the file: a truncated or corrupt `.safetensors` shard is a
`ValueError` naming it (not safetensors' own `SafetensorError`, which names no file), and invalid JSON in
`config.json` or the index names the file and the line/column (`dsv3.config.read_json`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from dsv3.config import read_json

__all__ = ["FP8_DTYPE_NAMES", "has_fp8_tensors", "open_shard", "read_json", "read_weight_map", "set_normal_mode"]

FP8_DTYPE_NAMES = ("F8_E4M3", "F8_E5M2")  # safetensors' names of the FP8 dtypes


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


def has_fp8_tensors(files: list[Path]) -> bool:
    """Whether any tensor in these shards is FP8 (read from the headers: no tensor data is loaded)."""
    for file in files:
        with open_shard(file) as f:
            if any(f.get_slice(name).get_dtype() in FP8_DTYPE_NAMES for name in f.keys()):
                return True
    return False


def set_normal_mode(path: str | Path) -> None:
    """Give a file written by safetensors (which creates it 0600) the mode of any new file: 0666 less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
