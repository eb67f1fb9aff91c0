"""The three FP8 GEMMs of a training linear: quantizers in plain torch ops and the block-scaled GEMM as an
opaque custom op (`torch.ops.dsv3.fp8_scaled_mm`, cuBLAS `F.scaled_mm` on Hopper), so that `torch.compile`
traces a whole FP8 linear with no graph break and fuses each quantization into the kernel of its producer.

DeepSeek-V3's tiles map onto cuBLAS's block-wise scaling recipes (Hopper, cuBLASLt >= 12.9):

| GEMM | A (row-major, `[M, K]`) | B (column-major, `[K, N]`) | recipe |
| --- | --- | --- | --- |
| forward `y = x Wᵀ` | x, 1×128 tiles | Wᵀ, 128×128 blocks | BlockWise1x128 × BlockWise128x128 |
| dgrad `dx = dy W` | dy, 1×128 tiles | W, 128×128 blocks | BlockWise1x128 × BlockWise128x128 |
| wgrad `dW = dyᵀ x` | dyᵀ, 128 tokens per channel | x, 128 tokens per channel | BlockWise1x128 × BlockWise1x128 |

Every product accumulates in fp32 with one scale per 128 elements of the contraction, as in the report.
Every contraction is zero-padded to a multiple of 512 (`ALIGN_K`; zero rows and columns change neither the
tile max-abs nor the sums): on the H200 (torch 2.11, CUDA 13) cuBLAS returned wrong results, up to inf, without
an error when K/128 was not a multiple of 4 (found by the `dsv3.kernels.fp8` work: K = 256, 384, 640, 1152
wrong; 512, 1024, 2048, 7168 right). The rows of every operand (tokens, or channels in wgrad) are padded to
a multiple of 16 (cuBLAS refused M = 65).
The emulation (`emulate=True`, the CPU oracle) pads to 128 only.

Quantizers (`quantize_rows`: 1×128 tiles along a row; `quantize_tokens_t`: 128×1 tiles, codes written
transposed; `quantize_weight_padded`: 128×128 blocks) equal `dsv3.kernels.fp8.quantize_act` /
`quantize_weight` bit for bit: scale = IEEE float32 `amax / 448` (1 for all-zero tiles), codes =
round-to-nearest-even(IEEE float32 `x / scale`) clamped to ±448. Under `torch.compile` they are torch ops, and
inductor would otherwise turn the divisions into an approximate `div.full.f32` (and `/ 448` into a multiply by
a rounded 1/448), so both go through float64: `f32(f64(x) * f64(1 / f64(scale)))` is the correctly rounded
float32 quotient of two float32 numbers, because such a quotient is never an exact float32 midpoint and lies at
least 2^-49 (relative) from every midpoint, while the float64 error is below 2^-51 (same for `amax / 448`).
Run eagerly on CUDA the Triton kernels (`fp8_quant_triton`, `dsv3.kernels.fp8.quantize_act`) do the same
arithmetic in one pass each, bit for bit (the GPU tests compare them).

`torch.ops.dsv3.fp8_scaled_mm(a [M, K], b [N, K], a_scale_t [K/128, M], b_scale, b_blocks, out_dtype)`
takes every operand row-major (cuBLAS's column-major B is `b.t()`): `b_scale` is `[N/128, K/128]` for 128×128
blocks of b, else `[K/128, N]` (1×128 tiles of b, transposed like `a_scale_t`). On a GPU where
`blockwise_supported` holds (probed once per GPU), it runs cuBLAS through `dsv3.kernels.fp8_cublas.scaled_mm`
(shared with the routed experts' grouped GEMM), with no check of its output in the hot path: the padding rules
above keep it to shapes that give right answers, and an error raises. Elsewhere it runs the Triton FP8 GEMM
(other CUDA GPUs, 128×128 B) or the emulation (`fp8_cublas.emulated_mm`). The emulated GEMMs of `fp8_linear`
are the oracle (tests/test_train_fp8_gemms.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.kernels.fp8 import FP8_DTYPE, FP8_MAX, quantize_act
from dsv3.kernels import fp8_quant_triton
from dsv3.kernels.fp8_cublas import blockwise_supported, emulated_mm, scaled_mm

BLOCK = 128
ALIGN_K = 512  # every contraction of the cuBLAS path padded to a multiple of this (see the module docstring)
ALIGN_M = 16  # rows of A on the cuBLAS path


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad2(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """`[R, C]` -> `[rows, cols]` with zeros appended (no copy when already that size)."""
    if x.shape[0] == rows and x.shape[1] == cols:
        return x
    return F.pad(x, (0, cols - x.shape[1], 0, rows - x.shape[0]))


# ---------------------------------------------------------------- quantizers in torch ops (traceable)

def _scale(amax: torch.Tensor) -> torch.Tensor:
    """float32 max-abs -> IEEE float32 `amax / 448`, 1 where the tile is all zeros."""
    s = (amax.to(torch.float64) / FP8_MAX).to(torch.float32)
    return torch.where(s > 0, s, torch.ones_like(s))


def _codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 of IEEE float32 `x / scale` (x float32, scale broadcastable), clamped to ±448."""
    q = (x.to(torch.float64) * scale.to(torch.float64).reciprocal()).to(torch.float32)
    return q.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_rows_torch(x: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x `[R, C]` zero-padded to `[rows, cols]` (cols a multiple of 128), 1×128 tiles along each row ->
    codes `[rows, cols]` e4m3 and scales transposed `[cols/128, rows]` float32 (contiguous)."""
    t = _pad2(x, rows, cols).to(torch.float32).view(rows, cols // BLOCK, BLOCK)  # [R', Cb, 128]
    s = _scale(t.abs().amax(dim=-1))  # [R', Cb]
    return _codes(t, s[..., None]).view(rows, cols), s.t().contiguous()


def quantize_tokens_t_torch(x: torch.Tensor, rows: int, cols: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x `[M, C]` zero-padded to `[rows, cols]` (rows a multiple of 128; cols defaults to C), 128×1 tiles (128
    tokens of a channel) -> codes transposed `[cols, rows]` e4m3 and scales `[rows/128, cols]` float32 (the
    transposed layout of the codes' 1×128 scales)."""
    c = x.shape[1] if cols is None else cols
    t = _pad2(x, rows, c).to(torch.float32).view(rows // BLOCK, BLOCK, c)  # [Mb, 128, C]
    s = _scale(t.abs().amax(dim=1))  # [Mb, C]
    return _codes(t, s[:, None, :]).view(rows, c).t().contiguous(), s


def quantize_blocks_torch(w: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w `[N, K]` zero-padded to `[rows, cols]` (multiples of 128), 128×128 blocks -> codes `[rows, cols]`
    e4m3 and scales `[rows/128, cols/128]` float32."""
    t = _pad2(w, rows, cols).to(torch.float32).view(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK)
    s = _scale(t.abs().amax(dim=(1, 3)))  # [Nb, Kb]
    return _codes(t, s[:, None, :, None]).view(rows, cols), s


# ---------------------------------------------------------------- dispatch: Triton kernels when eager on CUDA

def _use_triton(t: torch.Tensor) -> bool:
    """The one-pass Triton quantizers: eager CUDA only (compiled graphs use the torch ops, fused by inductor)."""
    return t.is_cuda and not torch.compiler.is_compiling() and fp8_quant_triton.available()


def quantize_rows(x: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows_torch`, through the Triton activation quantizer when eager on CUDA."""
    if _use_triton(x) and cols % BLOCK == 0:
        q, s = quantize_act(_pad2(x, rows, cols), BLOCK)  # Triton on CUDA; s: [rows, cols/128] column-major
        return q, s.t().contiguous()
    return quantize_rows_torch(x, rows, cols)


def quantize_tokens_t(x: torch.Tensor, rows: int, cols: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_tokens_t_torch`, in one Triton pass when eager on CUDA (bit-equal, tests/test_train_fp8_gemms.py)."""
    cols = x.shape[1] if cols is None else cols
    if _use_triton(x) and rows == _ceil(x.shape[0], ALIGN_K):
        x = _pad2(x, x.shape[0], cols)  # the kernel pads the tokens itself
        q, s = fp8_quant_triton.quantize_tokens_t(x, ALIGN_K)  # [C, rows], [C, rows/128] stride (1, C)
        return q, s.t()
    return quantize_tokens_t_torch(x, rows, cols)


def quantize_weight_padded(w: torch.Tensor, align: int = ALIGN_K) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W `[N, K]` -> e4m3 codes `[N', K']`, the same codes transposed `[K', N']` (contiguous, for dgrad) and
    128×128 scales `[N'/128, K'/128]`; both dims zero-padded to multiples of `align` (each is a contraction:
    K of the forward, N of dgrad; padding blocks are zeros). One Triton pass when eager on CUDA."""
    w = w.detach()
    n, k = w.shape
    rows, cols = _ceil(n, align), _ceil(k, align)
    if _use_triton(w) and align % BLOCK == 0:
        return fp8_quant_triton.quantize_weight_t(w, align)  # bit-equal to the below (tests/test_train_fp8_gemms.py)
    w_q, w_s = quantize_blocks_torch(w, rows, cols)
    # the transpose quantized from the transposed master (the same blocks, so the same codes): the transposing
    # happens on the high-precision read, never as an e4m3 copy (Triton/ptxas mis-stored transposed e4m3 tiles
    # on this stack, see fp8_quant_triton)
    w_qt, _ = quantize_blocks_torch(w.t(), cols, rows)
    return w_q, w_qt, w_s


# ---------------------------------------------------------------- the GEMM: the custom op

@torch.library.custom_op("dsv3::fp8_scaled_mm", mutates_args=())
def fp8_scaled_mm(a: torch.Tensor, b: torch.Tensor, a_scale_t: torch.Tensor, b_scale: torch.Tensor,
                  b_blocks: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """Block-scaled FP8 `a bᵀ` with fp32 accumulation: a `[M, K]`, b `[N, K]` e4m3 (row-major), a's 1×128
    scales transposed `[K/128, M]`, b's scales `[N/128, K/128]` (`b_blocks`) or `[K/128, N]` -> `[M, N]`."""
    a, b, a_scale_t, b_scale = a.contiguous(), b.contiguous(), a_scale_t.contiguous(), b_scale.contiguous()
    if blockwise_supported(a.device):
        return scaled_mm(a, b, a_scale_t, b_scale, b_blocks, out_dtype)
    if a.is_cuda and b_blocks and b.shape[0] % BLOCK == 0:
        from dsv3.kernels.fp8 import fp8_gemm  # Triton on sm89+, the PyTorch reference otherwise
        return fp8_gemm(a, a_scale_t.t(), b, b_scale, out_dtype=out_dtype)
    return emulated_mm(a, b, a_scale_t, b_scale, b_blocks, out_dtype)


@fp8_scaled_mm.register_fake
def _(a, b, a_scale_t, b_scale, b_blocks, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


# ---------------------------------------------------------------- the three GEMMs of a linear

def _gemm(emulate: bool):
    return emulated_mm if emulate else torch.ops.dsv3.fp8_scaled_mm


def gemm_forward(x: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor, n: int, out_dtype: torch.dtype,
                 emulate: bool = False) -> torch.Tensor:
    """x `[M, K]` (high precision) quantized in 1×128 tiles, times the padded FP8 W `[N', K']` (from
    `quantize_weight_padded`) -> `[M, n]` `out_dtype`."""
    m = x.shape[0]
    x_q, x_st = quantize_rows(x, m if emulate else _ceil(m, ALIGN_M), w_q.shape[1])  # [M', K'], [K'/128, M']
    nb = -(-n // BLOCK)  # only the 128-row blocks of W that hold real outputs
    y = _gemm(emulate)(x_q, w_q[: nb * BLOCK], x_st, w_s[:nb].contiguous(), True, out_dtype)  # [M', nb*128]
    return y if y.shape == (m, n) else y[:m, :n]


def gemm_dgrad(dy: torch.Tensor, w_qt: torch.Tensor, w_s: torch.Tensor, k: int, out_dtype: torch.dtype,
               emulate: bool = False) -> torch.Tensor:
    """dy `[M, N]` quantized in 1×128 tiles along N, times the padded FP8 W (given as its transpose
    `[K', N']`, scales `[N'/128, K'/128]`) -> dx `[M, k]`."""
    m = dy.shape[0]
    dy_q, dy_st = quantize_rows(dy, m if emulate else _ceil(m, ALIGN_M), w_qt.shape[1])  # [M', N'], [N'/128, M']
    kb = -(-k // BLOCK)
    dx = _gemm(emulate)(dy_q, w_qt[: kb * BLOCK], dy_st, w_s.t()[:kb].contiguous(), True, out_dtype)  # [M', kb*128]
    return dx if dx.shape == (m, k) else dx[:m, :k]


def gemm_wgrad(dy: torch.Tensor, x: torch.Tensor, emulate: bool = False) -> torch.Tensor:
    """dW `[N, K]` float32 `= dyᵀ x` with dy `[M, N]` and x `[M, K]` quantized in 128×1 tiles (128 tokens
    per channel); the token count (the contraction) is zero-padded to a multiple of `ALIGN_K` (128 emulated),
    N and K (the rows of the two operands) to multiples of `ALIGN_M` for cuBLAS."""
    (m, n), k = dy.shape, x.shape[1]
    rows, align = (_ceil(m, BLOCK), 1) if emulate else (_ceil(m, ALIGN_K), ALIGN_M)
    dy_t, dy_s = quantize_tokens_t(dy, rows, _ceil(n, align))  # [N', M'], [M'/128, N']
    x_t, x_s = quantize_tokens_t(x, rows, _ceil(k, align))  # [K', M'], [M'/128, K']
    dw = _gemm(emulate)(dy_t, x_t, dy_s, x_s, False, torch.float32)  # [N', K']
    return dw if dw.shape == (n, k) else dw[:n, :k]
