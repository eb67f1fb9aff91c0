"""The memory plan of a model split over GPUs, from its hyper-parameters alone (no folder, no tensors).

`plan_memory(args, tp, ep, weights, dtype)` counts, for one rank of a `tp x ep` layout as
`dsv3.model.parallel.parallelize_for_inference` splits it, the bytes of every parameter and buffer it keeps
(the vocabulary, attention heads, dense and shared MLPs and each owned expert's width over TP; the routed
experts over EP; norms, routers, `q_a_proj`/`kv_a_proj_with_mqa` and `eh_proj` whole on every rank), with FP8
Linears as e4m3 codes plus a float32 scale per 128x128 block where the official checkpoint stores them so, and
the latent cache's bytes per token, which every rank holds in full: all heads read the one latent
`[c_kv ; k_pe]`, so splitting the heads does not split it. The tests compare it with the bytes of models really
split; the engine's cache uses the same bytes per token (`dsv3.engine.model_runner.cache_bytes_per_block`).

`dsv3 info --tp N --ep M [--weights fp8]` prints it, with how much cache fits on an H200 or an H100.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsv3.config import ModelArgs
from dsv3.parallel import ParallelLayout

# usable device memory as torch.cuda.mem_get_info reports it for a whole device (bytes)
GPUS = {"H200": 143_771 * 2**20, "H100": 81_559 * 2**20}
FP8_BLOCK = 128


@dataclass
class MemoryPlan:
    layout: ParallelLayout
    weights: str  # "bf16" (the model dtype) or "fp8"
    weight_bytes: int  # parameters and buffers one rank holds
    cache_bytes_per_token: int  # the latent cache, main layers, on every rank

    def cache_tokens(self, device_bytes: int, utilization: float) -> int:
        """Tokens of latent cache that fit in `utilization` of `device_bytes` beside the weights (0: none)."""
        free = int(device_bytes * utilization) - self.weight_bytes
        return max(0, free // self.cache_bytes_per_token)


def plan_memory(args: ModelArgs, tp: int = 1, ep: int = 1, weights: str = "bf16", dtype_bytes: int = 2,
                mtp: bool = True, cache_dtype_bytes: int | None = None) -> MemoryPlan:
    """Bytes one rank of `tp x ep` holds (see the module docstring); `dtype_bytes` of the model dtype, `mtp`:
    count the MTP modules too (as a checkpoint that has them loads)."""
    if weights not in ("bf16", "fp8"):
        raise ValueError(f"weights must be 'bf16' or 'fp8', got {weights!r}")
    layout = ParallelLayout(tp, ep)
    from dsv3.model.parallel import check_layout
    check_layout(args, layout)
    e = dtype_bytes
    if weights == "fp8" and tp > 1:  # FP8 splits fall on 128-blocks (as shard_linear_ checks)
        h = args.n_heads // tp
        parts = {"query rows": h * args.qk_head_dim, "kv_b_proj rows": h * (args.qk_nope_head_dim + args.v_head_dim),
                 "o_proj columns": h * args.v_head_dim, "dense MLP width": args.inter_dim // tp,
                 "expert width": args.moe_inter_dim // tp}
        for what, size in parts.items():
            if size % FP8_BLOCK:
                raise ValueError(f"FP8 weights split on {FP8_BLOCK}-blocks, but each rank's {what} would be {size}; "
                                 "choose another --tp or --weights bf16")

    def linear(out: int, inp: int, keep_bf16: bool = False) -> int:
        if weights == "fp8" and not keep_bf16:
            return out * inp + math.ceil(out / FP8_BLOCK) * math.ceil(inp / FP8_BLOCK) * 4
        return out * inp * e

    d, h = args.dim, args.n_heads // tp
    attn = 2 * d * e  # the block's two norms
    if args.q_lora_rank:
        attn += linear(args.q_lora_rank, d) + args.q_lora_rank * e + linear(h * args.qk_head_dim, args.q_lora_rank)
    else:
        attn += linear(h * args.qk_head_dim, d)
    attn += linear(args.kv_lora_rank + args.qk_rope_head_dim, d) + args.kv_lora_rank * e
    attn += linear(h * (args.qk_nope_head_dim + args.v_head_dim), args.kv_lora_rank)
    attn += linear(d, h * args.v_head_dim)

    def mlp(width: int) -> int:
        return 2 * linear(width // tp, d) + linear(d, width // tp)

    dense = mlp(args.inter_dim)
    moe = args.n_routed_experts * d * e + (args.n_routed_experts * 4 if args.correction_bias else 0)
    moe += args.n_routed_experts // ep * mlp(args.moe_inter_dim)
    if args.n_shared_experts:
        moe += mlp(args.n_shared_experts * args.moe_inter_dim)
    total = 2 * args.vocab_size // tp * d * e + d * e  # embedding, head (BF16 in FP8 checkpoints too), final norm
    if args.tie_word_embeddings:
        total -= args.vocab_size // tp * d * e
    blocks = [(i, False) for i in range(args.n_layers)]
    blocks += [(args.n_layers + k, True) for k in range(args.num_nextn_predict_layers if mtp else 0)]
    for layer, is_mtp in blocks:
        total += attn + (moe if args.is_moe_layer(layer) else dense)
        if is_mtp:  # enorm, hnorm, shared_head.norm, eh_proj
            total += 3 * d * e + linear(d, 2 * d, keep_bf16=True)
    cache = args.n_layers * (args.kv_lora_rank + args.qk_rope_head_dim) * (cache_dtype_bytes or e)
    return MemoryPlan(layout, weights, total, cache)


def describe(plan: MemoryPlan, utilization: float = 0.9, gpus: dict[str, int] | None = None) -> list[str]:
    """The plan as lines for people: per-GPU weights, cache per 1K tokens, and what fits on each GPU."""
    gib = 2**30
    lay = plan.layout
    lines = [f"parallel plan: tp {lay.tp} x ep {lay.ep} = {lay.world} GPU(s), {plan.weights} weights",
             f"  weights per GPU               {plan.weight_bytes / gib:,.2f} GiB",
             f"  latent cache per 1K tokens    {plan.cache_bytes_per_token * 1024 / 2**20:,.1f} MiB per GPU "
             "(whole on every GPU: all heads read one latent)"]
    for name, size in (gpus or GPUS).items():
        tokens = plan.cache_tokens(size, utilization)
        usable = size * utilization / gib
        if tokens == 0:
            lines.append(f"  {name} ({size / gib:.1f} GiB): does not fit: {plan.weight_bytes / gib:,.1f} GiB of "
                         f"weights vs {usable:,.1f} GiB at {utilization:.0%} utilization")
        else:
            lines.append(f"  {name} ({size / gib:.1f} GiB): fits; at {utilization:.0%} utilization "
                         f"{usable - plan.weight_bytes / gib:,.1f} GiB is left for the cache: {tokens:,} tokens")
    return lines
