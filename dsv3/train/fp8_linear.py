"""FP8 mixed-precision training linear (DeepSeek-V3 report, section 3.3), as a `torch.autograd.Function`.

All three GEMMs of `y = x Wᵀ` run on e4m3 operands with fine-grained scales and fp32 accumulation:

| GEMM | left operand | right operand | contraction |
| --- | --- | --- | --- |
| forward `y = x Wᵀ` | x in 1×128 tiles (per token, 128 channels) | W in 128×128 blocks | K (in) |
| dgrad `dx = dy W` | dy in 1×128 tiles (per token, 128 out-channels) | W (same 128×128 blocks, transposed) | N (out) |
| wgrad `dW = dyᵀ x` | dy in 128×1 tiles (128 tokens, per channel) | x in 128×1 tiles | M (tokens) |

Every scale is the online max-abs of its tile / 448 (`dsv3.kernels.fp8`). The master weight stays in
float32 (the optimizer updates it); the FP8 weight and its scales are recomputed at every forward.

Two ways to run the GEMMs (`dsv3.train.fp8_gemms`):
- `emulate`: dequantize both FP8 operands to float32 and multiply in float32 (any device; the test oracle);
- otherwise the custom op `torch.ops.dsv3.fp8_scaled_mm`: cuBLAS block-scaled FP8 on Hopper (`F.scaled_mm`,
  bf16 outputs for y and dx, fp32 for dW), the Triton FP8 GEMM on other CUDA GPUs (forward and dgrad), the
  float32 emulation elsewhere.
Both share the quantizers. The function traces under `torch.compile` with no graph break: the quantizers are
torch ops that inductor fuses into their producers (RMSNorm, SiLU·up, the gradient of the next op), the GEMM
is one opaque node; eagerly on CUDA the quantizers are one-pass Triton kernels with the same bits.
For the wgrad tiles the activation is requantized from its original precision (the report re-tiles its
stored FP8 copy; that double rounding is not modelled).

`swap_to_fp8(model)` replaces the model's `nn.Linear` layers by `FP8TrainingLinear` (sharing the same Parameter, so
names and state dicts are unchanged), except the output head; the embedding, router gates and norms are
not `nn.Linear` and stay in high precision, as in the report. Its `module_filter_fn` narrows the swap to the
linears that `dsv3.train.fp8_select` finds large enough for FP8 to pay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dsv3.train import fp8_gemms

BLOCK = 128


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class FP8LinearFunction(torch.autograd.Function):
    """`y = x Wᵀ` with FP8 forward, input-gradient and weight-gradient GEMMs (see the module docstring).
    Traceable by dynamo: shapes and dtypes are the only Python state, the GEMMs are a custom op."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, emulate: bool) -> torch.Tensor:
        out_dtype = _out_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [M, K]
        with torch.autocast(x.device.type, enabled=False):
            align = BLOCK if emulate else fp8_gemms.ALIGN_K
            w_q, w_qt, w_s = fp8_gemms.quantize_weight_padded(weight, align)  # [N', K'], [K', N'], [N'/128, K'/128]
            y = fp8_gemms.gemm_forward(x2, w_q, w_s, weight.shape[0], out_dtype, emulate)  # [M, N]
        ctx.save_for_backward(x2, w_qt, w_s)  # backward needs only the transposed codes (dgrad)
        ctx.emulate, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = emulate, shape, x.dtype, weight.dtype
        return y.reshape(*shape[:-1], weight.shape[0])  # [..., N]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2, w_qt, w_s = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1])  # [M, N]
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dx = fp8_gemms.gemm_dgrad(dy, w_qt, w_s, x2.shape[1], ctx.x_dtype, ctx.emulate).reshape(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                dw = fp8_gemms.gemm_wgrad(dy, x2, ctx.emulate).to(ctx.w_dtype)  # [N, K]
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, emulate: bool = True) -> torch.Tensor:
    """x `[..., K]`, weight `[N, K]` -> `[..., N]` through the FP8 GEMMs."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: input has {x.shape[-1]} features, weight expects {weight.shape[1]}")
    return FP8LinearFunction.apply(x, weight, emulate)


class FP8TrainingLinear(nn.Linear):
    """A bias-free `nn.Linear` whose GEMMs run in FP8 (weights stay float32 masters)."""

    def __init__(self, in_features: int, out_features: int, emulate: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.emulate = emulate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.emulate)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8=e4m3, emulate={self.emulate}"


def swap_to_fp8(model: nn.Module, emulate: bool | None = None, skip: tuple[str, ...] = ("lm_head",),
                routed_experts: bool = True,
                module_filter_fn: Callable[[nn.Module, str], bool] | None = None) -> int:
    """Replace every bias-free `nn.Linear` of `model` (except names ending in `skip`) by an `FP8TrainingLinear`
    sharing its weight. `emulate=None` emulates on CPU and uses the FP8 kernels on CUDA.
    `routed_experts=False` leaves the routed experts (`...mlp.experts.{e}...`) as plain linears, so the MoE
    keeps its sync-free grouped path. `module_filter_fn(linear, path)`, as in torchao's `convert_to_float8_training`:
    only linears for which it returns True are swapped (`dsv3.train.fp8_select` decides by shape). Returns the
    count."""
    swapped = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is not nn.Linear or child.bias is not None or full.split(".")[-1] in skip:
                continue
            if not routed_experts and ".experts." in f".{full}":
                continue
            if module_filter_fn is not None and not module_filter_fn(child, full):
                continue
            device = child.weight.device
            new = FP8TrainingLinear(child.in_features, child.out_features,
                            emulate=device.type != "cuda" if emulate is None else emulate, device="meta")
            new.weight = child.weight
            setattr(parent, name, new)
            swapped += 1
    return swapped
