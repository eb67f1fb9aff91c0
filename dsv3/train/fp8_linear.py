"""FP8 mixed-precision training linear (DeepSeek-V3 report, section 3.3), as a `torch.autograd.Function`.

All three GEMMs of `y = x Wᵀ` run on e4m3 operands with fine-grained scales and fp32 accumulation:

| GEMM | left operand | right operand | contraction |
| --- | --- | --- | --- |
| forward `y = x Wᵀ` | x in 1×128 tiles (per token, 128 channels) | W in 128×128 blocks | K (in) |
| dgrad `dx = dy W` | dy in 1×128 tiles (per token, 128 out-channels) | W (same 128×128 blocks, transposed) | N (out) |
| wgrad `dW = dyᵀ x` | dy in 128×1 tiles (128 tokens, per channel) | x in 128×1 tiles | M (tokens) |

Every scale is the online max-abs of its tile / 448 (`dsv3.kernels.fp8`). The master weight stays in
float32 (the optimizer updates it); the FP8 weight and its scales are recomputed at every forward.

Three ways to run the GEMMs:
- `emulate`: dequantize both FP8 operands to float32 and multiply in float32 (any device; the test oracle);
- on CUDA where cuBLAS has the block-scaled recipes (Hopper): all three GEMMs on e4m3 tensor cores through
  `dsv3.train.fp8_gemms` (`F.scaled_mm`), bf16 outputs for y and dx, fp32 for dW;
- other CUDA GPUs: forward and dgrad through `dsv3.kernels.fp8.fp8_gemm` (Triton), wgrad emulated.
For the wgrad tiles the activation is requantized from its original precision (the report re-tiles its
stored FP8 copy; that double rounding is not modelled). Under `torch.compile` the FP8 linear runs eagerly
(a graph break): its kernels are opaque to the compiler anyway.

`swap_to_fp8(model)` replaces the model's `nn.Linear` layers by `FP8Linear` (sharing the same Parameter, so
names and state dicts are unchanged), except the output head; the embedding, router gates and norms are
not `nn.Linear` and stay in high precision, as in the report.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.kernels.fp8 import dequantize_weight, fp8_gemm, quantize_act, quantize_weight
from dsv3.train import fp8_gemms

BLOCK = 128


def dequantize_act(q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Inverse of `quantize_act`: q `[..., K]` e4m3 and scale `[..., ceil(K/block)]` -> float32 `[..., K]`."""
    k, tiles = q.shape[-1], scale.shape[-1]
    x = F.pad(q.to(torch.float32), (0, tiles * block - k)).view(*q.shape[:-1], tiles, block)  # [..., Kb, b]
    return (x * scale[..., None]).view(*q.shape[:-1], tiles * block)[..., :k]


def fake_quant_act(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """x `[..., K]` rounded through e4m3 with 1×block tiles along the last dim, as float32."""
    return dequantize_act(*quantize_act(x, block), block)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class FP8LinearFunction(torch.autograd.Function):
    """`y = x Wᵀ` with FP8 forward, input-gradient and weight-gradient GEMMs (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, emulate: bool) -> torch.Tensor:
        out_dtype = _out_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [M, K]
        cublas = not emulate and fp8_gemms.blockwise_supported(x.device)
        with torch.autocast(x.device.type, enabled=False):
            if cublas:
                w_q, w_qt, w_s = fp8_gemms.quantize_weight_padded(weight)  # [N', K'], [K', N'], [N'/128, K'/128]
                y = fp8_gemms.gemm_forward(x2, w_q, w_s, weight.shape[0], out_dtype)
                w_q = w_qt  # backward needs only the transpose (dgrad)
            else:
                x_q, x_s = quantize_act(x2, BLOCK)  # [M, K], [M, K/128]
                w_q, w_s = quantize_weight(weight.detach(), BLOCK)  # [N, K], [N/128, K/128]
                if emulate:
                    y = dequantize_act(x_q, x_s) @ dequantize_weight(w_q, w_s, BLOCK, torch.float32).T
                else:
                    y = fp8_gemm(x_q, x_s, w_q, w_s, out_dtype=torch.float32)
        ctx.save_for_backward(x2, w_q, w_s)
        ctx.emulate, ctx.cublas, ctx.x_shape, ctx.x_dtype, ctx.w_shape, ctx.w_dtype = (
            emulate, cublas, shape, x.dtype, weight.shape, weight.dtype)
        return y.to(out_dtype).view(*shape[:-1], weight.shape[0])  # [..., N]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2, w_q, w_s = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1])  # [M, N]
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.cublas:
                if ctx.needs_input_grad[0]:
                    dx = fp8_gemms.gemm_dgrad(dy, w_q, w_s, ctx.w_shape[1], ctx.x_dtype).view(ctx.x_shape)  # w_q: Wᵀ
                if ctx.needs_input_grad[1]:
                    dw = fp8_gemms.gemm_wgrad(dy, x2).to(ctx.w_dtype)  # [N, K]
                return dx, dw, None
            if ctx.needs_input_grad[0]:
                dy_q, dy_s = quantize_act(dy, BLOCK)  # 1x128 tiles along N
                if ctx.emulate:
                    dx = dequantize_act(dy_q, dy_s) @ dequantize_weight(w_q, w_s, BLOCK, torch.float32)
                else:
                    dx = fp8_gemm(dy_q, dy_s, w_q.t().contiguous(), w_s.t().contiguous(), out_dtype=torch.float32)
                dx = dx.to(ctx.x_dtype).view(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                dy_t = fake_quant_act(dy.t())  # [N, M]: 128x1 tiles of dy (128 tokens per channel)
                x_t = fake_quant_act(x2.t())  # [K, M]: 128x1 tiles of x
                dw = (dy_t @ x_t.T).to(ctx.w_dtype)  # [N, K]
        return dx, dw, None


@torch.compiler.disable
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, emulate: bool = True) -> torch.Tensor:
    """x `[..., K]`, weight `[N, K]` -> `[..., N]` through the FP8 GEMMs."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: input has {x.shape[-1]} features, weight expects {weight.shape[1]}")
    return FP8LinearFunction.apply(x, weight, emulate)


class FP8Linear(nn.Linear):
    """A bias-free `nn.Linear` whose GEMMs run in FP8 (weights stay float32 masters)."""

    def __init__(self, in_features: int, out_features: int, emulate: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.emulate = emulate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.emulate)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8=e4m3, emulate={self.emulate}"


def swap_to_fp8(model: nn.Module, emulate: bool | None = None, skip: tuple[str, ...] = ("lm_head",),
                routed_experts: bool = True) -> int:
    """Replace every bias-free `nn.Linear` of `model` (except names ending in `skip`) by an `FP8Linear`
    sharing its weight. `emulate=None` emulates on CPU and uses the FP8 kernels on CUDA.
    `routed_experts=False` leaves the routed experts (`...mlp.experts.{e}...`) as plain linears, so the MoE
    keeps its sync-free grouped bf16 path (there is no grouped FP8 kernel yet). Returns the count."""
    swapped = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is not nn.Linear or child.bias is not None or full.split(".")[-1] in skip:
                continue
            if not routed_experts and ".experts." in f".{full}":
                continue
            device = child.weight.device
            new = FP8Linear(child.in_features, child.out_features,
                            emulate=device.type != "cuda" if emulate is None else emulate, device="meta")
            new.weight = child.weight
            setattr(parent, name, new)
            swapped += 1
    return swapped
