"""Tiny random checkpoints written by `transformers` itself (the format oracle for our loader)."""

from __future__ import annotations

from pathlib import Path

import torch

V3_TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
    first_k_dense_replace=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=2, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
    max_position_embeddings=512, num_nextn_predict_layers=0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 128, "beta_fast": 32.0, "beta_slow": 1.0,
                     "mscale": 1.0, "mscale_all_dim": 1.0},
)

# DeepSeek-V2-Lite shape, scaled down: no query compression, one group, 2 shared experts, no normalisation
V2_LITE_TINY = {**V3_TINY, "q_lora_rank": None, "n_group": 1, "topk_group": 1, "n_shared_experts": 2,
                "norm_topk_prob": False, "routed_scaling_factor": 1.0, "num_experts_per_tok": 3,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, bias_std: float = 0.05) -> None:
    """Every parameter random (norm weights around 1), correction biases non-zero."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.05
        p.copy_(1.0 + noise if name.endswith("norm.weight") else noise * 2)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.randn(b.shape, generator=g) * bias_std)


def make_v3(path: Path, seed: int = 0, **overrides) -> "torch.nn.Module":
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    cfg = DeepseekV3Config(**{**V3_TINY, **overrides})
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    randomize(model, seed)
    model.save_pretrained(path)
    return model


def make_v2(path: Path, seed: int = 0, **overrides) -> "torch.nn.Module":
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
    base = {k: v for k, v in V3_TINY.items() if k not in ("num_nextn_predict_layers",)}
    cfg = DeepseekV2Config(**{**base, "n_group": 4, "topk_group": 2, "norm_topk_prob": False, **overrides})
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(cfg).float().eval()
    randomize(model, seed)
    model.save_pretrained(path)
    return model
