"""Tensor- and expert-parallel inference: `parallelize_for_inference(model, ctx)` splits a `Transformer` over the
ranks of a `dsv3.parallel.ParallelContext`, in place, after construction and before (or after) loading.

What each rank keeps (TP = this rank's tensor-parallel group of `tp` ranks, EP = its expert-parallel group of
`ep` ranks; `tp * ep` ranks in all):

- `embed_tokens`: a `VocabParallelEmbedding`, rows `[tp_rank * V/tp, ...)`; ids outside them give zeros and the
  TP group sums the rows (all-reduce).
- `lm_head`: the same vocabulary rows (column-parallel); the TP group all-gathers the logits.
- MLA: the heads split over TP. `q_b_proj` (or `q_proj`) and `kv_b_proj` keep this rank's heads' rows, `o_proj`
  the matching input columns (row-parallel), and the TP group sums its outputs. `q_a_proj`, `kv_a_proj_with_mqa`
  and their norms stay whole: the latent `[c_kv ; k_pe]` (576 numbers per token and layer for V3) is one for
  all heads, so every rank computes and caches the whole latent (the cache is replicated over the TP group,
  not split); each rank absorbs `kv_b_proj` for its own heads only.
- dense MLPs: `gate_proj`/`up_proj` column-split, `down_proj` row-split over TP, outputs summed over TP.
- MoE: the router stays whole on every rank. Routed experts are split over EP (EP rank r owns experts
  `[r * E/ep, (r + 1) * E/ep)`; the others become parameter-free `RemoteExpert`s), and each owned expert's
  intermediate dim is split over TP like a dense MLP, as are the shared experts. The MoE's output (routed +
  shared, partial over TP) is summed over TP once. How tokens reach the experts is the `experts_impl`:
  - `ExpertParallelExperts` (`moe="all-to-all"`, default): the tokens, equal on every EP rank, are split in
    EP-many slices; each rank sends its slice's (token, expert) pairs to the owners (`dsv3.parallel.dispatch`,
    the trainer's exchange), receives the outputs back (`combine`), and the EP group all-gathers the slices;
  - `LocalExpertsAllReduce` (`moe="all-reduce"`, the official demo's layout): every rank runs its own experts
    on all tokens routed to them, and the EP group sums the outputs (one all-reduce; no host sync beyond the
    per-expert counts, and capturable in CUDA graphs).

Parameter names never change, so a state dict's keys are the HF keys; shapes are the rank's slices.
`model.shard_plan` (a `ShardPlan`) says, for every split tensor, which dim and which `[start, stop)` of the full
tensor this rank holds, and which full tensors live on other ranks: the checkpoint loader reads only those slices
(`safe_open(...).get_slice`). FP8 weights (`weight` + `weight_scale_inv`) split on 128-blocks, so a split must
fall on a block boundary.

The sums and gathers after a split are forward hooks on the module whose output needs them (`o_proj`, a dense
`MLP`, a `MoE`, `lm_head`), the mechanism `torch.distributed.tensor.parallel`'s styles use too: the modules, their
forwards and their fused GPU forms stay as they are. With one rank (`tp = ep = 1`) nothing changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model.layers import MLP
from dsv3.model.mla import MLA
from dsv3.model.moe import LocalExperts, MoE
from dsv3.parallel import ParallelContext, ParallelLayout, combine, dispatch, run_local_experts, split_range

MOE_MODES = ("all-to-all", "all-reduce")


@dataclass
class ShardPlan:
    """This rank's part of the full model: `slices[key] = (dim, start, stop)` of each split tensor in full
    coordinates (FP8 scales follow their weight), and `elsewhere`: the keys of tensors other ranks hold."""

    layout: ParallelLayout
    moe: str = "all-to-all"
    slices: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    elsewhere: set[str] = field(default_factory=set)


class RemoteExpert(nn.Module):
    """Placeholder for a routed expert owned by another rank (no parameters; never called)."""

    def __init__(self, owner: int) -> None:
        super().__init__()
        self.owner = owner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"expert owned by rank {self.owner} called on this rank")

    def extra_repr(self) -> str:
        return f"owner={self.owner}"


class VocabParallelEmbedding(nn.Module):
    """Rows `[start, start + weight.shape[0])` of the embedding; the TP group sums the looked-up rows."""

    def __init__(self, weight: torch.Tensor, start: int, vocab_size: int, ctx: ParallelContext) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.vocab_size, self.ctx = start, vocab_size, ctx

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # [..., D]
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.ctx.all_reduce_tp(out)

    def extra_repr(self) -> str:
        return f"rows {self.start}..{self.start + self.weight.shape[0] - 1} of {self.vocab_size}"


class ExpertParallelExperts(LocalExperts):
    """Routed experts spread over the EP group, reached by all-to-all (see the module docstring)."""

    def __init__(self, ctx: ParallelContext, first: int, per: int) -> None:
        self.ctx, self.first, self.per = ctx, first, per

    def routed(self, moe: MoE, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        n = x.shape[0]
        sizes = [n // ctx.ep + (i < n % ctx.ep) for i in range(ctx.ep)]  # this EP rank's slice of the tokens
        lo = sum(sizes[: ctx.ep_rank])
        hi = lo + sizes[ctx.ep_rank]
        xr, local, exchange = dispatch(x[lo:hi], indices[lo:hi], self.per, ctx.ep_group, ctx.ep)
        y = run_local_experts([moe.experts[self.first + e] for e in range(self.per)], xr, local)
        part = combine(y, weights[lo:hi], exchange, hi - lo)  # [hi - lo, D] float32
        return ctx.all_gather_ep(part, sizes).to(x.dtype)

    def __repr__(self) -> str:
        return f"ExpertParallelExperts(experts={self.first}..{self.first + self.per - 1}, ep={self.ctx.ep})"


class LocalExpertsAllReduce(LocalExperts):
    """The official demo's layout: this rank's experts on every token routed to them, then one all-reduce."""

    def __init__(self, ctx: ParallelContext, first: int, per: int) -> None:
        self.ctx, self.first, self.per = ctx, first, per

    def routed(self, moe: MoE, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        local = indices - self.first  # [N, K]
        mine = (local >= 0) & (local < self.per)
        counts = torch.bincount(local[mine], minlength=self.per).tolist()
        for e, count in enumerate(counts):
            if count:
                rows, slot = torch.where(local == e)
                y = moe.experts[self.first + e](x[rows])  # [count, D]
                out.index_add_(0, rows, y.float() * weights[rows, slot, None])
        return self.ctx.all_reduce_ep(out).to(x.dtype)

    def __repr__(self) -> str:
        return f"LocalExpertsAllReduce(experts={self.first}..{self.first + self.per - 1}, ep={self.ctx.ep})"


def _replace(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of parameter or buffer `name` of `module`, keeping its kind."""
    old = module._parameters.get(name)
    if old is not None:
        setattr(module, name, nn.Parameter(tensor, requires_grad=old.requires_grad))
    else:
        module._buffers[name] = tensor


