"""Checkpoint load/save: our output loads in `transformers`, FP8 checkpoints, shards, and clear errors."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
from dsv3.config import ModelArgs
from dsv3.model import Transformer
from hf_models import make_v3


def _tokens(vocab=256):
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(3))


def test_saved_model_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    args = ModelArgs.from_preset("tiny").replace(num_nextn_predict_layers=0)
    model = Transformer(args).eval()
    with torch.no_grad():
        for block in model.layers[args.n_dense_layers:]:
            block.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    dsv3.save_model(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = _tokens(512)
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max() <= 1e-4


def test_round_trip_with_mtp_and_shards(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("tiny")).eval()
    dsv3.save_model(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    n_layers = model.args.n_layers
    assert {f"model.layers.{n_layers}.enorm.weight", f"model.layers.{n_layers}.shared_head.head.weight",
            f"model.layers.{n_layers}.embed_tokens.weight", f"model.layers.{n_layers}.eh_proj.weight"} <= set(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1
    loaded = dsv3.load_model(tmp_path, dtype=torch.float32)
    assert len(loaded.mtp) == 1
    tokens = _tokens(512)
    with torch.no_grad():
        a, (ma,) = model(tokens, return_mtp=True)
        b, (mb,) = loaded(tokens, return_mtp=True)
    assert torch.equal(a, b) and torch.equal(ma, mb)


def test_transformers_checkpoint_without_mtp_tensors_loads_with_warning(tmp_path):
    make_v3(tmp_path, num_nextn_predict_layers=1)
    with pytest.warns(UserWarning, match="no MTP tensors"):
        model = dsv3.load_model(tmp_path, dtype=torch.float32)
    assert len(model.mtp) == 0


def _quantize_128(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's formula, written out here as the oracle: per 128x128 block (edges zero-padded),
    scale = amax / 448, fp8 = w / scale; stored scale_inv = scale."""
    out, inp = w.shape
    rows, cols = math.ceil(out / 128), math.ceil(inp / 128)
    padded = torch.zeros(rows * 128, cols * 128)
    padded[:out, :inp] = w.float()
    blocks = padded.view(rows, 128, cols, 128)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # [rows, cols]
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(rows * 128, cols * 128)[:out, :inp]
    return q.contiguous(), scale


def _dequantize_128(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    blocks = torch.zeros(s.shape[0] * 128, s.shape[1] * 128)
    blocks[: q.shape[0], : q.shape[1]] = q.float()
    blocks = blocks.view(s.shape[0], 128, s.shape[1], 128) * s[:, None, :, None]
    return blocks.view(s.shape[0] * 128, -1)[: q.shape[0], : q.shape[1]].clone()


def test_fp8_checkpoint_matches_dequantized_model(tmp_path):
    # dims above and not multiple of 128 so edge blocks are exercised
    make_v3(tmp_path / "bf16", hidden_size=160, intermediate_size=200, moe_intermediate_size=136, q_lora_rank=144)
    state = load_file(tmp_path / "bf16" / "model.safetensors")
    fp8, dequantized = {}, {}
    for name, t in state.items():
        quantize = t.dim() == 2 and not any(s in name for s in ("embed_tokens", "lm_head", "mlp.gate.weight"))
        if quantize:
            q, s = _quantize_128(t)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            dequantized[name] = _dequantize_128(q, s)
        else:
            fp8[name] = dequantized[name] = t
    for sub, tensors in (("fp8", fp8), ("deq", dequantized)):
        (tmp_path / sub).mkdir()
        save_file(tensors, tmp_path / sub / "model.safetensors")
        config = json.loads((tmp_path / "bf16" / "config.json").read_text())
        if sub == "fp8":
            config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}
        (tmp_path / sub / "config.json").write_text(json.dumps(config))
    assert sum(t.dtype == torch.float8_e4m3fn for t in fp8.values()) > 10
    a = dsv3.load_model(tmp_path / "fp8", dtype=torch.float32)
    b = dsv3.load_model(tmp_path / "deq", dtype=torch.float32)
    c = dsv3.load_model(tmp_path / "fp8", dtype=torch.float32, weights="fp8")  # FP8 kept in memory
    fp8_params = [n for n, p in c.named_parameters() if p.dtype == torch.float8_e4m3fn]
    assert len(fp8_params) == sum(t.dtype == torch.float8_e4m3fn for t in fp8.values())
    tokens = _tokens()
    with torch.no_grad():
        ref = b(tokens)
        assert (a(tokens) - ref).abs().max() <= 1e-5
        assert (c(tokens) - ref).abs().max() <= 1e-4


