"""Fused MoE: routing on the device and grouped expert GEMMs, with a plain PyTorch reference twin.

Expert weights are stacked: `w_gate`, `w_up` `[E', I, D]` and `w_down` `[E', D, I]`, where the first
`E` experts are the routed ones and the last `S` are the shared experts cut into `moe_inter_dim`-wide
slices (a SwiGLU MLP of width `S*I` is exactly the sum of its `S` slices, so shared experts ride in the
same launches as routed ones, each chosen by every token with weight 1). FP8 weights are
`float8_e4m3fn` with per-128x128-block scales `[E', ceil(out/128), ceil(in/128)]` (`weight_scale_inv`
convention: dequantized = fp8 x scale).

- `route(logits, ...)`: DeepSeek routing of `dsv3.model.moe.Gate` on fp32 router logits `[N, E]`;
  returns `ids [N, K+S]` int32 and `weights [N, K+S]` fp32 with the shared slots appended.
- `fused_moe(x, ids, weights, w_gate, w_up, w_down, ...)`: `sum_k weights[n,k] * FFN_{ids[n,k]}(x[n])`.
- `swiglu(x, w_gate, w_up)` / `linear(x, w)`: the same kernels in dense mode (dense MLP layers and FP8
  weight-only linears).

On CUDA (or under `TRITON_INTERPRET=1`) the Triton kernels of `moe_triton.py` run with no host sync;
elsewhere the references, which are the test oracle. The references follow the model's rounding:
each projection's output is rounded to the activation dtype, expert outputs are weighted and summed
in fp32 and rounded once.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dsv3.kernels.fp8 import FP8_DTYPE, dequantize_weight, fp8_gemm_ref, quantize_act_ref

SCORE_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")


@functools.cache
def _triton():
    try:
        from dsv3.kernels import moe_triton
    except ImportError:
        return None
    return moe_triton if moe_triton.available() else None


def _use_triton(x: torch.Tensor) -> bool:
    kernels = _triton()
    return kernels is not None and (x.is_cuda or kernels._INTERPRET)


def group_mode(topk_method: str, n_groups: int) -> int:
    """0: no group limit; 1: group score = sum of its top-2 (`noaux_tc`); 2: its max (`group_limited_greedy`)."""
    if topk_method not in TOPK_METHODS:
        raise ValueError(f"topk_method must be one of {TOPK_METHODS}, got {topk_method!r}")
    if n_groups <= 1 or topk_method == "greedy":
        return 0
    return 1 if topk_method == "noaux_tc" else 2


# ---- routing -----------------------------------------------------------------------------------
def route_ref(logits: torch.Tensor, bias: torch.Tensor | None, topk: int, n_shared: int = 0,
              score_func: str = "sigmoid", topk_method: str = "noaux_tc", n_groups: int = 1,
              topk_groups: int = 1, norm: bool = True, route_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of `route` (the math of `Gate.forward`, plus the shared slots)."""
    n, e = logits.shape
    scores = logits.float().sigmoid() if score_func == "sigmoid" else logits.float().softmax(dim=-1)
    choice = scores if bias is None else scores + bias.float()
    mode = group_mode(topk_method, n_groups)
    if mode:
        grouped = choice.view(n, n_groups, e // n_groups)  # [N, G, E/G]
        group_scores = grouped.topk(2, dim=-1).values.sum(-1) if mode == 1 else grouped.amax(-1)
        keep = group_scores.topk(topk_groups, dim=-1).indices  # [N, topk_groups]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = grouped.masked_fill(~group_mask[..., None], float("-inf") if mode == 1 else 0.0).flatten(1)
    indices = choice.topk(topk, dim=-1).indices  # [N, K]
    weights = scores.gather(1, indices)
    if norm:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * route_scale
    shared = torch.arange(e, e + n_shared, device=logits.device).expand(n, n_shared)
    ids = torch.cat([indices, shared], dim=1).to(torch.int32)
    weights = torch.cat([weights, torch.ones(n, n_shared, device=logits.device)], dim=1)
    return ids, weights


def route(logits: torch.Tensor, bias: torch.Tensor | None, topk: int, n_shared: int = 0,
          score_func: str = "sigmoid", topk_method: str = "noaux_tc", n_groups: int = 1,
          topk_groups: int = 1, norm: bool = True, route_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits `[N, E]` -> (expert ids `[N, topk + n_shared]` int32, weights fp32); shared expert s
    is id `E + s` with weight 1. Same arguments as `Gate` (`norm` = normalise the top-k weights)."""
    if logits.dim() != 2:
        raise ValueError(f"route expects logits [N, E], got shape {tuple(logits.shape)}")
    e = logits.shape[1]
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
    if not 1 <= topk <= e:
        raise ValueError(f"topk must be in [1, {e}], got {topk}")
    mode = group_mode(topk_method, n_groups)
    if mode and (e % n_groups or not 1 <= topk_groups <= n_groups):
        raise ValueError(f"n_groups ({n_groups}) must divide the {e} experts and topk_groups ({topk_groups}) "
                         f"be in [1, n_groups]")
    if bias is not None and bias.shape != (e,):
        raise ValueError(f"bias must have shape ({e},), got {tuple(bias.shape)}")
    if _use_triton(logits):
        return _triton().route(logits.float(), None if bias is None else bias.float().contiguous(), topk, n_shared,
                               score_func, mode, n_groups, topk_groups, norm, route_scale)
    return route_ref(logits, bias, topk, n_shared, score_func, topk_method, n_groups, topk_groups, norm, route_scale)


# ---- expert FFNs -------------------------------------------------------------------------------
def _weight(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    return w.to(dtype) if scale is None else dequantize_weight(w, scale, dtype=dtype)


def fused_moe_ref(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor,
                  w_up: torch.Tensor, w_down: torch.Tensor, s_gate: torch.Tensor | None = None,
                  s_up: torch.Tensor | None = None, s_down: torch.Tensor | None = None, a8: bool = False
                  ) -> torch.Tensor:
    """PyTorch reference of `fused_moe`: loop over the experts that received tokens (host sync). `a8`: the
    W8A8 products (activations quantized per 1x128 tile, the reference block-scaled GEMM)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)

    def proj(a: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        if a8:
            return fp8_gemm_ref(*quantize_act_ref(a), w, s, out_dtype=x.dtype)
        return F.linear(a, _weight(w, s, x.dtype))

    for e in torch.unique(ids).tolist():
        token, slot = torch.where(ids == e)
        xe = x[token]
        g = proj(xe, w_gate[e], None if s_gate is None else s_gate[e])
        u = proj(xe, w_up[e], None if s_up is None else s_up[e])
        y = proj(F.silu(g) * u, w_down[e], None if s_down is None else s_down[e])
        out.index_add_(0, token, y * weights[token, slot, None])
    return out.to(x.dtype)


def _check_experts(x, ids, weights, w_gate, w_up, w_down, s_gate, s_up, s_down) -> None:
    if x.dim() != 2:
        raise ValueError(f"fused_moe expects x [N, D], got shape {tuple(x.shape)}")
    n, d = x.shape
    if ids.shape != weights.shape or ids.dim() != 2 or ids.shape[0] != n:
        raise ValueError(f"ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must both be [N={n}, K]")
    if w_gate.dim() != 3 or w_gate.shape != w_up.shape or w_gate.shape[2] != d:
        raise ValueError(f"w_gate {tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} must be [E, I, D={d}]")
    e, inter = w_gate.shape[:2]
    if tuple(w_down.shape) != (e, d, inter):
        raise ValueError(f"w_down must be [E={e}, D={d}, I={inter}], got {tuple(w_down.shape)}")
    fp8 = w_gate.dtype == FP8_DTYPE
    if fp8 != (s_gate is not None) or (s_gate is None) != (s_up is None) or (s_up is None) != (s_down is None):
        raise ValueError("FP8 expert weights need all three scales (s_gate, s_up, s_down); BF16 weights none")
    if not fp8 and w_gate.dtype != x.dtype:
        raise ValueError(f"expert weights ({w_gate.dtype}) must have the activation dtype ({x.dtype}) or be FP8")


def fused_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor,
              w_up: torch.Tensor, w_down: torch.Tensor, s_gate: torch.Tensor | None = None,
              s_up: torch.Tensor | None = None, s_down: torch.Tensor | None = None,
              stats: torch.Tensor | None = None, a8: bool = False) -> torch.Tensor:
    """`out[n] = sum_k weights[n, k] * down_e(silu(gate_e(x[n])) * up_e(x[n]))`, `e = ids[n, k]`.

    x `[N, D]`; ids `[N, K]` (int, each row without repeats); weights `[N, K]` fp32; stacked expert
    weights as in the module docstring. `stats` (int32 `[1]`, CUDA only) receives the number of experts
    that got tokens, on the device. `a8` (FP8 weights only): W8A8, FP8 x FP8 products with the activations
    quantized per 1x128 tile; otherwise FP8 weights are dequantized in registers (W8A16)."""
    _check_experts(x, ids, weights, w_gate, w_up, w_down, s_gate, s_up, s_down)
    a8 = a8 and s_gate is not None
    if _use_triton(x):
        return _triton().fused_moe(x, ids.to(torch.int32), weights.float(), w_gate, w_up, w_down,
                                   s_gate, s_up, s_down, stats, a8=a8)
    return fused_moe_ref(x, ids.long(), weights.float(), w_gate, w_up, w_down, s_gate, s_up, s_down, a8=a8)


def swiglu_ref(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, s_gate: torch.Tensor | None = None,
               s_up: torch.Tensor | None = None) -> torch.Tensor:
    return F.silu(F.linear(x, _weight(w_gate, s_gate, x.dtype))) * F.linear(x, _weight(w_up, s_up, x.dtype))


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, s_gate: torch.Tensor | None = None,
           s_up: torch.Tensor | None = None) -> torch.Tensor:
    """Dense `silu(x Wg^T) * (x Wu^T)`: x `[M, D]`, `w_gate`/`w_up` `[I, D]` (BF16/FP32, or FP8 + scales)."""
    if x.dim() != 2 or w_gate.shape != w_up.shape or w_gate.dim() != 2 or w_gate.shape[1] != x.shape[1]:
        raise ValueError(f"swiglu expects x [M, D] and weights [I, D]; got {tuple(x.shape)}, "
                         f"{tuple(w_gate.shape)}, {tuple(w_up.shape)}")
    if _use_triton(x):
        return _triton().swiglu(x, w_gate, w_up, s_gate, s_up)
    return swiglu_ref(x, w_gate, w_up, s_gate, s_up)


def linear_ref(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, _weight(w, scale, x.dtype))


def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """`x [..., K] @ W^T` for `W [N, K]` in BF16/FP32 or weight-only FP8 (`scale` per 128x128 block)."""
    if w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear expects x [..., K] and w [N, K]; got {tuple(x.shape)} and {tuple(w.shape)}")
    if (scale is not None) != (w.dtype == FP8_DTYPE):
        raise ValueError(f"a {w.dtype} weight {'needs' if scale is None else 'takes no'} scale")
    if _use_triton(x):
        out = _triton().linear(x.reshape(-1, x.shape[-1]), w, scale)
        return out.view(*x.shape[:-1], w.shape[0])
    return linear_ref(x, w, scale)
