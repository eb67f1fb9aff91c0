"""Rotary position embedding with YaRN context extension, for the decoupled RoPE part of MLA.

YaRN (as the released weights and `transformers` use it): frequencies below the `beta_slow`
correction bound are divided by `factor` (interpolated), those above `beta_fast` are kept
(extrapolated), with a linear ramp in between; cos/sin are multiplied by the attention factor
`mscale(factor, mscale) / mscale(factor, mscale_all_dim)` (1 for DeepSeek-V3, whose two mscales are
equal), and the softmax scale gets `mscale(factor, mscale_all_dim)^2` (see `ModelArgs.softmax_scale`).

The released weights pair adjacent channels (`rope_interleave`): channels (2i, 2i+1) rotate as one complex
number. With `rope_interleave=False` channel i pairs with channel i + d/2 (the GPT-NeoX layout).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dsv3.config import ModelArgs


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inv_frequencies(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """`(inv_freq [rope_dim / 2] float32, attention_factor)` for the model's rope settings."""
    dim = args.qk_rope_head_dim
    base = args.rope_theta
    # computed on the CPU explicitly: under a meta-device context, arange would go through slow decompositions
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    inv_extra = 1.0 / pos_freqs
    if not args.yarn:
        return inv_extra, 1.0
    factor = args.rope_factor
    inv_inter = 1.0 / (factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(args.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(args.beta_fast)), 0)
    high = min(math.ceil(correction_dim(args.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 where the original frequency is kept
    inv_freq = inv_inter * (1 - extrapolate) + inv_extra * extrapolate
    if args.mscale and args.mscale_all_dim:
        attention_factor = yarn_mscale(factor, args.mscale) / yarn_mscale(factor, args.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq, attention_factor


class Rotary(nn.Module):
    """Computes cos/sin for arbitrary integer positions on the fly (no max-length table)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        inv_freq, self.attention_factor = inv_frequencies(args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def reset(self) -> None:
        """Recompute the frequencies (after `to_empty`, which leaves non-persistent buffers uninitialised)."""
        if not self.inv_freq.is_meta:
            self.inv_freq.copy_(inv_frequencies(self.args)[0])

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions `[...]` int -> cos, sin `[..., rope_dim / 2]` float32."""
        freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotate `x [..., d]` by angles whose cos/sin broadcast to `[..., d/2]`; computed in float32.

    The output keeps the input channel layout, so a query and a key rotated here give the same dot
    product as in the reference implementations (which may permute channels; dot products are equal).
    """
    dtype = x.dtype
    x = x.float()
    if interleave:
        a, b = x[..., 0::2], x[..., 1::2]
        out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    else:
        a, b = x.chunk(2, dim=-1)
        out = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return out.to(dtype)