def shard_linear_(linear: nn.Module, dim: int, start: int, stop: int, key: str, plan: ShardPlan) -> None:
    """Keep `[start, stop)` of a linear layer's weight `[out, in]` along `dim` (0: output rows, 1: input columns),
    in place (meta tensors too), with its FP8 block scale; records the slice under `key` (the weight's key)."""
    weight = linear.weight
    scale = getattr(linear, "weight_scale_inv", None)
    if scale is not None:
        block = getattr(linear, "block_size", 128)
        if start % block or (stop % block and stop != weight.shape[dim]):
            raise ValueError(f"{key}: an FP8 weight splits on {block}-blocks, but this rank's part is "
                             f"[{start}, {stop}) of {weight.shape[dim]}; choose another --tp/--ep or "
                             "load with --weights bf16")
        _replace(linear, "weight_scale_inv", scale.narrow(dim, start // block, math.ceil(stop / block)
                                                          - start // block).clone())
    _replace(linear, "weight", weight.narrow(dim, start, stop - start).clone())
    attr = "out_features" if dim == 0 else "in_features"
    if hasattr(linear, attr):
        setattr(linear, attr, stop - start)
    plan.slices[key] = (dim, start, stop)


def _shard_mlp(mlp: MLP, prefix: str, index: int, parts: int, plan: ShardPlan) -> None:
    """Column-split gate/up and row-split down over `parts` ranks (the caller sums the partial outputs)."""
    inter = mlp.gate_proj.weight.shape[0]
    lo, hi = split_range(inter, parts, index, f"{prefix}intermediate size")
    shard_linear_(mlp.gate_proj, 0, lo, hi, f"{prefix}gate_proj.weight", plan)
    shard_linear_(mlp.up_proj, 0, lo, hi, f"{prefix}up_proj.weight", plan)
    shard_linear_(mlp.down_proj, 1, lo, hi, f"{prefix}down_proj.weight", plan)


def _shard_mla(mla: MLA, prefix: str, ctx: ParallelContext, plan: ShardPlan) -> None:
    h0, h1 = split_range(mla.n_heads, ctx.tp, ctx.tp_rank, f"{prefix}attention heads")
    q = "q_b_proj" if mla.q_lora_rank else "q_proj"
    shard_linear_(getattr(mla, q), 0, h0 * mla.qk_dim, h1 * mla.qk_dim, f"{prefix}{q}.weight", plan)
    kv = mla.nope_dim + mla.v_dim
    shard_linear_(mla.kv_b_proj, 0, h0 * kv, h1 * kv, f"{prefix}kv_b_proj.weight", plan)
    shard_linear_(mla.o_proj, 1, h0 * mla.v_dim, h1 * mla.v_dim, f"{prefix}o_proj.weight", plan)
    mla.n_heads = h1 - h0
    mla.o_proj.register_forward_hook(_sum_over_tp(ctx))


def _shard_moe(moe: MoE, prefix: str, ctx: ParallelContext, plan: ShardPlan) -> None:
    e0, e1 = split_range(moe.n_experts, ctx.ep, ctx.ep_rank, f"{prefix}routed experts")
    per = e1 - e0
    for e in range(moe.n_experts):
        name = f"{prefix}experts.{e}."
        if e0 <= e < e1:
            if ctx.tp > 1:
                _shard_mlp(moe.experts[e], name, ctx.tp_rank, ctx.tp, plan)
        else:
            plan.elsewhere.update(name + k for k in moe.experts[e].state_dict())
            moe.experts[e] = RemoteExpert(e // per * ctx.tp + ctx.tp_rank)
    if moe.shared_experts is not None and ctx.tp > 1:
        _shard_mlp(moe.shared_experts, f"{prefix}shared_experts.", ctx.tp_rank, ctx.tp, plan)
    if ctx.ep > 1:
        impl = ExpertParallelExperts if plan.moe == "all-to-all" else LocalExpertsAllReduce
        moe.set_experts_impl(impl(ctx, e0, per))
    elif ctx.tp > 1:  # every expert here, each a TP slice: the plain loop, summed over TP with the shared part
        moe.set_experts_impl(LocalExperts())
    moe.register_forward_hook(_sum_over_tp(ctx))


def check_layout(args, layout: ParallelLayout) -> None:
    """A ValueError naming the first size that does not divide over the layout's ranks (before anything changes)."""
    sizes = [("vocabulary size", args.vocab_size, layout.tp), ("attention heads", args.n_heads, layout.tp)]
    if args.n_dense_layers:
        sizes.append(("dense intermediate size", args.inter_dim, layout.tp))
    if args.n_routed_experts and args.n_layers > args.n_dense_layers:
        sizes += [("routed experts", args.n_routed_experts, layout.ep),
                  ("expert intermediate size", args.moe_inter_dim, layout.tp),
                  ("shared experts' intermediate size", args.n_shared_experts * args.moe_inter_dim, layout.tp)]
    for what, total, parts in sizes:
        if total % parts:
            flag = "--ep" if parts == layout.ep and what == "routed experts" else "--tp"
            raise ValueError(f"{what} ({total}) does not divide over {parts} ranks; choose {flag} dividing it")


def _sum_over_tp(ctx: ParallelContext):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return ctx.all_reduce_tp(output)
    return hook


def _gather_over_tp(ctx: ParallelContext):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return ctx.all_gather_tp(output, dim=-1)
    return hook


@torch.no_grad()
def parallelize_for_inference(model: nn.Module, ctx: ParallelContext, moe: str = "all-to-all") -> nn.Module:
    """Split `model` (a `Transformer`, on meta or loaded) over `ctx`'s ranks in place; returns it, with
    `model.shard_plan` and `model.parallel = ctx`. One rank: nothing changes. `moe`: "all-to-all" (EP dispatch
    and combine) or "all-reduce" (the official demo's layout)."""
    if moe not in MOE_MODES:
        raise ValueError(f"moe must be one of {', '.join(MOE_MODES)}, got {moe!r}")
    if getattr(model, "shard_plan", None) is not None and model.shard_plan.layout.world > 1:
        raise ValueError("the model is already split over ranks")
    plan = ShardPlan(ctx.layout, moe)
    model.parallel, model.shard_plan = ctx, plan
    if ctx.world == 1:
        return model
    check_layout(model.args, ctx.layout)
    if model.args.tie_word_embeddings and ctx.tp > 1:
        raise ValueError("tensor parallel does not split a model with tied embeddings; use --tp 1")
    vocab = model.args.vocab_size
    if ctx.tp > 1:
        v0, v1 = split_range(vocab, ctx.tp, ctx.tp_rank, "vocabulary size")
        weight = model.embed_tokens.weight
        model.embed_tokens = VocabParallelEmbedding(weight[v0:v1].clone(), v0, vocab, ctx)
        plan.slices["embed_tokens.weight"] = (0, v0, v1)
        shard_linear_(model.lm_head, 0, v0, v1, "lm_head.weight", plan)
        model.lm_head.register_forward_hook(_gather_over_tp(ctx))
    blocks = [(f"layers.{i}.", b) for i, b in enumerate(model.layers)]
    blocks += [(f"mtp.{k}.", b) for k, b in enumerate(model.mtp)]
    for prefix, block in blocks:
        if ctx.tp > 1:
            _shard_mla(block.self_attn, prefix + "self_attn.", ctx, plan)
        if isinstance(block.mlp, MoE):
            _shard_moe(block.mlp, prefix + "mlp.", ctx, plan)
        elif ctx.tp > 1:
            _shard_mlp(block.mlp, prefix + "mlp.", ctx.tp_rank, ctx.tp, plan)
            block.mlp.register_forward_hook(_sum_over_tp(ctx))
    return model


def split_parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the parameters and buffers this rank holds that are split over ranks, bytes of the rest)."""
    plan: ShardPlan | None = getattr(model, "shard_plan", None)
    split = rest = 0
    for key, t in model.state_dict().items():
        size = t.numel() * t.element_size()
        weight_key = key.removesuffix("_scale_inv")
        is_split = plan is not None and (weight_key in plan.slices or ".experts." in key)
        split, rest = (split + size, rest) if is_split else (split, rest + size)
    return split, rest
