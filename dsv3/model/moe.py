"""DeepSeekMoE: a router (`Gate`), routed experts, shared experts; no token is ever dropped.

Routing, for sigmoid (DeepSeek-V3) or softmax (DeepSeek-V2) scores `s`:
- selection scores: `s + b` with the correction bias `b` (V3, `noaux_tc`) or `s` alone;
- group limit: experts split in `n_expert_groups`; a group's score is the sum of its top-2 selection
  scores (`noaux_tc`) or its max score (`group_limited_greedy`); only the best `n_limited_groups`
  groups stay eligible (others masked: -inf for V3, 0 for V2, as the references do);
- top-k experts among the eligible ones; their weights are the raw scores `s` (bias excluded),
  normalised to sum 1 when `norm_topk_prob` (V3-style only; V2 never normalises), times `route_scale`.

The bias `e_score_correction_bias` is a float32 buffer: training moves it outside the optimizer
(auxiliary-loss-free balancing). The gate keeps the last routing (`last_scores`, `last_indices`) so the
trainer can count expert load and compute the sequence-wise balance loss.

Two ways to run the routed experts, equal up to rounding:
- `routed_loop` (the reference, used in inference): sort the (token, expert) pairs by expert, read the
  per-expert counts on the host, run each expert's MLP on its slice;
- `routed_grouped` (training): the same sort, but the counts stay on the device: their cumulative sum gives
  the group offsets of `torch._grouped_mm` over the experts' weights stacked at call time (`[E, I, D]`), so
  there is no host sync and no Python loop, and `torch.compile` can take the whole block. Parameters stay
  per expert, so names and checkpoints are unchanged; autograd splits the stacked gradient back.
`LocalExperts.routed` picks the grouped path in training mode when every expert is a plain `nn.Linear` MLP and
the GEMMs run in bf16 (CUDA's grouped GEMM and its compiled form are bf16-only; CPU eager takes any float dtype).

How the routed experts run is the MoE's `experts_impl`, an object given at construction (`MoE(args, dtype,
experts_impl)`) or through the one explicit `MoE.set_experts_impl` call, and shown in the module's repr:
`LocalExperts` here (the two paths above, `torch._grouped_mm` as the grouped GEMM); training swaps in FP8 grouped
GEMMs (`dsv3.train.fp8_grouped.FP8GroupedExperts`) or the all-to-all exchange of expert parallel
(`dsv3.train.expert_parallel.ExpertParallel`). Parameters and their names never change with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelArgs
from dsv3.model.layers import MLP


class LocalExperts:
    """Every routed expert on this rank: in training, with plain expert weights, the sync-free grouped path
    (`MoE.routed_grouped`), else the reference loop (`MoE.routed_loop`). `grouped_mm` is the grouped path's GEMM,
    over the experts' weights stacked in the compute dtype (`master_weights=False`) or in their own dtype
    (`True`: the GEMM quantizes them itself)."""

    master_weights = False

    def routed(self, moe: MoE, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sum over each token's chosen experts of `weight * expert(x)`; x `[N, D]`, weights/indices `[N, K]`."""
        if moe.training and x.shape[0] > 1 and moe.grouped_ok():
            device = x.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
            # grouped GEMMs: bf16 on CUDA and in compiled graphs (their meta kernel), any float dtype in CPU eager
            if dtype == torch.bfloat16 or (device == "cpu" and not torch.compiler.is_compiling()):
                return moe.routed_grouped(x, weights, indices)
        return moe.routed_loop(x, weights, indices)

    def grouped_mm(self, a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """a `[M, K]` (rows sorted by expert), w `[E, N, K]`, offsets `[E]` int32 end rows -> `[M, N]`."""
        return torch._grouped_mm(a, w.transpose(1, 2), offs=offsets)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def small_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`x.topk(k, dim=-1)` (values, indices, descending) as k rounds of max-and-mask. For the router's tiny
    last dims (2 of 8, 2 of 4 groups, 8 of 256) inside a compiled graph, inductor fuses these rounds into
    the surrounding kernels, where `topk` is an opaque, slow small-slice kernel (~11 ms per step of the 1B
    preset). Needs at least k entries above -inf per row (routing always has them)."""
    values, indices = [], []
    for _ in range(k):
        v, i = x.max(dim=-1, keepdim=True)  # [..., 1]
        values.append(v)
        indices.append(i)
        x = x.scatter(-1, i, float("-inf"))
    return torch.cat(values, dim=-1), torch.cat(indices, dim=-1)


class Gate(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.n_experts = args.n_routed_experts
        self.topk = args.n_activated_experts
        self.n_groups = args.n_expert_groups
        self.topk_groups = args.n_limited_groups
        self.score_func = args.score_func
        self.topk_method = args.topk_method
        self.norm_topk_prob = args.norm_topk_prob and args.topk_method == "noaux_tc"
        self.route_scale = args.route_scale
        self.weight = nn.Parameter(torch.empty(self.n_experts, args.dim, dtype=dtype))
        if args.correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.last_scores: torch.Tensor | None = None
        self.last_indices: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[N, D]` -> weights `[N, K]` float32, expert indices `[N, K]` int64."""
        weight = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        logits = F.linear(x if x.dtype == torch.float32 else x.float(), weight)  # [N, E]
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        topk = small_topk if torch.compiler.is_compiling() else torch.topk  # same selection; fusable when compiled
        if self.n_groups > 1 and self.topk_method != "greedy":
            grouped = choice.view(-1, self.n_groups, self.n_experts // self.n_groups)  # [N, G, E/G]
            if self.topk_method == "noaux_tc":
                group_scores = topk(grouped, 2)[0].sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = topk(group_scores, self.topk_groups)[1]  # [N, topk_groups]
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf") if self.topk_method == "noaux_tc"
                                         else 0.0).flatten(1)
        indices = topk(choice, self.topk)[1]  # [N, K]
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        self.last_scores, self.last_indices = scores, indices
        return weights * self.route_scale, indices


class MoE(nn.Module):
    """Shared experts (one MLP of width `n_shared * moe_inter_dim`) plus top-k routed experts."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype | None = None,
                 experts_impl: LocalExperts | None = None) -> None:
        super().__init__()
        self.dim = args.dim
        self.n_experts = args.n_routed_experts
        self.gate = Gate(args, dtype)
        self.experts = nn.ModuleList(MLP(args.dim, args.moe_inter_dim, dtype) for _ in range(self.n_experts))
        self.shared_experts = (MLP(args.dim, args.n_shared_experts * args.moe_inter_dim, dtype)
                               if args.n_shared_experts else None)
        self.experts_impl = experts_impl or LocalExperts()  # how the routed experts run (module docstring)
        self.stacked: nn.Module | None = None  # `dsv3.model.fused.StackedExperts` once fused for inference

    def set_experts_impl(self, impl: LocalExperts) -> None:
        """Choose how the routed experts run (`parallelize` does, once, before training)."""
        self.experts_impl = impl

    def extra_repr(self) -> str:
        return f"experts_impl={self.experts_impl!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[..., D]` -> `[..., D]`. Reference path: loop over the experts that received tokens; fused for
        inference (`self.stacked`): routing and every expert in the Triton kernels, no host sync."""
        shape = x.shape
        x = x.reshape(-1, self.dim)  # [N, D]
        if self.stacked is not None and x.is_cuda and not torch.is_grad_enabled():
            return self.stacked(x, self.gate).view(shape)
        weights, indices = self.gate(x)
        routed = self.routed(x, weights, indices)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(x)
        return routed.view(shape)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sum over each token's chosen experts of `weight * expert(x)`; x `[N, D]`, weights/indices `[N, K]`,
        as `experts_impl` runs them (by default: `routed_grouped` in training with plain expert weights, else
        the reference `routed_loop`)."""
        return self.experts_impl.routed(self, x, weights, indices)

    def grouped_ok(self) -> bool:
        """True when `routed_grouped` applies: `torch._grouped_mm` exists and every expert projection is a
        plain floating-point `nn.Linear` (not an FP8 checkpoint weight, not an FP8 training linear)."""
        if not hasattr(torch, "_grouped_mm"):
            return False
        first = self.experts[0]
        return all(type(getattr(first, name)) is nn.Linear and getattr(first, name).weight.is_floating_point()
                   and getattr(first, name).weight.element_size() >= 2
                   for name in ("gate_proj", "up_proj", "down_proj"))

    def routed_loop(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Reference path. The (token, expert) pairs are sorted by expert once, so each expert that got tokens
        runs one MLP on a contiguous slice of the gathered inputs; one host sync (the per-expert counts) per
        call. A single token skips the sort: its K outputs are weighted and summed by one `[1, K] x [K, D]`
        product."""
        if x.shape[0] == 1:
            ys = torch.cat([self.experts[e](x) for e in indices.tolist()[0]])  # [K, D]
            out = torch.mm(weights, ys if ys.dtype == torch.float32 else ys.float())  # [1, D], float32 as below
            return out if out.dtype == x.dtype else out.to(x.dtype)
        k = indices.shape[1]
        flat = indices.flatten()  # [N * K]
        order = flat.argsort(stable=True)  # pairs grouped by expert, token order kept within an expert
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        token = order // k  # [N * K] token of each sorted pair
        xs = x[token]  # [N * K, D]
        ys = []
        start = 0
        for e, count in enumerate(counts):
            if count:
                ys.append(self.experts[e](xs[start:start + count]))
                start += count
        out = torch.zeros_like(x, dtype=torch.float32)
        if ys:  # no tokens, no experts
            y = torch.cat(ys) * weights.flatten()[order, None]  # [N * K, D]
            out.index_add_(0, token, y.float())
        return out.to(x.dtype)

    def stacked_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts' weights stacked for grouped GEMMs, in `dtype`: gate and up as one `[E, 2I, D]`
        (each expert's gate rows, then its up rows) and down as `[E, D, I]`. Differentiable: gradients flow
        back to every expert's own Parameters."""
        gate = torch.stack([e.gate_proj.weight for e in self.experts]).to(dtype)  # [E, I, D]
        up = torch.stack([e.up_proj.weight for e in self.experts]).to(dtype)  # [E, I, D]
        down = torch.stack([e.down_proj.weight for e in self.experts]).to(dtype)  # [E, D, I]
        return torch.cat([gate, up], dim=1), down

    def routed_grouped(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`routed` without a host sync: grouped GEMMs over the pairs sorted by expert (see the module doc).
        Runs in the autocast dtype when autocast is on (the grouped GEMM is not an autocast op). Dispatch and
        combine are permutations (gathers both ways, no atomics), so forward and backward are deterministic.
        Both grouped GEMMs are `experts_impl.grouped_mm(a, w [E, N, K], offsets)`; the weights are stacked in the
        compute dtype, or in their master dtype when `experts_impl.master_weights` (FP8 experts quantize them)."""
        n, k = indices.shape
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        flat = indices.flatten()  # [N * K] expert of each (token, slot) pair
        order = flat.argsort(stable=True)  # sorted position -> pair; token order kept within an expert
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        counts = torch.zeros(self.n_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))  # [E], static shape (no bincount)
        offsets = counts.cumsum(0, dtype=torch.int32)  # [E] end of each expert's rows
        xs = _GatherPairs.apply(x.to(dtype), order, inverse, k)  # [N * K, D] sorted by expert
        impl = self.experts_impl
        w13, w2 = self.stacked_weights(self.experts[0].gate_proj.weight.dtype if impl.master_weights else dtype)
        h = impl.grouped_mm(xs, w13, offsets)  # [N * K, 2I]
        gate, up = h.chunk(2, dim=-1)
        a = F.silu(gate) * up  # [N * K, I]
        y = impl.grouped_mm(a, w2, offsets)  # [N * K, D]
        y = _PermuteRows.apply(y, inverse, order).view(n, k, -1)  # [N, K, D] back in (token, slot) order
        out = (y.float() * weights.unsqueeze(-1)).sum(dim=1)  # [N, D] float32 weighted sum (not autocast)
        return out.to(x.dtype)


class _PermuteRows(torch.autograd.Function):
    """`src[index]` for a permutation `index` whose inverse is `inverse`: the backward is the gather
    `grad[inverse]` instead of an atomic scatter-add."""

    @staticmethod
    def forward(ctx, src: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return src[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


class _GatherPairs(torch.autograd.Function):
    """x `[N, D]` -> `x[order // k]` `[N * K, D]` (each token once per routed slot, sorted by expert). The
    backward un-sorts with the inverse permutation and sums each token's K rows: no atomics."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x[order // k]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad[inverse].view(-1, ctx.k, grad.shape[-1]).sum(dim=1), None, None, None
