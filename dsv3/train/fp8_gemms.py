"""The three FP8 GEMMs of a training linear on CUDA, through cuBLAS block-scaled FP8 (`F.scaled_mm`).

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
wrong; 512, 1024, 2048, 7168 right). Token counts are padded to a multiple of 16 (cuBLAS refused M = 65).

Scale layouts cuBLAS wants (checked by torch): a 1×128 scale of an `[R, C]` operand is `[R, C/128]` with
stride `(1, R)`; a 128×128 scale of B `[K, N]` is `[ceil4(K/128), N/128]` with stride `(1, ceil4(K/128))`.

`blockwise_supported(device)` probes once whether the recipes run (an sm90 GPU and a torch/cuBLAS that has
them; `probe_errors` says why not); `dsv3.train.fp8_linear` falls back to the Triton forward/dgrad kernels and
an emulated wgrad otherwise. Guards, because cuBLAS's block-scaled support has refused or mis-computed some
shapes on this stack: the first call per shape of each GEMM is checked against the float32 product of the
same dequantized operands, and the first call per shape of each Triton quantizer against its input; a
failure is recorded in `refused` and that shape takes the emulation / PyTorch path from then on.
The emulated GEMMs of `fp8_linear` are the oracle these are tested against (tests/test_train_fp8_gemms.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dsv3.kernels.fp8 import quantize_act, quantize_weight
from dsv3.train import fp8_quant_triton

BLOCK = 128
ALIGN_K = 512  # every contraction padded to a multiple of this (see the module docstring)


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_cols(x: torch.Tensor, cols: int) -> torch.Tensor:
    """`[R, C]` -> `[R, cols]` with zero columns appended (no copy when already that wide)."""
    return x if x.shape[1] == cols else F.pad(x, (0, cols - x.shape[1]))


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x if x.shape[0] == rows else F.pad(x, (0, 0, 0, rows - x.shape[0]))


def _col_major(s: torch.Tensor) -> torch.Tensor:
    """A 1×128 scale `[R, T]` with stride `(1, R)` (a view when it already is)."""
    s = s.to(torch.float32)
    return s if s.stride(0) == 1 and (s.shape[1] == 1 or s.stride(1) == s.shape[0]) else s.t().contiguous().t()


def _block_scale(s: torch.Tensor) -> torch.Tensor:
    """128×128 scales `[out_blocks, contraction_blocks]` -> cuBLAS's B layout `[ceil4(cb), out_blocks]`,
    stride `(1, ceil4(cb))` (the contraction blocks zero-padded to a multiple of 4)."""
    s = s.to(torch.float32)
    return _pad_cols(s, _ceil(s.shape[1], 4)).contiguous().t()


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and fp8_quant_triton.available()


def _kernel_ok(kind: str, x: torch.Tensor, deq: torch.Tensor) -> bool:
    """First call per (kind, shape, dtype) of a Triton quantizer: its dequantized codes must be finite and
    within e4m3's rounding of the input (relative error < 0.1; e4m3 gives ~0.03); otherwise the kind/shape is
    recorded in `refused` and the PyTorch path used from then on."""
    key = (kind, x.device.index, tuple(x.shape), x.dtype)
    if key in refused:
        return False
    if key in _checked:
        return True
    _checked.add(key)
    ref = x.float()
    err = float((deq - ref).norm() / ref.norm().clamp_min(1e-30))
    if not (err < 0.1 and bool(torch.isfinite(deq).all())):
        refused[key] = f"Triton {kind}: relative error {err:.3g} of the dequantized codes"
        return False
    return True


def quantize_weight_padded(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W `[N, K]` -> e4m3 codes `[N', K']`, the same codes transposed `[K', N']` (contiguous, for dgrad) and
    128×128 scales `[N'/128, K'/128]`; both dims zero-padded to multiples of `ALIGN_K` (each is a contraction:
    K of the forward, N of dgrad; padding blocks are zeros). One Triton pass on CUDA."""
    w = w.detach()
    n, k = w.shape
    if _use_triton(w):
        w_q, w_qt, w_s = fp8_quant_triton.quantize_weight_t(w, ALIGN_K)
        key = ("weight", w.device.index, tuple(w.shape), w.dtype)
        if key in _checked and key not in refused:
            return w_q, w_qt, w_s
        deq = (w_q.float() * w_s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1))[:n, :k]
        if _kernel_ok("weight", w, deq):  # the transpose is a copy of these codes (fp8_quant_triton)
            return w_q, w_qt, w_s
    w_q, w_s = quantize_weight(_pad_rows(_pad_cols(w, _ceil(k, ALIGN_K)), _ceil(n, ALIGN_K)), BLOCK)
    return w_q, w_q.t().contiguous(), w_s