# ---- errors -------------------------------------------------------------------------------------
def test_bf16_checkpoint_quantized_at_load_with_fp8_weights(tmp_path):
    make_v3(tmp_path)
    a = dsv3.load_model(tmp_path, dtype=torch.float32)
    b = dsv3.load_model(tmp_path, dtype=torch.float32, weights="fp8")
    assert b.layers[0].self_attn.kv_b_proj.weight.dtype == torch.float8_e4m3fn
    assert b.lm_head.weight.dtype == torch.float32  # the head stays high precision, as in the release
    # oracle: the fp32 model with each quantized weight replaced by its e4m3 round trip (test's own formula)
    with torch.no_grad():
        n_fp8 = 0
        for name, module in b.named_modules():
            if getattr(module, "weight_scale_inv", None) is not None:
                ref_q, _ = _quantize_128(a.get_submodule(name).weight)
                assert torch.equal(module.weight.view(torch.uint8), ref_q.view(torch.uint8)), name
                a.get_submodule(name).weight.copy_(_dequantize_128(module.weight, module.weight_scale_inv))
                n_fp8 += 1
        assert n_fp8 > 10
        tokens = _tokens()
        assert (b(tokens) - a(tokens)).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="weights must be one of"):
        dsv3.load_model(tmp_path, weights="int4")


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        dsv3.load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        dsv3.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(ModelArgs.from_preset("tiny").to_hf_config()))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors files"):
        dsv3.load_model(tmp_path)


def _saved_state(tmp_path):
    make_v3(tmp_path)
    return load_file(tmp_path / "model.safetensors")


def test_missing_tensor_is_named(tmp_path):
    state = _saved_state(tmp_path)
    del state["model.layers.1.self_attn.kv_b_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \(1\): model\.layers\.1\.self_attn\.kv_b_proj\.weight \[128, 32\]"):
        dsv3.load_model(tmp_path)


def test_unexpected_and_misshaped_tensors_are_named(tmp_path):
    state = _saved_state(tmp_path)
    state["model.layers.0.mystery.weight"] = torch.zeros(3)
    state["model.norm.weight"] = torch.ones(65)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        dsv3.load_model(tmp_path)
    message = str(err.value)
    assert "unexpected tensors (1): model.layers.0.mystery.weight" in message
    assert "shape mismatches (1): model.norm.weight: checkpoint [65] vs model [64]" in message


def test_fp8_tensor_without_scale_and_broken_index(tmp_path):
    state = _saved_state(tmp_path)
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.weight has no model.layers.0.mlp.up_proj.weight_scale_inv"):
        dsv3.load_model(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        dsv3.load_model(tmp_path)


def test_truncated_shard_and_bad_json_name_the_file(tmp_path):
    """A cut-off `.safetensors` file or invalid JSON gives one ValueError naming the file (and line/column)."""
    from dsv3.cli import main

    make_v3(tmp_path)
    shard = tmp_path / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{shard}: not a readable safetensors file") as err:
        dsv3.load_model(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {\n  "a": "model.safetensors",\n}')
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: invalid JSON at line 3 column 1"):
        dsv3.load_model(tmp_path)
    config = tmp_path / "config.json"
    config.write_text('{\n  "model_type": "deepseek_v3",\n  "hidden_size": ,\n}')
    with pytest.raises(ValueError, match=f"{config}: invalid JSON at line 3 column 18"):
        dsv3.load_model(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x", "--device", "cpu"]) == 1


def test_saved_shards_have_normal_modes(tmp_path):
    import os
    import stat

    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("tiny"))
    old = os.umask(0o022)
    try:
        dsv3.save_model(model, tmp_path, max_shard_bytes=2**20)
    finally:
        os.umask(old)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o644}


def test_save_model_writes_the_tokenizer_so_the_folder_generates(tmp_path):
    from dsv3.tokenizer import load_tokenizer

    source = dsv3.default_model_path()
    model = dsv3.load_model(source, dtype=torch.float32)
    out = dsv3.save_model(model, tmp_path / "copy")  # the tokenizer comes from the folder the model came from
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert (out / "tokenizer_config.json").is_file()
    llm = dsv3.LLM(model=str(out), device="cpu", dtype=torch.float32)
    result = llm.generate(["The"], dsv3.SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(result[0].token_ids) == 3 and isinstance(result[0].text, str)
    assert load_tokenizer(out).vocab_size == load_tokenizer(source).vocab_size

    bare = Transformer(ModelArgs.from_preset("tiny"))
    assert not (dsv3.save_model(bare, tmp_path / "bare") / "tokenizer.json").exists()  # nothing to copy
    dsv3.save_model(bare, tmp_path / "given", tokenizer=source)
    assert (tmp_path / "given" / "tokenizer.json").is_file()
    assert not (dsv3.save_model(model, tmp_path / "none", tokenizer=False) / "tokenizer.json").exists()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        dsv3.save_model(bare, tmp_path / "bad", tokenizer=tmp_path)
