"""Ranks, process groups and collectives for parallel inference and training.

`ParallelLayout(tp, ep, rank)` is pure arithmetic: `tp * ep` ranks, rank `r = ep_rank * tp + tp_rank`, so the
ranks of one tensor-parallel (TP) group are neighbours (one node's NVLink); an expert-parallel (EP) group holds
the ranks with the same `tp_rank`. Sharding code (`dsv3.model.parallel`, `dsv3 convert shard`, the memory
planner) needs only a layout; running needs a `ParallelContext`, the layout plus its `torch.distributed`
groups: the world, this rank's TP and EP groups, and a gloo control group for Python objects (the engine's step
plans), so that on NCCL object traffic stays off the GPU streams.

`ParallelContext.from_env(tp, ep)` joins the `torchrun` world (NCCL on CUDA, gloo on CPU; multi-node through
torchrun's rendezvous) with a timeout on every collective, so a rank that dies or hangs stops the group with an
error instead of a silent hang. One process is `ParallelContext.single()`: every collective is the identity.

The expert-parallel exchange lives here too, one implementation for the engine and the trainer:
`dispatch(x, indices, per, group, world)` sends each (token, expert) pair to the rank owning the expert (ranks
own `per` consecutive experts) by all-to-all; `combine(y, weights, exchange, n)` sends the expert outputs back
and adds `weight * output` into each token's row. With a gradient wanted, the hidden states travel through the
autograd all-to-all (training); without, through the plain one (inference).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0  # a collective that waits longer than this stops the group (DSV3_DIST_TIMEOUT)


@dataclass(frozen=True)
class ParallelLayout:
    """Which part of the model rank `rank` holds: TP index `tp_rank` of `tp`, EP index `ep_rank` of `ep`."""

    tp: int = 1
    ep: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        for name in ("tp", "ep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be in [0, {self.world}) for tp={self.tp} x ep={self.ep}, got {self.rank}")

    @property
    def world(self) -> int:
        return self.tp * self.ep

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def ep_rank(self) -> int:
        return self.rank // self.tp

    def tp_group_ranks(self, ep_rank: int) -> list[int]:
        return [ep_rank * self.tp + t for t in range(self.tp)]

    def ep_group_ranks(self, tp_rank: int) -> list[int]:
        return [e * self.tp + tp_rank for e in range(self.ep)]

    def at(self, rank: int) -> ParallelLayout:
        return ParallelLayout(self.tp, self.ep, rank)


def split_range(total: int, parts: int, index: int, what: str) -> tuple[int, int]:
    """`[start, stop)` of part `index` of `total` split evenly in `parts`; a ValueError naming `what` if uneven."""
    if total % parts:
        raise ValueError(f"{what} ({total}) does not divide over {parts} ranks")
    per = total // parts
    return index * per, (index + 1) * per


def timeout_seconds(timeout: float | None = None) -> float:
    """The collective timeout: `timeout`, else DSV3_DIST_TIMEOUT (seconds), else 600."""
    if timeout is not None:
        return float(timeout)
    raw = os.environ.get("DSV3_DIST_TIMEOUT", "")
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"DSV3_DIST_TIMEOUT must be a number of seconds, got {raw!r}") from None


def torchrun_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def join_world(device: torch.device, timeout: float | None = None) -> torch.device:
    """Join the torchrun process group once (NCCL on CUDA, gloo on CPU), every collective bounded by the
    timeout; on CUDA each rank takes GPU LOCAL_RANK. Returns the device this rank computes on."""
    rank, world, local_rank = torchrun_world()
    if world <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out NCCL op aborts the group
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_seconds(timeout)),
                                device_id=device if device.type == "cuda" else None)
    return device


class ParallelContext:
    """A layout and its process groups (None for one process). Passed explicitly; no module-level state."""

    def __init__(self, layout: ParallelLayout, device: torch.device, *, tp_group: Any = None, ep_group: Any = None,
                 control_group: Any = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.layout = layout
        self.device = device
        self.tp_group, self.ep_group, self.control_group = tp_group, ep_group, control_group
        self.timeout = timeout

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> ParallelContext:
        return cls(ParallelLayout(), torch.device(device))

    @classmethod
    def from_env(cls, tp: int | None = None, ep: int | None = None, device: str | torch.device = "cpu",
                 timeout: float | None = None) -> ParallelContext:
        """The torchrun world split as `tp x ep` (defaults: `ep=1`, `tp` the rest of the world). One process
        with tp = ep = 1 (or unset) is `single()`; asking for more ranks than torchrun started is an error."""
        rank, world, _ = torchrun_world()
        ep = 1 if ep is None else ep
        if tp is None:
            if world % ep:
                raise ValueError(f"--ep {ep} does not divide the world of {world} processes")
            tp = world // ep
        layout_world = ParallelLayout(tp, ep).world  # validates tp, ep
        if layout_world != world:
            hint = "start it with torchrun --nproc-per-node N" if world == 1 else "or change --tp/--ep"
            raise ValueError(f"--tp {tp} x --ep {ep} needs {layout_world} processes, but the world has {world} "
                             f"({hint})")
        device = torch.device(device)
        if world == 1:
            return cls.single(device)
        seconds = timeout_seconds(timeout)
        device = join_world(device, seconds)
        layout = ParallelLayout(tp, ep, rank)
        tp_group = ep_group = None
        limit = datetime.timedelta(seconds=seconds)
        for e in range(ep):  # every rank creates every group, in the same order
            g = dist.new_group(layout.tp_group_ranks(e), timeout=limit)
            tp_group = g if e == layout.ep_rank else tp_group
        for t in range(tp):
            g = dist.new_group(layout.ep_group_ranks(t), timeout=limit)
            ep_group = g if t == layout.tp_rank else ep_group
        control = dist.new_group(list(range(world)), backend="gloo", timeout=limit)
        return cls(layout, device, tp_group=tp_group, ep_group=ep_group, control_group=control, timeout=seconds)

    # ---- the layout ---------------------------------------------------------------------------
    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def ep(self) -> int:
        return self.layout.ep

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def tp_rank(self) -> int:
        return self.layout.tp_rank

    @property
    def ep_rank(self) -> int:
        return self.layout.ep_rank

    @property
    def is_driver(self) -> bool:
        """Rank 0 schedules, samples and talks to the user."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"ParallelContext(rank={self.rank}, tp={self.tp}, ep={self.ep}, device={self.device})"

    # ---- collectives (identity for a group of one) ----------------------------------------------
    def all_reduce_tp(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over this rank's TP group, in place; returns it."""
        if self.tp > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def all_reduce_ep(self, x: torch.Tensor) -> torch.Tensor:
        if self.ep > 1:
            dist.all_reduce(x, group=self.ep_group)
        return x

    def all_gather_tp(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """This TP group's pieces of `x` concatenated along `dim`, in TP-rank order."""
        if self.tp == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=dim)

    def all_gather_ep(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Rows `[sizes[i], ...]` from each EP rank i, concatenated along dim 0 (uneven sizes allowed)."""
        if self.ep == 1:
            return x
        width = max(sizes)
        padded = x.new_zeros(width, *x.shape[1:])
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.ep)]
        dist.all_gather(parts, padded, group=self.ep_group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (pickled, over the gloo control group)."""
        if self.world == 1:
            return obj
        box = [obj if self.is_driver else None]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        return box[0]


# ---- expert-parallel exchange ---------------------------------------------------------------------
@dataclass
class Exchange:
    """How one `dispatch` moved the (token, expert) pairs, so that `combine` can send the outputs back."""

    order: torch.Tensor  # [P] pair index of each sorted pair (pairs sorted by expert, hence by owner)
    token: torch.Tensor  # [P] token of each sorted pair
    send_splits: list[int]  # pairs sent to each rank
    recv_splits: list[int]  # pairs received from each rank
    group: Any


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    x = x.contiguous()
    if torch.is_grad_enabled() and x.requires_grad:
        from torch.distributed._functional_collectives import all_to_all_single_autograd
        return all_to_all_single_autograd(x, out_splits, in_splits, group)
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


def dispatch(x: torch.Tensor, indices: torch.Tensor, per: int, group: Any,
             world: int) -> tuple[torch.Tensor, torch.Tensor, Exchange]:
    """Send each token's pairs to the ranks owning their experts (rank r owns `[r * per, (r + 1) * per)`).
    x `[N, D]`, indices `[N, K]` -> received hidden states `[R, D]`, their experts as local ids `[R]` (in
    `[0, per)`), and the exchange for `combine`. Every rank of `group` must call it, in the same order."""
    k = indices.shape[1]
    flat = indices.flatten()  # [P]
    order = flat.argsort(stable=True)  # pairs grouped by expert, hence by owner
    token = order // k  # [P]
    experts = flat[order]
    owner = experts // per
    send = torch.zeros(world, dtype=torch.long, device=x.device).scatter_add_(0, owner, torch.ones_like(owner))
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    send_splits, recv_splits = send.tolist(), recv.tolist()
    xr = _all_to_all(x[token], recv_splits, send_splits, group)  # [R, D]
    local = torch.empty(sum(recv_splits), dtype=torch.long, device=x.device)
    dist.all_to_all_single(local, (experts - owner * per).contiguous(), recv_splits, send_splits, group=group)
    return xr, local, Exchange(order, token, send_splits, recv_splits, group)


def combine(y: torch.Tensor, weights: torch.Tensor, ex: Exchange, n_tokens: int) -> torch.Tensor:
    """Send expert outputs `y [R, D]` (in received order) back and sum `weight * output` per token -> float32
    `[n_tokens, D]`."""
    yb = _all_to_all(y, ex.send_splits, ex.recv_splits, ex.group)  # [P, D] in `ex.order`
    out = torch.zeros(n_tokens, y.shape[-1], dtype=torch.float32, device=y.device)
    return out.index_add(0, ex.token, yb.float() * weights.flatten()[ex.order, None])


def run_local_experts(experts: list[torch.nn.Module], xr: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Received pairs `xr [R, D]` through their local experts (`local [R]` indexes `experts`) -> `[R, D]` in the
    received order. Every expert runs, on zero rows if it got none, so that in training each owned expert gets a
    (zero) gradient and the output always depends on `xr` (backward runs both exchanges on every rank)."""
    local_order = local.argsort(stable=True)
    counts = torch.zeros(len(experts), dtype=torch.long, device=xr.device)
    counts = counts.scatter_add_(0, local, torch.ones_like(local)).tolist()
    xs = xr[local_order]
    ys, start = [], 0
    for expert, count in zip(experts, counts):
        ys.append(expert(xs[start:start + count]))
        start += count
    ys = torch.cat(ys)
    return torch.empty_like(ys).index_copy(0, local_order, ys)
