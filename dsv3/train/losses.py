"""Training objectives of DeepSeek-V3: next-token cross-entropy, the multi-token-prediction loss, and the
complementary sequence-wise balance loss.

- `next_token_loss(logits [B, T, V], targets [B, T])`: mean cross-entropy, computed in float32.
- `mtp_loss(mtp_logits, targets, weight)`: depth k's logits `[B, T - k, V]` at position t predict token
  t + k + 1, i.e. `targets[:, t + k]` (targets are the inputs shifted by one). The loss is
  `L_mtp = (λ / D) Σ_k CE_k` with D the number of MTP modules.
- `sequence_balance_loss(scores, indices, seq_len, topk, alpha)`: per sequence of T tokens,
  `L_bal = α Σ_i f_i P_i`, `f_i = N_r / (K_r T) · #{t : i ∈ topK(t)}`, `P_i = (1/T) Σ_t s_{i,t} / Σ_j s_{j,t}`;
  averaged over the sequences of the batch. `f` is a count (no gradient); the gradient flows through `P`.
  `model_balance_loss` sums it over every MoE layer (main and MTP) from the gates' `last_scores`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits `[B, T, V]` against targets `[B, T]` (`-100` ignored), in float32."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on [B, T]")
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def mtp_losses(mtp_logits: list[torch.Tensor], targets: torch.Tensor, ce=next_token_loss) -> list[torch.Tensor]:
    """CE_k for each depth k = 1..D: logits `[B, T - k, V]` against `targets[:, k:]` `[B, T - k]` (through
    `ce`, `next_token_loss` or its compiled form)."""
    out = []
    for k, logits in enumerate(mtp_logits, start=1):
        out.append(ce(logits, targets[:, k:]))
    return out


def mtp_loss(mtp_logits: list[torch.Tensor], targets: torch.Tensor, weight: float) -> torch.Tensor:
    """`(λ / D) Σ_k CE_k`; zero (a float32 scalar on the targets' device) when there is no MTP module."""
    if not mtp_logits:
        return torch.zeros((), device=targets.device)
    return weight / len(mtp_logits) * torch.stack(mtp_losses(mtp_logits, targets)).sum()


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, seq_len: int, topk: int,
                          alpha: float) -> torch.Tensor:
    """Sequence-wise balance loss of one MoE layer, averaged over sequences.

    scores `[B*T, E]` raw affinities `s` (sigmoid or softmax, bias excluded), indices `[B*T, K]` the experts
    each token was routed to; tokens are laid out sequence by sequence (`[B, T]` flattened)."""
    n_tokens, n_experts = scores.shape
    if n_tokens % seq_len:
        raise ValueError(f"{n_tokens} routed tokens is not a whole number of sequences of length {seq_len}")
    batch = n_tokens // seq_len
    probs = scores.float() / scores.float().sum(dim=-1, keepdim=True)  # s' [B*T, E]
    p = probs.view(batch, seq_len, n_experts).mean(dim=1)  # P_i [B, E]
    chosen = torch.zeros(n_tokens, n_experts, device=scores.device)
    chosen.scatter_(1, indices, 1.0)
    f = chosen.view(batch, seq_len, n_experts).sum(dim=1) * (n_experts / (topk * seq_len))  # f_i [B, E]
    return alpha * (f * p).sum(dim=-1).mean()


def moe_gates(model: nn.Module) -> list[nn.Module]:
    """The router of every MoE block, main layers first then MTP blocks (`block.mlp.gate`)."""
    return [block.mlp.gate for block in model.blocks() if hasattr(block.mlp, "gate")]


def gate_seq_lens(model: nn.Module, seq_len: int) -> list[int]:
    """Per gate of `moe_gates(model)`, the length of the sequences it routed: T for the main layers,
    T - k for MTP depth k (it sees positions t < T - k)."""
    lens = [seq_len for layer in model.layers if hasattr(layer.mlp, "gate")]
    lens += [seq_len - k for k, block in enumerate(model.mtp, start=1) if hasattr(block.mlp, "gate")]
    return lens


def model_balance_loss(model: nn.Module, seq_len: int, alpha: float, layer_loss=sequence_balance_loss) -> torch.Tensor:
    """Sum over every MoE layer (main and MTP) of `sequence_balance_loss` (or `layer_loss`, e.g. its compiled
    form), from the routing of the last forward pass on sequences of length `seq_len`."""
    total = None
    for gate, n in zip(moe_gates(model), gate_seq_lens(model, seq_len)):
        if gate.last_scores is None:
            raise ValueError("a MoE gate has no routing recorded: run a forward pass first")
        loss = layer_loss(gate.last_scores, gate.last_indices, n, gate.topk, alpha)
        total = loss if total is None else total + loss
    return total if total is not None else torch.zeros(())
