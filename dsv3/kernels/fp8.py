"""FP8 (e4m3) block-wise quantization: plain PyTorch references and the CUDA dispatching wrappers.

DeepSeek-V3 stores Linear weights as `float8_e4m3fn` with one float32 scale per 128×128 block
(`weight_scale_inv`: dequantized block = FP8 block × scale) and quantizes activations on the fly per
token per 128 channels (1×128 tiles). This module is the reference for all of it:

- `quantize_weight` / `dequantize_weight`: 128×128 blocks; edge blocks are zero-padded to a full block
  for the max-abs and cropped again, so any [out, in] shape works.
- `quantize_act`: 1×128 tiles along the last dim of `[..., K]`.
- `fp8_gemm`: `dequant(a) @ dequant(w).T` with fp32 accumulation, output in bf16 (or `out_dtype`).

Everything here runs on CPU and is the oracle of the Triton kernels in `fp8_triton.py`; on CUDA the
wrappers pick those kernels when Triton is importable. Work is done in chunks of block rows so no
temporary is much larger than `_CHUNK_ELEMS` float32 numbers (the checkpoint tools run this on
100M-element tensors on laptops).
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_FMTS = (None, "ue8m0")
_CHUNK_ELEMS = 1 << 24  # float32 elements per temporary chunk (64 MiB)


def _check_block(block: int) -> None:
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")


def _check_scale_fmt(scale_fmt: str | None) -> None:
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")


def round_scale_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Round positive float32 scales up to the next power of two (exact, via the bit pattern).

    A scale that is already a power of two is kept; anything else gets its exponent bumped and its
    mantissa cleared, so `x / scale` can only shrink and never exceeds `FP8_MAX`.
    """
    bits = scale.to(torch.float32).contiguous().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    has_mantissa = (bits & 0x7FFFFF) != 0
    rounded = (exponent + has_mantissa.to(torch.int32)) << 23
    return rounded.view(torch.float32)


def _scale_from_amax(amax: torch.Tensor, scale_fmt: str | None) -> torch.Tensor:
    """amax (float32) -> scale with `amax / scale == FP8_MAX`; all-zero tiles get scale 1 (no NaN)."""
    scale = amax / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if scale_fmt == "ue8m0":
        scale = round_scale_ue8m0(scale)
    return scale


