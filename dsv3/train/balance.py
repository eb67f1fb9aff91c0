"""Auxiliary-loss-free load balancing: the per-expert bias update of DeepSeek-V3.

Each MoE gate selects experts by `s + b`, where `b` is the float32 buffer `e_score_correction_bias` (no
gradient, not in the optimizer). After every optimizer step, from the tokens each expert received over the
whole step (all micro-batches, summed over data-parallel ranks):

    b_i -= γ  if expert i got more tokens than the layer's mean,
    b_i += γ  if it got fewer                      (b_i += γ · sign(mean - count_i)).

γ is `update_rate` (optionally `early_rate` for the first `early_steps` steps: a short run from scratch
needs a larger step to undo the router's early collapse than a 15T-token run does); it drops to 0 (the
bias is frozen) once `freeze_after_steps` optimizer steps or `freeze_after_tokens` training tokens are
reached, as the report freezes it for the last 500B tokens.
Counting stays on the device (`scatter_add_`; CUDA's `bincount` reads its input's max on the host) until
`step`, which also returns load statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dsv3.train.losses import moe_gates


@dataclass
class LoadStats:
    """Expert load of one step, as ratios to the layer's mean load (1.0 = perfectly balanced)."""
    max_ratio: torch.Tensor  # [L] max_i count_i / mean, per MoE layer
    min_ratio: torch.Tensor  # [L] min_i count_i / mean
    counts: torch.Tensor  # [L, E] tokens per expert over the step

    @property
    def worst_max(self) -> float:
        return float(self.max_ratio.max()) if self.max_ratio.numel() else 1.0

    @property
    def worst_min(self) -> float:
        return float(self.min_ratio.min()) if self.min_ratio.numel() else 1.0


def _expert_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: `[n_experts]` int64 from expert indices of any shape, without a host sync."""
    flat = indices.flatten()
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


class BiasBalancer:
    """Counts expert load over a step and moves every gate's correction bias toward balance."""

    def __init__(self, model: nn.Module, update_rate: float = 1e-3, freeze_after_steps: int | None = None,
                 freeze_after_tokens: int | None = None, group: dist.ProcessGroup | None = None,
                 early_rate: float | None = None, early_steps: int = 0) -> None:
        if update_rate < 0 or (early_rate is not None and early_rate < 0):
            raise ValueError(f"bias update rates must be >= 0, got {update_rate} and early {early_rate}")
        self.gates = [g for g in moe_gates(model) if g.e_score_correction_bias is not None]
        self.update_rate = update_rate
        self.early_rate, self.early_steps = early_rate, early_steps
        self.freeze_after_steps = freeze_after_steps
        self.freeze_after_tokens = freeze_after_tokens
        self.group = group
        self.steps = 0
        self.tokens = 0
        self.counts: torch.Tensor | None = None  # [L, E] accumulated since the last step

    def frozen(self) -> bool:
        """True once the step or token budget of the bias updates is spent."""
        if self.freeze_after_steps is not None and self.steps >= self.freeze_after_steps:
            return True
        return self.freeze_after_tokens is not None and self.tokens >= self.freeze_after_tokens

    def current_rate(self) -> float:
        """γ of the next update: 0 when frozen, `early_rate` during the first `early_steps` steps."""
        if self.frozen():
            return 0.0
        if self.early_rate is not None and self.steps < self.early_steps:
            return self.early_rate
        return self.update_rate

    def observe(self) -> None:
        """Add the routing of the last forward pass (each gate's `last_indices`) to the step's counts."""
        if not self.gates:
            return
        counts = torch.stack([_expert_counts(g.last_indices, g.n_experts) for g in self.gates])  # [L, E]
        self.counts = counts if self.counts is None else self.counts + counts

    @torch.no_grad()
    def step(self, tokens: int) -> LoadStats | None:
        """End of an optimizer step that consumed `tokens` training tokens (global): all-reduce the counts,
        update the biases unless frozen, reset the counts. Returns the step's load statistics."""
        if self.counts is None:
            self.steps += 1
            self.tokens += tokens
            return None
        counts = self.counts.float()
        if self.group is not None or (dist.is_available() and dist.is_initialized()):
            dist.all_reduce(counts, group=self.group)
        mean = counts.mean(dim=-1, keepdim=True)  # [L, 1]
        rate = self.current_rate()
        if rate:
            direction = torch.sign(mean - counts)  # +1 under-loaded, -1 over-loaded, 0 at the mean
            for gate, d in zip(self.gates, direction):
                gate.e_score_correction_bias.add_(rate * d.to(gate.e_score_correction_bias.device))
        ratio = counts / mean.clamp_min(1e-9)
        self.counts = None
        self.steps += 1
        self.tokens += tokens
        return LoadStats(ratio.max(dim=-1).values.cpu(), ratio.min(dim=-1).values.cpu(), counts.cpu())

    def state_dict(self) -> dict:
        return {"steps": self.steps, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.tokens = int(state["steps"]), int(state["tokens"])
