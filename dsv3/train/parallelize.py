"""Distributed setup and everything applied to the model from outside it, in torchtitan's order:
FP8 linears → activation checkpointing → `torch.compile` → data parallel (FSDP2 or DDP). Attention needs
nothing here: `model(tokens [B, T])` already runs the causal backend's fused SDPA
(`dsv3.model.attention.CausalAttention`).

- `init_distributed(device)`: under `torchrun` (WORLD_SIZE > 1) joins the process group (NCCL on CUDA,
  gloo on CPU) and returns a `DistInfo`; a single process gets rank 0 of 1 and no group.
- `apply_fp8(model, plan)`: the FP8 linears and the routed experts' path, exactly as an `FP8Plan` of
  `dsv3.train.fp8_select.plan_fp8` says (which GEMMs gain from FP8, by shape).
- `parallelize(model, ...)` returns the module to call for training: the model itself (one process, or
  sharded in place by FSDP2, `dsv3.train.fsdp`), or a `DistributedDataParallel` around it.
  `data_parallel="auto"` takes FSDP2 when the MoE runs the grouped path (every expert then gets a gradient
  on every rank, which FSDP2's reduce-scatter needs), else DDP, which handles experts without tokens
  (`find_unused_parameters`) by reducing zeros for them (e.g. emulated FP8 experts on CPU). With expert
  parallel (`dsv3.train.expert_parallel`, applied by the trainer before this) DDP ignores the owned experts.
  Buffers are not broadcast: the gate biases are updated identically on every rank from all-reduced counts.
- `apply_activation_checkpointing(model)`: each block (main layers and MTP modules) replaced in its
  `ModuleList` by torch's non-reentrant `checkpoint_wrapper` around it, as torchtitan does.

State-dict keys stay those of the plain `Transformer`, so checkpoints and `save_model` see it unchanged. The
one transform that changes module paths is activation checkpointing: the wrapper puts
`_checkpoint_wrapped_module.` into `named_parameters()` names; its own state-dict hooks drop that part (and put
it back on load), FSDP2's state-dict helpers drop it too, and `plain_name` drops it where code keys something
by parameter name (DDP's ignore list, the expert-parallel optimizer state).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX, checkpoint_wrapper

from dsv3.train.fp8_linear import swap_to_fp8
from dsv3.train.fp8_select import FP8Plan
from dsv3.train.fsdp import fsdp_applies, shard_model


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is an error naming the choice."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    return device


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the `torchrun` process group when WORLD_SIZE > 1; on CUDA each rank takes GPU LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    from dsv3.parallel import join_world, torchrun_world
    rank, world, local_rank = torchrun_world()
    device = join_world(device)  # the same world (and collective timeout) as parallel inference
    return DistInfo(rank, world, local_rank), device


def plain_name(name: str) -> str:
    """A parameter name as the plain `Transformer` has it (activation checkpointing's wrapper part removed)."""
    return name.replace(_CHECKPOINT_PREFIX, "")


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block's forward in backward instead of keeping its activations: every block of
    `model.layers` and `model.mtp` is replaced in its list by `checkpoint_wrapper(block)` (non-reentrant
    `torch.utils.checkpoint`). The wrapper forwards attribute reads to the block (`block.mlp` still works).
    Returns the number of blocks wrapped."""
    wrapped = 0
    for blocks in (model.layers, model.mtp):
        for i, block in enumerate(blocks):
            # no randomness in the forward: nothing to replay, so the RNG state is not saved
            blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
            wrapped += 1
    return wrapped


def compile_model(model: nn.Module) -> str:
    """`torch.compile` each transformer block whole when its MoE runs the sync-free grouped path (training
    mode, plain expert weights): routing, dispatch, grouped GEMMs and combine then have static shapes. With
    emulated FP8 experts (the reference loop, data-dependent) only the static parts are compiled: attention,
    norms, dense MLPs and shared experts. Returns "blocks" or "parts"."""
    grouped = all(block.mlp.grouped_ok() for block in model.blocks() if hasattr(block.mlp, "experts"))
    # the blocks share one code object; room for the dense/MoE/MTP variants and recompiles (default 8)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # a checkpointed block traces as one graph only if its one side effect, the gate recording its routing
    # (`Gate.last_scores`), may be left out of the recomputation: it records the same routing again
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for block in model.blocks():
        if grouped:
            block.compile()
            continue
        block.self_attn.compile()
        block.input_layernorm.compile()
        block.post_attention_layernorm.compile()
        if not hasattr(block.mlp, "experts"):
            block.mlp.compile()
        elif block.mlp.shared_experts is not None:
            block.mlp.shared_experts.compile()
    return "blocks" if grouped else "parts"


def apply_fp8(model: nn.Module, plan: FP8Plan) -> int:
    """Apply `plan` (`dsv3.train.fp8_select.plan_fp8` of this model): the linears it names become
    `FP8TrainingLinear` (`swap_to_fp8` with the plan as its filter), and each MoE layer's routed experts take the
    plan's path: "loop" (their own linears are among the plan's, so the MoE runs its reference loop), "grouped"
    (the `FP8GroupedExperts` implementation: the grouped path's two GEMMs through `fp8_grouped_mm`) or "bf16"
    (unchanged: bf16's grouped GEMM). Returns the number of linears swapped."""
    swapped = swap_to_fp8(model, module_filter_fn=lambda _, path: path in plan.linears)
    grouped = [path for path, how in plan.experts.items() if how == "grouped"]
    if grouped:
        from dsv3.train.fp8_grouped import FP8GroupedExperts
        for path in grouped:
            model.get_submodule(path).set_experts_impl(FP8GroupedExperts())
    return swapped


def parallelize(model: nn.Module, info: DistInfo, device: torch.device, *, fp8: FP8Plan | None = None,
                activation_checkpointing: bool = False, compile: bool = False, data_parallel: str = "auto",
                ddp_ignore: list[str] | tuple[str, ...] = ()) -> nn.Module:
    """Apply the training transforms in place and return the module to call (DDP wrapper when distributed).
    `fp8`: the FP8 plan of this model to apply (`apply_fp8`), None for none.
    `ddp_ignore`: parameter names DDP leaves alone (the owned experts under expert parallel)."""
    if fp8 is not None:
        apply_fp8(model, fp8)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        compile_model(model)
    if not info.distributed:
        return model
    if data_parallel == "fsdp" or (data_parallel == "auto" and fsdp_applies(model)):
        return shard_model(model, info.world_size, device)
    from torch.nn.parallel import DistributedDataParallel
    if ddp_ignore:  # parameters that live on one rank (expert parallel): never all-reduced
        actual = {plain_name(n): n for n, _ in model.named_parameters()}  # DDP matches the module paths
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, [actual[n] for n in ddp_ignore])
    with warnings.catch_warnings():
        # torch >= 2.13 deprecates broadcast_buffers in favour of forward_sync_buffers (absent in older torch);
        # the meaning we need, no per-forward buffer broadcast, is the same
        warnings.simplefilter("ignore", FutureWarning)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=True, broadcast_buffers=False)


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks (in place); identity for one process."""
    if info.distributed:
        dist.all_reduce(t)
        t /= info.world_size
    return t
