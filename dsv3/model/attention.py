"""Attention backends: where MLA keeps its latents and how it attends over them.

`MLA.forward(x, cos, sin, meta)` computes its queries and the un-normalised latents `kv_a`, then calls the
backend that `meta` carries, chosen once by whoever runs the model:

- `write_latents(mla, kv_a, cos, sin, meta)` -> `(kv [N, C], k_pe [N, R])`, the normalised latent and the
  rotated rope key of each new token, stored where the backend keeps them;
- `attend(mla, q_nope, q_pe, kv, k_pe, meta)` -> `[N, H * v]`, the heads' outputs before `o_proj`.

Backends:
- `CausalAttention` (here): no cache. The flat tokens are `meta.batch` rows of `meta.seqlen` tokens, each
  attending causally to its own row. Expanded keys and values through `F.scaled_dot_product_attention`
  (flash attention on GPUs; training and `model(tokens [B, T])`), or `absorb=True`: attention in the latent
  space, the reference form that paged decoding uses.
- `dsv3.engine.attention.PagedAttention` / `TritonPagedAttention`: the engine's paged latent cache (CPU
  reference, GPU kernels).

Metadata is one `AttentionMeta` per forward. Backends never change the model; the model never knows which
backend it runs on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from dsv3.model.mla import MLA


class AttentionBackend(Protocol):
    def write_latents(self, mla: MLA, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      meta: AttentionMeta) -> tuple[torch.Tensor, torch.Tensor]: ...

    def attend(self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
               meta: AttentionMeta) -> torch.Tensor: ...


@dataclass
class AttentionMeta:
    """What one forward's attention needs. `backend` is the only field every backend reads; `batch` and
    `seqlen` describe `CausalAttention`'s rows; `step` holds a paged backend's own per-step tensors; `plan`,
    when set, is a decode plan whose packed weights replace the plain modules' products (CPU decoding,
    `dsv3.engine.cpu_decode`)."""

    backend: AttentionBackend
    batch: int = 1
    seqlen: int = 0
    step: Any = None
    plan: Any = None


class CausalAttention:
    """No cache: `meta.batch` independent rows of `meta.seqlen` tokens, causal within each row."""

    def __init__(self, absorb: bool = False) -> None:
        self.absorb = absorb

    def write_latents(self, mla: MLA, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      meta: AttentionMeta) -> tuple[torch.Tensor, torch.Tensor]:
        return mla.latents(kv_a, cos, sin)

    def attend(self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
               meta: AttentionMeta) -> torch.Tensor:
        b, t = meta.batch, meta.seqlen
        q_nope, q_pe = q_nope.view(b, t, mla.n_heads, -1), q_pe.view(b, t, mla.n_heads, -1)
        kv, k_pe = kv.view(b, t, -1), k_pe.view(b, t, -1)
        o = self._absorbed(mla, q_nope, q_pe, kv, k_pe) if self.absorb else self._sdpa(mla, q_nope, q_pe, kv, k_pe)
        return o.reshape(b * t, -1)  # [N, H * v]

    @staticmethod
    def _sdpa(mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor,
              k_pe: torch.Tensor) -> torch.Tensor:
        """Expanded keys/values `[B, T, H, .]` and one fused causal attention -> `[B, T, H, v]`. The value head
        dim is zero-padded to the query/key head dim on GPUs, where the flash kernel wants equal head dims."""
        kv_full = mla.kv_b_proj(kv).unflatten(-1, (mla.n_heads, mla.nope_dim + mla.v_dim))  # [B, T, H, nope + v]
        k_nope, v = kv_full.split([mla.nope_dim, mla.v_dim], dim=-1)
        dtype = k_nope.dtype
        q = torch.cat([q_nope, q_pe.to(q_nope.dtype)], dim=-1).to(dtype)  # [B, T, H, qk]
        k = torch.cat([k_nope, k_pe.to(dtype).unsqueeze(2).expand(-1, -1, mla.n_heads, -1)], dim=-1)
        pad = mla.qk_dim - mla.v_dim if q.is_cuda else 0
        if pad > 0:
            v = F.pad(v, (0, pad))  # [B, T, H, qk]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=mla.softmax_scale)  # [B, H, T, v (+ pad)]
        return o.transpose(1, 2)[..., : mla.v_dim]

    @staticmethod
    def _absorbed(mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor,
                  k_pe: torch.Tensor) -> torch.Tensor:
        """Attention in the latent space: scores `[B, H, T, T]` of `[q_nope W_uk ; q_pe]` against `[kv ; k_pe]`,
        outputs through `W_uv` -> `[B, T, H, v]`."""
        t = kv.shape[1]
        q_lat = mla.absorb_query(q_nope)  # [B, T, H, C]
        scores = torch.einsum("bthc,bsc->bhts", q_lat, kv) + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)
        scores = scores.float() * mla.softmax_scale
        hidden = torch.ones(t, t, dtype=torch.bool, device=kv.device).triu(1)  # [T, S] future keys
        probs = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)
        o_lat = torch.einsum("bhts,bsc->bthc", probs.to(kv.dtype), kv)  # [B, T, H, C]
        return mla.value_heads(o_lat)


EXPANDED = CausalAttention(absorb=False)
ABSORBED = CausalAttention(absorb=True)


def causal_meta(batch: int, seqlen: int, absorb: bool = False) -> AttentionMeta:
    """Metadata of `batch` rows of `seqlen` tokens without a cache."""
    return AttentionMeta(ABSORBED if absorb else EXPANDED, batch=batch, seqlen=seqlen)
