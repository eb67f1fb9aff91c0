"""Triton kernels for the two FP8 training quantizations that the inference kernels do not cover, each one
pass over its input that writes the operands in the layouts cuBLAS's block-scaled GEMMs read (the weight's
transpose excepted):

- `quantize_tokens_t(x [M, C])`: 128×1 tiles (128 tokens of one channel), the wgrad operands. Writes the
  codes transposed, `[C, M']` row-major (M' = M rounded up to `align`, padding tokens are zeros), and the scales
  `[C, M'/128]` with stride `(1, C)`. Replaces a transposing copy plus a quantization pass.
- `quantize_weight_t(w [N, K])`: 128×128 blocks; writes the codes `[N', K']` and the scales `[N'/128, K'/128]`
  (N', K' rounded up to `align` with zero blocks) in one pass, then the codes' transpose `[K', N']` (the dgrad
  operand) by a copy (see the function).

The arithmetic is `dsv3.kernels.fp8`'s reference: scale = max-abs / 448 with IEEE division (1 for all-zero
tiles), codes = round-to-nearest-even(x / scale) clamped to ±448, so codes and scales equal the reference
bit for bit (tests/test_train_fp8_gemms.py checks this on the GPU).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: callers use the PyTorch path
    triton = None

FP8_MAX = 448.0


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:
    _E4M3_MAX = tl.constexpr(FP8_MAX)

    @triton.jit
    def _quant_tokens_t_kernel(x_ptr, q_ptr, s_ptr, M, C, M_PAD, stride_xm, BLOCK_C: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid_m * 128 + tl.arange(0, 128)  # [128] tokens
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC] channels
        mask = (rows[:, None] < M) & (cols[None, :] < C)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)  # [128, BC]
        amax = tl.max(tl.abs(x), axis=0)  # [BC]
        scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, _E4M3_MAX, tl.float32)), 1.0)
        y = tl.math.div_rn(x, tl.broadcast_to(scale[None, :], (128, BLOCK_C)))
        y = tl.minimum(tl.maximum(y, -_E4M3_MAX), _E4M3_MAX)
        q_ptrs = q_ptr + cols[None, :].to(tl.int64) * M_PAD + rows[:, None]  # transposed store: [C, M']
        tl.store(q_ptrs, y.to(q_ptr.dtype.element_ty), mask=cols[None, :] < C)
        tl.store(s_ptr + pid_m * C + cols, scale, mask=cols < C)  # [M'/128, C] row-major

    @triton.jit
    def _quant_weight_kernel(w_ptr, q_ptr, s_ptr, N, K, K_PAD, stride_wn):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * 128 + tl.arange(0, 128)
        cols = pid_k * 128 + tl.arange(0, 128)
        mask = (rows[:, None] < N) & (cols[None, :] < K)
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :], mask=mask, other=0.0)
        w = w.to(tl.float32)  # [128, 128]
        amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
        scale = tl.where(amax > 0, tl.math.div_rn(amax, _E4M3_MAX), 1.0)
        y = tl.math.div_rn(w, tl.full((128, 128), 1.0, tl.float32) * scale)
        y = tl.minimum(tl.maximum(y, -_E4M3_MAX), _E4M3_MAX).to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + rows[:, None].to(tl.int64) * K_PAD + cols[None, :], y)  # [N', K']
        tl.store(s_ptr + pid_n * (K_PAD // 128) + pid_k, scale)


def quantize_tokens_t(x: torch.Tensor, align: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x `[M, C]` -> codes `[C, M']` e4m3 (row-major) and scales `[C, M'/128]` float32 (stride `(1, C)`); M' is M
    rounded up to `align` (a multiple of 128), the padding tokens zeros."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, c = x.shape
    m_pad = -(-m // align) * align
    q = torch.empty(c, m_pad, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m_pad // 128, c, dtype=torch.float32, device=x.device)
    block_c = 64
    _quant_tokens_t_kernel[(m_pad // 128, triton.cdiv(c, block_c))](
        x, q, s, m, c, m_pad, x.stride(0), BLOCK_C=block_c, num_warps=8)
    return q, s.t()


def quantize_weight_t(w: torch.Tensor, align: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w `[N, K]` -> codes `[N', K']`, their transpose `[K', N']` (both e4m3, contiguous) and block scales
    `[N'/128, K'/128]` float32; N', K' are N, K rounded up to `align` (a multiple of 128), padding blocks zeros."""
    if w.stride(-1) != 1:
        w = w.contiguous()
    n, k = w.shape
    n_pad, k_pad = -(-n // align) * align, -(-k // align) * align
    q = torch.empty(n_pad, k_pad, dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty(n_pad // 128, k_pad // 128, dtype=torch.float32, device=w.device)
    _quant_weight_kernel[(n_pad // 128, k_pad // 128)](w, q, s, n, k, k_pad, w.stride(0), num_warps=8)
    # the transpose is a plain copy: an in-kernel transposed store of the e4m3 tile wrote it untransposed on the
    # H200 (Triton 3.6; the codes and scales were right bit for bit; tests/test_train_fp8_gemms.py, 2026-11-29)
    qt = q.t().contiguous()
    return q, qt, s
