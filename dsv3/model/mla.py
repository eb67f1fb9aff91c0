"""Multi-head Latent Attention (MLA).

Per token only the normalised KV latent `c_kv [kv_lora_rank]` and the rotated rope key `k_pe
[qk_rope_head_dim]` are kept (576 numbers per layer for DeepSeek-V3). Where they are kept and how the queries
attend over them is the attention backend's business (`dsv3.model.attention`): `forward` computes the queries
and the un-normalised latents, hands the latents to `meta.backend.write_latents`, and the queries to
`meta.backend.attend`, then applies `o_proj`. Two forms of attention, numerically equal, are built from the
sub-steps here:

- expanded: `kv_b_proj` expands the latents into per-head `k_nope` and `v`, then ordinary attention;
- absorbed: `kv_b_proj`'s key half is folded into the query (`absorb_query`: `q_nope W_uk` lives in latent
  space) and its value half is applied after attending over the latents (`value_heads`), so keys and values
  are never materialised (decoding over a cache).

`fused=True` (set by `dsv3.model.fused.fuse_for_inference`, inference only): the query rope runs as the
in-place Triton kernel on CUDA tensors. `meta.plan` set (the engine's CPU decode steps,
`dsv3.engine.cpu_decode`): the plan runs the whole sub-layer from its packed weights, through the same
backend.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.config import ModelArgs
from dsv3.kernels import mla_decode as mla_ops
from dsv3.model.attention import AttentionMeta
from dsv3.model.layers import RMSNorm, dense_weight, linear
from dsv3.model.rope import apply_rope


def _rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE as one complex multiply: x `[..., d]`, freqs `[..., d/2]` complex (`cos + i sin`,
    broadcast). The same products and sums as `apply_rope(interleave=True)`, in float32, with fewer small ops."""
    dtype = x.dtype
    h = x if dtype == torch.float32 else x.float()
    if h.stride(-1) != 1 or h.storage_offset() % 2 or any(s % 2 for s in h.stride()[:-1]):
        h = h.contiguous()
    out = torch.view_as_real(torch.view_as_complex(h.unflatten(-1, (-1, 2))) * freqs).flatten(-2)
    return out if dtype == torch.float32 else out.to(dtype)


class MLA(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype | None = None, layer_id: int = 0) -> None:
        super().__init__()
        self.layer_id = layer_id  # the backend's cache index (MTP modules follow the main layers)
        self.n_heads = args.n_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.nope_dim = args.qk_nope_head_dim
        self.rope_dim = args.qk_rope_head_dim
        self.v_dim = args.v_head_dim
        self.qk_dim = args.qk_head_dim
        self.softmax_scale = args.softmax_scale
        self.interleave = args.rope_interleave
        self.fused = False
        if self.q_lora_rank:
            self.q_a_proj = linear(args.dim, self.q_lora_rank, dtype)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, args.rms_norm_eps, dtype)
            self.q_b_proj = linear(self.q_lora_rank, self.n_heads * self.qk_dim, dtype)
        else:
            self.q_proj = linear(args.dim, self.n_heads * self.qk_dim, dtype)
        self.kv_a_proj_with_mqa = linear(args.dim, self.kv_lora_rank + self.rope_dim, dtype)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, args.rms_norm_eps, dtype)
        self.kv_b_proj = linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), dtype)
        self.o_proj = linear(self.n_heads * self.v_dim, args.dim, dtype)
        # `kv_b_proj`'s weight dequantized once, for FP8 weights on the fused path (`fuse_for_inference`)
        self.register_buffer("kv_b_dense", None, persistent=False)

    def extra_repr(self) -> str:
        return f"layer_id={self.layer_id}, heads={self.n_heads}, fused={self.fused}"

    # ---- sub-steps ---------------------------------------------------------------------------
    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x `[..., R]` rotated by cos/sin broadcastable to `[..., R/2]` (float32 math, x's dtype)."""
        if self.interleave and not torch.compiler.is_compiling():  # compiled: real arithmetic (inductor has
            return _rotate(x, torch.complex(cos, sin))  # no complex, and the storage-offset check breaks graphs)
        return apply_rope(x, cos, sin, self.interleave)

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[N, D]`, cos/sin `[N, R/2]` -> q_nope `[N, H, nope]`, q_pe `[N, H, R]` (rotated)."""
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q = q.unflatten(-1, (self.n_heads, self.qk_dim))
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        if self.fused and q.is_cuda and not torch.is_grad_enabled() and q.dim() == 3:
            return q_nope, mla_ops.rope_(q_pe, cos, sin, self.interleave)  # in place in q
        return q_nope, self.rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2))

    def latents(self, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`kv_a_proj_with_mqa(x)` `[N, C + R]` -> the kept pair: kv `[N, C]` (normalised), k_pe `[N, R]`
        (rotated)."""
        kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(kv), self.rope(k_pe, cos, sin)

    def kv_b_halves(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`kv_b_proj` as per-head `W_uk [H, nope, C]` and `W_uv^T [H, C, v]` (views; FP8 dequantized)."""
        w = self.kv_b_dense if self.kv_b_dense is not None and self.kv_b_dense.dtype == dtype else \
            dense_weight(self.kv_b_proj, dtype)
        w = w.unflatten(0, (self.n_heads, self.nope_dim + self.v_dim))
        return w[:, : self.nope_dim], w[:, self.nope_dim:].transpose(1, 2)

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope `[..., H, nope]` -> latent query `[..., H, kv_lora_rank]` (`q_nope W_uk`, one batched matmul
        over heads)."""
        w_uk = self.kv_b_halves(q_nope.dtype)[0]
        flat = q_nope.reshape(-1, self.n_heads, self.nope_dim)  # [M, H, nope]
        q_lat = torch.bmm(flat.transpose(0, 1), w_uk).transpose(0, 1)  # [M, H, C]
        return q_lat.reshape(*q_nope.shape[:-1], -1)

    def value_heads(self, o_lat: torch.Tensor) -> torch.Tensor:
        """Latent attention output `[..., H, kv_lora_rank]` -> per-head values `[..., H, v]` (`W_uv`)."""
        w_uv_t = self.kv_b_halves(o_lat.dtype)[1]
        flat = o_lat.reshape(-1, self.n_heads, self.kv_lora_rank)  # [M, H, C]
        o = torch.bmm(flat.transpose(0, 1), w_uv_t).transpose(0, 1)  # [M, H, v]
        return o.reshape(*o_lat.shape[:-1], self.v_dim)

    # ---- the forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        """x `[N, D]` (flat tokens), cos/sin `[N, R/2]` -> `[N, D]`. A decode plan in `meta` (CPU decode steps)
        computes the same from its packed weights."""
        if meta.plan is not None:
            return meta.plan.attention(self, x, cos, sin, meta)
        backend = meta.backend
        q_nope, q_pe = self.queries(x, cos, sin)
        kv, k_pe = backend.write_latents(self, self.kv_a_proj_with_mqa(x), cos, sin, meta)
        return self.o_proj(backend.attend(self, q_nope, q_pe, kv, k_pe, meta))
