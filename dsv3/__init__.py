"""dsv3: DeepSeek-V3 — model, FP8 tools, inference engine, OpenAI-compatible server, training and eval.

`import dsv3` is cheap; the heavy parts load on first use of the names below.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["ModelArgs", "Transformer", "load_model", "save_model", "LLM", "EngineConfig", "SamplingParams",
           "default_model_path"]

_WHERE = {
    "ModelArgs": "dsv3.config",
    "Transformer": "dsv3.model",
    "load_model": "dsv3.checkpoint",
    "save_model": "dsv3.checkpoint",
    "LLM": "dsv3.engine",
    "EngineConfig": "dsv3.engine",
    "SamplingParams": "dsv3.engine",
}


def default_model_path() -> "Path":
    """The small DeepSeek-V3 trained by this project and shipped in the package (`dsv3/assets/default-model`),
    used by `dsv3 chat`, `generate` and `serve` when no `--model` is given."""
    from pathlib import Path
    path = Path(__file__).parent / "assets" / "default-model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"the built-in default model is not installed at {path}; pass --model DIR")
    return path


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'dsv3' has no attribute {name!r}")
