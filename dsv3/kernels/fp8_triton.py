"""Triton kernels for block-scaled FP8 on Hopper: activation quantization and the FP8 GEMM.

`fp8.py` holds the PyTorch references (the test oracle) and the wrappers that call in here on CUDA.
Import is lazy and safe: without Triton (CPU machines) `available()` is False and nothing is compiled.

- `act_quant(x, block=128, scale_fmt)`: one program per (row, 8 tiles); scale = amax / 448 with IEEE
  division (`div_rn`), all-zero tiles get scale 1, `ue8m0` rounds the scale's bit pattern up to a power
  of two, exactly as the reference does, so codes and scales match it bit for bit.
- `fp8_gemm(a, a_s, w, w_s)`: `C[M, N] = Σ_kb (A_kb · W_kbᵀ) · a_s[m, kb] · w_s[n // 128, kb]`. BLOCK_K is
  the 128 scale block, so each K step is one tensor-core FP8 dot whose result is scaled and added into
  an fp32 accumulator: the "promote to FP32 every 128 elements of K" recipe of the DeepSeek-V3 report.
  Two autotuned launch families share the kernel: large M stores the tile directly in the output
  dtype; small M (decode, memory-bound) may split K across programs and `atomic_add` into an fp32
  workspace, so enough programs stream the weight to saturate HBM.

The kernels also run under `TRITON_INTERPRET=1` on CPU tensors (one fixed config, no autotune), which
is how the GPU tests can be exercised without a GPU.
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the wrappers in fp8.py use the references
    triton = None

FP8_MAX = 448.0
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# DSV3_AUTOTUNE=quick: autotune over 2 configs per launch family instead of all (the GPU tests set it: compiling
# every config for every test shape takes minutes; correctness does not depend on which config wins)
_QUICK = os.environ.get("DSV3_AUTOTUNE", "full") == "quick"
_QUICK_CONFIGS = 2


def available() -> bool:
    """True when the kernels can run: Triton importable and a CUDA device (or the interpreter)."""
    return triton is not None and (torch.cuda.is_available() or _INTERPRET)


if triton is not None:
    _E4M3_MAX = tl.constexpr(FP8_MAX)  # jitted code may only read constexpr globals

    @triton.jit
    def _round_e4m3(y, EXACT: tl.constexpr):
        """y (float32, already within ±448) -> e4m3, nearest even. Under the interpreter (EXACT) y is first
        rounded onto the e4m3 grid with integer ops: the interpreter's float32 -> e4m3 cast rounds ties away
        and drops the carry across a power of two (124.15 -> 64), while the GPU's cast is exact."""
        if EXACT:
            bits = y.to(tl.int32, bitcast=True)  # normal range: 3 mantissa bits, half to even, carry into exponent
            normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
            sub = ((tl.abs(y) * 512.0 + 12582912.0) - 12582912.0) / 512.0  # |y| < 2**-6: multiples of 2**-9
            y = tl.where(tl.abs(y) < 0.015625, tl.where(bits < 0, -sub, sub), normal)  # keeps the sign of -0
        return y.to(tl.float8e4nv)

    @triton.jit
    def _act_quant_kernel(
        x_ptr, q_ptr, s_ptr, K, N_TILES,
        stride_xm, stride_qm, stride_sm, stride_sk,
        BLOCK: tl.constexpr, TILES: tl.constexpr, UE8M0: tl.constexpr, EXACT: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # rows * K may pass 2**31 for long prefills
        tile0 = tl.program_id(1) * TILES
        tiles = tile0 + tl.arange(0, TILES)  # [TILES]
        cols = tiles[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # [TILES, BLOCK]
        mask = cols < K
        x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)  # [TILES]
        scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, _E4M3_MAX, tl.float32)), 1.0)
        if UE8M0:
            bits = scale.to(tl.int32, bitcast=True)
            bump = ((bits & 0x7FFFFF) != 0).to(tl.int32)
            scale = ((((bits >> 23) & 0xFF) + bump) << 23).to(tl.float32, bitcast=True)
        y = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], (TILES, BLOCK)))
        y = tl.minimum(tl.maximum(y, -_E4M3_MAX), _E4M3_MAX)
        tl.store(q_ptr + row * stride_qm + cols, _round_e4m3(y, EXACT), mask=mask)
        tl.store(s_ptr + row * stride_sm + tiles * stride_sk, scale, mask=tiles < N_TILES)

    @triton.jit
    def _fp8_gemm_kernel(
        a_ptr, w_ptr, c_ptr, as_ptr, ws_ptr,
        M, N, K, M_BUCKET,
        stride_am, stride_wn, stride_cm, stride_asm, stride_ask, stride_wsn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        # grouped ordering of output tiles so consecutive programs share A rows / W columns in L2
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        group_size = GROUP_M * num_pid_n
        first_m = (pid // group_size) * GROUP_M
        group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group_size) % group_m
        pid_n = (pid % group_size) // group_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # wrap out-of-range rows/cols onto valid ones: loads need no mask, the store is masked
        rows_a = offs_m % M
        rows_w = offs_n % N
        offs_k = tl.arange(0, BLOCK_K)

        k_tiles = tl.cdiv(K, BLOCK_K)
        tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
        kt0 = pid_k * tiles_per_split
        kt1 = tl.minimum(kt0 + tiles_per_split, k_tiles)

        a_ptrs = a_ptr + rows_a.to(tl.int64)[:, None] * stride_am + (kt0 * BLOCK_K + offs_k)[None, :]  # [BM, BK]
        w_ptrs = w_ptr + rows_w[None, :] * stride_wn + (kt0 * BLOCK_K + offs_k)[:, None]  # [BK, BN]
        as_ptrs = as_ptr + rows_a * stride_asm + kt0 * stride_ask  # [BM]
        # one weight scale per 128 rows of W: a single scalar when the tile sits inside one 128-row block
        ws_ptrs = ws_ptr + (rows_w // BLOCK_K) * stride_wsn + kt0  # [BN]
        ws_ptr1 = ws_ptr + (pid_n * BLOCK_N // BLOCK_K) * stride_wsn + kt0  # scalar

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(kt0, kt1):
            if EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs)
            else:
                k_left = K - kt * BLOCK_K
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            a_s = tl.load(as_ptrs)
            if BLOCK_N <= BLOCK_K:
                acc += tl.dot(a, w) * (a_s * tl.load(ws_ptr1))[:, None]
            else:
                acc += tl.dot(a, w) * (a_s[:, None] * tl.load(ws_ptrs)[None, :])
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
            as_ptrs += stride_ask
            ws_ptrs += 1
            ws_ptr1 += 1

        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if SPLIT_K == 1:
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
        else:
            tl.atomic_add(c_ptrs, acc, mask=c_mask, sem="relaxed")

    @triton.jit
    def _fp8_gemm_tma_kernel(
        a_desc, w_desc, c_ptr, as_ptr, ws_ptr,
        M, N, K, M_BUCKET,
        stride_cm, stride_asm, stride_ask, stride_wsn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # same math as _fp8_gemm_kernel; A and W tiles come through TMA (out-of-range parts read as zeros)
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        group_size = GROUP_M * num_pid_n
        first_m = (pid // group_size) * GROUP_M
        group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group_size) % group_m
        pid_n = (pid % group_size) // group_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        as_ptrs = as_ptr + (offs_m % M) * stride_asm  # [BM]
        ws_ptrs = ws_ptr + ((offs_n % N) // BLOCK_K) * stride_wsn  # [BN]
        ws_ptr1 = ws_ptr + (off_n // BLOCK_K) * stride_wsn  # scalar (BLOCK_N <= 128)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(0, tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([off_m, kt * BLOCK_K])  # [BM, BK]
            w = w_desc.load([off_n, kt * BLOCK_K])  # [BN, BK], K-major as FP8 wgmma wants
            a_s = tl.load(as_ptrs + kt * stride_ask)
            if BLOCK_N <= BLOCK_K:
                acc += tl.dot(a, w.T) * (a_s * tl.load(ws_ptr1 + kt))[:, None]
            else:
                acc += tl.dot(a, w.T) * (a_s[:, None] * tl.load(ws_ptrs + kt)[None, :])

        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    def _cfg(bm, bn, stages, warps, group=8, split=1, tma=False):
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": group}
        if not tma:
            meta["SPLIT_K"] = split
        return triton.Config(meta, num_stages=stages, num_warps=warps, pre_hook=_set_tma_blocks if tma else None)

    def _set_tma_blocks(nargs):
        nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]

    # large M (prefill, training-sized GEMMs): compute-bound tiles, direct store in the output dtype
    # (BLOCK_M, BLOCK_N, stages, warps); compiled for sm90 ahead of time to check: 128x128 with 8 warps and
    # the 64-row tiles need no register spills, the 256-wide ones spill a little (two 128x256 accumulators)
    _LARGE = [(128, 256, 3, 8), (256, 128, 3, 8), (128, 128, 3, 8), (128, 128, 4, 8), (128, 128, 5, 8),
              (128, 128, 4, 4), (64, 256, 4, 4), (64, 128, 4, 4), (64, 128, 6, 4), (64, 64, 5, 4)]
    _LARGE_M_CONFIGS = [_cfg(*c) for c in _LARGE]
    _TMA_CONFIGS = [_cfg(*c, tma=True) for c in _LARGE]
    # small M (decode): thin tiles, deep pipelines, optional split-K into an fp32 workspace
    _SMALL_M_CONFIGS = [
        _cfg(bm, bn, 5, 4, group=1, split=split) for bm in (16, 32, 64) for bn in (32, 64, 128) for split in (1, 2, 4)
    ]

    def _prune_m(configs, named_args, **kwargs):
        # no point in row tiles much taller than M
        limit = max(16, triton.next_power_of_2(named_args["M"]))
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(limit, min(x.kwargs["BLOCK_M"] for x in configs))]
        kept = kept or configs[:1]
        return kept[-_QUICK_CONFIGS:] if _QUICK else kept  # quick: the smallest tiles, fastest to compile

    _heuristics = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
    _KEY = ["M_BUCKET", "N", "K"]
    _gemm_large = triton.autotune(_LARGE_M_CONFIGS, _KEY, prune_configs_by={"early_config_prune": _prune_m})(
        _heuristics(_fp8_gemm_kernel)
    )
    _gemm_small = triton.autotune(
        _SMALL_M_CONFIGS, _KEY, prune_configs_by={"early_config_prune": _prune_m}, reset_to_zero=["c_ptr"]
    )(_heuristics(_fp8_gemm_kernel))
    _gemm_tma = triton.autotune(_TMA_CONFIGS, _KEY, prune_configs_by={"early_config_prune": _prune_m})(
        _fp8_gemm_tma_kernel
    )
    _gemm_fixed = _heuristics(_fp8_gemm_kernel)


SMALL_M = 64  # at or below: the decode launch family (split-K allowed)
VARIANTS = ("auto", "ptr", "tma")


def act_quant(x: torch.Tensor, block: int = 128, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `fp8.quantize_act_ref`: `[..., K]` -> (`[..., K]` e4m3, `[..., ceil(K/block)]` fp32).

    The scale comes back as a column-major view (stride 1 along the tokens): same values and shape as
    the reference, laid out the way the GEMM (and cuBLAS block scaling) reads it.
    """
    k = x.shape[-1]
    n_tiles = math.ceil(k / block)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(n_tiles, m, dtype=torch.float32, device=x.device).t()  # [M, Kb], column-major
    if m:
        tiles = min(8, triton.next_power_of_2(n_tiles))
        grid = (m, triton.cdiv(n_tiles, tiles))
        _act_quant_kernel[grid](
            x2, q, s, k, n_tiles, x2.stride(0), q.stride(0), s.stride(0), s.stride(1),
            BLOCK=block, TILES=tiles, UE8M0=scale_fmt == "ue8m0", EXACT=_INTERPRET, num_warps=4,
        )
    return q.view(*x.shape), s.view(*x.shape[:-1], n_tiles)


def _tma_ok(*tensors: torch.Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and t.stride(0) % 16 == 0 for t in tensors)


def fp8_gemm(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    variant: str = "auto",
) -> torch.Tensor:
    """Triton twin of `fp8.fp8_gemm_ref` for 128-blocks (shapes already checked by the wrapper).

    `variant`: "ptr" (pointer loads; split-K family at M <= SMALL_M), "tma" (TMA tile loads, M > SMALL_M
    and 16-byte aligned rows only), or "auto" (tma where it applies, else ptr).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    k = a_fp8.shape[-1]
    n = w_fp8.shape[0]
    a2 = a_fp8.reshape(-1, k)
    a2 = a2 if a2.stride(-1) == 1 else a2.contiguous()
    s2 = a_scale.reshape(-1, a_scale.shape[-1]).to(torch.float32)
    w = w_fp8 if w_fp8.stride(-1) == 1 else w_fp8.contiguous()
    ws = w_scale.to(torch.float32).contiguous()
    m = a2.shape[0]
    if m == 0 or n == 0:
        return torch.zeros(*a_fp8.shape[:-1], n, dtype=out_dtype, device=a_fp8.device)
    if m > SMALL_M and s2.stride(0) != 1:
        s2 = s2.t().contiguous().t()  # column-major: a tile's M scales are one contiguous read
    m_bucket = triton.next_power_of_2(m)
    sizes = (m, n, k, m_bucket)
    scale_strides = (s2.stride(0), s2.stride(1), ws.stride(0))

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta.get("SPLIT_K", 1))

    use_tma = variant == "tma" or (variant == "auto" and m > SMALL_M and _tma_ok(a2, w))
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        if not _tma_ok(a2, w):
            raise ValueError(f"variant='tma' needs 16-byte aligned rows (K % 16 == 0), got K={k}")
        out = torch.empty(m, n, dtype=out_dtype, device=a_fp8.device)
        a_desc = TensorDescriptor.from_tensor(a2, [128, 128])  # block shapes are set per config
        w_desc = TensorDescriptor.from_tensor(w, [128, 128])
        args = (a_desc, w_desc, out, s2, ws, *sizes, out.stride(0), *scale_strides)
        if _INTERPRET:
            a_desc.block_shape, w_desc.block_shape = [32, 128], [64, 128]
            _fp8_gemm_tma_kernel[grid](*args, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=2)
        else:
            _gemm_tma[grid](*args, BLOCK_K=128)
    elif _INTERPRET:
        out = torch.zeros(m, n, dtype=torch.float32, device=a_fp8.device)
        _gemm_fixed[grid](
            a2, w, out, s2, ws, *sizes, a2.stride(0), w.stride(0), out.stride(0), *scale_strides,
            BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=2, SPLIT_K=2,
        )
        out = out.to(out_dtype)
    elif m <= SMALL_M:
        acc = torch.zeros(m, n, dtype=torch.float32, device=a_fp8.device)
        _gemm_small[grid](a2, w, acc, s2, ws, *sizes, a2.stride(0), w.stride(0), acc.stride(0), *scale_strides, BLOCK_K=128)
        out = acc if out_dtype == torch.float32 else acc.to(out_dtype)
    else:
        out = torch.empty(m, n, dtype=out_dtype, device=a_fp8.device)
        _gemm_large[grid](a2, w, out, s2, ws, *sizes, a2.stride(0), w.stride(0), out.stride(0), *scale_strides, BLOCK_K=128)
    return out.view(*a_fp8.shape[:-1], n)
