"""Multi-head Latent Attention (MLA).

Per token only the normalised KV latent `c_kv [kv_lora_rank]` and the rotated rope key
`k_pe [qk_rope_head_dim]` are cached (576 numbers per layer for DeepSeek-V3). Two ways to attend over
them, numerically equal and switchable per call:

- expanded: `kv_b_proj` expands the latents into per-head `k_nope` and `v`, then ordinary attention;
- absorbed: `kv_b_proj`'s key half is folded into the query (`q_nope W_uk` lives in latent space) and its
  value half is applied after attending over the latents, so keys/values are never materialised.

The sub-steps (`queries`, `latents`, `project` = both, `absorb_query`, `latent_output`, `absorbed_queries`,
`attend`) are public so the engine can run them over its own paged cache; `forward` is the self-contained path
with an optional contiguous cache. Rope on the interleaved layout runs as one complex multiply (`_rotate`), or,
when the caller passes per-token `rotation_matrices`, as one batched product.

Single float32 CPU tokens in inference take shorter paths with the same values up to float32 rounding (CPU
decoding, where each small op costs microseconds): embedding-bag products over the row-major `kv_b_proj` for
`absorb_query`, over the W_uv^T copy and the fused q_a/kv_a weight that `dsv3.model.layers.cpu_decode_layout`
makes, and one product with its absorbed query weight in `absorbed_queries`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelArgs
from dsv3.model.layers import RMSNorm, bag_offsets, decode_linear, dense_weight, gemv_or_linear, linear
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


def rotation_matrices(cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """cos/sin `[N, R/2]` -> `[N, R, R]`: the rope of each of N tokens as a matrix M with `x M` equal to
    `apply_rope(x, cos, sin, interleave)` for a row x `[R]` (each 2x2 block rotates one channel pair: adjacent
    channels when `interleave`, else channel i with i + R/2)."""
    n, half = cos.shape
    dim = 2 * half
    pairs = torch.arange(half, device=cos.device)
    a, b = (2 * pairs, 2 * pairs + 1) if interleave else (pairs, pairs + half)
    m = torch.zeros(n, dim, dim, dtype=torch.float32, device=cos.device)
    m[:, a, a] = cos  # out[a] = x[a] cos - x[b] sin
    m[:, b, a] = -sin
    m[:, a, b] = sin  # out[b] = x[a] sin + x[b] cos
    m[:, b, b] = cos
    return m


class LatentCache:
    """Contiguous per-layer cache `[max_batch, max_seq, kv_lora_rank]` + `[max_batch, max_seq, rope_dim]`."""

    def __init__(self, args: ModelArgs, max_batch: int, max_seq: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        self.kv = torch.zeros(max_batch, max_seq, args.kv_lora_rank, device=device, dtype=dtype)
        self.pe = torch.zeros(max_batch, max_seq, args.qk_rope_head_dim, device=device, dtype=dtype)

    def update(self, kv: torch.Tensor, pe: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `[B, T, .]` at `start_pos` and return everything cached so far for these rows."""
        bsz, seqlen = kv.shape[:2]
        end = start_pos + seqlen
        if end > self.kv.shape[1] or bsz > self.kv.shape[0]:
            raise ValueError(f"cache holds {self.kv.shape[0]} x {self.kv.shape[1]} tokens; "
                             f"asked for batch {bsz} up to position {end}")
        self.kv[:bsz, start_pos:end] = kv
        self.pe[:bsz, start_pos:end] = pe
        return self.kv[:bsz, :end], self.pe[:bsz, :end]


