"""Small building blocks shared by attention, MoE and MTP: RMSNorm, the SwiGLU MLP, weight access.

Module and parameter names equal the Hugging Face DeepSeek-V3 names (`gate_proj`, `up_proj`, `down_proj`,
`weight`), so a state-dict key is the HF key without its `model.` prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """`weight * x / rms(x)`, computed in float32 and cast back (as the reference does)."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def linear(in_dim: int, out_dim: int, dtype: torch.dtype | None = None) -> nn.Linear:
    """A bias-free Linear (every projection in DeepSeek-V3 is bias-free)."""
    return nn.Linear(in_dim, out_dim, bias=False, dtype=dtype)


def dense_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight of a Linear as a dense `[out, in]` tensor of `dtype`, dequantizing FP8 weights."""
    weight = module.weight
    scale = getattr(module, "weight_scale_inv", None)
    if scale is not None:
        from dsv3.kernels.fp8 import dequantize_weight
        return dequantize_weight(weight, scale, dtype=dtype)
    return weight.to(dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`. Used for dense layers and every expert."""

    def __init__(self, dim: int, inter_dim: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gate_proj = linear(dim, inter_dim, dtype)
        self.up_proj = linear(dim, inter_dim, dtype)
        self.down_proj = linear(inter_dim, dim, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
