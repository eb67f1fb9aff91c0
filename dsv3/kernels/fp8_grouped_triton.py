"""Triton kernels of the FP8 grouped GEMM used in training (`dsv3.train.fp8_grouped`), for Hopper (sm90).

Rows of the activations are sorted by expert; `offsets[E]` (int32, on the device) holds the end row of each
expert. No kernel reads it on the host: each program finds its expert from `offsets` itself (a cumulative
sum over the padded expert axis), so every grid is static and nothing syncs. The row tiles of an expert start
at its first row (`_tile_of`); a grid over `cdiv(M, BM) + E` tiles covers any split, programs past the last
tile return at once.

- `quant_act(x, offsets, rows, cols)`: one pass over `x [M, K]` in 128x128 tiles that writes, as asked,
  the 1x128 row tiles (`q [M, K]` e4m3, scales `[K/128, M]`: the operand of forward and dgrad) and the
  128x1 column tiles, transposed (`qt [K, P]` e4m3 with the rows of tile t at columns `t*128...`, zero padded
  to whole tiles, scales `[T, K]`: the token-contiguous operand of wgrad). P = 128 * T, T = cdiv(M,128) + E.
- `quant_weight(w)`: `w [E, N, K]` in 128x128 blocks -> q `[E, N, K]`, its transpose `[E, K, N]` (dgrad reads
  it K-major, as FP8 wgmma and cuBLAS want; written by the same pass, 4 codes to a uint32 word) and scales
  `[E, N/128, K/128]`.
- `grouped_gemm(a, a_s, b, b_s, offsets)`: `C[rows of e] = Σ_kb (A_kb · B_e,kbᵀ) · a_s · b_s` with BLOCK_K 128:
  one FP8 tensor-core dot per 128 of K, scaled and added into an fp32 accumulator (the report's promotion).
  Forward: b = the weight; dgrad: b = its transpose with the block scales read transposed.
- `grouped_wgrad(dyt, dyt_s, xt, xt_s, offsets)`: `dW_e = Σ_t (dyᵀ_t · x_t) · s_dy,t ⊗ s_x,t` over the
  expert's 128-token tiles: one program per (expert, N tile, K tile), loop bounds read from `offsets`.

Scales: `s = amax / 448` (IEEE division; an all-zero tile gets 1), codes `x * (1 / s)` rounded to nearest e4m3
after clamping to ±448; the PyTorch reference in `fp8_grouped.py` computes exactly this, bit for bit.
Under `TRITON_INTERPRET=1` the kernels run on CPU tensors with one fixed config; the interpreter's float32 ->
e4m3 cast drops the carry when rounding up across a power of two (-125.6 -> -64), so there (EXACT) the value is
first rounded to the e4m3 grid with integer ops and the cast is exact. Byte outputs are stored as integers and
no kernel stores bytes transposed (the column tiles go 4 rows to a uint32): with Triton 3.6's ptxas a kernel that
stores an 8-bit tile both plainly and transposed corrupts the transposed copy (triton-lang/triton#11111; seen
here on the H200 with fp8 and with uint8 stores, not with the packed words).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: fp8_grouped uses the reference
    triton = None

TILE = 128  # the report's quantization tile, also BLOCK_K of every GEMM and the token tile of wgrad
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# DSV3_AUTOTUNE=quick (the tests): 2 configs per kernel instead of all, as dsv3/kernels/fp8_triton.py does
_QUICK = os.environ.get("DSV3_AUTOTUNE", "full") == "quick"
_QUICK_CONFIGS = 2


def available() -> bool:
    """True when the kernels can run: Triton importable and a CUDA device (or the interpreter)."""
    return triton is not None and (torch.cuda.is_available() or _INTERPRET)


def n_tiles(m: int, e: int, align: int = 1) -> int:
    """Static bound on the 128-row tiles of M rows split over E experts (each expert's last tile is short;
    with `align`, each expert's tile count is rounded up to a multiple of it)."""
    return -(-m // TILE) + e * align


if triton is not None:
    _E4M3_MAX = tl.constexpr(448.0)

    @triton.jit
    def _to_e4m3(x, EXACT: tl.constexpr):
        """float32 -> e4m3, nearest even, saturating at ±448."""
        x = tl.minimum(tl.maximum(x, -_E4M3_MAX), _E4M3_MAX)
        if EXACT:
            # normal range: keep 3 mantissa bits, round half to even, the carry moves into the exponent
            bits = x.to(tl.int32, bitcast=True)
            normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
            # subnormal range (|x| < 2**-6): multiples of 2**-9; 1.5 * 2**23 makes the fp32 add round to integers
            sub = ((x * 512.0 + 12582912.0) - 12582912.0) / 512.0
            x = tl.where(tl.abs(x) < 0.015625, sub, normal)
        return x.to(tl.float8e4nv)

    @triton.jit
    def _scale(amax):
        """amax -> (scale, 1 / scale); scale = amax / 448, 1 for all-zero tiles."""
        s = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
        s = tl.where(s > 0, s, 1.0)
        return s, tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)

    @triton.jit
    def _expert_table(offs_ptr, E, BM: tl.constexpr, E_PAD: tl.constexpr, ALIGN: tl.constexpr = 1):
        """Per expert (padded to E_PAD): start row, end row, tiles of BM rows (rounded up to a multiple of
        ALIGN tiles), first tile index."""
        e = tl.arange(0, E_PAD)
        ends = tl.load(offs_ptr + e, mask=e < E, other=0)
        starts = tl.load(offs_ptr + e - 1, mask=(e > 0) & (e < E), other=0)
        tiles = (ends - starts + BM * ALIGN - 1) // (BM * ALIGN) * ALIGN
        cum = tl.cumsum(tiles, 0)  # inclusive
        return e, starts, ends, tiles, cum - tiles

    @triton.jit
    def _tile_of(offs_ptr, E, t, BM: tl.constexpr, E_PAD: tl.constexpr, ALIGN: tl.constexpr = 1):
        """Tile t of the expert-major tiling -> (expert, first row, the expert's end row, the expert's first
        tile, its tile count); expert >= E past the last tile."""
        e, starts, ends, tiles, first = _expert_table(offs_ptr, E, BM, E_PAD, ALIGN)
        expert = tl.sum((first + tiles <= t).to(tl.int32), 0)  # experts whose tiles all come before t
        sel = e == expert
        first_e = tl.sum(tl.where(sel, first, 0), 0)
        row0 = tl.sum(tl.where(sel, starts, 0), 0) + (t - first_e) * BM
        row_end = tl.sum(tl.where(sel, ends, 0), 0)
        return expert, row0, row_end, first_e, tl.sum(tl.where(sel, tiles, 0), 0)

    @triton.jit
    def _quant_act_kernel(
        x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, offs_ptr,
        E, K, stride_xm, stride_qm, stride_sk, stride_qtk, stride_stt,
        ROWS: tl.constexpr, COLS: tl.constexpr, EXACT: tl.constexpr, E_PAD: tl.constexpr, BLOCK: tl.constexpr,
        PACK3D: tl.constexpr, BLOCKED: tl.constexpr = False, ALIGN: tl.constexpr = 1,
    ):
        t = tl.program_id(0)
        kb = tl.program_id(1)
        expert, row0, row_end, first, tiles = _tile_of(offs_ptr, E, t, BLOCK, E_PAD, ALIGN)
        if expert >= E:
            return
        r = tl.arange(0, BLOCK)
        rows = row0 + r
        cols = kb * BLOCK + tl.arange(0, BLOCK)
        rmask = rows < row_end
        cmask = cols < K
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        if ROWS or not PACK3D:
            x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            ax = tl.abs(x)
        if ROWS:  # 1x128 tiles: per row, over these 128 columns
            s, inv = _scale(tl.max(ax, axis=1))
            q = _to_e4m3(x * inv[:, None], EXACT).to(tl.uint8, bitcast=True)
            if BLOCKED:  # the tile's 128 row slots, padding rows as zero codes with scale 1; scales per expert
                slots = (t * BLOCK + r).to(tl.int64)
                tl.store(q_ptr + slots[:, None] * stride_qm + cols[None, :], q, mask=cmask[None, :])
                kbs = tl.cdiv(K, BLOCK)
                base = first.to(tl.int64) * BLOCK * kbs + kb * (tiles * BLOCK) + (t - first) * BLOCK
                tl.store(s_ptr + base + r, s)
            else:
                tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q, mask=mask)
                tl.store(s_ptr + kb * stride_sk + rows, s, mask=rmask)
        if COLS:  # 128x1 tiles: per column, over this tile's rows (padding rows are zeros)
            # 4 consecutive rows -> one little-endian uint32, so the transpose moves 32-bit words, not bytes
            shift = (tl.arange(0, 4) * 8).to(tl.uint32)
            if PACK3D:  # load the tile as [row groups, 4, cols]: the packing sums along an axis of the load layout
                rows3 = row0 + tl.arange(0, BLOCK // 4)[:, None, None] * 4 + tl.arange(0, 4)[None, :, None]
                mask3 = (rows3 < row_end) & cmask[None, None, :]
                x3 = tl.load(x_ptr + rows3.to(tl.int64) * stride_xm + cols[None, None, :], mask=mask3, other=0.0)
                x3 = x3.to(tl.float32)
                s, inv = _scale(tl.max(tl.max(tl.abs(x3), axis=1), axis=0))
                q4 = _to_e4m3(x3 * inv[None, None, :], EXACT).to(tl.uint8, bitcast=True).to(tl.uint32)
            else:
                s, inv = _scale(tl.max(ax, axis=0))
                q = _to_e4m3(x * inv[None, :], EXACT).to(tl.uint8, bitcast=True).to(tl.uint32)
                q4 = tl.reshape(q, (BLOCK // 4, 4, BLOCK))  # [row groups, 4, cols]
            packed = tl.sum(q4 << shift[None, :, None], axis=1)  # [BLOCK / 4, BLOCK], disjoint bytes
            if BLOCKED:  # expert e's codes as one [K, tiles * 128] row-major block from tile `first`
                slot = ((t - first) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)).to(tl.int64)
                base = first.to(tl.int64) * (BLOCK // 4) * K
                ptrs = qt_ptr + base + cols.to(tl.int64)[None, :] * (tiles * (BLOCK // 4)) + slot[:, None]
            else:
                slot = (t * (BLOCK // 4) + tl.arange(0, BLOCK // 4)).to(tl.int64)
                ptrs = qt_ptr + cols.to(tl.int64)[None, :] * (stride_qtk // 4) + slot[:, None]
            tl.store(ptrs, packed, mask=cmask[None, :])
            tl.store(st_ptr + t * stride_stt + cols, s, mask=cmask)

    @triton.jit
    def _quant_weight_kernel(
        w_ptr, q_ptr, qt_ptr, s_ptr,
        N, K, stride_we, stride_wn, stride_qe, stride_qn, stride_se, stride_sn,
        EXACT: tl.constexpr, BLOCK: tl.constexpr, TRANSPOSE: tl.constexpr,
    ):
        e = tl.program_id(0).to(tl.int64)
        nb = tl.program_id(1)
        kb = tl.program_id(2)
        rows = nb * BLOCK + tl.arange(0, BLOCK)
        cols = kb * BLOCK + tl.arange(0, BLOCK)
        mask = (rows[:, None] < N) & (cols[None, :] < K)
        w = tl.load(w_ptr + e * stride_we + rows[:, None] * stride_wn + cols[None, :], mask=mask, other=0.0)
        w = w.to(tl.float32)
        amax = tl.zeros((BLOCK,), tl.float32) + tl.max(tl.max(tl.abs(w), axis=1), axis=0)  # the block's, per row
        s, inv = _scale(amax)
        q = _to_e4m3(w * inv[:, None], EXACT).to(tl.uint8, bitcast=True)  # byte stores as integers (see above)
        tl.store(q_ptr + e * stride_qe + rows[:, None] * stride_qn + cols[None, :], q, mask=mask)
        tl.store(s_ptr + e * stride_se + nb * stride_sn + kb, tl.max(s, axis=0))
        if TRANSPOSE:  # the codes transposed, [E, K, N]: 4 consecutive rows packed into one uint32 (N % 4 == 0)
            # the block is read again as [row groups, 4, cols] (as quant_act's PACK3D): packing the stored tile
            # itself gave wrong words on the H200 (the ptxas issue in the module docstring)
            shift = (tl.arange(0, 4) * 8).to(tl.uint32)
            rows3 = nb * BLOCK + tl.arange(0, BLOCK // 4)[:, None, None] * 4 + tl.arange(0, 4)[None, :, None]
            mask3 = (rows3 < N) & (cols[None, None, :] < K)
            w3 = tl.load(w_ptr + e * stride_we + rows3 * stride_wn + cols[None, None, :], mask=mask3, other=0.0)
            q4 = _to_e4m3(w3.to(tl.float32) * tl.max(inv, axis=0), EXACT).to(tl.uint8, bitcast=True).to(tl.uint32)
            packed = tl.sum(q4 << shift[None, :, None], axis=1)  # [BLOCK / 4, BLOCK]
            groups = nb * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
            ptrs = qt_ptr + e * (K * (N // 4)) + cols.to(tl.int64)[None, :] * (N // 4) + groups[:, None]
            tl.store(ptrs, packed, mask=(groups[:, None] < N // 4) & (cols[None, :] < K))

    @triton.jit
    def _grouped_gemm_kernel(
        a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, offs_ptr,
        E, N, K, M_BUCKET,
        stride_am, stride_ask, stride_be, stride_bn, stride_bse, stride_bsn, stride_bsk, stride_cm,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_PAD: tl.constexpr,
        EVEN_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        grid_n = tl.cdiv(N, BLOCK_N)
        t = pid // grid_n  # consecutive programs share the A tile (and the expert's B in L2)
        pid_n = pid % grid_n
        expert, row0, row_end, _, _ = _tile_of(offs_ptr, E, t, BLOCK_M, E_PAD)
        if expert >= E:
            return
        offs_m = row0 + tl.arange(0, BLOCK_M)
        rows = tl.minimum(offs_m, row_end - 1).to(tl.int64)  # rows past the expert repeat its last: no load mask
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_b = offs_n % N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]  # [BM, BK]
        b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + cols_b[:, None] * stride_bn + offs_k[None, :]  # [BN, BK]
        as_ptrs = as_ptr + rows  # [BM] scales of k-block 0 ([K/128, M] layout)
        bs_base = bs_ptr + expert * stride_bse
        bs_ptrs = bs_base + (cols_b // BLOCK_K) * stride_bsn  # [BN]
        bs_ptr1 = bs_base + (pid_n * BLOCK_N // BLOCK_K) * stride_bsn  # scalar when BN <= 128
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_left = K - kt * BLOCK_K
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                b = tl.load(b_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            a_s = tl.load(as_ptrs + kt * stride_ask)
            if BLOCK_N <= BLOCK_K:
                acc += tl.dot(a, tl.trans(b)) * (a_s * tl.load(bs_ptr1 + kt * stride_bsk))[:, None]
            else:
                acc += tl.dot(a, tl.trans(b)) * (a_s[:, None] * tl.load(bs_ptrs + kt * stride_bsk)[None, :])
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < row_end) & (offs_n[None, :] < N))

    @triton.jit
    def _wgrad_program(offs_ptr, E, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
                       E_PAD: tl.constexpr):
        """A wgrad program's (expert, n-tile, k-tile) and its expert's first token tile and tile count."""
        pid = tl.program_id(0)
        grid_n = tl.cdiv(N, BLOCK_N)
        grid_k = tl.cdiv(K, BLOCK_K)
        expert = pid // (grid_n * grid_k)
        rest = pid % (grid_n * grid_k)
        e, starts, ends, tiles, first = _expert_table(offs_ptr, E, BLOCK_T, E_PAD)
        sel = e == expert
        t0 = tl.sum(tl.where(sel, first, 0), 0)
        count = tl.sum(tl.where(sel, tiles, 0), 0)
        return expert, rest // grid_k, rest % grid_k, t0, count

    @triton.jit
    def _grouped_wgrad_kernel(
        a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, offs_ptr,
        E, N, K, M_BUCKET,
        stride_an, stride_ast, stride_bk, stride_bst, stride_ce, stride_cn,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr,
    ):
        expert, pid_n, pid_k, t0, count = _wgrad_program(offs_ptr, E, N, K, BLOCK_N, BLOCK_K, BLOCK_T, E_PAD)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        rows_a = offs_n % N
        rows_b = offs_k % K
        slot = (t0 * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        a_ptrs = a_ptr + rows_a.to(tl.int64)[:, None] * stride_an + slot[None, :]  # [BN, BT] dyᵀ
        b_ptrs = b_ptr + rows_b.to(tl.int64)[:, None] * stride_bk + slot[None, :]  # [BK, BT] xᵀ
        as_ptrs = as_ptr + t0 * stride_ast + rows_a  # [BN]
        bs_ptrs = bs_ptr + t0 * stride_bst + rows_b  # [BK]
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for _ in range(0, count):
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
            a_s = tl.load(as_ptrs)
            b_s = tl.load(bs_ptrs)
            acc += tl.dot(a, tl.trans(b)) * (a_s[:, None] * b_s[None, :])
            a_ptrs += BLOCK_T
            b_ptrs += BLOCK_T
            as_ptrs += stride_ast
            bs_ptrs += stride_bst
        c_ptrs = c_ptr + expert.to(tl.int64) * stride_ce + offs_n[:, None] * stride_cn + offs_k[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))

    @triton.jit
    def _grouped_gemm_tma_kernel(
        a_desc, as_ptr, b_desc, bs_ptr, c_ptr, offs_ptr,
        E, N, K, M_BUCKET,
        stride_ask, stride_bse, stride_bsn, stride_bsk, stride_cm,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_PAD: tl.constexpr,
    ):
        # _grouped_gemm_kernel with A and B tiles through TMA: b_desc views B as [E * N, K]; rows past the
        # expert (A) or past N (B, the next expert's) are read but never stored, reads past the end are zeros
        pid = tl.program_id(0)
        grid_n = tl.cdiv(N, BLOCK_N)
        t = pid // grid_n
        pid_n = pid % grid_n
        expert, row0, row_end, _, _ = _tile_of(offs_ptr, E, t, BLOCK_M, E_PAD)
        if expert >= E:
            return
        offs_m = row0 + tl.arange(0, BLOCK_M)
        as_ptrs = as_ptr + tl.minimum(offs_m, row_end - 1)  # [BM]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_b = expert * N + pid_n * BLOCK_N
        bs_base = bs_ptr + expert * stride_bse
        bs_ptrs = bs_base + ((offs_n % N) // BLOCK_K) * stride_bsn  # [BN]
        bs_ptr1 = bs_base + (pid_n * BLOCK_N // BLOCK_K) * stride_bsn
        acc = _tma_mainloop(a_desc, b_desc, as_ptrs, bs_ptrs, bs_ptr1, row0, row_b, K, stride_ask, stride_bsk,
                            BLOCK_M, BLOCK_N, BLOCK_K)
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < row_end) & (offs_n[None, :] < N))

    @triton.jit
    def _tma_mainloop(a_desc, b_desc, as_ptrs, bs_ptrs, bs_ptr1, row0, row_b, K, stride_ask, stride_bsk,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Σ over 128-blocks of K of the FP8 dot times its row and block scales (fp32 promotion per block)."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(0, tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([row0, kt * BLOCK_K])  # [BM, BK]
            b = b_desc.load([row_b, kt * BLOCK_K])  # [BN, BK], K-major
            a_s = tl.load(as_ptrs + kt * stride_ask)
            if BLOCK_N <= BLOCK_K:
                acc += tl.dot(a, b.T) * (a_s * tl.load(bs_ptr1 + kt * stride_bsk))[:, None]
            else:
                acc += tl.dot(a, b.T) * (a_s[:, None] * tl.load(bs_ptrs + kt * stride_bsk)[None, :])
        return acc

    @triton.jit
    def _grouped_wgrad_tma_kernel(
        a_desc, as_ptr, b_desc, bs_ptr, c_ptr, offs_ptr,
        E, N, K, M_BUCKET,
        stride_ast, stride_bst, stride_ce, stride_cn,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr,
    ):
        # _grouped_wgrad_kernel with the dyᵀ and xᵀ tiles through TMA
        expert, pid_n, pid_k, t0, count = _wgrad_program(offs_ptr, E, N, K, BLOCK_N, BLOCK_K, BLOCK_T, E_PAD)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        as_ptrs = as_ptr + t0 * stride_ast + offs_n % N
        bs_ptrs = bs_ptr + t0 * stride_bst + offs_k % K
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for i in range(0, count):
            a = a_desc.load([pid_n * BLOCK_N, (t0 + i) * BLOCK_T])  # [BN, BT]
            b = b_desc.load([pid_k * BLOCK_K, (t0 + i) * BLOCK_T])  # [BK, BT]
            a_s = tl.load(as_ptrs + i * stride_ast)
            b_s = tl.load(bs_ptrs + i * stride_bst)
            acc += tl.dot(a, b.T) * (a_s[:, None] * b_s[None, :])
        c_ptrs = c_ptr + expert.to(tl.int64) * stride_ce + offs_n[:, None] * stride_cn + offs_k[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))

    def _cfg(meta: dict, stages: int, warps: int, hook=None):
        return triton.Config(meta, num_stages=stages, num_warps=warps, pre_hook=hook)

    def _gemm_blocks(nargs):
        nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        nargs["b_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]

    def _wgrad_blocks(nargs):
        nargs["a_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_T"]]
        nargs["b_desc"].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_T"]]

    # (BLOCK_M, BLOCK_N, stages, warps); quick mode keeps the last two. Measured on the H200 (MOE_1B shapes): small
    # tiles win, 3 CTAs per SM hide the per-block promotion; 128x256 tiles spill, 128x128 x 8 warps fits 1 CTA per SM
    _GEMM = [(128, 128, 3, 8), (64, 64, 3, 4), (64, 128, 2, 4), (64, 128, 4, 4), (64, 128, 3, 4)]
    # (BLOCK_N, BLOCK_K, stages, warps)
    _WGRAD = [(128, 128, 3, 8), (64, 256, 3, 8), (64, 64, 3, 4), (64, 128, 2, 4), (64, 128, 4, 4), (64, 128, 3, 4)]

    def _configs(table, names, hook=None):
        configs = [_cfg(dict(zip(names, c[:2])), c[2], c[3], hook) for c in table]
        return configs[-_QUICK_CONFIGS:] if _QUICK else configs

    _KEY = ["M_BUCKET", "N", "K"]
    _even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
    _gemm_tuned = triton.autotune(_configs(_GEMM, ("BLOCK_M", "BLOCK_N")), _KEY)(_even_k(_grouped_gemm_kernel))
    _gemm_fixed = _even_k(_grouped_gemm_kernel)
    _gemm_tma_tuned = triton.autotune(_configs(_GEMM, ("BLOCK_M", "BLOCK_N"), _gemm_blocks), _KEY)(
        _grouped_gemm_tma_kernel)
    _wgrad_tuned = triton.autotune(_configs(_WGRAD, ("BLOCK_N", "BLOCK_K")), _KEY)(_grouped_wgrad_kernel)
    _wgrad_tma_tuned = triton.autotune(_configs(_WGRAD, ("BLOCK_N", "BLOCK_K"), _wgrad_blocks), _KEY)(
        _grouped_wgrad_tma_kernel)


def _e_pad(e: int) -> int:
    return max(2, triton.next_power_of_2(e))


# quant_act's column tiles loaded a second time as [32, 4, 128], the 4 packed rows along an axis of the load: on the
# H200 (x [131072, 1024] bf16) rows + columns 0.240 ms against 0.284 ms packing from the 2-D tile
QUANT_PACK3D = True
QUANT_WARPS = 8


def quant_act(x: torch.Tensor, offsets: torch.Tensor, rows: bool = True, cols: bool = True,
              num_warps: int | None = None, pack3d: bool | None = None, blocked: bool = False, align: int = 1):
    """x `[M, K]` (any float dtype) -> (q, s, qt, st); the parts not asked for are None.

    Flat layout (the Triton GEMMs): q `[M, K]`, s `[K/128, M]`, qt `[K, P]` (P = 128 T) holding each expert's
    128-row tiles from its first row, transposed, padding rows zero; st `[T, K]`. Tile slots past the experts'
    last tile are left unwritten.
    Blocked layout (`blocked`, the per-expert cuBLAS GEMMs): each expert owns `R_e = 128 * tiles_e` row slots
    from slot `128 * first_e` (tiles_e rounded up to a multiple of `align`), so every expert's operand is one
    contiguous block whose rows and contraction are whole tiles: q `[128 T, K]` (padding rows: zero codes,
    scale 1), s flat with expert e's scales as a `[K/128, R_e]` row-major block from `128 * first_e * K/128`, qt
    flat with expert e's codes as a `[K, R_e]` row-major block from `128 * first_e * K`, st `[T, K]` as flat."""
    m, k = x.shape
    e = offsets.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    kb = -(-k // TILE)
    t = n_tiles(m, e, align)
    dev = x.device
    slots = t * TILE if blocked else m
    q = torch.empty(slots, k, dtype=torch.float8_e4m3fn, device=dev) if rows else None
    if rows:
        s = torch.empty(slots * kb, dtype=torch.float32, device=dev) if blocked else \
            torch.empty(kb, m, dtype=torch.float32, device=dev)
    else:
        s = None
    if cols:
        qt = torch.empty(k * t * TILE, dtype=torch.float8_e4m3fn, device=dev) if blocked else \
            torch.empty(k, t * TILE, dtype=torch.float8_e4m3fn, device=dev)
    else:
        qt = None
    st = torch.empty(t, k, dtype=torch.float32, device=dev) if cols else None
    if m and (rows or cols):
        dummy = torch.empty(1, 1, dtype=torch.float8_e4m3fn, device=dev)
        dummy_s = torch.empty(1, 1, dtype=torch.float32, device=dev)
        qq, ss, qqt, sst = (q if rows else dummy, s if rows else dummy_s, qt if cols else dummy,
                            st if cols else dummy_s)
        qq, qqt = qq.view(torch.uint8), (qqt.view(torch.int32) if cols else qqt.view(torch.uint8))
        _quant_act_kernel[(t, kb)](
            x, qq, ss, qqt, sst, offsets, e, k, x.stride(0), qq.stride(0), ss.stride(0), t * TILE, sst.stride(0),
            ROWS=rows, COLS=cols, EXACT=_INTERPRET, E_PAD=_e_pad(e), BLOCK=TILE,
            PACK3D=QUANT_PACK3D if pack3d is None else pack3d, BLOCKED=blocked, ALIGN=align,
            num_warps=num_warps or QUANT_WARPS,
        )
    return q, s, qt, st


def quant_weight(w: torch.Tensor):
    """w `[E, N, K]` -> (q `[E, N, K]` e4m3, qt `[E, K, N]` e4m3, s `[E, N/128, K/128]` float32), one pass over w
    (the transposed codes packed 4 to a uint32 word where N % 4 == 0, else a torch copy)."""
    e, n, k = w.shape
    w = w if w.stride(-1) == 1 else w.contiguous()
    nb, kb = -(-n // TILE), -(-k // TILE)
    q = torch.empty(e, n, k, dtype=torch.float8_e4m3fn, device=w.device)
    packed = n % 4 == 0
    qt = torch.empty(e, k, n, dtype=torch.float8_e4m3fn, device=w.device) if packed else None
    s = torch.empty(e, nb, kb, dtype=torch.float32, device=w.device)
    if w.numel():
        _quant_weight_kernel[(e, nb, kb)](
            w, q.view(torch.uint8), qt.view(torch.int32) if packed else q.view(torch.uint8), s, n, k,
            w.stride(0), w.stride(1), q.stride(0), q.stride(1), s.stride(0), s.stride(1), EXACT=_INTERPRET,
            BLOCK=TILE, TRANSPOSE=packed, num_warps=8,
        )
    return q, qt if packed else q.transpose(1, 2).contiguous(), s


VARIANTS = ("auto", "ptr", "tma")
AUTO = "tma"  # what "auto" picks where TMA applies (else "ptr")
LAST_KERNEL = None  # the compiled kernel of the last explicit-config launch (registers, spills: benchmarks)


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and row strides (e4m3: rows a multiple of 16 long)."""
    return all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and (t.stride(-2) * t.element_size()) % 16 == 0
               for t in tensors)


def _pick(variant: str, *tensors: torch.Tensor) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    ok = _tma_ok(*tensors)
    if variant == "tma" and not ok:
        raise ValueError(f"variant={variant!r} needs 16-byte aligned e4m3 rows (lengths a multiple of 16)")
    if variant == "auto":
        return AUTO if ok else "ptr"
    return variant


def _launch(kernel, grid, args, config: dict, **fixed):
    """One launch with an explicit config (`num_warps`, `num_stages` and constexprs in `config`)."""
    global LAST_KERNEL
    LAST_KERNEL = kernel[grid](*args, **fixed, **config)


def grouped_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, offsets: torch.Tensor,
                 out_dtype: torch.dtype, transpose_b_scales: bool = False, variant: str = "auto",
                 config: dict | None = None) -> torch.Tensor:
    """a `[M, K]` e4m3 with scales `[K/128, M]`, b `[E, N, K]` e4m3 with block scales `[E, N/128, K/128]`
    (`[E, K/128, N/128]` read transposed when `transpose_b_scales`) -> `[M, N]` in `out_dtype`: each expert's
    rows times its b. Rows past `offsets[-1]` are not written. `variant`: pointer loads ("ptr"), TMA tile
    loads ("tma"), or "auto". `config` (benchmarks): launch with these block sizes / warps / stages instead of
    the autotuned ones."""
    m, k = a.shape
    e, n, _ = b.shape
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    kind = _pick(variant, a, b)
    if m == 0 or n == 0:
        return out
    if transpose_b_scales:
        s_e, s_n, s_k = b_s.stride(0), b_s.stride(2), b_s.stride(1)
    else:
        s_e, s_n, s_k = b_s.stride(0), b_s.stride(1), b_s.stride(2)

    def grid(meta):
        return ((-(-m // meta["BLOCK_M"]) + e) * triton.cdiv(n, meta["BLOCK_N"]),)

    sizes = (e, n, k, triton.next_power_of_2(m))
    fixed = {"BLOCK_K": TILE, "E_PAD": _e_pad(e)}
    if kind == "ptr":
        args = (a, a_s, b, b_s, out, offsets, *sizes, a.stride(0), a_s.stride(0), b.stride(0), b.stride(1),
                s_e, s_n, s_k, out.stride(0))
        if _INTERPRET:
            _gemm_fixed[grid](*args, BLOCK_M=32, BLOCK_N=128, **fixed)
        elif config is not None:
            _launch(_gemm_fixed, grid, args, config, **fixed)
        else:
            _gemm_tuned[grid](*args, **fixed)
        return out
    from triton.tools.tensor_descriptor import TensorDescriptor

    cfg = config or ({"BLOCK_M": 32, "BLOCK_N": 128} if _INTERPRET else None)
    a_desc = TensorDescriptor.from_tensor(a, [128, TILE])  # block shapes: set per config
    b_desc = TensorDescriptor.from_tensor(b.view(e * n, k), [128, TILE])
    if cfg is not None:
        a_desc.block_shape, b_desc.block_shape = [cfg["BLOCK_M"], TILE], [cfg["BLOCK_N"], TILE]
    args = (a_desc, a_s, b_desc, b_s, out, offsets, *sizes, a_s.stride(0), s_e, s_n, s_k, out.stride(0))
    if cfg is not None:
        _launch(_grouped_gemm_tma_kernel, grid, args, cfg, **fixed)
    else:
        _gemm_tma_tuned[grid](*args, **fixed)
    return out


def grouped_wgrad(dyt: torch.Tensor, dyt_s: torch.Tensor, xt: torch.Tensor, xt_s: torch.Tensor,
                  offsets: torch.Tensor, m: int, variant: str = "auto", config: dict | None = None) -> torch.Tensor:
    """dyᵀ `[N, P]` e4m3 with scales `[T, N]`, xᵀ `[K, P]` e4m3 with scales `[T, K]` (from `quant_act`'s column
    tiles of M rows) -> dW `[E, N, K]` float32; experts without rows get zeros. `variant` and `config` as
    `grouped_gemm`."""
    n, k, e = dyt.shape[0], xt.shape[0], offsets.shape[0]
    out = torch.empty(e, n, k, dtype=torch.float32, device=dyt.device)
    kind = _pick(variant, dyt, xt)
    if n == 0 or k == 0:
        return out
    sizes = (e, n, k, triton.next_power_of_2(max(m, 1)))

    def grid(meta):
        return (e * triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]),)

    fixed = {"BLOCK_T": TILE, "E_PAD": _e_pad(e)}
    cfg = config or ({"BLOCK_N": 64, "BLOCK_K": 128} if _INTERPRET else None)
    if kind == "ptr":
        args = (dyt, dyt_s, xt, xt_s, out, offsets, *sizes,
                dyt.stride(0), dyt_s.stride(0), xt.stride(0), xt_s.stride(0), out.stride(0), out.stride(1))
        if cfg is not None:
            _launch(_grouped_wgrad_kernel, grid, args, cfg, **fixed)
        else:
            _wgrad_tuned[grid](*args, **fixed)
        return out
    from triton.tools.tensor_descriptor import TensorDescriptor

    a_desc = TensorDescriptor.from_tensor(dyt, [128, TILE])
    b_desc = TensorDescriptor.from_tensor(xt, [128, TILE])
    args = (a_desc, dyt_s, b_desc, xt_s, out, offsets, *sizes, dyt_s.stride(0), xt_s.stride(0),
            out.stride(0), out.stride(1))
    if cfg is not None:
        a_desc.block_shape, b_desc.block_shape = [cfg["BLOCK_N"], TILE], [cfg["BLOCK_K"], TILE]
        _launch(_grouped_wgrad_tma_kernel, grid, args, cfg, **fixed)
    else:
        _wgrad_tma_tuned[grid](*args, **fixed)
    return out