class MLA(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.nope_dim = args.qk_nope_head_dim
        self.rope_dim = args.qk_rope_head_dim
        self.v_dim = args.v_head_dim
        self.qk_dim = args.qk_head_dim
        self.softmax_scale = args.softmax_scale
        self.interleave = args.rope_interleave
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

    # ---- sub-steps ---------------------------------------------------------------------------
    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[..., D]`, cos/sin `[..., rope/2]` -> q_nope `[..., H, nope]`, q_pe `[..., H, rope]` (rotated)."""
        freqs = torch.complex(cos, sin) if self.interleave else None
        return self._queries(x, cos, sin, freqs)

    def latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[..., D]` -> the cached pair: kv `[..., kv_lora_rank]` (normalised), k_pe `[..., rope]` (rotated)."""
        freqs = torch.complex(cos, sin) if self.interleave else None
        return self._latents(x, cos, sin, freqs)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, freqs: torch.Tensor | None = None,
                rotation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`queries` and `latents` of the same x in one call: -> q_nope, q_pe, kv, k_pe. `freqs`: `cos + i sin`
        when the caller already has it (the engine computes it once per step). `rotation`: for x `[N, D]`, the
        rope of each token as a matrix `[N, R, R]` (`rotation_matrices`), applied by one batched product per
        rotated tensor instead of a complex multiply's five small ops (decoding, where those ops dominate)."""
        if rotation is not None or torch.compiler.is_compiling():  # compiled: real-arithmetic rope, since the
            freqs = None  # complex multiply's storage-offset check is a graph break (and inductor has no complex)
        elif self.interleave and freqs is None:
            freqs = torch.complex(cos, sin)
        elif not self.interleave:
            freqs = None
        fused = self._fused_qkv_a()
        if fused is not None:  # q_a_proj and kv_a_proj_with_mqa in one product (see `cpu_decode_layout`)
            q_a, kv = gemv_or_linear(x, fused).split([self.q_lora_rank, self.kv_lora_rank + self.rope_dim], -1)
            return (*self._queries(x, cos, sin, freqs, q_a, rotation),
                    *self._latents(x, cos, sin, freqs, kv, rotation))
        return *self._queries(x, cos, sin, freqs, None, rotation), *self._latents(x, cos, sin, freqs, None, rotation)

    def absorbed_queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         freqs: torch.Tensor | None = None, rotation: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x `[N, D]` -> the queries of absorbed attention `[q_nope W_uk ; q_pe]` `[N, H, C + R]` (rotated), and
        the cached pair kv `[N, C]`, k_pe `[N, R]`. Arguments as in `project`.

        For one token with the absorbed query weight of `cpu_decode_layout` (still matching `q_b_proj` and
        `kv_b_proj`) and rotation matrices, the latent and rope queries come from one product of the normed
        `q_a`; otherwise `project`, then `absorb_query`."""
        absorbed = self.__dict__.get("_q_absorbed")  # single tokens only: MKL multiplies several rows slower
        fused = self._fused_qkv_a() if absorbed is not None and rotation is not None and x.shape[0] == 1 else None
        if fused is None or absorbed[1] != self._absorb_key():
            q_nope, q_pe, kv, k_pe = self.project(x, cos, sin, freqs, rotation)
            return torch.cat([self.absorb_query(q_nope), q_pe], dim=-1), kv, k_pe
        q_a, kv_a = gemv_or_linear(x, fused).split([self.q_lora_rank, self.kv_lora_rank + self.rope_dim], -1)
        q = F.linear(self.q_a_layernorm.row(q_a), absorbed[0]).view(x.shape[0], self.n_heads, -1)  # [N, H, C + R]
        q_lat, q_pe = q.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        q = torch.cat([q_lat, torch.bmm(q_pe, rotation)], dim=-1)  # [N, H, C + R]
        return q, *self._latents(x, cos, sin, None, kv_a, rotation)

    def _absorb_key(self) -> tuple:
        q_b, kv_b = self.q_b_proj.weight, self.kv_b_proj.weight
        return q_b.data_ptr(), q_b._version, kv_b.data_ptr(), kv_b._version

    def _fused_qkv_a(self) -> torch.Tensor | None:
        """The `[q_lora + kv_lora + rope, dim]` weight whose parts are `q_a_proj.weight` and
        `kv_a_proj_with_mqa.weight`, while both still live there and no gradient is wanted."""
        fused = self.__dict__.get("_qkv_a")
        if fused is None or torch.is_grad_enabled():
            return None
        weight, kv_ptr = fused
        if self.q_a_proj.weight.data_ptr() != weight.data_ptr() or self.kv_a_proj_with_mqa.weight.data_ptr() != kv_ptr:
            return None
        return weight

    def _queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, freqs: torch.Tensor | None,
                 q_a: torch.Tensor | None = None, rotation: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """`q_a`: `q_a_proj(x)` when the caller already has it."""
        if self.q_lora_rank:
            q_a = self.q_a_proj(x) if q_a is None else q_a
            q = decode_linear(self.q_a_layernorm.row(q_a), self.q_b_proj)
        else:
            q = self.q_proj(x)
        q = q.unflatten(-1, (self.n_heads, self.qk_dim))
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        if rotation is not None:
            return q_nope, torch.bmm(q_pe, rotation)  # [N, H, R] x [N, R, R]
        if freqs is not None:
            return q_nope, _rotate(q_pe, freqs.unsqueeze(-2))
        return q_nope, apply_rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2), self.interleave)

    def _latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, freqs: torch.Tensor | None,
                 kv_a: torch.Tensor | None = None, rotation: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """`kv_a`: `kv_a_proj_with_mqa(x)` when the caller already has it."""
        kv_a = self.kv_a_proj_with_mqa(x) if kv_a is None else kv_a
        kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        if rotation is not None:
            k_pe = torch.bmm(k_pe.unsqueeze(1), rotation).squeeze(1)  # [N, 1, R] x [N, R, R]
        elif freqs is not None:
            k_pe = _rotate(k_pe, freqs)
        else:
            k_pe = apply_rope(k_pe, cos, sin, self.interleave)
        return self.kv_a_layernorm.row(kv), k_pe

    def _kv_b_halves(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`kv_b_proj` as per-head `W_uk [H, nope, C]` and `W_uv^T [H, C, v]` (views of the weight; FP8
        dequantized).

        In inference mode the views of a plain weight are kept and reused while the weight's storage, version
        and dtype stay the same (they cost a few small ops per call otherwise)."""
        weight = self.kv_b_proj.weight
        plain = getattr(self.kv_b_proj, "weight_scale_inv", None) is None and weight.dtype == dtype
        key = None
        if plain and torch.is_inference_mode_enabled():
            key = (weight.data_ptr(), weight._version, weight.stride(), dtype)
            cached = self.__dict__.get("_kv_b_views")
            if cached is not None and cached[0] == key:
                return cached[1]
        w = dense_weight(self.kv_b_proj, dtype).unflatten(0, (self.n_heads, self.nope_dim + self.v_dim))
        halves = (w[:, : self.nope_dim], w[:, self.nope_dim:].transpose(1, 2))
        if key is not None:
            self.__dict__["_kv_b_views"] = (key, halves)
        return halves

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope `[..., H, nope]` -> latent query `[..., H, kv_lora_rank]` (`q_nope W_uk`, one batched matmul
        over heads)."""
        w_uk = self._kv_b_halves(q_nope.dtype)[0]
        weight = self.kv_b_proj.weight
        if (q_nope.numel() == self.n_heads * self.nope_dim and weight.is_contiguous() and weight.dtype == torch.float32
                and q_nope.dtype == torch.float32 and not weight.is_cuda and w_uk.data_ptr() == weight.data_ptr()
                and not torch.is_grad_enabled()):
            # one token: one embedding bag per head over that head's W_uk rows of the row-major kv_b weight
            q_lat = torch.embedding_bag(weight, self._absorb_rows(), bag_offsets(self.n_heads, self.nope_dim),
                                        False, 0, False, q_nope.reshape(-1), False, None)[0]  # [H, C]
            return q_lat.view(*q_nope.shape[:-1], -1)
        flat = q_nope if q_nope.dim() == 3 else q_nope.reshape(-1, self.n_heads, self.nope_dim)  # [M, H, nope]
        q_lat = torch.bmm(flat.transpose(0, 1), w_uk).transpose(0, 1)  # [M, H, C]
        return q_lat if q_nope.dim() == 3 else q_lat.reshape(*q_nope.shape[:-1], -1)

    def _absorb_rows(self) -> torch.Tensor:
        """`[H * nope]` rows of `kv_b_proj.weight` holding W_uk, head by head (cached)."""
        rows = self.__dict__.get("_absorb_index")
        if rows is None:
            per_head = self.nope_dim + self.v_dim
            rows = (torch.arange(self.n_heads)[:, None] * per_head + torch.arange(self.nope_dim)).flatten()
            self.__dict__["_absorb_index"] = rows
        return rows

    def latent_output(self, o_lat: torch.Tensor) -> torch.Tensor:
        """Attention output in latent space `[..., H, kv_lora_rank]` -> `[..., D]` (`W_uv`, then `o_proj`)."""
        uv_t = self.__dict__.get("_uv_t")
        weight = self.kv_b_proj.weight
        if (uv_t is not None and o_lat.numel() == self.n_heads * self.kv_lora_rank and o_lat.dtype == torch.float32
                and not torch.is_grad_enabled() and uv_t[1:] == (weight.data_ptr(), weight._version)):
            # one token: one embedding bag per head over the rows of its W_uv^T copy (see `cpu_decode_layout`)
            o = torch.embedding_bag(uv_t[0], self._output_rows(), bag_offsets(self.n_heads, self.kv_lora_rank),
                                    False, 0, False, o_lat.reshape(-1), False, None)[0]  # [H, v]
            return decode_linear(o.view(*o_lat.shape[:-2], self.n_heads * self.v_dim), self.o_proj)
        w_uv_t = self._kv_b_halves(o_lat.dtype)[1]
        flat = o_lat if o_lat.dim() == 3 else o_lat.reshape(-1, self.n_heads, self.kv_lora_rank)  # [M, H, C]
        o = torch.bmm(flat.transpose(0, 1), w_uv_t)  # [H, M, v]
        o = o.transpose(0, 1).reshape(*o_lat.shape[:-2], self.n_heads * self.v_dim)  # [..., H * v]
        return decode_linear(o, self.o_proj)

    def _output_rows(self) -> torch.Tensor:
        """`arange(H * kv_lora_rank)`: every row of the W_uv^T copy, head by head (cached)."""
        rows = self.__dict__.get("_output_index")
        if rows is None:
            rows = self.__dict__["_output_index"] = torch.arange(self.n_heads * self.kv_lora_rank)
        return rows

    def attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
               mask: torch.Tensor | None, absorb: bool = True) -> torch.Tensor:
        """Queries `[B, T, H, .]` over cached latents kv `[B, S, C]`, k_pe `[B, S, R]`; mask `[T, S]` or
        `[B, T, S]` additive (or None = attend to all). Returns `[B, T, D]`."""
        if absorb:
            q_lat = self.absorb_query(q_nope)  # [B, T, H, C]
            scores = torch.einsum("bthc,bsc->bhts", q_lat, kv) + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)
            probs = self._softmax(scores, mask)
            o_lat = torch.einsum("bhts,bsc->bthc", probs.to(kv.dtype), kv)
            return self.latent_output(o_lat)
        kv_full = self.kv_b_proj(kv).unflatten(-1, (self.n_heads, self.nope_dim + self.v_dim))  # [B, S, H, nope+v]
        k_nope, v = kv_full.split([self.nope_dim, self.v_dim], dim=-1)
        scores = torch.einsum("bthd,bshd->bhts", q_nope, k_nope) + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)
        probs = self._softmax(scores, mask)
        o = torch.einsum("bhts,bshd->bthd", probs.to(v.dtype), v)  # [B, T, H, v]
        return self.o_proj(o.flatten(-2))

    def _softmax(self, scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        scores = scores.float() * self.softmax_scale  # [B, H, T, S]
        if mask is not None:
            scores = scores + (mask.unsqueeze(1) if mask.dim() == 3 else mask)
        return F.softmax(scores, dim=-1)

    # ---- self-contained path -----------------------------------------------------------------
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: LatentCache | None = None, start_pos: int = 0, absorb: bool = True) -> torch.Tensor:
        """x `[B, T, D]` -> `[B, T, D]`. With a cache, the new latents are stored at `start_pos` and the
        queries attend over everything cached for these rows."""
        q_nope, q_pe, kv, k_pe = self.project(x, cos, sin)
        if cache is not None:
            kv, k_pe = cache.update(kv, k_pe, start_pos)
        return self.attend(q_nope, q_pe, kv, k_pe, mask, absorb)
