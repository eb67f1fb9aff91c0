"""Triton kernels of an MLA decode step: paged latent attention (split-K) and the fused ops around it.

`mla_decode.py` holds the PyTorch references and the wrappers that call in here.

- `_mla_decode_kernel`, grid (sequence, head group, split): absorbed queries `q_lat [B, H, C]`,
  `q_pe [B, H, R]` attend over the sequence's latents in the paged cache `[blocks, page, C + R]`
  through its block table; the latent is both key (with the rope key) and value, so one pass over the
  cache reads each token's 576 numbers once for a group of heads. Online softmax in fp32 (exp2).
  With several splits each program covers a slice of the context and writes its normalised partial
  output and log-sum-exp; `_combine_kernel` merges them.
- `_rmsnorm_kernel`: optional residual add (`x + r` rounded to the model dtype, as the block does), then
  RMSNorm with the reference's roundings.
- `_rope_kernel`: rotary embedding in place on `[N, H, R]` (interleaved pairs or halves).
- `_latent_kernel`: `kv_a_proj_with_mqa` output `[N, C + R]` -> RMSNorm on the latent, rope on the key,
  written to a contiguous output and (for slots >= 0) to the paged cache.
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: mla_decode.py uses the references
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634


def available() -> bool:
    """True when the kernels can run: Triton importable and a CUDA device (or the interpreter)."""
    return triton is not None and (torch.cuda.is_available() or _INTERPRET)


if triton is not None:

    @triton.jit(do_not_specialize=["H", "stride_qb", "stride_qh", "stride_pb", "stride_ob", "stride_oh"])
    def _mla_decode_kernel(
        q_ptr, qpe_ptr, cache_ptr, bt_ptr, lens_ptr, out_ptr, part_ptr, lse_ptr,
        H, C, R, PAGE, scale_log2,
        stride_qb, stride_qh, stride_pb, stride_ph, stride_cblk, stride_ctok, stride_bt, stride_ob, stride_oh,
        BH: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, SPLITS: tl.constexpr,
        PREC: tl.constexpr,
    ):
        b = tl.program_id(0)
        heads = tl.program_id(1) * BH + tl.arange(0, BH)
        split = tl.program_id(2)
        length = tl.load(lens_ptr + b)
        per = tl.cdiv(tl.cdiv(length, SPLITS), BN) * BN
        start = split * per
        end = tl.minimum(length, start + per)
        hm = heads < H
        offs_c = tl.arange(0, BC)
        offs_r = tl.arange(0, BR)
        cm = offs_c < C
        rm = offs_r < R
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_c[None, :],
                    mask=hm[:, None] & cm[None, :], other=0.0)  # [BH, BC]
        qp = tl.load(qpe_ptr + b * stride_pb + heads[:, None] * stride_ph + offs_r[None, :],
                     mask=hm[:, None] & rm[None, :], other=0.0)  # [BH, BR]
        m_i = tl.full((BH,), float("-inf"), tl.float32)
        l_i = tl.zeros((BH,), tl.float32)
        acc = tl.zeros((BH, BC), tl.float32)
        for n0 in range(start, end, BN):
            pos = n0 + tl.arange(0, BN)
            pm = pos < end
            blk = tl.load(bt_ptr + b * stride_bt + pos // PAGE, mask=pm, other=0)
            row = blk.to(tl.int64) * stride_cblk + (pos % PAGE) * stride_ctok
            kv = tl.load(cache_ptr + row[:, None] + offs_c[None, :], mask=pm[:, None] & cm[None, :], other=0.0)
            kp = tl.load(cache_ptr + row[:, None] + C + offs_r[None, :], mask=pm[:, None] & rm[None, :], other=0.0)
            s = tl.dot(q, tl.trans(kv), input_precision=PREC)
            s = tl.dot(qp, tl.trans(kp), s, input_precision=PREC)  # [BH, BN]
            s = tl.where(pm[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(kv.dtype), kv, acc, input_precision=PREC)
            m_i = m_new
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        o = acc / safe_l[:, None]
        if SPLITS == 1:
            tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_c[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=hm[:, None] & cm[None, :])
        else:
            base = (b * H + heads) * SPLITS + split  # [BH]
            tl.store(part_ptr + base[:, None].to(tl.int64) * BC + offs_c[None, :], o, mask=hm[:, None])
            lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
            tl.store(lse_ptr + base, lse, mask=hm)

    @triton.jit(do_not_specialize=["H", "stride_ob", "stride_oh"])
    def _combine_kernel(part_ptr, lse_ptr, out_ptr, H, C, stride_ob, stride_oh,
                        SPLITS: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BS)
        offs_c = tl.arange(0, BC)
        base = (b * H + h) * SPLITS
        lse = tl.load(lse_ptr + base + offs_s, mask=offs_s < SPLITS, other=float("-inf"))
        m = tl.max(lse, 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse - m)  # 0 for empty splits
        total = tl.sum(w, 0)
        part = tl.load(part_ptr + (base + offs_s[:, None]).to(tl.int64) * BC + offs_c[None, :],
                       mask=offs_s[:, None] < SPLITS, other=0.0)
        o = tl.sum(part * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_c, o.to(out_ptr.dtype.element_ty), mask=offs_c < C)

    @triton.jit
    def _rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, D, eps,
                        stride_x, stride_r, stride_o, stride_ro, HAS_RES: tl.constexpr, BD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BD)
        m = offs < D
        x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0)
        dt = x.dtype
        if HAS_RES:
            r = tl.load(res_ptr + row * stride_r + offs, mask=m, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(dt)
            tl.store(res_out_ptr + row * stride_ro + offs, x, mask=m)
        xf = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, 0) / D + eps)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        y = (xf * inv).to(dt).to(tl.float32) * w
        tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _pair_offsets(HALF: tl.constexpr, BHALF: tl.constexpr, INTERLEAVE: tl.constexpr):
        i = tl.arange(0, BHALF)
        if INTERLEAVE:
            return i, 2 * i, 2 * i + 1
        return i, i, i + HALF

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, H, stride_xn, stride_xh, stride_cn,
                     HALF: tl.constexpr, BHALF: tl.constexpr, BH: tl.constexpr, INTERLEAVE: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        heads = tl.arange(0, BH)
        i, ia, ib = _pair_offsets(HALF, BHALF, INTERLEAVE)
        im = i < HALF
        cos = tl.load(cos_ptr + n * stride_cn + i, mask=im, other=0.0)[None, :]
        sin = tl.load(sin_ptr + n * stride_cn + i, mask=im, other=0.0)[None, :]
        mask = (heads[:, None] < H) & im[None, :]
        base = x_ptr + n * stride_xn + heads[:, None] * stride_xh
        a = tl.load(base + ia[None, :], mask=mask, other=0.0)
        b = tl.load(base + ib[None, :], mask=mask, other=0.0)
        af = a.to(tl.float32)
        bf = b.to(tl.float32)
        tl.store(base + ia[None, :], (af * cos - bf * sin).to(a.dtype), mask=mask)
        tl.store(base + ib[None, :], (af * sin + bf * cos).to(a.dtype), mask=mask)

    @triton.jit
    def _latent_kernel(kva_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, cache_ptr, slots_ptr, C, eps,
                       stride_kn, stride_cn, stride_on, stride_slot,
                       HALF: tl.constexpr, BHALF: tl.constexpr, BC: tl.constexpr, INTERLEAVE: tl.constexpr,
                       HAS_CACHE: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BC)
        m = offs < C
        kv = tl.load(kva_ptr + n * stride_kn + offs, mask=m, other=0.0)
        dt = kv.dtype
        xf = kv.to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, 0) / C + eps)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        y = ((xf * inv).to(dt).to(tl.float32) * w).to(dt)
        i, ia, ib = _pair_offsets(HALF, BHALF, INTERLEAVE)
        im = i < HALF
        cos = tl.load(cos_ptr + n * stride_cn + i, mask=im, other=0.0)
        sin = tl.load(sin_ptr + n * stride_cn + i, mask=im, other=0.0)
        a = tl.load(kva_ptr + n * stride_kn + C + ia, mask=im, other=0.0).to(tl.float32)
        b = tl.load(kva_ptr + n * stride_kn + C + ib, mask=im, other=0.0).to(tl.float32)
        ra = (a * cos - b * sin).to(dt)
        rb = (a * sin + b * cos).to(dt)
        tl.store(out_ptr + n * stride_on + offs, y, mask=m)
        tl.store(out_ptr + n * stride_on + C + ia, ra, mask=im)
        tl.store(out_ptr + n * stride_on + C + ib, rb, mask=im)
        if HAS_CACHE:
            slot = tl.load(slots_ptr + n)
            if slot >= 0:
                dst = cache_ptr + slot.to(tl.int64) * stride_slot
                tl.store(dst + offs, y.to(cache_ptr.dtype.element_ty), mask=m)
                tl.store(dst + C + ia, ra.to(cache_ptr.dtype.element_ty), mask=im)
                tl.store(dst + C + ib, rb.to(cache_ptr.dtype.element_ty), mask=im)


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _prec(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def num_splits_for(batch: int, n_heads: int, block_h: int = 16, sms: int = 132) -> int:
    """Splits of the context so that the grid fills the GPU (a function of the batch only: graph-safe)."""
    programs = batch * math.ceil(n_heads / block_h)
    return max(1, min(16, triton.next_power_of_2(max(1, (2 * sms) // max(1, programs)))))


def mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
               seq_lens: torch.Tensor, scale: float, num_splits: int | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Shapes checked by the wrapper; see `mla_decode.mla_decode`."""
    b, h, c = q_lat.shape
    r = q_pe.shape[-1]
    page = cache.shape[1]
    if out is None:
        out = torch.empty(b, h, c, dtype=q_lat.dtype, device=q_lat.device)
    if b == 0:
        return out
    bh = 16
    bn = 16 if _INTERPRET else 32
    if num_splits is None:
        num_splits = num_splits_for(b, h, bh)
    bc, br = _p2(c), _p2(r)
    if num_splits > 1:
        part = torch.empty(b * h * num_splits, bc, dtype=torch.float32, device=q_lat.device)
        lse = torch.empty(b * h * num_splits, dtype=torch.float32, device=q_lat.device)
    else:
        part = lse = out
    grid = (b, triton.cdiv(h, bh), num_splits)
    _mla_decode_kernel[grid](
        q_lat, q_pe, cache, block_tables, seq_lens, out, part, lse,
        h, c, r, page, float(scale) * LOG2E,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), cache.stride(0), cache.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1),
        BH=bh, BC=bc, BR=br, BN=bn, SPLITS=num_splits, PREC=_prec(q_lat),
        num_warps=8, num_stages=2,
    )
    if num_splits > 1:
        _combine_kernel[(b, h)](part, lse, out, h, c, out.stride(0), out.stride(1),
                                SPLITS=num_splits, BS=max(2, num_splits), BC=bc, num_warps=4)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x `[M, D]` (last dim contiguous) -> (normed `[M, D]`, `x + residual` or None)."""
    m, d = x.shape
    out = torch.empty(m, d, dtype=x.dtype, device=x.device)
    res_out = torch.empty(m, d, dtype=x.dtype, device=x.device) if residual is not None else None
    if m:
        bd = _p2(d)
        r = residual if residual is not None else x
        ro = res_out if res_out is not None else out
        _rmsnorm_kernel[(m,)](x, r, weight, out, ro, d, float(eps), x.stride(0), r.stride(0), out.stride(0),
                              ro.stride(0), HAS_RES=residual is not None, BD=bd,
                              num_warps=8 if bd >= 4096 else 4)
    return out, res_out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """In place on x `[N, H, R]` (last dim contiguous); cos/sin `[N, R/2]` fp32."""
    n, h, r = x.shape
    if n:
        half = r // 2
        _rope_kernel[(n,)](x, cos, sin, h, x.stride(0), x.stride(1), cos.stride(0),
                           HALF=half, BHALF=_p2(half, 2), BH=_p2(h, 2), INTERLEAVE=interleave, num_warps=4)
    return x


def store_latents(kva: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                  interleave: bool, cache: torch.Tensor | None, slots: torch.Tensor | None) -> torch.Tensor:
    """kva `[N, C + R]` -> `[N, C + R]` (normed latent, rotated key); also into `cache [slots, C + R]`."""
    n, width = kva.shape
    c = weight.shape[0]
    half = (width - c) // 2
    out = torch.empty(n, width, dtype=kva.dtype, device=kva.device)
    if n:
        has_cache = cache is not None
        _latent_kernel[(n,)](
            kva, weight, cos, sin, out, cache if has_cache else out, slots if has_cache else out, c, float(eps),
            kva.stride(0), cos.stride(0), out.stride(0), cache.stride(0) if has_cache else 0,
            HALF=half, BHALF=_p2(half, 2), BC=_p2(c), INTERLEAVE=interleave, HAS_CACHE=has_cache, num_warps=4,
        )
    return out
