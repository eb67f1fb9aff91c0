"""Inference on the GPU kernels: `fuse_for_inference(model, fp8=False)` readies a loaded `Transformer`.

What it does, in place, keeping names, parameters and the state dict:
- each MoE gets a `StackedExperts` (`moe.stacked`): its routed experts stacked into `[E + S, I, D]` /
  `[E + S, D, I]` tensors, with the `S` shared experts appended as `moe_inter_dim`-wide slices that are
  always chosen with weight 1. The expert `Linear`s become views into the stacks (no second copy; the
  shared-expert MLP keeps its own weights). On CUDA its forward runs fp32 router logits (cuBLAS), then
  `dsv3.kernels.moe.route` and `fused_moe`, with no host sync.
- RMSNorms, MLPs and MLA query rope take their Triton kernels (`fused = True` on each module).
- `fp8=True` quantizes every projection except the embedding, output head and router to FP8 with 128x128
  block scales (`FP8Linear`, weight-only: activations stay BF16), as the released checkpoint does.

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
from dsv3.model.layers import MLP, RMSNorm, weight_and_scale
from dsv3.model.mla import MLA
from dsv3.model.moe import Gate, MoE

FP8_SKIP = ("embed_tokens", "lm_head", "gate")


class FP8Linear(nn.Module):
    """A bias-free Linear with a `float8_e4m3fn` weight `[out, in]` and its `weight_scale_inv` block scale."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale_inv", scale)

    @classmethod
    def quantize(cls, linear: nn.Linear) -> "FP8Linear":
        return cls(*fp8_ops.quantize_weight(linear.weight.detach()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return moe_ops.linear(x, self.weight, self.weight_scale_inv)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8"


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
        return moe_ops.fused_moe(x, ids, weights, self.w_gate, self.w_up, self.w_down, self.s_gate, self.s_up,
                                 self.s_down, stats=self.active_experts if x.is_cuda else None)


def _quantize_linears(module: nn.Module, skip: tuple[str, ...] = FP8_SKIP) -> None:
    for name, child in list(module.named_children()):
        if name in skip or isinstance(child, (FP8Linear, MoE)):
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, FP8Linear.quantize(child))
        else:
            _quantize_linears(child, skip)


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
def stack_experts(moe: MoE, fp8: bool) -> StackedExperts:
    """Stack `moe`'s routed experts + shared slices; the routed experts' Linears become views into the stacks."""
    inter = moe.experts[0].gate_proj.weight.shape[0]
    shared = moe.shared_experts
    if fp8 and inter % 128:
        raise ValueError(f"FP8 experts need moe_inter_dim divisible by 128, got {inter}")
    if fp8 and shared is not None:
        _quantize_linears(shared, ())
    n_exp = len(moe.experts)
    n_shared = len(_shared_slices(shared, "gate_proj", inter))
    stacks, scales = [], []
    for name in ("gate_proj", "up_proj", "down_proj"):
        slices = _shared_slices(shared, name, inter)
        if fp8:
            lin0 = getattr(moe.experts[0], name)
            shape, device = tuple(lin0.weight.shape), lin0.weight.device
            w8 = torch.empty(n_exp + n_shared, *shape, dtype=fp8_ops.FP8_DTYPE, device=device)
            s8 = torch.empty(n_exp + n_shared, *fp8_ops.scale_shape(*shape), dtype=torch.float32, device=device)
            for e, expert in enumerate(moe.experts):
                lin = getattr(expert, name)
                if isinstance(lin, FP8Linear):
                    w8[e], s8[e] = lin.weight, lin.weight_scale_inv
                else:
                    w8[e], s8[e] = fp8_ops.quantize_weight(lin.weight.detach())
                setattr(expert, name, FP8Linear(w8[e], s8[e]))
            for i, (w, s) in enumerate(slices):
                w8[n_exp + i], s8[n_exp + i] = w, s
            stacks.append(w8)
            scales.append(s8)
        else:
            stack = torch.stack([getattr(e, name).weight.detach() for e in moe.experts] + [w for w, _ in slices])
            for e, expert in enumerate(moe.experts):
                getattr(expert, name).weight = nn.Parameter(stack[e], requires_grad=False)
            stacks.append(stack)
    return StackedExperts(*stacks, tuple(scales) if fp8 else None, moe.gate.weight.detach().float(), n_shared)


@torch.no_grad()
def fuse_for_inference(model: nn.Module, fp8: bool = False) -> nn.Module:
    """Ready a loaded model for the GPU kernels (see the module docstring), in place; returns the model.

    Call after the model is on its device. Parameters lose `requires_grad` (inference only)."""
    for module in list(model.modules()):
        if isinstance(module, MoE) and module.stacked is None:
            module.stacked = stack_experts(module, fp8)
    if fp8:
        _quantize_linears(model)
    for module in model.modules():
        if isinstance(module, (RMSNorm, MLP, MLA)):
            module.fused = True
    for p in model.parameters():
        p.requires_grad_(False)
    return model
