"""The `transformers` peer of the GPU benchmarks (`decode.py`, `engine_gpu.py`): `DeepseekV3ForCausalLM` with
the shapes of a dsv3 `ModelArgs`, random weights, SDPA attention and `transformers`' default experts
implementation. Imported by the benchmark scripts from their own folder (they run as `python benchmarks/X.py`).

The 16B preset routes with softmax scores (DeepSeek-V2-Lite); the peer is built as a DeepSeek-V3 model of the
same shapes (sigmoid scores, one expert group), which moves the same bytes and does the same GEMMs.
"""

from __future__ import annotations

import torch

from dsv3.config import ModelArgs


def hf_config(args: ModelArgs):
    """A `DeepseekV3Config` with `args`' shapes (no MTP layer, untied head, SDPA)."""
    from transformers import DeepseekV3Config

    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.yarn:
        rope = {"rope_type": "yarn", "rope_theta": args.rope_theta, "factor": args.rope_factor,
                "original_max_position_embeddings": args.original_seq_len, "beta_fast": args.beta_fast,
                "beta_slow": args.beta_slow, "mscale": args.mscale, "mscale_all_dim": args.mscale_all_dim}
    return DeepseekV3Config(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.inter_dim,
        moe_intermediate_size=args.moe_inter_dim, num_hidden_layers=args.n_layers,
        first_k_dense_replace=args.n_dense_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_heads,
        q_lora_rank=args.q_lora_rank or None, kv_lora_rank=args.kv_lora_rank, qk_nope_head_dim=args.qk_nope_head_dim,
        qk_rope_head_dim=args.qk_rope_head_dim, v_head_dim=args.v_head_dim, n_routed_experts=args.n_routed_experts,
        n_shared_experts=args.n_shared_experts, num_experts_per_tok=args.n_activated_experts,
        n_group=args.n_expert_groups, topk_group=args.n_limited_groups, norm_topk_prob=args.norm_topk_prob,
        routed_scaling_factor=args.route_scale, max_position_embeddings=args.max_seq_len,
        num_nextn_predict_layers=0, rms_norm_eps=args.rms_norm_eps, rope_parameters=rope,
        rope_interleave=args.rope_interleave, tie_word_embeddings=False, attn_implementation="sdpa",
    )


def build_hf(args: ModelArgs, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """The peer model on `device` in `dtype`, eval mode, greedy generation that never stops at an EOS."""
    from transformers import DeepseekV3ForCausalLM

    cfg = hf_config(args)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = DeepseekV3ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf
