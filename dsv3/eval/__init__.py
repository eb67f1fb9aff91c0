"""Evaluation: bits-per-byte / perplexity, log-likelihood tasks, generation tasks, needle in a haystack.

Modules: `perplexity` (span scoring, sliding-window bits-per-byte), `tasks` (registry and loaders from
local package files), `multiple_choice` (acc / acc_norm, LAMBADA), `generation` (GSM8K, HumanEval and
its sandbox), `needle` (retrieval heat map), `harness` (a run of several tasks and its results files, what
`dsv3 eval` drives). Names load on first use, so `import dsv3.eval` pulls in no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TASKS": "dsv3.eval.tasks",
    "load_task": "dsv3.eval.tasks",
    "score_spans": "dsv3.eval.perplexity",
    "evaluate_perplexity": "dsv3.eval.perplexity",
    "evaluate_choice": "dsv3.eval.multiple_choice",
    "evaluate_lambada": "dsv3.eval.multiple_choice",
    "evaluate_gsm8k": "dsv3.eval.generation",
    "evaluate_humaneval": "dsv3.eval.generation",
    "run_programs": "dsv3.eval.generation",
    "GreedyGenerator": "dsv3.eval.generation",
    "run_needle": "dsv3.eval.needle",
    "EvalPlan": "dsv3.eval.harness",
    "evaluate": "dsv3.eval.harness",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dsv3.eval' has no attribute {name!r}")
