"""MLA decode attention over a paged latent cache, and the small fused ops of a decode step.

Cache layout (the engine's, per layer): `[num_blocks, block_size, kv_lora_rank + rope_dim]`; token `p` of
a sequence lives in block `block_tables[b, p // block_size]` at row `p % block_size`. Attention runs
absorbed: the caller folds `kv_b_proj`'s key half into the query (`q_lat = q_nope W_uk`, `[B, H, C]`)
and applies its value half to the output, so the kernel only sees the 576-wide latents.

- `mla_decode(q_lat, q_pe, cache, block_tables, seq_lens, scale)`: `[B, H, C]` latent outputs; each
  sequence attends over its first `seq_lens[b]` cached tokens (0 gives zeros). Split-K over long
  contexts with a log-sum-exp merge; the number of splits depends only on the batch (graph-safe).
- `rms_norm(x, w, eps, residual)`: RMSNorm with an optional fused residual add (`x + residual`, which
  is also returned), with `dsv3.model.layers.RMSNorm`'s roundings.
- `rope_(x, cos, sin, interleave)`: rotary embedding in place on `[N, H, R]`.
- `store_latents(kva, w, eps, cos, sin, interleave, cache, slots)`: `kv_a_proj_with_mqa` output ->
  normalised latent + rotated rope key, written to the cache slots (negative slot = skip, for padding).

On CUDA (or under `TRITON_INTERPRET=1`) the Triton kernels of `mla_decode_triton.py` run; elsewhere
the references below, which are the test oracle.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _triton():
    try:
        from dsv3.kernels import mla_decode_triton
    except ImportError:
        return None
    return mla_decode_triton if mla_decode_triton.available() else None


def _use_triton(x: torch.Tensor) -> bool:
    kernels = _triton()
    return kernels is not None and (x.is_cuda or kernels._INTERPRET)


# ---- attention ---------------------------------------------------------------------------------
def mla_decode_ref(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                   seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """PyTorch reference of `mla_decode` (fp32 math, one sequence at a time)."""
    b, h, c = q_lat.shape
    page = cache.shape[1]
    out = torch.zeros(b, h, c, dtype=q_lat.dtype, device=q_lat.device)
    flat = cache.reshape(-1, cache.shape[-1])  # [slots, C + R]
    for i, length in enumerate(seq_lens.tolist()):
        if length == 0:
            continue
        pos = torch.arange(length, device=cache.device)
        slots = block_tables[i, pos // page].long() * page + pos % page
        ctx = flat[slots].float()  # [S, C + R]
        scores = q_lat[i].float() @ ctx[:, :c].T + q_pe[i].float() @ ctx[:, c:].T  # [H, S]
        probs = (scores * scale).softmax(dim=-1)
        out[i] = (probs @ ctx[:, :c]).to(q_lat.dtype)
    return out


def mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
               seq_lens: torch.Tensor, scale: float, num_splits: int | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA decode: one query token per sequence over its paged latents.

    q_lat `[B, H, C]`, q_pe `[B, H, R]` (last dims contiguous, any batch/head strides); cache
    `[num_blocks, block_size, C + R]`; block_tables `[B, max_blocks]` int32; seq_lens `[B]` int32 (tokens
    to attend, the current one included); `scale` the softmax scale. Returns `[B, H, C]` (or fills
    `out`). `num_splits` (power of two <= 16) overrides the context split of the Triton kernel."""
    if q_lat.dim() != 3 or q_pe.dim() != 3 or q_lat.shape[:2] != q_pe.shape[:2]:
        raise ValueError(f"q_lat [B, H, C] and q_pe [B, H, R] must agree; got {tuple(q_lat.shape)}, "
                         f"{tuple(q_pe.shape)}")
    b, h, c = q_lat.shape
    r = q_pe.shape[-1]
    if cache.dim() != 3 or cache.shape[-1] != c + r:
        raise ValueError(f"cache must be [num_blocks, block_size, C + R = {c + r}], got {tuple(cache.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != b or seq_lens.shape != (b,):
        raise ValueError(f"block_tables must be [B={b}, max_blocks] and seq_lens [B={b}]; got "
                         f"{tuple(block_tables.shape)}, {tuple(seq_lens.shape)}")
    if num_splits is not None and (num_splits < 1 or num_splits > 16 or num_splits & (num_splits - 1)):
        raise ValueError(f"num_splits must be a power of two in [1, 16], got {num_splits}")
    if _use_triton(q_lat):
        return _triton().mla_decode(q_lat, q_pe, cache, block_tables.to(torch.int32), seq_lens.to(torch.int32),
                                    scale, num_splits, out)
    result = mla_decode_ref(q_lat, q_pe, cache, block_tables, seq_lens, scale)
    if out is not None:
        out.copy_(result)
        return out
    return result


# ---- fused step ops ----------------------------------------------------------------------------
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), (x if residual is not None else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(RMSNorm(x + residual), x + residual)`, or `(RMSNorm(x), None)` without a residual; x `[M, D]`."""
    if x.dim() != 2 or weight.shape != (x.shape[1],) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rms_norm expects x [M, D], weight [D], residual like x; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {None if residual is None else tuple(residual.shape)}")
    if _use_triton(x) and x.stride(-1) == 1 and (residual is None or residual.stride(-1) == 1):
        return _triton().rms_norm(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Out of place: x `[..., R]` rotated by cos/sin broadcastable to `[..., R/2]` (fp32 math)."""
    xf = x.float()
    if interleave:
        a, b = xf[..., 0::2], xf[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)
    a, b = xf.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1).to(x.dtype)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotate x `[N, H, R]` in place (last dim contiguous); cos/sin `[N, R/2]` float32. Returns x."""
    if x.dim() != 3 or x.shape[-1] % 2 or cos.shape != (x.shape[0], x.shape[-1] // 2) or sin.shape != cos.shape:
        raise ValueError(f"rope_ expects x [N, H, R] (R even) and cos/sin [N, R/2]; got {tuple(x.shape)}, "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    if _use_triton(x) and x.stride(-1) == 1:
        return _triton().rope_(x, cos.float().contiguous(), sin.float().contiguous(), interleave)
    x.copy_(rope_ref(x, cos[:, None], sin[:, None], interleave))
    return x


def store_latents_ref(kva: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                      interleave: bool, cache: torch.Tensor | None = None,
                      slots: torch.Tensor | None = None) -> torch.Tensor:
    c = weight.shape[0]
    kv, pe = kva[:, :c], kva[:, c:]
    out = torch.cat([rms_norm_ref(kv, weight, eps)[0], rope_ref(pe, cos, sin, interleave)], dim=-1)
    if cache is not None:
        keep = slots >= 0
        cache[slots[keep].long()] = out[keep].to(cache.dtype)
    return out


def store_latents(kva: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                  interleave: bool = True, cache: torch.Tensor | None = None,
                  slots: torch.Tensor | None = None) -> torch.Tensor:
    """kva `[N, C + R]` (the `kv_a_proj_with_mqa` output) -> `[N, C + R]` = [RMSNorm(latent) ; rope(key)].

    With `cache [num_slots, C + R]` (the paged cache of one layer, flattened) and `slots [N]` int, row n
    is also written to `cache[slots[n]]` unless `slots[n] < 0`."""
    if kva.dim() != 2 or kva.shape[1] <= weight.shape[0] or (kva.shape[1] - weight.shape[0]) % 2:
        raise ValueError(f"store_latents expects kva [N, C + R] with weight [C]; got {tuple(kva.shape)}, "
                         f"{tuple(weight.shape)}")
    if (cache is None) != (slots is None):
        raise ValueError("store_latents needs both cache and slots, or neither")
    if cache is not None and (cache.dim() != 2 or cache.shape[1] != kva.shape[1] or slots.shape != (kva.shape[0],)):
        raise ValueError(f"cache must be [num_slots, {kva.shape[1]}] and slots [{kva.shape[0]}]; got "
                         f"{tuple(cache.shape)}, {tuple(slots.shape)}")
    if _use_triton(kva) and kva.stride(-1) == 1 and (cache is None or cache.stride(-1) == 1):
        return _triton().store_latents(kva, weight, eps, cos.float().contiguous(), sin.float().contiguous(),
                                       interleave, cache, slots)
    return store_latents_ref(kva, weight, eps, cos, sin, interleave, cache, slots)
