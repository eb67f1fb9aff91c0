"""Inference on the GPU kernels: `fuse_for_inference(model)` readies a loaded `Transformer`.

What it does, in place, keeping names, parameters and the state dict:
- each MoE gets a `StackedExperts` (`moe.stacked`): its routed experts stacked into `[E + S, I, D]` /
  `[E + S, D, I]` tensors, with the `S` shared experts appended as `moe_inter_dim`-wide slices that are
  always chosen with weight 1. The expert `Linear`s become views into the stacks (no second copy; the
  shared-expert MLP keeps its own weights). On CUDA its forward runs fp32 router logits (cuBLAS), then
  `dsv3.kernels.moe.route` and `fused_moe`, with no host sync.
- RMSNorms, MLPs and MLA query rope take their Triton kernels (`fused = True` on each module).
- FP8 weights (`dsv3.model.fp8_linear.FP8Linear`, as `load_model(weights="fp8")` or
  `convert_linears_to_fp8` leave them) stay FP8: the experts are stacked as FP8 codes with their per-expert
  block scales, and `StackedExperts` follows the same activation policy as `FP8Linear` (W8A16 or W8A8,
  `dsv3.kernels.fp8.resolve_policy`). MLA's `kv_b_proj` is dequantized once to the activation dtype
  (`MLA.kv_b_dense`), since the absorbed attention uses it as two batched matrices every step; vLLM does
  the same.

Stacking needs the loaded weights, so this runs after loading, once; a second call changes nothing. Every
fused form falls back to the module's PyTorch form off CUDA and while gradients are wanted, and the kernel
tests compare each kernel with that form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.kernels import fp8 as fp8_ops
from dsv3.kernels import moe as moe_ops
from dsv3.model.fp8_linear import FP8Linear
from dsv3.model.layers import MLP, RMSNorm, dense_weight, weight_and_scale
from dsv3.model.mla import MLA
from dsv3.model.moe import Gate, MoE

class StackedExperts(nn.Module):
    """A MoE's routed experts and shared slices stacked for `fused_moe` (buffers, not in the state dict)."""

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                 scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, router: torch.Tensor,
                 n_shared_slices: int) -> None:
        super().__init__()
        self.register_buffer("w_gate", w_gate, persistent=False)  # [E + S, I, D]
        self.register_buffer("w_up", w_up, persistent=False)  # [E + S, I, D]
        self.register_buffer("w_down", w_down, persistent=False)  # [E + S, D, I]
        s = scales or (None, None, None)  # FP8 block scales [E + S, ceil(I/128), ceil(D/128)]
        self.register_buffer("s_gate", s[0], persistent=False)
        self.register_buffer("s_up", s[1], persistent=False)
        self.register_buffer("s_down", s[2], persistent=False)
        self.register_buffer("router_weight", router, persistent=False)  # [E, D] float32
        self.n_shared_slices = n_shared_slices
        self.fp8 = s[0] is not None
        self.policy = "auto"  # FP8 activation policy (`dsv3.model.fp8_linear.set_fp8_policy`)
        # [1] int32: experts (shared slices included) that got tokens in the last call (CUDA, benchmarks)
        self.register_buffer("active_experts", torch.zeros(1, dtype=torch.int32, device=router.device),
                             persistent=False)

    def extra_repr(self) -> str:
        e, i, d = self.w_gate.shape
        return f"experts={e - self.n_shared_slices}+{self.n_shared_slices} shared, inter={i}, dim={d}, " \
               f"{'fp8' if self.s_gate is not None else self.w_gate.dtype}"

    def forward(self, x: torch.Tensor, gate: Gate) -> torch.Tensor:
        """x `[N, D]` -> routed + shared experts' output `[N, D]`."""
        logits = F.linear(x.float(), self.router_weight)  # [N, E]
        ids, weights = moe_ops.route(logits, gate.e_score_correction_bias, gate.topk, self.n_shared_slices,
                                     gate.score_func, gate.topk_method, gate.n_groups, gate.topk_groups,
                                     gate.norm_topk_prob, gate.route_scale)
        a8 = self.fp8 and fp8_ops.resolve_policy(self.policy, x.device, x.shape[0]) == "w8a8"
        return moe_ops.fused_moe(x, ids, weights, self.w_gate, self.w_up, self.w_down, self.s_gate, self.s_up,
                                 self.s_down, stats=self.active_experts if x.is_cuda else None, a8=a8)