def quantize_tokens_t(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x `[M, C]` in 128×1 tiles (128 tokens of a channel) -> codes transposed `[C, M']` and scales
    `[C, M'/128]` (M' = M rounded up to `ALIGN_K`; padding tokens are zeros). One Triton pass on CUDA."""
    if _use_triton(x):
        q, s = fp8_quant_triton.quantize_tokens_t(x, ALIGN_K)
        key = ("tokens", x.device.index, tuple(x.shape), x.dtype)
        if key in _checked and key not in refused:
            return q, s
        deq = (q.float() * s.repeat_interleave(BLOCK, 1)).t()[: x.shape[0]]  # [M, C]
        if _kernel_ok("tokens", x, deq):
            return q, s
    return quantize_act(_pad_rows(x, _ceil(x.shape[0], ALIGN_K)).t(), BLOCK)


def gemm_forward(x: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor, n: int,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """x `[M, K]` (high precision) quantized in 1×128 tiles, times padded FP8 Wᵀ -> `[M, n]` `out_dtype`."""
    m = x.shape[0]
    x_q, x_s = quantize_act(_pad_rows(_pad_cols(x, w_q.shape[1]), _ceil(m, 16)), BLOCK)  # [M', K'], [M', K'/128]
    y = _scaled_mm(x_q, w_q.t(), _col_major(x_s), F.ScalingType.BlockWise1x128,
                   _block_scale(w_s), F.ScalingType.BlockWise128x128, out_dtype)  # [M', N']
    return y if y.shape == (m, n) else y[:m, :n]


def gemm_dgrad(dy: torch.Tensor, w_qt: torch.Tensor, w_s: torch.Tensor, k: int,
               out_dtype: torch.dtype) -> torch.Tensor:
    """dy `[M, N]` quantized in 1×128 tiles along N, times padded FP8 W (given as its transpose `[K', N']`)
    -> dx `[M, k]`."""
    m = dy.shape[0]
    dy_q, dy_s = quantize_act(_pad_rows(_pad_cols(dy, w_qt.shape[1]), _ceil(m, 16)), BLOCK)  # [M', N'], [M', N'/128]
    dx = _scaled_mm(dy_q, w_qt.t(), _col_major(dy_s), F.ScalingType.BlockWise1x128,
                    _block_scale(w_s.t()), F.ScalingType.BlockWise128x128, out_dtype)  # [M', K']
    return dx if dx.shape == (m, k) else dx[:m, :k]


def gemm_wgrad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dW `[N, K]` float32 `= dyᵀ x` with dy `[M, N]` and x `[M, K]` quantized in 128×1 tiles (128 tokens
    per channel); the token count (the contraction) is zero-padded to a multiple of `ALIGN_K`."""
    dy_t, dy_ts = quantize_tokens_t(dy)  # [N, M'], [N, M'/128]
    x_t, x_ts = quantize_tokens_t(x)  # [K, M'], [K, M'/128]
    return _scaled_mm(dy_t, x_t.t(), _col_major(dy_ts), F.ScalingType.BlockWise1x128,
                      _col_major(x_ts), F.ScalingType.BlockWise1x128, torch.float32)  # [N, K]


# (device, recipes, A shape, B shape, out dtype) -> why cuBLAS's result was refused there (diagnostics)
refused: dict[tuple, str] = {}
_checked: set[tuple] = set()


def _dequantized(a, b, scale_a, scale_b, recipe_b, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 values the product multiplies: A's first `rows` rows `[rows, K]` and B `[K, N]`."""
    k, n = a.shape[1], b.shape[1]
    a_f = a[:rows].float() * scale_a[:rows].repeat_interleave(BLOCK, dim=1)[:, :k]
    if recipe_b == F.ScalingType.BlockWise128x128:
        per = scale_b[: -(-k // BLOCK)].repeat_interleave(BLOCK, dim=0)[:k].repeat_interleave(BLOCK, dim=1)[:, :n]
    else:  # 1x128 along K, one row of scales per output column
        per = scale_b.t().repeat_interleave(BLOCK, dim=0)[:k]
    return a_f, b.float() * per


def _scaled_mm(a, b, scale_a, recipe_a, scale_b, recipe_b, out_dtype: torch.dtype) -> torch.Tensor:
    """`F.scaled_mm` in `out_dtype` (bf16 then a cast where cuBLAS offers no float32 output). The first call
    per (device, recipes, shapes, dtype) is checked against the float32 product of the same dequantized
    operands on up to 128 rows; a refused or wrong (non-finite, relative error > 1e-2) result is remembered
    in `refused` and that shape is computed by the float32 emulation from then on."""
    key = (a.device.index, int(recipe_a), int(recipe_b), tuple(a.shape), tuple(b.shape), out_dtype)
    if key in refused:
        a_f, b_f = _dequantized(a, b, scale_a, scale_b, recipe_b, a.shape[0])
        return (a_f @ b_f).to(out_dtype)
    direct = out_dtype != torch.float32 or a.device.type != "cuda" or _fp32_out(a.device.index)
    try:
        y = F.scaled_mm(a, b, scale_a, recipe_a, scale_b, recipe_b,
                        output_dtype=out_dtype if direct else torch.bfloat16)
    except (RuntimeError, ValueError, NotImplementedError) as e:
        refused[key] = f"{type(e).__name__}: {e}"[:300]
        return _scaled_mm(a, b, scale_a, recipe_a, scale_b, recipe_b, out_dtype)
    y = y if direct else y.float()
    if key not in _checked:
        _checked.add(key)
        rows = min(128, a.shape[0])
        a_f, b_f = _dequantized(a, b, scale_a, scale_b, recipe_b, rows)
        ref = a_f @ b_f
        err = float((y[:rows].float() - ref).norm() / ref.norm().clamp_min(1e-30))
        if not (err < 1e-2 and bool(torch.isfinite(y).all())):
            refused[key] = f"relative error {err:.3g} against the dequantized product (or non-finite output)"
            return _scaled_mm(a, b, scale_a, recipe_a, scale_b, recipe_b, out_dtype)
    return y


@functools.cache
def _fp32_out(device_index: int) -> bool:
    try:
        device = torch.device("cuda", device_index)
        a = torch.ones(128, 128, device=device).to(torch.float8_e4m3fn)
        s = torch.ones(128, 1, device=device)
        F.scaled_mm(a, a.t(), s, F.ScalingType.BlockWise1x128, s, F.ScalingType.BlockWise1x128,
                    output_dtype=torch.float32)
        return True
    except (RuntimeError, NotImplementedError, ValueError):
        return False


@functools.cache
def _probe(device_index: int) -> bool:
    if not (hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")):
        probe_errors[device_index] = "this torch has no F.scaled_mm / F.ScalingType"
        return False
    if torch.cuda.get_device_capability(device_index) != (9, 0):
        probe_errors[device_index] = f"compute capability {torch.cuda.get_device_capability(device_index)}, not 9.0"
        return False
    try:
        device = torch.device("cuda", device_index)
        x = torch.randn(256, 256, device=device)
        w_q, w_qt, w_s = quantize_weight_padded(torch.randn(128, 256, device=device))
        gemm_forward(x, w_q, w_s, 128, torch.bfloat16)
        gemm_dgrad(torch.randn(256, 128, device=device), w_qt, w_s, 256, torch.bfloat16)
        gemm_wgrad(torch.randn(256, 128, device=device), x)
        torch.cuda.synchronize(device)
        return True
    except (RuntimeError, NotImplementedError, ValueError, AttributeError) as e:
        probe_errors[device_index] = f"{type(e).__name__}: {e}"[:300]
        return False


probe_errors: dict[int, str] = {}  # device index -> why the block-scaled recipes were found unusable


def blockwise_supported(device: torch.device) -> bool:
    """Whether the cuBLAS block-scaled FP8 recipes run on `device` (probed once per GPU)."""
    if device.type != "cuda":
        return False
    return _probe(device.index if device.index is not None else torch.cuda.current_device())
