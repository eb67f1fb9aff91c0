"""Low-rank adaptation (LoRA) for fine-tuning: `W -> W + scale * B @ A` on chosen Linear weights.

The delta is a `torch.nn.utils.parametrize` parametrization of each chosen module's `weight`, so the
model's own forward runs unchanged (no module swaps, no patched forwards) and the base weights stay frozen.
`B` starts at zero, so the adapted model starts equal to the base. `merge_lora` folds the deltas into the
weights; `lora_factors` returns them by HF tensor name for `dsv3.checkpoint.adapter.save_adapter`.

The routed experts are left out by default: they hold most of a DeepSeek-V3's parameters, and an adapter
on attention, the dense and shared-expert MLPs and the head is small enough to ship beside the base model.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.nn.utils import parametrize

from dsv3.checkpoint.names import ours_to_hf

ROUTED_EXPERT = re.compile(r"(^|\.)experts\.\d+\.")


class LowRankDelta(nn.Module):
    """`weight + scale * B @ A` with A `[rank, in]` (random), B `[out, rank]` (zeros)."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float,
                 device: torch.device | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.A = nn.Parameter(torch.randn(rank, in_features, device=device) / math.sqrt(in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.scale * self.B @ self.A).to(weight.dtype)


def lora_targets(model: nn.Module, skip: re.Pattern = ROUTED_EXPERT) -> list[str]:
    """Names of the `nn.Linear` modules that get an adapter: every Linear but the routed experts."""
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and not skip.search(name)]


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: list[str] | None = None) -> list[str]:
    """Freeze every parameter of `model` and put a `LowRankDelta` on each target Linear's weight (default
    `lora_targets`; alpha defaults to rank, a scale of 1). Returns the target names."""
    targets = lora_targets(model) if targets is None else targets
    if not targets:
        raise ValueError("no Linear module to adapt")
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in targets:
        mod = modules[name]
        out_features, in_features = mod.weight.shape
        parametrize.register_parametrization(
            mod, "weight", LowRankDelta(out_features, in_features, rank, float(alpha or rank), mod.weight.device))
    return targets


def lora_factors(model: nn.Module, n_layers: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF weight name -> (A `[r, in]`, scale * B `[out, r]`), float32 on the CPU, for every adapted weight."""
    out = {}
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod, "weight"):
            delta = mod.parametrizations.weight[0]
            out[ours_to_hf(f"{name}.weight", n_layers)] = (delta.A.detach().float().cpu(),
                                                           (delta.scale * delta.B).detach().float().cpu())
    return out


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight (`W + scale * B @ A`) and remove the parametrizations."""
    for mod in model.modules():
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
