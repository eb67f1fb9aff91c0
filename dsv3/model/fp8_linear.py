"""The one FP8 weight format of inference: `FP8Linear`, the DeepSeek-V3 checkpoint layout, half the bytes.

`FP8Linear` holds `weight` (`float8_e4m3fn`, `[out, in]`) and `weight_scale_inv` (float32,
`[ceil(out/128), ceil(in/128)]`, dequantized block = FP8 block × scale), so its state-dict keys are the
HF names and a checkpoint's FP8 tensors copy straight in. The same tensors, stacked per expert, feed the
fused MoE kernels (`dsv3.model.fused.stack_experts`). Forward follows the module's activation policy
(`policy`, set by `set_fp8_policy`; `dsv3.kernels.fp8.resolve_policy` says what each one means):

- `w8a16`: activations stay in their dtype, the weight is dequantized: in registers by the Triton
  weight-only GEMM on CUDA (`dsv3.kernels.moe.linear`), a slab of output rows at a time elsewhere, so no
  full-size high-precision copy of the weight exists. Equal to the dequantized BF16 model up to the
  rounding of each product.
- `w8a8`: activations quantized per 1×128 tile and the block-scaled FP8 GEMM (`dsv3.kernels.fp8.fp8_gemm`:
  cuBLAS or Triton on the GPU, the reference on CPU), as the report's inference does.
- `auto` (default): W8A8 for 64 rows or more on GPUs with FP8 tensor cores, W8A16 otherwise.

While `x` needs a gradient the slab-wise dequantized matmul runs (autograd flows to `x`).

`convert_linears_to_fp8(model)` swaps `nn.Linear` modules for `FP8Linear`, keeping BF16 the layers the
official checkpoint keeps BF16 (`keep_bf16`): the output head, the MoE router (`mlp.gate`, not an
`nn.Linear` here anyway), the MTP `shared_head.head` and `eh_proj`; embeddings and norms are not Linear.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.kernels import moe as moe_ops
from dsv3.kernels.fp8 import (
    FP8_DTYPE,
    FP8_POLICIES,
    _CHUNK_ELEMS,
    dequantize_weight,
    fp8_gemm,
    quantize_act,
    quantize_weight,
    resolve_policy,
    scale_shape,
)

# Linear layers that stay BF16 in the official FP8 checkpoint (matched on the module's dotted name)
BF16_LINEAR_SUFFIXES = ("lm_head", "shared_head.head", "eh_proj", "mlp.gate")


def keep_bf16(name: str) -> bool:
    """True for a module name the official DeepSeek-V3 FP8 checkpoint stores in BF16."""
    name = name.removeprefix("model.")
    return any(name == s or name.endswith("." + s) for s in BF16_LINEAR_SUFFIXES)


class FP8Linear(nn.Module):
    """`y = x Wᵀ (+ b)` with W stored as block-scaled e4m3 (`weight`, `weight_scale_inv`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        block_size: int = 128,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"FP8Linear needs positive sizes, got in={in_features}, out={out_features}")
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        self.policy = "auto"  # the activation policy (module docstring); `set_fp8_policy` changes it
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device), requires_grad=False
        )
        self.weight_scale_inv = nn.Parameter(
            torch.ones(scale_shape(out_features, in_features, block_size), dtype=torch.float32, device=device),
            requires_grad=False,
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 128, scale_fmt: str | None = None) -> FP8Linear:
        """Quantize an `nn.Linear` (its weight per 128×128 block; the bias is kept as is)."""
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, block_size, w.device,
                  linear.bias.dtype if linear.bias is not None else None)
        if not w.is_meta:  # meta modules (built before loading) only need the right shapes and dtypes
            q, s = quantize_weight(w.detach(), block_size, scale_fmt)
            new.weight.data.copy_(q)
            new.weight_scale_inv.data.copy_(s)
            if linear.bias is not None:
                new.bias.data.copy_(linear.bias.detach())
        return new

    @classmethod
    def from_tensors(cls, weight: torch.Tensor, scale: torch.Tensor) -> FP8Linear:
        """A bias-free FP8Linear over existing tensors (no copy: views into stacked experts stay views)."""
        new = cls(weight.shape[1], weight.shape[0], device="meta")
        new.weight = nn.Parameter(weight, requires_grad=False)
        new.weight_scale_inv = nn.Parameter(scale, requires_grad=False)
        return new

    def dequantized_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The full `[out, in]` weight in `dtype` (allocates it; forward does not)."""
        return dequantize_weight(self.weight, self.weight_scale_inv, self.block_size, dtype)

    def mode(self, x: torch.Tensor) -> str:
        """"w8a16" or "w8a8": how `forward(x)` runs (gradients and other block sizes: always w8a16)."""
        if self.block_size != 128 or (x.requires_grad and torch.is_grad_enabled()):
            return "w8a16"
        return resolve_policy(self.policy, x.device, x.numel() // max(1, x.shape[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FP8Linear expects {self.in_features} input features, got shape {tuple(x.shape)}")
        mode = self.mode(x)
        if mode == "w8a8":
            x_q, x_s = quantize_act(x, self.block_size)  # [..., K] e4m3, [..., K/128]
            y = fp8_gemm(x_q, x_s, self.weight, self.weight_scale_inv, out_dtype=x.dtype)
        elif x.is_cuda and not torch.is_grad_enabled():
            y = moe_ops.linear(x, self.weight, self.weight_scale_inv)  # dequantized in registers
        else:
            y = self._dequant_matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _dequant_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ dequant(W).T, dequantizing a slab of whole 128-row blocks at a time."""
        b = self.block_size
        n = self.out_features
        rows = max(1, _CHUNK_ELEMS // (self.in_features * b)) * b  # ~16M weight elements per slab
        if rows >= n:
            return F.linear(x, self.dequantized_weight(x.dtype))
        out = x.new_empty(*x.shape[:-1], n)  # [..., N]
        for n0 in range(0, n, rows):
            n1 = min(n, n0 + rows)
            s = self.weight_scale_inv[n0 // b : math.ceil(n1 / b)]
            w = dequantize_weight(self.weight[n0:n1], s, b, x.dtype)  # [rows, K]
            out[..., n0:n1] = F.linear(x, w)
        return out

    def _apply(self, fn, recurse: bool = True):
        # Device moves (and to_empty, share_memory) apply; dtype casts such as `model.to(torch.bfloat16)`
        # must not turn the e4m3 codes or their float32 scales into something else.
        probe16 = fn(torch.empty(0, dtype=torch.float16, device=self.weight.device))
        probe64 = fn(torch.empty(0, dtype=torch.float64, device=self.weight.device))
        if probe16.dtype == torch.float16 and probe64.dtype == torch.float64:
            return super()._apply(fn, recurse)
        device = probe16.device
        for p in (self.weight, self.weight_scale_inv):
            p.data = p.data.to(device)
        if self.bias is not None:
            self.bias.data = fn(self.bias.data)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_size={self.block_size}, policy={self.policy}")


def set_fp8_policy(model: nn.Module, policy: str) -> int:
    """Set the activation policy of every FP8 module of `model` (FP8Linears and FP8 stacked experts);
    returns how many modules hold FP8 weights."""
    if policy not in FP8_POLICIES:
        raise ValueError(f"FP8 policy must be one of {FP8_POLICIES}, got {policy!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, FP8Linear) or getattr(module, "fp8", False):
            module.policy = policy
            count += 1
    return count


def has_fp8_weights(model: nn.Module) -> bool:
    return any(p.dtype == FP8_DTYPE for p in model.parameters())


def convert_linears_to_fp8(
    model: nn.Module,
    skip: Callable[[str], bool] | None = keep_bf16,
    block_size: int = 128,
    scale_fmt: str | None = None,
) -> list[str]:
    """Replace each `nn.Linear` of `model` whose dotted name `skip` rejects by an `FP8Linear`, in place.

    Real weights are quantized (`FP8Linear.from_linear`); modules on the meta device become empty FP8
    modules of the right shapes, ready for a loader to copy checkpoint tensors into. Returns the names
    of the converted modules.
    """
    converted = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not nn.Linear or (skip is not None and skip(full)):
                continue
            setattr(module, child_name, FP8Linear.from_linear(child, block_size, scale_fmt))
            converted.append(full)
    return converted
