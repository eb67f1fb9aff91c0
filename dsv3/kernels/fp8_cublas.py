"""cuBLAS's block-scaled FP8 GEMM with DeepSeek-V3's tiles (`F.scaled_mm`, Hopper, cuBLASLt >= 12.9), shared by
the training linear (`dsv3.train.fp8_gemms`) and the routed experts' per-expert GEMMs (`fp8_grouped_cublas`):

- `scaled_mm(a, b, a_scale_t, b_scale, b_blocks, out_dtype, out=None)`: `a bᵀ` with a `[M, K]` and b `[N, K]`
  e4m3, both row-major (cuBLAS's column-major B is `b.t()`), a's 1x128 scales transposed `[K/128, M]`, b's
  128x128 block scales `[N/128, K/128]` (`b_blocks`) or its 1x128 scales transposed `[K/128, N]`; into `out`
  (a contiguous `[M, N]` view) when given;
- `emulated_mm`: the same product in float32 from the dequantized codes (the CPU path, the tests' oracle);
- `blockwise_supported(device)`: whether this GPU's cuBLAS runs both recipes (probed once per GPU; why not in
  `probe_errors`); `fp32_out(device_index)`: whether it writes float32 outputs.

The recipes: BlockWise1x128 x BlockWise128x128 (forward, dgrad) and BlockWise1x128 x BlockWise1x128 (wgrad,
both operands in 128-token tiles). Callers keep to the shapes cuBLAS computes right on the H200 (torch 2.11,
CUDA 13): contractions a multiple of 512 (K/128 not a multiple of 4 gave wrong results, up to inf, without an
error) and row counts a multiple of 16 (it refused M = 65).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn


def _dequant_b(b: torch.Tensor, b_scale: torch.Tensor, b_blocks: bool) -> torch.Tensor:
    """b `[N, K]` codes -> float32 with its scales (128×128 blocks `[ceil(N/128), K/128]`, or 1×128 tiles
    transposed `[K/128, N]`)."""
    n, k = b.shape
    kb = k // BLOCK
    if b_blocks:
        nb = b_scale.shape[0]
        per = b_scale[:, None, :, None].expand(nb, BLOCK, kb, BLOCK).reshape(nb * BLOCK, k)[:n]  # [N, K]
    else:
        per = b_scale.t()[:, :, None].expand(n, kb, BLOCK).reshape(n, k)  # [N, K]
    return b.to(torch.float32) * per


def emulated_mm(a: torch.Tensor, b: torch.Tensor, a_scale_t: torch.Tensor, b_scale: torch.Tensor,
                b_blocks: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """What `scaled_mm` computes, in float32 from the dequantized codes: a `[M, K]`, b `[N, K]` (K a multiple
    of 128) -> `[M, N]` in `out_dtype`."""
    m, k = a.shape
    a_f = (a.to(torch.float32).view(m, k // BLOCK, BLOCK) * a_scale_t.t()[:, :, None]).view(m, k)  # [M, K]
    return (a_f @ _dequant_b(b, b_scale, b_blocks).t()).to(out_dtype)


def block_scale(s: torch.Tensor) -> torch.Tensor:
    """128×128 scales `[out_blocks, contraction_blocks]` -> cuBLAS's B layout `[ceil4(cb), out_blocks]`,
    stride `(1, ceil4(cb))` (the contraction blocks zero-padded to a multiple of 4)."""
    cb = s.shape[1]
    return (s if cb % 4 == 0 else F.pad(s, (0, -cb % 4))).contiguous().t()


def scaled_mm(a: torch.Tensor, b: torch.Tensor, a_scale_t: torch.Tensor, b_scale: torch.Tensor, b_blocks: bool,
              out_dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """cuBLAS block-scaled `a bᵀ` in `out_dtype` (bf16 then a cast where cuBLAS offers no float32 output), or
    written into `out` (its dtype must be one cuBLAS writes). An error from cuBLAS propagates."""
    recipe_b = F.ScalingType.BlockWise128x128 if b_blocks else F.ScalingType.BlockWise1x128
    scale_b = block_scale(b_scale) if b_blocks else b_scale.t()
    if out is not None:
        torch._scaled_mm_v2(a, b.t(), [a_scale_t.t()], [F.ScalingType.BlockWise1x128.value], [], [scale_b],
                            [recipe_b.value], [], None, out.dtype, [], False, out=out)
        return out
    direct = out_dtype != torch.float32 or a.device.type != "cuda" or fp32_out(a.device.index)
    y = F.scaled_mm(a, b.t(), a_scale_t.t(), F.ScalingType.BlockWise1x128, scale_b, recipe_b,
                    output_dtype=out_dtype if direct else torch.bfloat16)
    return y if direct else y.to(out_dtype)


@functools.cache
def fp32_out(device_index: int) -> bool:
    """Whether cuBLAS writes float32 outputs of the block-scaled recipes on this GPU."""
    try:
        device = torch.device("cuda", device_index)
        a = torch.ones(128, 128, device=device).to(FP8_DTYPE)
        s = torch.ones(128, 1, device=device)
        F.scaled_mm(a, a.t(), s, F.ScalingType.BlockWise1x128, s, F.ScalingType.BlockWise1x128,
                    output_dtype=torch.float32)
        return True
    except (RuntimeError, NotImplementedError, ValueError):
        return False


probe_errors: dict[int, str] = {}  # device index -> why the block-scaled recipes were found unusable


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
        a = torch.randn(256, 512, device=device).to(FP8_DTYPE)
        w = torch.randn(128, 512, device=device).to(FP8_DTYPE)
        a_st, w_s, w_st = (torch.ones(4, 256, device=device), torch.ones(1, 4, device=device),
                           torch.ones(4, 128, device=device))
        scaled_mm(a, w, a_st, w_s, True, torch.bfloat16)  # 1x128 x 128x128
        scaled_mm(w, a, w_st, a_st, False, torch.bfloat16)  # 1x128 x 1x128
        torch.cuda.synchronize(device)
        return True
    except (RuntimeError, NotImplementedError, ValueError, AttributeError) as e:
        probe_errors[device_index] = f"{type(e).__name__}: {e}"[:300]
        return False


def blockwise_supported(device: torch.device) -> bool:
    """Whether the cuBLAS block-scaled FP8 recipes run on `device` (probed once per GPU)."""
    if device.type != "cuda":
        return False
    return _probe(device.index if device.index is not None else torch.cuda.current_device())
