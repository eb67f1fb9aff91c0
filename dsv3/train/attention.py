"""Training attention: MLA through `F.scaled_dot_product_attention` (flash attention on GPUs).

`MLA.forward` without a cache materialises the `[B, H, T, T]` float32 scores, which at training sizes costs
more memory traffic than the whole rest of the block. Training never uses a cache and always attends
causally, so `use_sdpa(model)` replaces each attention module's `forward` (instance level: names, parameters
and the model code stay as they are) by `sdpa_forward`: the same projections (`MLA.project`), the expanded
keys/values (`kv_b_proj`), then one fused causal attention. The value head dim is zero-padded to the
query/key head dim so the flash kernel (equal head dims) applies; the padding columns are dropped after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model.mla import MLA


def sdpa_forward(mla: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Causal self-attention of x `[B, T, D]` -> `[B, T, D]`, equal to `mla(x, cos, sin, causal_mask)`."""
    q_nope, q_pe, kv, k_pe = mla.project(x, cos, sin)  # [B,T,H,nope], [B,T,H,rope], [B,T,C], [B,T,rope]
    kv_full = mla.kv_b_proj(kv).unflatten(-1, (mla.n_heads, mla.nope_dim + mla.v_dim))  # [B, T, H, nope+v]
    k_nope, v = kv_full.split([mla.nope_dim, mla.v_dim], dim=-1)
    dtype = k_nope.dtype
    q = torch.cat([q_nope, q_pe.to(q_nope.dtype)], dim=-1)  # [B, T, H, qk]
    k = torch.cat([k_nope, k_pe.to(dtype).unsqueeze(2).expand(-1, -1, mla.n_heads, -1)], dim=-1)
    q = q.to(dtype)
    pad = mla.qk_dim - mla.v_dim
    if pad > 0:
        v = F.pad(v, (0, pad))  # [B, T, H, qk]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, scale=mla.softmax_scale)  # [B, H, T, qk]
    o = o.transpose(1, 2)[..., : mla.v_dim]  # [B, T, H, v]
    return mla.o_proj(o.flatten(-2))


def use_sdpa(model: nn.Module) -> int:
    """Route every cache-free, masked attention call of `model`'s MLA modules through `sdpa_forward`
    (calls with a cache or without a mask keep `MLA.forward`). Returns the number of modules changed."""
    changed = 0
    for module in model.modules():
        if not isinstance(module, MLA) or "forward" in module.__dict__:
            continue
        inner = module.forward

        def forward(x, cos, sin, mask, cache=None, start_pos=0, absorb=True, _mla=module, _inner=inner):
            if cache is not None or mask is None or start_pos != 0:
                return _inner(x, cos, sin, mask, cache, start_pos, absorb)
            return sdpa_forward(_mla, x, cos, sin)

        module.forward = forward
        changed += 1
    return changed
