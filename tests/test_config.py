"""ModelArgs: validation messages, HF config round trips, presets, parameter counts from shapes."""

import json

import pytest

from dsv3.config import ModelArgs
from dsv3.model.counts import count_parameters

RELEASED_V3 = {  # the fields of the released DeepSeek-V3 config.json that matter here
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
}


def test_released_config_equals_671B_preset():
    args = ModelArgs.from_hf_config(RELEASED_V3)
    preset = ModelArgs.from_preset("671B")
    assert args == preset
    assert args.extra_hf["quantization_config"]["weight_block_size"] == [128, 128]


@pytest.mark.parametrize("preset", ["tiny", "16B", "236B", "671B"])
def test_presets_round_trip_hf_config(preset, tmp_path):
    args = ModelArgs.from_preset(preset)
    (tmp_path / "config.json").write_text(json.dumps(args.to_hf_config()))
    assert ModelArgs.from_hf_config(tmp_path) == args


def test_transformers_reads_our_config_like_ours():
    from transformers import DeepseekV3Config
    args = ModelArgs.from_preset("671B")
    hf = DeepseekV3Config(**args.to_hf_config())
    rope = hf.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 40.0, 4096)
    assert ModelArgs.from_hf_config(hf.to_dict()) == args  # `rope_parameters` spelling read too


def test_v2_config_defaults_to_softmax_greedy():
    cfg = {**RELEASED_V3, "model_type": "deepseek_v2", "topk_method": "greedy", "n_group": 1, "topk_group": 1,
           "rope_scaling": None}
    cfg.pop("scoring_func")
    args = ModelArgs.from_hf_config(cfg)
    assert (args.score_func, args.topk_method, args.correction_bias, args.yarn) == ("softmax", "greedy", False, False)
    assert ModelArgs.from_hf_config(args.to_hf_config()) == args


@pytest.mark.parametrize("change, field", [
    (dict(n_activated_experts=9, n_routed_experts=8), "n_activated_experts"),
    (dict(n_expert_groups=3), "n_expert_groups"),
    (dict(n_limited_groups=5), "n_limited_groups"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(score_func="relu"), "score_func"),
    (dict(topk_method="best"), "topk_method"),
    (dict(dim=0), "dim"),
    (dict(n_dense_layers=4), "n_dense_layers"),
    (dict(q_lora_rank=-1), "q_lora_rank"),
    (dict(dtype="int8"), "dtype"),
    (dict(rope_factor=0.0), "rope_factor"),
    (dict(n_limited_groups=1, n_activated_experts=3), "n_limited_groups"),
])
def test_validation_names_the_field(change, field):
    base = ModelArgs.from_preset("tiny")
    with pytest.raises(ValueError, match=field):
        base.replace(**change)


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ModelArgs.from_preset("huge")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        ModelArgs.from_hf_config(tmp_path)
    with pytest.raises(ValueError, match="model_type"):
        ModelArgs.from_hf_config({**RELEASED_V3, "model_type": "llama"})


def test_671B_parameter_counts_from_shapes():
    counts = count_parameters(ModelArgs.from_preset("671B"))
    assert abs(counts.main / 671e9 - 1) < 0.01
    assert abs(counts.mtp / 11.5e9 - 1) < 0.02
    # activated per token, embedding excluded, beside the published 36.7B (see README for the counting)
    assert abs(counts.activated_no_embedding / 36.7e9 - 1) < 0.01


def test_invalid_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "model_type": "deepseek_v3"\n  "hidden_size": 64\n}')
    with pytest.raises(ValueError, match=f"^{path}: invalid JSON at line 3 column 3: Expecting ',' delimiter$"):
        ModelArgs.from_hf_config(tmp_path)
    path.write_bytes(b'{"model_type": "deepseek_v3\xff"}')
    with pytest.raises(ValueError, match=f"^{path}: not UTF-8 text"):
        ModelArgs.from_hf_config(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        ModelArgs.from_hf_config(path)
    path.write_text("{")
    with pytest.raises(ValueError, match=f"^{path}: invalid JSON at line 1 column 2"):
        ModelArgs.from_json(path)
