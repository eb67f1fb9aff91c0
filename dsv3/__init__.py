"""dsv3: DeepSeek-V3 — model, FP8 tools, inference engine, OpenAI-compatible server, training and eval.

`import dsv3` is cheap; the heavy parts load on first use of the names below.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["ModelArgs", "Transformer", "load_model", "save_model", "LLM", "EngineConfig", "SamplingParams",
           "default_model_path", "default_chat_model_path"]

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
    used by `dsv3 generate` and `eval` when no `--model` is given."""
    from pathlib import Path
    path = Path(__file__).parent / "assets" / "default-model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"the built-in default model is not installed at {path}; pass --model DIR")
    return path


def default_chat_model_path() -> "Path":
    """The built-in chat model: the default model instruction-tuned by `dsv3 sft`, shipped as a LoRA adapter
    (`dsv3/assets/default-chat-model`) and merged once into a checkpoint folder under ~/.cache/dsv3/models,
    whose path this returns. `dsv3 chat`, `serve` and `generate --chat` use it when no `--model` is given."""
    from pathlib import Path

    from dsv3.checkpoint.adapter import materialize
    adapter = Path(__file__).parent / "assets" / "default-chat-model"
    if not (adapter / "adapter_config.json").exists():
        raise FileNotFoundError(f"the built-in chat model is not installed at {adapter}; pass --model DIR")
    return materialize(adapter)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'dsv3' has no attribute {name!r}")
