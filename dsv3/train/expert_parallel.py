"""Expert parallel (EP) training over all ranks, applied from outside the model (`--expert-parallel`).

`shard_experts(model, rank, world)` keeps on each rank only the routed experts it owns (rank r owns experts
`[r * E/world, (r + 1) * E/world)` of every MoE layer, MTP included; the others become parameter-free
placeholders, so their weights and AdamW state live on one rank only), and gives each MoE the `ExpertParallel`
experts implementation (`MoE.set_experts_impl`): the all-to-all exchange below. Everything else (attention, dense layers, shared experts, router, embedding,
head) stays replicated and is averaged by DDP, which is told to leave the expert weights alone.

One MoE layer, on every rank, for its own tokens:
1. route locally; sort the (token, expert) pairs by expert, which also groups them by owning rank;
2. exchange pair counts, then the pairs' hidden states and local expert ids (`dsv3.parallel.dispatch`, with
   autograd for the hidden states; the one exchange parallel inference uses too) over a process group of its
   own (DDP's gradient all-reduces run on the default group at the same time in backward, and two groups never
   mix their collectives);
3. run the received pairs through the local experts (sorted by expert), send the outputs back the same way;
4. add `weight * output` into each token's row, as the single-process `MoE.routed` does.

Gradients: an owned expert's gradient sums the contributions of every rank's loss (they come back through the
all-to-all), while DDP averages the replicated weights over ranks; a hook scales expert gradients by 1/world
so both are the gradient of the mean loss, as one process on the whole batch computes it.
`clip_grad_norm_ep` clips by the global norm (expert parts summed over ranks). `gather_full_state` and
`gather_optimizer_state` / `load_optimizer_state` move full, name-keyed states through rank 0 for checkpoints.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from dsv3.model.moe import LocalExperts, MoE
from dsv3.model.parallel import RemoteExpert
from dsv3.parallel import combine, dispatch, run_local_experts
from dsv3.train.parallelize import plain_name

EXPERT_MARK = "_dsv3_expert_parallel"  # attribute set on owned expert parameters


class ExpertParallel(LocalExperts):
    """The `experts_impl` of a MoE whose routed experts are spread over the ranks: this rank owns experts
    `[first, first + per)`, `routed` exchanges the (token, expert) pairs by all-to-all over `group`."""

    def __init__(self, group: dist.ProcessGroup, first: int, per: int, world: int) -> None:
        self.group, self.first, self.per, self.world = group, first, per, world

    def routed(self, moe: MoE, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return routed_expert_parallel(moe, x, weights, indices, group=self.group, first=self.first, per=self.per,
                                      world=self.world)

    def __repr__(self) -> str:
        return f"ExpertParallel(experts={self.first}..{self.first + self.per - 1}, world={self.world})"


def moe_layers(model: nn.Module) -> list[nn.Module]:
    return [block.mlp for block in model.blocks() if hasattr(block.mlp, "experts")]


def shard_experts(model: nn.Module, rank: int, world: int) -> dist.ProcessGroup | None:
    """Keep rank `rank`'s experts, route every MoE through the all-to-all exchange; returns the EP group
    (None, and nothing changed, for one process). The experts of each layer must divide evenly over ranks."""
    if world <= 1:
        return None
    layers = moe_layers(model)
    for moe in layers:
        if moe.n_experts % world:
            raise ValueError(f"expert parallel: {moe.n_experts} routed experts do not divide over {world} ranks")
    group = dist.new_group(list(range(world)))
    for moe in layers:
        per = moe.n_experts // world
        first = rank * per
        for e in range(moe.n_experts):
            if first <= e < first + per:
                for p in moe.experts[e].parameters():
                    setattr(p, EXPERT_MARK, True)
                    p.register_hook(partial(torch.div, other=world))  # see the module docstring
            else:
                moe.experts[e] = RemoteExpert(e // per)
        moe.set_experts_impl(ExpertParallel(group, first, per, world))
    return group


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of the owned expert parameters, as state dicts key them (for DDP to ignore, for checkpoints)."""
    return [plain_name(n) for n, p in model.named_parameters() if getattr(p, EXPERT_MARK, False)]


def routed_expert_parallel(moe: nn.Module, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, *,
                           group, first: int, per: int, world: int) -> torch.Tensor:
    """`MoE.routed` with the experts spread over ranks (see the module docstring); x `[N, D]`, weights and
    indices `[N, K]` -> `[N, D]`. Every rank must call it for every MoE layer, in the same order. The exchange
    is `dsv3.parallel`'s, shared with parallel inference."""
    xr, local, exchange = dispatch(x, indices, per, group, world)  # [R, D] pairs this rank's experts serve
    y = run_local_experts([moe.experts[first + e] for e in range(per)], xr, local)
    return combine(y, weights, exchange, x.shape[0]).to(x.dtype)


@torch.no_grad()
def clip_grad_norm_ep(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip all gradients by their global norm: the replicated parameters' (equal on every rank after DDP)
    plus the owned experts' summed over ranks. Returns the norm before clipping (float32 scalar)."""
    dense, owned = [], []
    for p in model.parameters():
        if p.grad is not None:
            (owned if getattr(p, EXPERT_MARK, False) else dense).append(p.grad)
    device = next(model.parameters()).device

    def sq(grads: list[torch.Tensor]) -> torch.Tensor:
        return sum((g.float().pow(2).sum() for g in grads), torch.zeros((), device=device))

    owned_sq = sq(owned)
    dist.all_reduce(owned_sq)
    total = (sq(dense) + owned_sq).sqrt()
    if math.isfinite(max_norm):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in dense + owned:
            g.mul_(coef.to(g.dtype))
    return total


def gather_full_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full model state dict on the CPU of rank 0 (None elsewhere): this rank's tensors plus every other
    rank's owned experts. Collective."""
    local = {n: t.detach().cpu() for n, t in model.state_dict().items()}
    mine = {n: local[n] for n in expert_parameter_names(model)}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    if dist.get_rank() != 0:
        return None
    for part in parts:
        local.update(part)
    return local


def _named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    names = {p: plain_name(n) for n, p in model.named_parameters()}
    state = {names[p]: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in s.items()}
             for p, s in optimizer.state.items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[p] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """The optimizer state keyed by parameter name, all ranks' owned experts included, on rank 0. Collective."""
    mine = _named_optimizer_state(model, optimizer)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    if dist.get_rank() != 0:
        return None
    full = parts[0]
    for part in parts[1:]:
        full["state"].update(part["state"])
        for group, other in zip(full["param_groups"], part["param_groups"]):
            group["params"] += [n for n in other["params"] if n not in group["params"]]
    return full


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a name-keyed optimizer state (from `gather_optimizer_state`) into this rank's optimizer: the
    entries of its own parameters, and each group's hyper-parameters."""
    names = {p: plain_name(n) for n, p in model.named_parameters()}
    current = optimizer.state_dict()  # the same groups, parameters as consecutive ints
    state, groups = {}, []
    for group, ids, saved_group in zip(optimizer.param_groups, current["param_groups"], saved["param_groups"]):
        for p, i in zip(group["params"], ids["params"]):
            if names[p] in saved["state"]:
                state[i] = saved["state"][names[p]]
        groups.append({**{k: v for k, v in saved_group.items() if k != "params"}, "params": ids["params"]})
    optimizer.load_state_dict({"state": state, "param_groups": groups})
