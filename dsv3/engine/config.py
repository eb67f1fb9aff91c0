"""`EngineConfig`: every setting of the `LLM` engine in one validated dataclass.

The command line builds one from its flags (`dsv3/cli/flags.py`), library callers pass one or keyword
overrides (`LLM(path, device="cuda", num_blocks=64)`), and both meet here, so each setting is checked in
one place, with a `ValueError` that names the field.

`dtype` uses one vocabulary everywhere: `auto`, `bfloat16`, `float16`, `float32`, where `auto` is
float32 on a CPU (faster there) and bfloat16 on a GPU. A `torch.dtype` is accepted and stored by name,
so this module imports no torch and the command line can build a config before torch loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

DTYPES = ("auto", "bfloat16", "float16", "float32")
EXPERT_EXCHANGES = ("all-to-all", "all-reduce")  # as dsv3.model.parallel.MOE_MODES (no torch import here)
WEIGHTS = ("auto", "bf16", "fp8")  # as dsv3.checkpoint.load.WEIGHTS (no torch import here)
FP8_POLICIES = ("auto", "w8a16", "w8a8")  # as dsv3.kernels.fp8.FP8_POLICIES
SPECULATIVE = (None, "mtp")  # speculative decoding methods
MAX_DRAFT_TOKENS = 8


def resolve_dtype(dtype: str, device: str) -> str:
    """The dtype name `dtype` means on `device`: `auto` is float32 on a CPU, bfloat16 elsewhere."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    return "float32" if str(device).split(":")[0] == "cpu" else "bfloat16"


def _check_device(device: str) -> None:
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return
    if kind == "cuda" and (not index or index.isdigit()):
        return
    raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")


def _at_least(name: str, value: Any, low: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}{' or None' if optional else ''}, got {value!r}")


@dataclass
class EngineConfig:
    """What `LLM` is built with. `device` and `dtype` apply when `LLM` loads a checkpoint folder; a
    `Transformer` passed in keeps its own. Cache size: `num_blocks` blocks of `block_size` tokens, or
    `cache_memory` bytes, or (neither) a default share of the device's memory."""

    device: str = "cpu"  # cpu, cuda or cuda:N
    dtype: str = "bfloat16"  # auto, bfloat16, float16 or float32
    num_blocks: int | None = None  # paged-cache blocks
    cache_memory: int | None = None  # paged-cache bytes (when num_blocks is None)
    block_size: int = 16  # tokens per cache block
    max_num_seqs: int = 64  # sequences in one step (and the largest CUDA-graph decode batch)
    max_num_batched_tokens: int = 2048  # token budget of one step
    max_model_len: int | None = None  # prompt + output per sequence; None: the model's and cache's limit
    enable_prefix_caching: bool = True  # share the cached blocks of equal prompt prefixes
    tensor_parallel_size: int | None = None  # under torchrun: ranks splitting heads/vocab/MLPs (None: the world / ep)
    expert_parallel_size: int | None = None  # under torchrun: ranks splitting the routed experts (None: 1)
    expert_exchange: str = "all-to-all"  # how tokens reach experts over EP: all-to-all, or all-reduce (the demo's)
    fast: bool | None = None  # fused kernels + CUDA graphs for decode; None: on for models on CUDA
    weights: str = "auto"  # Linear weights in memory when loading a folder: auto (FP8 kept on CUDA), bf16, fp8
    fp8_policy: str | None = None  # FP8 weights' activations: auto, w8a16, w8a8 (dsv3.kernels.fp8.resolve_policy);
    # None keeps the model's own (`FP8Linear`'s default is auto)
    speculative: str | None = None  # "mtp": the model's MTP module drafts, the main model verifies; None: off
    num_draft_tokens: int = 1  # drafts per sequence and step with speculative="mtp"

    def __post_init__(self) -> None:
        if not isinstance(self.device, str):  # a torch.device
            self.device = str(self.device)
        _check_device(self.device)
        if not isinstance(self.dtype, str):  # a torch.dtype: "torch.bfloat16" -> "bfloat16"
            self.dtype = str(self.dtype).removeprefix("torch.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _at_least("num_blocks", self.num_blocks, 1, optional=True)
        _at_least("cache_memory", self.cache_memory, 1, optional=True)
        if self.num_blocks is not None and self.cache_memory is not None:
            raise ValueError("num_blocks and cache_memory both size the cache; give one of them")
        _at_least("block_size", self.block_size, 1)
        _at_least("max_num_seqs", self.max_num_seqs, 1)
        _at_least("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}): every running sequence needs a token in a step")
        _at_least("max_model_len", self.max_model_len, 2, optional=True)
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be True or False, got {self.enable_prefix_caching!r}")
        if self.fast not in (None, True, False):
            raise ValueError(f"fast must be True, False or None, got {self.fast!r}")
        _at_least("tensor_parallel_size", self.tensor_parallel_size, 1, optional=True)
        _at_least("expert_parallel_size", self.expert_parallel_size, 1, optional=True)
        if self.expert_exchange not in EXPERT_EXCHANGES:
            raise ValueError(f"expert_exchange must be one of {', '.join(EXPERT_EXCHANGES)}, "
                             f"got {self.expert_exchange!r}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        if self.fp8_policy is not None and self.fp8_policy not in FP8_POLICIES:
            raise ValueError(f"fp8_policy must be one of {', '.join(FP8_POLICIES)}, got {self.fp8_policy!r}")
        if self.speculative not in SPECULATIVE:
            raise ValueError(f"speculative must be one of {', '.join(map(str, SPECULATIVE))}, got {self.speculative!r}")
        _at_least("num_draft_tokens", self.num_draft_tokens, 1)
        if self.num_draft_tokens > MAX_DRAFT_TOKENS:
            raise ValueError(f"num_draft_tokens must be <= {MAX_DRAFT_TOKENS}, got {self.num_draft_tokens}")

    @property
    def resolved_dtype(self) -> str:
        """`dtype` with `auto` resolved for `device`."""
        return resolve_dtype(self.dtype, self.device)

    @property
    def torch_dtype(self) -> Any:
        """`resolved_dtype` as a `torch.dtype` (imports torch)."""
        import torch
        return getattr(torch, self.resolved_dtype)


def with_overrides(config: EngineConfig | None, overrides: dict[str, Any]) -> EngineConfig:
    """`config` (default: `EngineConfig()`) with the fields in `overrides` replaced, validated again.
    How `LLM(path, config, **overrides)` reads its arguments; an unknown name is a TypeError."""
    known = [f.name for f in dataclasses.fields(EngineConfig)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise TypeError(f"unknown engine setting(s) {', '.join(unknown)}; EngineConfig has {', '.join(known)}")
    if config is None:
        return EngineConfig(**overrides)
    if not isinstance(config, EngineConfig):
        raise ValueError(f"config must be an EngineConfig, got {type(config).__name__}")
    return dataclasses.replace(config, **overrides) if overrides else config
