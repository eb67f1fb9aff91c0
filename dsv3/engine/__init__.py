"""The inference engine: continuous batching over a paged MLA latent cache, behind the `LLM` class.

`config` (`EngineConfig`), `sequence`, `block_manager` and `scheduler` are plain Python; `sampling`,
`model_runner` and `llm` hold the tensors. Names are loaded on first use so that importing the plain parts pulls in no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "dsv3.engine.llm",
    "EngineConfig": "dsv3.engine.config",
    "RequestOutput": "dsv3.engine.llm",
    "SamplingParams": "dsv3.engine.sampling",
    "Sampler": "dsv3.engine.sampling",
    "Sequence": "dsv3.engine.sequence",
    "SequenceStatus": "dsv3.engine.sequence",
    "BlockManager": "dsv3.engine.block_manager",
    "Scheduler": "dsv3.engine.scheduler",
    "SchedulerOutput": "dsv3.engine.scheduler",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dsv3.engine' has no attribute {name!r}")