def _to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to e4m3 (nearest even), saturating at ±448 instead of producing NaN."""
    return x.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _rows_per_chunk(cols: int, block: int) -> int:
    """A multiple of `block` rows whose padded float32 copy stays near `_CHUNK_ELEMS` elements."""
    padded_cols = math.ceil(cols / block) * block
    return max(1, _CHUNK_ELEMS // max(1, padded_cols * block)) * block


def _padded_blocks(chunk: torch.Tensor, block: int) -> torch.Tensor:
    """[R, C] -> fresh float32 copy, zero-padded and viewed as [R/b, b, C/b, b]."""
    rows, cols = chunk.shape
    pad_r, pad_c = -rows % block, -cols % block
    if pad_r or pad_c:
        x = F.pad(chunk.to(torch.float32), (0, pad_c, 0, pad_r))
    else:
        x = chunk.to(torch.float32, copy=True)  # callers modify it in place
    return x.view((rows + pad_r) // block, block, (cols + pad_c) // block, block)


def scale_shape(out_features: int, in_features: int, block: int = 128) -> tuple[int, int]:
    """Shape of the per-block scale of an [out, in] weight: [ceil(out/block), ceil(in/block)]."""
    return math.ceil(out_features / block), math.ceil(in_features / block)


def quantize_weight(
    w: torch.Tensor, block: int = 128, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize an [out, in] weight to e4m3 with one scale per block×block tile.

    Returns `(w_fp8 [out, in] float8_e4m3fn, scale_inv [ceil(out/block), ceil(in/block)] float32)`
    such that `w ≈ w_fp8 * scale_inv` block-wise (the HF `weight_scale_inv` convention).
    `scale_fmt="ue8m0"` rounds each scale up to a power of two.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"quantize_weight expects a floating-point weight, got {w.dtype}")
    _check_block(block)
    _check_scale_fmt(scale_fmt)
    rows, cols = w.shape
    w_fp8 = torch.empty(rows, cols, dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty(scale_shape(rows, cols, block), dtype=torch.float32, device=w.device)
    step = _rows_per_chunk(cols, block)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        x = _padded_blocks(w[r0:r1], block)  # [Rb, b, Cb, b]
        s = _scale_from_amax(x.abs().amax(dim=(1, 3)), scale_fmt)  # [Rb, Cb]
        x.div_(s[:, None, :, None])
        q = _to_fp8(x).view(x.shape[0] * block, x.shape[2] * block)
        w_fp8[r0:r1] = q[: r1 - r0, :cols]
        scale[r0 // block : r0 // block + s.shape[0]] = s
    return w_fp8, scale


def dequantize_weight(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = 128, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Inverse of `quantize_weight`: [out, in] FP8 × per-block scale -> [out, in] `dtype`.

    Works in chunks of block rows (float32 math, one rounding to `dtype`), so the only large tensor
    allocated is the output itself.
    """
    if w_fp8.dim() != 2:
        raise ValueError(f"dequantize_weight expects a 2-D [out, in] weight, got shape {tuple(w_fp8.shape)}")
    _check_block(block)
    rows, cols = w_fp8.shape
    expected = scale_shape(rows, cols, block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(w_fp8.shape)} "
            f"with block {block}: expected {expected}"
        )
    scale_inv = scale_inv.to(device=w_fp8.device, dtype=torch.float32)
    out = torch.empty(rows, cols, dtype=dtype, device=w_fp8.device)
    step = _rows_per_chunk(cols, block)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        x = _padded_blocks(w_fp8[r0:r1], block)  # [Rb, b, Cb, b]
        x.mul_(scale_inv[r0 // block : r0 // block + x.shape[0], None, :, None])
        out[r0:r1] = x.view(x.shape[0] * block, x.shape[2] * block)[: r1 - r0, :cols]
    return out


def quantize_act_ref(
    x: torch.Tensor, block: int = 128, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of `quantize_act` (1×block tiles along the last dim)."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"quantize_act expects [..., K] with K >= 1, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"quantize_act expects a floating-point tensor, got {x.dtype}")
    _check_block(block)
    _check_scale_fmt(scale_fmt)
    k = x.shape[-1]
    n_tiles = math.ceil(k / block)
    xf = F.pad(x.to(torch.float32), (0, n_tiles * block - k))
    xf = xf.view(*x.shape[:-1], n_tiles, block)  # [..., Kb, b]
    scale = _scale_from_amax(xf.abs().amax(dim=-1), scale_fmt)  # [..., Kb]
    xf.div_(scale[..., None])
    q = _to_fp8(xf).view(*x.shape[:-1], n_tiles * block)[..., :k]
    return q.contiguous(), scale


def fp8_gemm_ref(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = 128,
) -> torch.Tensor:
    """PyTorch reference of `fp8_gemm`: fp32 `dequant(a) @ dequant(w).T`, in chunks of output columns."""
    k = a_fp8.shape[-1]
    n_tiles = a_scale.shape[-1]
    a = F.pad(a_fp8.to(torch.float32), (0, n_tiles * block - k))
    a = a.view(*a_fp8.shape[:-1], n_tiles, block) * a_scale.to(torch.float32)[..., None]  # [..., Kb, b]
    a = a.view(*a_fp8.shape[:-1], n_tiles * block)[..., :k]  # [..., K]
    a2 = a.reshape(-1, k)  # [M, K]
    n = w_fp8.shape[0]
    out = torch.empty(a2.shape[0], n, dtype=out_dtype, device=a_fp8.device)
    step = _rows_per_chunk(k, block)
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        b0 = n0 // block
        w = dequantize_weight(w_fp8[n0:n1], w_scale[b0 : b0 + math.ceil((n1 - n0) / block)], block, torch.float32)
        out[:, n0:n1] = a2 @ w.T
    return out.view(*a_fp8.shape[:-1], n)


def _check_gemm_shapes(a_fp8, a_scale, w_fp8, w_scale, block: int) -> None:
    if w_fp8.dim() != 2:
        raise ValueError(f"fp8_gemm expects a 2-D [N, K] weight, got shape {tuple(w_fp8.shape)}")
    n, k = w_fp8.shape
    if a_fp8.shape[-1] != k:
        raise ValueError(f"fp8_gemm: activation K={a_fp8.shape[-1]} does not match weight K={k}")
    if tuple(a_scale.shape) != (*a_fp8.shape[:-1], math.ceil(k / block)):
        raise ValueError(
            f"fp8_gemm: a_scale shape {tuple(a_scale.shape)} must be {(*a_fp8.shape[:-1], math.ceil(k / block))}"
        )
    if tuple(w_scale.shape) != scale_shape(n, k, block):
        raise ValueError(f"fp8_gemm: w_scale shape {tuple(w_scale.shape)} must be {scale_shape(n, k, block)}")
    if a_fp8.dtype != FP8_DTYPE or w_fp8.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_gemm expects {FP8_DTYPE} operands, got {a_fp8.dtype} and {w_fp8.dtype}")


@functools.cache
def _triton_kernels():
    """The Triton module, or None when Triton (or its GPU backend) is unavailable."""
    try:
        from dsv3.kernels import fp8_triton
    except ImportError:
        return None
    return fp8_triton if fp8_triton.available() else None


def _use_triton(t: torch.Tensor, block: int) -> bool:
    """Triton's e4m3 type and FP8 tensor-core dots need sm89 (Ada) or newer."""
    if not t.is_cuda or block != 128 or _triton_kernels() is None:
        return False
    return _capability(t.device) >= (8, 9)


def quantize_act(
    x: torch.Tensor, block: int = 128, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `[..., K]` activations per 1×block tile: `(x_fp8 [..., K], scale [..., ceil(K/block)] float32)`.

    On CUDA the scale comes back column-major (stride 1 along the tokens), the layout the GEMM reads.
    """
    if _use_triton(x, block) and x.dim() >= 1 and x.shape[-1] > 0 and x.is_floating_point():
        _check_scale_fmt(scale_fmt)
        return _triton_kernels().act_quant(x, block, scale_fmt)
    return quantize_act_ref(x, block, scale_fmt)


def scaled_mm_block(
    a_fp8: torch.Tensor, a_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """`fp8_gemm` through `torch._scaled_mm` with 1×128 / 128×128 block scales (cuBLAS, sm90, recent torch).

    cuBLAS reads the activation scales outer-dim-major (`[M, Kb]` with stride `(1, M)`), the weight
    column-major (`w.t()`) and its scales as `[Kb, Nb]`. Shapes must be whole 128-blocks (checked by
    `_scaled_mm_applies`); unsupported builds raise RuntimeError."""
    k, n = a_fp8.shape[-1], w_fp8.shape[0]
    a2 = a_fp8.reshape(-1, k)
    s2 = a_scale.reshape(-1, a_scale.shape[-1]).to(torch.float32)
    m = a2.shape[0]
    pad = -m % 16  # cuBLAS refuses row counts that are not a multiple of 16 here (CUBLAS_STATUS_NOT_SUPPORTED)
    if pad:
        a2 = F.pad(a2.view(torch.uint8), (0, 0, 0, pad)).view(FP8_DTYPE)  # zero rows, cropped below
        s2 = F.pad(s2, (0, 0, 0, pad), value=1.0)
    if s2.stride(0) != 1 or s2.shape[0] == 1:
        s2 = s2.t().contiguous().t()
    out = torch._scaled_mm(a2, w_fp8.t(), s2, w_scale.to(torch.float32).t(), out_dtype=out_dtype)
    return (out[:m] if pad else out).view(*a_fp8.shape[:-1], n)


_SCALED_MM_MIN_M = 65  # below: our Triton kernels (split-K) beat cuBLAS' block-scaled GEMM at decode sizes
GEMM_BACKENDS = ("auto", "scaled_mm", "triton", "ref")


def cublas_block_shape(n: int, k: int) -> bool:
    """Weight shapes for which cuBLAS' block-scaled GEMM gave right answers on the H200 (torch 2.11, CUDA 13):
    N a multiple of 128 and K a multiple of 512, i.e. a whole number of 16-byte rows of K/128 fp32 scales
    (K = 512, 1024, 1536, 2048, 7168 all right for every M from 16 to 1000). With K = 256, 384, 640 or 1152 it
    returned garbage (relative errors 0.2 to inf, depending on M) without raising: those stay on Triton.
    Rows are padded to a multiple of 16 by `scaled_mm_block` (cuBLAS refuses other row counts)."""
    return n % 128 == 0 and k % 512 == 0


@functools.cache
def device_capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _capability(device: torch.device) -> tuple[int, int]:
    return device_capability(device.index if device.index is not None else torch.cuda.current_device())


def gemm_backend(m: int, n: int, k: int, device: torch.device, out_dtype: torch.dtype = torch.bfloat16,
                 capability: tuple[int, int] | None = None) -> str:
    """Which `fp8_gemm` backend runs an `[m, k] x [n, k]^T` block-scaled product, decided from the shape and
    the device alone (no trial run, no output check): cuBLAS' block-scaled `torch._scaled_mm` on sm90+ for
    m > 64 on `cublas_block_shape` shapes with bf16/fp32 output; our Triton kernel on sm89+ otherwise; the
    PyTorch reference on CPU and older GPUs. `capability` overrides the device's (tests)."""
    if device.type != "cuda":
        return "ref"
    cap = capability or _capability(device)
    if (cap >= (9, 0) and m >= _SCALED_MM_MIN_M and cublas_block_shape(n, k)
            and out_dtype in (torch.bfloat16, torch.float32) and hasattr(torch, "_scaled_mm")):
        return "scaled_mm"
    if cap >= (8, 9) and _triton_kernels() is not None:
        return "triton"
    return "ref"


# ---- the activation policy of FP8 weights ---------------------------------------------------------
FP8_POLICIES = ("auto", "w8a16", "w8a8")
AUTO_W8A8_MIN_ROWS = 64  # `auto`: W8A8 from this many rows of activations (prefill), W8A16 below (decode)
_said_no_fp8_mma: set[str] = set()


def fp8_mma_available(device: torch.device) -> bool:
    """FP8 tensor-core MMA through our kernels: a CUDA device of sm89 (Ada) or newer, with Triton."""
    return device.type == "cuda" and _triton_kernels() is not None and _capability(device) >= (8, 9)


def resolve_policy(policy: str, device: torch.device, rows: int) -> str:
    """How a product with FP8 weights runs for `rows` rows of activations: "w8a16" (the weight dequantized
    in registers, activations stay BF16: the official demo's way, the fastest for decode) or "w8a8"
    (activations quantized per 1x128 tile, FP8 MMA: the report's inference, the fastest for prefill).

    `policy`: "w8a16", "w8a8", or "auto" (W8A8 from `AUTO_W8A8_MIN_ROWS` rows on GPUs with FP8 MMA, else
    W8A16). On CPU "w8a8" runs the reference GEMM on quantized operands (same numbers as the GPU, slowly) and
    "auto" is W8A16; on a GPU without FP8 MMA (before sm89) everything is W8A16, said once in the log."""
    if policy not in FP8_POLICIES:
        raise ValueError(f"FP8 policy must be one of {FP8_POLICIES}, got {policy!r}")
    if device.type != "cuda":
        return "w8a8" if policy == "w8a8" else "w8a16"
    if not fp8_mma_available(device):
        name = torch.cuda.get_device_name(device)
        if policy != "w8a16" and name not in _said_no_fp8_mma:
            _said_no_fp8_mma.add(name)
            logging.getLogger("dsv3").warning(
                "%s has no FP8 tensor cores (needs sm89+): FP8 weights are dequantized in registers (w8a16)", name)
        return "w8a16"
    if policy == "auto":
        return "w8a8" if rows >= AUTO_W8A8_MIN_ROWS else "w8a16"
    return policy


def fp8_gemm(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = 128,
    backend: str = "auto",
) -> torch.Tensor:
    """Block-scaled FP8 GEMM: `dequant(a [..., K]) @ dequant(w [N, K]).T -> [..., N]` in `out_dtype`.

    `a_scale` is `[..., ceil(K/block)]` (from `quantize_act`), `w_scale` is
    `[ceil(N/block), ceil(K/block)]` (from `quantize_weight`). Accumulation is fp32.
    `backend="auto"` takes `gemm_backend`'s choice (cuBLAS for large M on whole-block shapes, faster there than
    our Triton kernel per benchmarks/fp8_gemm.py; Triton, split-K, at decode sizes; the reference off FP8
    hardware); `"scaled_mm"`, `"triton"` and `"ref"` force one. A backend that fails raises.
    """
    _check_gemm_shapes(a_fp8, a_scale, w_fp8, w_scale, block)
    if backend not in GEMM_BACKENDS:
        raise ValueError(f"fp8_gemm: backend must be one of {GEMM_BACKENDS}, got {backend!r}")
    if backend == "auto":
        n, k = w_fp8.shape
        backend = gemm_backend(a_fp8.numel() // max(1, k), n, k, a_fp8.device, out_dtype) if block == 128 else "ref"
    if backend == "scaled_mm":
        return scaled_mm_block(a_fp8, a_scale, w_fp8.contiguous(), w_scale, out_dtype)
    if backend == "triton":
        return _triton_kernels().fp8_gemm(a_fp8, a_scale, w_fp8, w_scale, out_dtype)
    return fp8_gemm_ref(a_fp8, a_scale, w_fp8, w_scale, out_dtype, block)
