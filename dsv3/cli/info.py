"""`dsv3 info`: a preset's or checkpoint's shape and parameter counts (counted from module shapes, not
hard-coded), compared with the published activated count for the 671B preset, and the memory plan of running it
split over `--tp x --ep` GPUs (`dsv3.model.memory`): weights per GPU, latent cache per 1K tokens, and whether it
fits on an H200 or an H100; nothing is loaded."""

from __future__ import annotations

import argparse

from dsv3.cli.flags import UsageError, positive_int, resolve_model, unit_interval

PUBLISHED_ACTIVATED_671B = 36.7e9


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Print a preset's or checkpoint's hyper-parameters and its parameter counts: main model, "
                     "MTP modules, and activated per token.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="671B", help="named preset in dsv3/configs (tiny, 16B, 236B, 671B)")
    src.add_argument("--model", metavar="DIR", default=None,
                     help="HF-format checkpoint folder, read from its config.json (default: none, --preset is used)")
    g = p.add_argument_group("memory plan")
    g.add_argument("--tensor-parallel-size", "--tp", type=positive_int, default=1, metavar="N",
                   help="GPUs splitting heads, vocabulary and MLPs (default: %(default)s)")
    g.add_argument("--expert-parallel-size", "--ep", type=positive_int, default=1, metavar="M",
                   help="GPUs splitting the routed experts; the plan is for N x M GPUs (default: %(default)s)")
    g.add_argument("--weights", choices=["bf16", "fp8"], default="bf16",
                   help="Linear weights in memory: bf16, or fp8 as the official checkpoint stores them "
                        "(default: %(default)s)")
    g.add_argument("--gpu-memory-utilization", type=unit_interval, default=0.9, metavar="F",
                   help="share of each GPU's memory for weights and cache (default: %(default)s)")
    p.set_defaults(run=run)


def _size(n: int) -> str:
    return f"{n / 1e9:,.3f}B" if n >= 1e8 else f"{n / 1e6:,.3f}M"


def run(args: argparse.Namespace) -> int:
    from dsv3.config import ModelArgs
    from dsv3.model.counts import count_parameters

    if args.model is not None:
        name = args.model
        cfg = ModelArgs.from_hf_config(resolve_model(args.model))
    else:
        name = args.preset
        cfg = ModelArgs.from_preset(args.preset)
    c = count_parameters(cfg)
    print(f"{name}: {cfg.n_layers} layers ({cfg.n_dense_layers} dense), dim {cfg.dim}, {cfg.n_heads} heads, "
          f"vocab {cfg.vocab_size}")
    print(f"  MLA: q_lora_rank {cfg.q_lora_rank or 'none'}, kv_lora_rank {cfg.kv_lora_rank}, "
          f"head dims nope {cfg.qk_nope_head_dim} / rope {cfg.qk_rope_head_dim} / v {cfg.v_head_dim}; "
          f"cache {cfg.kv_lora_rank + cfg.qk_rope_head_dim} numbers per token per layer")
    if cfg.n_routed_experts:
        print(f"  MoE: {cfg.n_shared_experts} shared + {cfg.n_routed_experts} routed experts, "
              f"{cfg.n_activated_experts} active, {cfg.n_expert_groups} groups top-{cfg.n_limited_groups}, "
              f"{cfg.score_func} scores, route scale {cfg.route_scale}")
    print(f"  rope: theta {cfg.rope_theta:g}" + (f", YaRN factor {cfg.rope_factor:g} from {cfg.original_seq_len}"
                                                 if cfg.yarn else "") + f"; max context {cfg.max_seq_len}")
    print(f"parameters (main model)        {_size(c.main)}")
    print(f"parameters (MTP, unique)       {_size(c.mtp)}  ({cfg.num_nextn_predict_layers} module(s); "
          f"{_size(c.mtp_with_copies)} with the embedding/head copies stored in the files)")
    print(f"activated per token            {_size(c.activated)} with the embedding, "
          f"{_size(c.activated_no_embedding)} without")
    if args.preset == "671B" and args.model is None:
        print(f"  published: {PUBLISHED_ACTIVATED_671B / 1e9:.1f}B activated; ours without the input embedding "
              f"is {c.activated_no_embedding / PUBLISHED_ACTIVATED_671B * 100 - 100:+.2f}% from it")
    from dsv3.model.memory import describe, plan_memory
    try:
        plan = plan_memory(cfg, args.tensor_parallel_size, args.expert_parallel_size, args.weights)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print("\n".join(describe(plan, args.gpu_memory_utilization)))
    return 0
