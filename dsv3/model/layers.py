"""Small building blocks shared by attention, MoE and MTP: RMSNorm, the SwiGLU MLP, weight access.

Module and parameter names equal the Hugging Face DeepSeek-V3 names (`gate_proj`, `up_proj`, `down_proj`,
`weight`), so a state-dict key is the HF key without its `model.` prefix.

`fused=True` (set by `dsv3.model.fused.fuse_for_inference`, inference only): RMSNorm and the MLP run the
Triton kernels of `dsv3.kernels` on CUDA tensors when no gradient is wanted; their PyTorch forms are the
reference the kernel tests compare with.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.kernels import mla_decode as mla_ops
from dsv3.kernels import moe as moe_ops


class RMSNorm(nn.Module):
    """`weight * x / rms(x)`, computed in float32 and cast back (as the reference does).

    `forward(x, residual)` adds first and returns both the norm and the sum (the pre-norm residual stream),
    which the fused kernel does in one pass."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.fused = False
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, fused={self.fused}"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.fused and x.is_cuda and x.dim() == 2 and not torch.is_grad_enabled():
            out, summed = mla_ops.rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (out, summed)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32:
            return torch.rms_norm(x, self.weight.shape, self.weight, self.eps)  # the same ops in one call
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def linear(in_dim: int, out_dim: int, dtype: torch.dtype | None = None) -> nn.Linear:
    """A bias-free Linear (every projection in DeepSeek-V3 is bias-free)."""
    return nn.Linear(in_dim, out_dim, bias=False, dtype=dtype)


def weight_and_scale(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear layer's weight and its FP8 block scale (None for a plain weight)."""
    return module.weight, getattr(module, "weight_scale_inv", None)


def dense_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight of a Linear as a dense `[out, in]` tensor of `dtype`, dequantizing FP8 weights."""
    weight, scale = weight_and_scale(module)
    if scale is not None:
        from dsv3.kernels.fp8 import dequantize_weight
        return dequantize_weight(weight, scale, dtype=dtype)
    return weight.to(dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`. Used for dense layers and every expert."""

    def __init__(self, dim: int, inter_dim: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.fused = False
        self.gate_proj = linear(dim, inter_dim, dtype)
        self.up_proj = linear(dim, inter_dim, dtype)
        self.down_proj = linear(inter_dim, dim, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w8a8 = getattr(self.gate_proj, "mode", None)  # FP8Linear: W8A8 runs through its own GEMMs
        if self.fused and x.is_cuda and not torch.is_grad_enabled() and (w8a8 is None or w8a8(x) != "w8a8"):
            x2 = x.reshape(-1, x.shape[-1])
            (wg, sg), (wu, su) = weight_and_scale(self.gate_proj), weight_and_scale(self.up_proj)
            h = moe_ops.swiglu(x2, wg, wu, sg, su)
            wd, sd = weight_and_scale(self.down_proj)
            return moe_ops.linear(h, wd, sd).view(*x.shape[:-1], wd.shape[0])
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@contextmanager
def skip_torch_init() -> Iterator[None]:
    """Build modules without torch's default initialisation, for meta-device construction where a loader
    fills every tensor anyway (on meta, `normal_` pulls in torch's decompositions: seconds of imports)."""
    saved = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}
    try:
        for cls in saved:
            cls.reset_parameters = lambda self: None
        yield
    finally:
        for cls, fn in saved.items():
            cls.reset_parameters = fn
