"""FP8 grouped GEMM for the routed experts in training: `fp8_grouped_mm(x, w, offsets)`, differentiable.

`x [M, K]` holds rows sorted by expert, `offsets [E]` (int32) the end row of each expert, `w [E, N, K]` the
experts' stacked weights (float32 masters or bf16); the result is `[M, N]`, `y[rows of e] = x[rows of e] w_eᵀ`,
in the autocast dtype (else x's dtype) - what `torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)` gives.
All three GEMMs run on e4m3 operands with fp32 accumulation, tiled as the DeepSeek-V3 report says:

| GEMM | left operand | right operand |
| --- | --- | --- |
| forward `y = x w_eᵀ` | x in 1x128 tiles (per row, 128 of K) | w_e in 128x128 blocks |
| dgrad `dx = dy w_e` | dy in 1x128 tiles (per row, 128 of N) | the same 128x128 blocks |
| wgrad `dW_e = dy_eᵀ x_e` | dy in 128x1 tiles (128 rows, one channel) | x in 128x1 tiles |

The wgrad tiles start at each expert's first row, so no tile crosses an expert boundary and an expert's last
tile is short. Each scale is its tile's max-abs / 448 (1 for an all-zero tile), codes are `x * (1 / scale)`
clamped to ±448 and rounded to nearest e4m3; the weight is quantized from the master copy at every call.

Three implementations of the same numerics (`backend` picks; `fp8_grouped_mm(impl=...)` forces one):
- `fp8_grouped_mm_ref`: plain PyTorch (fake-quantize each operand with its tiles, float32 matmul per expert, a
  host loop over the experts); the oracle of the tests and the path on CPU. Its `block` can be made small so
  tiny hand-checked cases exercise partial tiles.
- "cublas" (Hopper, N and K multiples of 512: the released model's 7168 x 2048 experts): the Triton
  quantization passes write expert-blocked operands, then one cuBLAS block-scaled GEMM per expert
  (`dsv3.kernels.fp8_grouped_cublas`); the row counts are read on the host once per forward.
- "triton" (other sm89+ GPUs and shapes): the same quantization passes in the flat layout, then Triton grouped
  GEMMs whose grids are static (no host sync: each program finds its expert from `offsets` on the device).

`FP8GroupedExperts` is the MoE experts implementation that runs its grouped GEMMs through this op;
`dsv3.train.fp8_select` decides per MoE layer whether it pays (the released widths: yes; the ~1B benchmark
model: no). Measured speeds are in benchmarks/RESULTS.md ("FP8 training at the released widths (issue 21)").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.model.moe import LocalExperts
from dsv3.kernels import fp8_grouped_cublas as cublas
from dsv3.kernels import fp8_grouped_triton as kernels

BLOCK = 128
FP8_MAX = 448.0
_E4M3 = torch.float8_e4m3fn


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _fake_quant(x: torch.Tensor) -> torch.Tensor:
    """x `[..., B]` float32, one tile per last-dim vector -> rounded through e4m3 with the tile's scale."""
    scale = x.abs().amax(dim=-1, keepdim=True) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (x * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(_E4M3)
    return q.to(torch.float32) * scale


def fake_quant_rows(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """x `[R, C]` -> float32 `[R, C]` rounded through e4m3 in 1 x block tiles along C."""
    r, c = x.shape
    tiles = -(-c // block)
    xf = F.pad(x.to(torch.float32), (0, tiles * block - c)).view(r, tiles, block)  # [R, Cb, b]
    return _fake_quant(xf).view(r, tiles * block)[:, :c]


def fake_quant_blocks(w: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """w `[N, K]` -> float32 `[N, K]` rounded through e4m3 in block x block tiles (edges padded with zeros)."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    wf = F.pad(w.to(torch.float32), (0, kb * block - k, 0, nb * block - n))
    wf = wf.view(nb, block, kb, block).permute(0, 2, 1, 3).reshape(nb, kb, block * block)  # [Nb, Kb, b*b]
    wq = _fake_quant(wf).view(nb, kb, block, block).permute(0, 2, 1, 3).reshape(nb * block, kb * block)
    return wq[:n, :k]


def _bounds(offsets: torch.Tensor, m: int) -> list[tuple[int, int]]:
    """offsets `[E]` -> [(start, end)] per expert (host read: reference path only)."""
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    if any(b < a for a, b in zip(starts, ends)) or (ends and ends[-1] != m):
        raise ValueError(f"offsets must be non-decreasing and end at the row count {m}, got {ends}")
    return list(zip(starts, ends))


def _check(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> None:
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"fp8_grouped_mm expects x [M, K] and w [E, N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if w.shape[2] != x.shape[1]:
        raise ValueError(f"fp8_grouped_mm: x has K={x.shape[1]}, w expects K={w.shape[2]}")
    if offsets.dim() != 1 or offsets.shape[0] != w.shape[0] or offsets.dtype != torch.int32:
        raise ValueError(f"fp8_grouped_mm: offsets must be int32 [E={w.shape[0]}], got {offsets.dtype} "
                         f"{tuple(offsets.shape)}")
    if not (x.is_floating_point() and w.is_floating_point()):
        raise ValueError(f"fp8_grouped_mm expects floating-point x and w, got {x.dtype} and {w.dtype}")


class _GroupedRef(torch.autograd.Function):
    """The reference: fake-quantized operands, float32 matmuls, a loop over the experts."""

    @staticmethod
    def forward(ctx, x, w, offsets, block, out_dtype):
        bounds = _bounds(offsets, x.shape[0])
        xq = fake_quant_rows(x, block)  # [M, K]
        wq = [fake_quant_blocks(w[e], block) for e in range(w.shape[0])]  # E x [N, K]
        y = x.new_zeros(x.shape[0], w.shape[1], dtype=torch.float32)
        for e, (a, b) in enumerate(bounds):
            y[a:b] = xq[a:b] @ wq[e].T
        ctx.save_for_backward(x, w)
        ctx.bounds, ctx.block, ctx.wq = bounds, block, wq
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        block = ctx.block
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dyq = fake_quant_rows(dy, block)  # [M, N], 1 x block tiles along N
            dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            for e, (a, b) in enumerate(ctx.bounds):
                dx[a:b] = dyq[a:b] @ ctx.wq[e]
            dx = dx.to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            for e, (a, b) in enumerate(ctx.bounds):
                if b > a:  # block x 1 tiles from the expert's first row: rows of the transposed slices
                    dw[e] = fake_quant_rows(dy[a:b].T, block) @ fake_quant_rows(x[a:b].T, block).T
            dw = dw.to(w.dtype)
        return dx, dw, None, None, None


def fp8_grouped_mm_ref(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, block: int = BLOCK,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """PyTorch reference of `fp8_grouped_mm` (host loop over experts; any device). `block` is the tile size."""
    _check(x, w, offsets)
    return _GroupedRef.apply(x, w, offsets, block, out_dtype or _out_dtype(x))


class _GroupedKernels(torch.autograd.Function):
    """The same numerics through the GPU kernels: the Triton quantization passes, then the GEMMs of `impl`:
    "triton" (the grouped Triton kernels on the flat layout; no host sync) or "cublas" (one block-scaled cuBLAS
    GEMM per expert on the expert-blocked layout, `fp8_grouped_cublas`; the row counts read on the host once
    per forward)."""

    @staticmethod
    def forward(ctx, x, w, offsets, out_dtype, impl):
        ctx.plan = cublas.layout(offsets) if impl == "cublas" else None
        ctx.m, ctx.k, ctx.x_dtype, ctx.w_dtype = x.shape[0], x.shape[1], x.dtype, w.dtype
        xq, xs, xtq, xts = _quant(ctx, x, offsets, rows=True, cols=ctx.needs_input_grad[1])
        wq, wtq, ws = kernels.quant_weight(w.detach())
        ctx.save_for_backward(xtq, xts, wtq, ws, offsets)
        return _gemm(ctx, xq, xs, wq, ws, offsets, out_dtype, False)

    @staticmethod
    def backward(ctx, dy):
        xtq, xts, wtq, ws, offsets = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dyq, dys, dytq, dyts = _quant(ctx, dy, offsets, rows=need_x, cols=need_w)
        dx = dw = None
        if need_x:  # dx = dy w_e: the transposed weight codes, block scales read transposed
            dx = _gemm(ctx, dyq, dys, wtq, ws, offsets, ctx.x_dtype, True)
        if need_w:
            if ctx.plan is not None:
                dw = cublas.wgrad(dytq, dyts, xtq, xts, ctx.plan, dy.shape[1], ctx.k)
            else:
                dw = kernels.grouped_wgrad(dytq, dyts, xtq, xts, offsets, ctx.m)
            dw = dw if ctx.w_dtype == torch.float32 else dw.to(ctx.w_dtype)
        return dx, dw, None, None, None


def _quant(ctx, x, offsets, rows: bool, cols: bool):
    """`quant_act` in the layout the backend's GEMMs read."""
    blocked = {"blocked": True, "align": cublas.ALIGN} if ctx.plan is not None else {}
    return kernels.quant_act(x, offsets, rows=rows, cols=cols, **blocked)


def _gemm(ctx, a, a_s, b, b_s, offsets, out_dtype, transpose_b_scales: bool):
    """A forward-type grouped GEMM (forward, dgrad) on the backend's kernels."""
    if ctx.plan is not None:
        return cublas.gemm(a, a_s, b, b_s, ctx.plan, ctx.m, out_dtype, transpose_b_scales=transpose_b_scales)
    return kernels.grouped_gemm(a, a_s, b, b_s, offsets, out_dtype, transpose_b_scales=transpose_b_scales)


BACKENDS = ("auto", "cublas", "triton", "reference")


def backend(x: torch.Tensor, w: torch.Tensor) -> str:
    """Which implementation `fp8_grouped_mm` runs for x `[M, K]` by w `[E, N, K]`: "cublas" (one block-scaled
    cuBLAS GEMM per expert, Hopper, N and K multiples of 512), "triton" (the sync-free grouped kernels, other
    sm89+ GPUs or other shapes; or the CPU under TRITON_INTERPRET=1), else "reference"."""
    if cublas.applies(x, w.shape[1], w.shape[2]):
        return "cublas"
    return "triton" if triton_applies(x) else "reference"


def triton_applies(x: torch.Tensor) -> bool:
    """True when the Triton kernels take `x`'s device: CUDA sm89+ with Triton, or CPU under TRITON_INTERPRET=1."""
    if not kernels.available():
        return False
    if x.is_cuda:
        return torch.cuda.get_device_capability(x.device) >= (8, 9)
    return kernels._INTERPRET and x.device.type == "cpu"


@torch.compiler.disable
def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                   out_dtype: torch.dtype | None = None, impl: str = "auto") -> torch.Tensor:
    """x `[M, K]` (rows sorted by expert), w `[E, N, K]`, offsets `[E]` int32 end rows (the last must be M)
    -> `[M, N]` in `out_dtype` (default: the autocast dtype, else x's). FP8 forward, dgrad and wgrad through
    `impl` (one of BACKENDS; "auto" = `backend(x, w)`): cuBLAS per expert on Hopper (one host read of the
    row counts), the Triton kernels on other CUDA GPUs (no host sync), the reference elsewhere."""
    _check(x, w, offsets)
    if impl not in BACKENDS:
        raise ValueError(f"fp8_grouped_mm: impl must be one of {BACKENDS}, got {impl!r}")
    out_dtype = out_dtype or _out_dtype(x)
    impl = backend(x, w) if impl == "auto" else impl
    if impl in ("cublas", "triton"):
        return _GroupedKernels.apply(x, w, offsets.contiguous(), out_dtype, impl)
    return _GroupedRef.apply(x, w, offsets, BLOCK, out_dtype)


class FP8GroupedExperts(LocalExperts):
    """The routed experts on the grouped path with `fp8_grouped_mm` as its GEMM (`fp8_select`'s plan, or
    `--fp8-experts grouped`): the
    experts' weights go in as their float32 masters and the op quantizes them. The loop path (inference) is
    unchanged."""

    master_weights = True

    def grouped_mm(self, a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return fp8_grouped_mm(a, w, offsets)
