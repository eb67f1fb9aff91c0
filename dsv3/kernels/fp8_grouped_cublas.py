"""The routed experts' FP8 GEMMs (forward, dgrad, wgrad of `dsv3.train.fp8_grouped`) as one cuBLAS
block-scaled GEMM per expert, on the expert-blocked operands of `fp8_grouped_triton.quant_act(blocked=True,
align=ALIGN)`: each expert's rows sit in whole 128-row tiles from a 512-aligned slot (padding rows are zero
codes), so every expert's operands are contiguous blocks whose row counts and token contractions are multiples
of 512, the shapes cuBLAS's block-scaled recipes compute right (`dsv3.train.fp8_gemms` says why).

| GEMM | A | B | recipe |
| --- | --- | --- | --- |
| forward `y_e = x_e w_eᵀ` | x_e, 1x128 tiles | w_e, 128x128 blocks | BlockWise1x128 x BlockWise128x128 |
| dgrad `dx_e = dy_e w_e` | dy_e, 1x128 tiles | w_eᵀ (its own codes transposed), 128x128 blocks | the same |
| wgrad `dW_e = dy_eᵀ x_e` | dy_eᵀ, 128 tokens per channel | x_eᵀ, 128 tokens per channel | 1x128 x 1x128 |

The row counts are read on the host once per forward (`layout`, one sync per MoE layer; the backward reuses
them). An expert's output rows are written straight into the `[M, N]` result: its padded block runs past its
own rows into the next experts' first rows, which those experts overwrite after it, in order, on one stream (the
result has 128 * ALIGN spare rows at the end for the last expert). No copy, no gather.
"""

from __future__ import annotations

import torch

from dsv3.kernels import fp8_cublas
from dsv3.kernels.fp8_grouped_triton import TILE

ALIGN = 4  # tiles per alignment unit: 512 rows / tokens (cuBLAS's contraction rule)


def layout(offsets: torch.Tensor) -> list[tuple[int, int, int, int, int]]:
    """offsets `[E]` int32 end rows -> per expert (expert, first tile, tiles, first row, rows), as `quant_act`
    (blocked, ALIGN) tiles them. Reads the offsets on the host (a sync)."""
    ends = offsets.tolist()
    out, first, start = [], 0, 0
    for e, end in enumerate(ends):
        rows = end - start
        tiles = -(-rows // (TILE * ALIGN)) * ALIGN
        out.append((e, first, tiles, start, rows))
        first, start = first + tiles, end
    return out


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, a_scale_t: torch.Tensor, b_scale: torch.Tensor,
             b_blocks: bool) -> None:
    """out `[R, N]` = a `[R, K]` times b `[N, K]`ᵀ (both row-major e4m3), in place; scales as `fp8_cublas`
    takes them. cuBLAS on CUDA; elsewhere (the tests on CPU) the float32 emulation of the same product."""
    if out.is_cuda:
        fp8_cublas.scaled_mm(a, b, a_scale_t, b_scale, b_blocks, out.dtype, out=out)
    else:
        out.copy_(fp8_cublas.emulated_mm(a, b, a_scale_t, b_scale, b_blocks, out.dtype))


def gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, plan, m: int,
         out_dtype: torch.dtype, transpose_b_scales: bool = False) -> torch.Tensor:
    """a: blocked rows `[128 T, K]` e4m3 with blocked scales (flat), b `[E, N, K]` e4m3 with 128x128 scales
    `[E, N/128, K/128]` (`[E, K/128, N/128]` read transposed when `transpose_b_scales`) -> `[M, N]`."""
    k = a.shape[1]
    n = b.shape[1]
    kb = -(-k // TILE)
    out = torch.empty(m + TILE * ALIGN, n, dtype=out_dtype, device=a.device)
    for e, first, tiles, start, rows in plan:
        if rows == 0:
            continue
        r = tiles * TILE
        a_e = a[first * TILE: first * TILE + r]
        s_e = a_s[first * TILE * kb: (first * TILE + r) * kb].view(kb, r)  # [K/128, R]
        _mm_into(out[start: start + r], a_e, b[e], s_e, b_s[e].t() if transpose_b_scales else b_s[e], True)
    return out[:m]


def wgrad(dyt: torch.Tensor, dyt_s: torch.Tensor, xt: torch.Tensor, xt_s: torch.Tensor, plan, n: int,
          k: int) -> torch.Tensor:
    """dyᵀ and xᵀ as blocked column tiles (flat codes, scales `[T, N]` / `[T, K]`) -> dW `[E, N, K]` float32
    (zeros for experts without rows)."""
    e_count = len(plan)
    fp32 = not dyt.is_cuda or fp8_cublas.fp32_out(dyt.device.index if dyt.device.index is not None else
                                                  torch.cuda.current_device())
    dw = torch.empty(e_count, n, k, dtype=torch.float32 if fp32 else torch.bfloat16, device=dyt.device)
    for e, first, tiles, start, rows in plan:
        if rows == 0:
            dw[e].zero_()
            continue
        r = tiles * TILE
        a = dyt[first * TILE * n: (first * TILE + r) * n].view(n, r)
        b = xt[first * TILE * k: (first * TILE + r) * k].view(k, r)
        _mm_into(dw[e], a, b, dyt_s[first: first + tiles], xt_s[first: first + tiles], False)
    return dw if fp32 else dw.float()


def applies(x: torch.Tensor, n: int, k: int) -> bool:
    """Whether the cuBLAS path takes a grouped GEMM of x `[M, K]` by w `[E, N, K]`: a GPU whose cuBLAS runs the
    block-scaled recipes (Hopper) and N, K multiples of 512 (each is a contraction: K of the forward, N of
    dgrad)."""
    if not x.is_cuda or n % (TILE * ALIGN) or k % (TILE * ALIGN):
        return False
    return fp8_cublas.blockwise_supported(x.device)
