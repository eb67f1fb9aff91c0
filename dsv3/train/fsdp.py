"""FSDP2 data parallel for training (`torch.distributed.fsdp.fully_shard`), applied from outside the model.

`shard_model(model, world_size, device)` shards every transformer block (main layers and MTP modules), then
the root (embedding, final norm, output head), over a 1-D device mesh of all ranks: each rank keeps 1/world of
every parameter and of its AdamW state; forward all-gathers a block's parameters just before it runs, backward
reduce-scatters its gradients (averaged over ranks, like DDP).

FSDP2 needs every rank to produce a gradient for every parameter of a sharded group. The routed experts do on
the sync-free grouped MoE path (`MoE.routed_grouped`, training mode): the experts' weights are stacked at call
time, so an expert that got no token still gets a (zero) gradient. `fsdp_applies(model)` checks that path is
the one that runs. Buffers (the gates' `e_score_correction_bias`) are not sharded: the balancer moves them
identically on every rank from all-reduced expert counts.

Checkpoints stay in the plain layout: `full_model_state` / `full_optimizer_state` gather full tensors (every
rank must call them; rank 0 gets them on the CPU) and `load_full_model_state` / `load_full_optimizer_state`
scatter them back, through `torch.distributed.checkpoint.state_dict`.
"""

from __future__ import annotations

import torch
from torch import nn


def is_sharded(model: nn.Module) -> bool:
    """True once `shard_model` (FSDP2) has been applied to `model`."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def fsdp_applies(model: nn.Module) -> bool:
    """True when every MoE layer of `model` runs the grouped path in training (all experts get gradients)."""
    return all(block.mlp.grouped_ok() for block in model.blocks() if hasattr(block.mlp, "experts"))


def shard_model(model: nn.Module, world_size: int, device: torch.device, *,
                param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard `model` in place with FSDP2 over all `world_size` ranks (the process group must exist); returns it.

    `param_dtype`: the dtype parameters are all-gathered and computed in (e.g. bf16, with fp32 shards kept for
    the optimizer); None keeps their dtype. `reduce_dtype`: the dtype gradients are reduced in (None: the
    parameter dtype)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not fsdp_applies(model):
        raise ValueError("FSDP2 needs the grouped MoE path (every expert a plain nn.Linear MLP, torch._grouped_mm "
                         "available): an expert without tokens would have no gradient on some ranks")
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.blocks():
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state dict on the CPU of rank 0 (other ranks get an empty dict). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The full optimizer state dict (keyed by parameter names) on the CPU of rank 0. Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Scatter a full model state dict (as `full_model_state` returns, read by rank 0) into the shards. Collective."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(model, state, options=_options(broadcast_from_rank0=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Scatter a full optimizer state dict (from `full_optimizer_state`) into the sharded optimizer. Collective."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=_options(broadcast_from_rank0=True))