def _shared_slices(shared: MLP | None, name: str, inter: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per-slice (weight, scale) of the shared MLP's projection `name`, each `inter` wide."""
    if shared is None:
        return []
    w, s = weight_and_scale(getattr(shared, name))
    n = w.shape[1 if name == "down_proj" else 0] // inter
    b = inter // 128
    if name == "down_proj":  # [D, S * I]: column slices
        return [(w[:, i * inter:(i + 1) * inter], None if s is None else s[:, i * b:(i + 1) * b]) for i in range(n)]
    return [(w[i * inter:(i + 1) * inter], None if s is None else s[i * b:(i + 1) * b]) for i in range(n)]


@torch.no_grad()
def stack_experts(moe: MoE) -> StackedExperts:
    """Stack `moe`'s routed experts + shared slices in their own format (BF16, or FP8 codes with per-expert
    block scales); the routed experts' Linears become views into the stacks (no second copy)."""
    inter = moe.experts[0].gate_proj.weight.shape[0]
    shared = moe.shared_experts
    fp8 = isinstance(moe.experts[0].gate_proj, FP8Linear)
    linears = [getattr(e, n) for e in moe.experts for n in ("gate_proj", "up_proj", "down_proj")]
    if shared is not None:
        linears += [shared.gate_proj, shared.up_proj, shared.down_proj]
    if any(isinstance(lin, FP8Linear) != fp8 for lin in linears):
        raise ValueError("a MoE's experts must be all FP8 or all unquantized to be stacked")
    if fp8 and inter % 128:
        raise ValueError(f"FP8 experts need moe_inter_dim divisible by 128, got {inter}")
    policy = moe.experts[0].gate_proj.policy if fp8 else None  # carried over to the views and the stack
    stacks, scales = [], []
    for name in ("gate_proj", "up_proj", "down_proj"):
        slices = _shared_slices(shared, name, inter)
        stack = torch.stack([getattr(e, name).weight.detach() for e in moe.experts] + [w for w, _ in slices])
        if fp8:
            scale = torch.stack([getattr(e, name).weight_scale_inv.detach() for e in moe.experts]
                                + [sc for _, sc in slices])
            for e, expert in enumerate(moe.experts):
                view = FP8Linear.from_tensors(stack[e], scale[e])
                view.policy = policy
                setattr(expert, name, view)
            scales.append(scale)
        else:
            for e, expert in enumerate(moe.experts):
                getattr(expert, name).weight = nn.Parameter(stack[e], requires_grad=False)
        stacks.append(stack)
    n_shared = len(_shared_slices(shared, "gate_proj", inter))
    stacked = StackedExperts(*stacks, tuple(scales) if fp8 else None, moe.gate.weight.detach().float(), n_shared)
    if fp8:
        stacked.policy = policy
    return stacked


@torch.no_grad()
def fuse_for_inference(model: nn.Module) -> nn.Module:
    """Ready a loaded model for the GPU kernels (see the module docstring), in place; returns the model.

    Call after the model is on its device. Parameters lose `requires_grad` (inference only)."""
    for module in list(model.modules()):
        if isinstance(module, MoE) and module.stacked is None:
            module.stacked = stack_experts(module)
    for module in model.modules():
        if isinstance(module, (RMSNorm, MLP, MLA)):
            module.fused = True
        if isinstance(module, MLA) and isinstance(module.kv_b_proj, FP8Linear) and module.kv_b_dense is None:
            module.kv_b_dense = dense_weight(module.kv_b_proj, model.embed_tokens.weight.dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
