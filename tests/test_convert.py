"""Tests of dsv3.checkpoint.convert: FP8 <-> BF16 checkpoint conversion on tiny `transformers` checkpoints.

Oracles: the tensors of the input folder (read independently with safetensors), the PyTorch
quantize/dequantize references, `transformers` loading both folders (its own FP8 path dequantizes on
CPU), and dsv3's loader (an FP8 folder loaded as BF16 equals the folder converted by dsv3).
"""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3.checkpoint import convert as cv
from dsv3.cli import build_parser, main
from dsv3.kernels import fp8

E4M3 = torch.float8_e4m3fn
VOCAB, HIDDEN, LAYERS = 320, 160, 2  # 160 = one full 128 block + an edge block
TINY = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=256, moe_intermediate_size=96,
    num_hidden_layers=LAYERS, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
    q_lora_rank=136, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
    norm_topk_prob=True, routed_scaling_factor=2.5, max_position_embeddings=256, num_nextn_predict_layers=0,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
)
# what the official release keeps in BF16 among the 2-D `.weight` tensors of this checkpoint
MTP = f"model.layers.{LAYERS}"
BF16_2D = {"model.embed_tokens.weight", "lm_head.weight", f"{MTP}.eh_proj.weight", f"{MTP}.shared_head.head.weight",
           f"{MTP}.embed_tokens.weight"} | {f"model.layers.{i}.mlp.gate.weight" for i in range(1, LAYERS)}
SIDE_FILES = {"tokenizer.json": '{"model": {"type": "BPE"}}', "tokenizer_config.json": '{"bos_token": "<s>"}'}


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory) -> Path:
    """A multi-shard BF16 DeepSeek-V3 folder written by transformers, plus an MTP-layer shard and tokenizer files."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    path = tmp_path_factory.mktemp("bf16")
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY)).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.05 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    model.save_pretrained(path, max_shard_size="300KB")
    # the official MTP layer: what save_pretrained leaves out
    g = torch.Generator().manual_seed(1)
    mtp = {f"{MTP}.{k}": (torch.randn(*shape, generator=g) * 0.1).to(torch.bfloat16) for k, shape in {
        "eh_proj.weight": (HIDDEN, 2 * HIDDEN), "enorm.weight": (HIDDEN,), "hnorm.weight": (HIDDEN,),
        "shared_head.head.weight": (VOCAB, HIDDEN), "shared_head.norm.weight": (HIDDEN,),
        "embed_tokens.weight": (VOCAB, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, 64),
    }.items()}
    save_file(mtp, str(path / "mtp.safetensors"), metadata={"format": "pt"})
    index = json.loads((path / cv.INDEX_NAME).read_text())
    index["weight_map"].update({k: "mtp.safetensors" for k in mtp})
    (path / cv.INDEX_NAME).write_text(json.dumps(index))
    for name, text in SIDE_FILES.items():
        (path / name).write_text(text)
    (path / "figures").mkdir()
    (path / "figures" / "note.txt").write_text("side folder")
    return path


@pytest.fixture(scope="module")
def fp8_dir(bf16_dir, tmp_path_factory) -> Path:
    return cv.bf16_to_fp8(bf16_dir, tmp_path_factory.mktemp("fp8") / "out", progress=False)


def _check_index(folder: Path) -> dict:
    index = json.loads((folder / cv.INDEX_NAME).read_text())
    weight_map = index["weight_map"]
    seen, total = {}, 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                seen[k] = file.name
                total += t.numel() * t.element_size()
    assert weight_map == seen  # every tensor listed, in the right file, and nothing else
    assert set(weight_map.values()) == {p.name for p in folder.glob("*.safetensors")}
    assert index["metadata"]["total_size"] == total
    assert not list(folder.glob("*.partial")) and not list(folder.glob(".*partial"))
    for k, file in weight_map.items():  # a weight and its scale always share a shard
        if k.endswith("_scale_inv"):
            assert weight_map[k.removesuffix("_scale_inv")] == file, k
    return weight_map


def test_bf16_to_fp8_quantizes_what_the_official_checkpoint_quantizes(bf16_dir, fp8_dir):
    src, out = _read_all(bf16_dir), _read_all(fp8_dir)
    weight_map = _check_index(fp8_dir)
    assert len({f for f in weight_map.values()}) > 1  # multi-shard output
    quantized = {k for k, v in src.items() if v.dim() == 2 and k.endswith(".weight") and k not in BF16_2D}
    assert any(".mlp.experts." in k for k in quantized) and f"{MTP}.self_attn.o_proj.weight" in quantized
    assert set(out) == set(src) | {k + "_scale_inv" for k in quantized}
    for k, t in src.items():
        if k in quantized:
            q_ref, s_ref = fp8.quantize_weight(t)
            assert out[k].dtype == E4M3 and torch.equal(out[k].view(torch.uint8), q_ref.view(torch.uint8)), k
            s = out[k + "_scale_inv"]
            assert s.dtype == torch.float32 and s.shape == (math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128))
            assert torch.equal(s, s_ref)
            assert weight_map[k] == weight_map[k + "_scale_inv"]  # a weight and its scale share a shard
        else:
            assert out[k].dtype == t.dtype and torch.equal(out[k], t), k  # copied bit for bit
    cfg = json.loads((fp8_dir / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}
    src_cfg = json.loads((bf16_dir / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == src_cfg
    for name, text in SIDE_FILES.items():
        assert (fp8_dir / name).read_text() == text
    assert (fp8_dir / "figures" / "note.txt").read_text() == "side folder"
    assert (fp8_dir / "generation_config.json").exists()


def test_fp8_to_bf16_dequantizes_and_round_trips(bf16_dir, fp8_dir, tmp_path):
    back_dir = cv.fp8_to_bf16(fp8_dir, tmp_path / "back", progress=False)
    src, q, back = _read_all(bf16_dir), _read_all(fp8_dir), _read_all(back_dir)
    _check_index(back_dir)
    assert set(back) == set(src)
    for k, t in src.items():
        assert back[k].dtype == t.dtype, k
        if q[k].dtype == E4M3:
            assert torch.equal(back[k], fp8.dequantize_weight(q[k], q[k + "_scale_inv"], dtype=torch.bfloat16))
            s_full = q[k + "_scale_inv"].repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]]
            err = (back[k].float() - t.float()).abs()
            # e4m3 rounding (2^-4 relative, 2^-10 of the block scale near zero) plus one bf16 rounding (2^-8)
            assert torch.all(err <= 2.0**-4 * t.float().abs() + 2.0**-10 * s_full + 2.0**-8 * back[k].float().abs())
            assert err.max() > 0
        else:
            assert torch.equal(back[k], t), k
    cfg = json.loads((back_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg == json.loads((bf16_dir / "config.json").read_text())
    assert (back_dir / "tokenizer.json").read_text() == SIDE_FILES["tokenizer.json"]


def test_ue8m0_scales_and_config(bf16_dir, tmp_path):
    out_dir = cv.bf16_to_fp8(bf16_dir, tmp_path / "ue8m0", scale_fmt="ue8m0", progress=False)
    out = _read_all(out_dir)
    scales = [v for k, v in out.items() if k.endswith("_scale_inv")]
    assert scales and all(torch.equal(torch.log2(s), torch.round(torch.log2(s))) for s in scales)
    assert json.loads((out_dir / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"


def test_fp8_checkpoint_loaded_as_bf16_equals_its_bf16_conversion(fp8_dir, tmp_path):
    """dsv3 loading the FP8 folder with BF16 weights gives the logits of the folder dsv3 converted to BF16."""
    from dsv3.checkpoint.load import load_model

    back_dir = cv.fp8_to_bf16(fp8_dir, tmp_path / "back", progress=False)
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        from_fp8 = load_model(fp8_dir, dtype=torch.bfloat16, progress=False)(tokens)
        from_back = load_model(back_dir, dtype=torch.bfloat16, progress=False)(tokens)
    assert torch.isfinite(from_back).all() and torch.equal(from_fp8, from_back)


def test_transformers_reads_our_fp8_layout(tmp_path):
    """transformers' fine-grained FP8 loader (dequantizing on CPU) reads our FP8 folder as the BF16 model.

    Its CPU dequantization infers the block size as rows // scale_rows, which is only right when every
    dimension above 128 is a multiple of 128 (it mis-scales 160 = 128 + 32), so this model keeps to that."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = {**TINY, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "q_lora_rank": 64,
           "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "vocab_size": 256}
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg)).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.05 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "bf16")
    fp8_path = cv.bf16_to_fp8(tmp_path / "bf16", tmp_path / "fp8", progress=False)
    tokens = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hf_fp8 = AutoModelForCausalLM.from_pretrained(fp8_path, dtype=torch.bfloat16).eval()
        sd, ours = hf_fp8.state_dict(), _read_all(fp8_path)
        w = "model.layers.0.self_attn.q_b_proj.weight"
        # transformers multiplies in bf16, dsv3 in fp32: equal up to one bf16 rounding
        torch.testing.assert_close(sd[w], fp8.dequantize_weight(ours[w], ours[w + "_scale_inv"]), rtol=2**-7, atol=0)
        quantized_logits = hf_fp8(tokens).logits.float()
        exact_logits = model.eval()(tokens).logits.float()
    rel = (quantized_logits - exact_logits).norm() / exact_logits.norm()
    assert 0 < rel < 0.1, rel  # FP8 weights: a small, non-zero change


def test_refuses_to_overwrite_without_force(bf16_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="not empty.*--force"):
        cv.bf16_to_fp8(bf16_dir, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # with force, stale weights go and the new folder is complete and consistent
    (out / "model-00009-of-00009.safetensors").write_bytes(b"stale")
    cv.bf16_to_fp8(bf16_dir, out, force=True, progress=False)
    assert not (out / "model-00009-of-00009.safetensors").exists()
    _check_index(out)
    assert (out / "keep.txt").read_text() == "user data"


def test_input_errors_name_the_problem(bf16_dir, fp8_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        cv.fp8_to_bf16(tmp_path / "nope", tmp_path / "o1", progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        cv.bf16_to_fp8(fp8_dir, tmp_path / "o2", progress=False)
    with pytest.raises(ValueError, match="must differ"):
        cv.fp8_to_bf16(fp8_dir, fp8_dir, force=True, progress=False)
    with pytest.raises(ValueError, match="scale_fmt"):
        cv.bf16_to_fp8(bf16_dir, tmp_path / "o3", scale_fmt="e5m2", progress=False)


def test_fp8_weight_without_scale_is_reported(fp8_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((fp8_dir / "config.json").read_text())
    save_file({"model.layers.0.mlp.down_proj.weight": torch.zeros(4, 4).to(E4M3)}, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="down_proj.weight has no .*_scale_inv"):
        cv.fp8_to_bf16(broken, tmp_path / "o", progress=False)


def test_interrupted_run_leaves_nothing_that_looks_complete(bf16_dir, tmp_path, monkeypatch):
    calls = []

    def failing_quantize(w, block=128, scale_fmt=None):
        calls.append(1)
        if len(calls) > 12:
            raise KeyboardInterrupt
        return fp8.quantize_weight(w, block, scale_fmt)

    written = []
    real_save = cv.save_file

    def spy(tensors, path, metadata=None):
        written.append(path)
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(cv, "quantize_weight", failing_quantize)
    monkeypatch.setattr(cv, "save_file", spy)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        cv.bf16_to_fp8(bf16_dir, out, max_shard_bytes=50_000, progress=False)
    assert written  # shards had been written when the run stopped ...
    names = {p.name for p in out.iterdir()}
    assert "config.json" not in names and cv.INDEX_NAME not in names
    assert not [n for n in names if n.endswith(".safetensors") or n.endswith(".partial")]  # ... and are gone


def test_conversion_holds_about_one_shard(bf16_dir, tmp_path, monkeypatch):
    """Peak memory: only the output buffer (one shard) and the tensor being converted are alive.

    tracemalloc does not see torch storage, so every tensor the converter reads or produces is tracked
    with a weakref finalizer (live bytes go down when the converter drops it), and each `save_file` call
    records the size of the shard it writes."""
    live = {"now": 0, "peak": 0}
    tracked: set[int] = set()  # ids of live tracked tensors (tensors compare elementwise, so no WeakSet)

    def release(key: int, n: int) -> None:
        tracked.discard(key)
        live["now"] -= n

    def track(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in tracked:
            tracked.add(id(t))
            n = t.numel() * t.element_size()
            live["now"] += n
            live["peak"] = max(live["peak"], live["now"])
            weakref.finalize(t, release, id(t), n)
        return t

    real_get, real_add, real_save = cv._TensorReader.get, cv._ShardWriter.add, cv.save_file
    monkeypatch.setattr(cv._TensorReader, "get", lambda self, name, cur: track(real_get(self, name, cur)))
    monkeypatch.setattr(cv._ShardWriter, "add", lambda self, group: real_add(self, [(n, track(t)) for n, t in group]))
    shard_sizes = []

    def spy(tensors, path, metadata=None):
        shard_sizes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(cv, "save_file", spy)
    src = _read_all(bf16_dir)
    total = sum(t.numel() * t.element_size() for t in src.values())
    largest = max(t.numel() * t.element_size() for t in src.values())
    del src
    # default cap: the largest input shard
    largest_input = max(p.stat().st_size for p in bf16_dir.glob("*.safetensors"))
    cv.bf16_to_fp8(bf16_dir, tmp_path / "a", progress=False)
    assert len(shard_sizes) > 2 and max(shard_sizes) <= largest_input
    # a small cap: many shards, and never more than a shard plus the tensor in flight (input + outputs)
    for direction, src_dir, cap in (("bf16-to-fp8", bf16_dir, 60_000), ("fp8-to-bf16", tmp_path / "a", 60_000)):
        shard_sizes.clear()
        live["peak"] = live["now"] = 0
        fn = cv.bf16_to_fp8 if direction == "bf16-to-fp8" else cv.fp8_to_bf16
        out = fn(src_dir, tmp_path / direction, max_shard_bytes=cap, progress=False)
        assert len(shard_sizes) == len(list(out.glob("*.safetensors"))) >= 5
        assert max(shard_sizes) <= max(cap, largest + 4 * math.ceil(largest / 128**2))  # + its scale
        assert live["peak"] <= cap + 2 * largest, (direction, live["peak"])
        assert live["peak"] < total / 2  # streaming, not the whole model
        _check_index(out)
    assert _read_all(tmp_path / "fp8-to-bf16").keys() == _read_all(bf16_dir).keys()


def test_cli_round_trip(bf16_dir, tmp_path, capsys):
    assert main(["convert", "bf16-to-fp8", "--input", str(bf16_dir), "--output", str(tmp_path / "f"),
                 "--scale-fmt", "ue8m0"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["convert", "fp8-to-bf16", "--input", str(tmp_path / "f"), "--output", str(tmp_path / "b")]) == 0
    assert set(_read_all(tmp_path / "b")) == set(_read_all(bf16_dir))
    args = build_parser(["convert"]).parse_args(["convert", "fp8-to-bf16", "--input", str(tmp_path / "f"),
                                                 "--output", str(tmp_path / "b")])
    assert args.force is False
    capsys.readouterr()
    assert main(["convert", "fp8-to-bf16", "--input", str(tmp_path / "f"), "--output", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dsv3 convert fp8-to-bf16: error:") and "--force" in err and err.count("\n") == 1
    assert main(["convert", "fp8-to-bf16", "--input", str(tmp_path / "f"), "--output", str(tmp_path / "b"),
                 "--force"]) == 0
    assert main(["convert", "bf16-to-fp8", "--input", "x", "--output", "y", "--scale-fmt", "e5m2"]) == 2


def test_truncated_shard_and_bad_config_name_the_file(bf16_dir, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(bf16_dir, src)
    shard = sorted(src.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{shard}: not a readable safetensors file"):
        cv.fp8_to_bf16(src, tmp_path / "o1", progress=False)
    assert main(["convert", "bf16-to-fp8", "--input", str(src), "--output", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert err.startswith(f"dsv3 convert bf16-to-fp8: error: {shard}: not a readable safetensors file")
    (src / "config.json").write_text('{"model_type": "deepseek_v3",,}')
    assert main(["convert", "fp8-to-bf16", "--input", str(src), "--output", str(tmp_path / "o3")]) == 1
    assert capsys.readouterr().err.startswith(f"dsv3 convert fp8-to-bf16: error: {src / 'config.json'}: invalid "
                                              "JSON at line 1 column 30")


def test_fp8_to_bf16_refuses_a_folder_that_is_not_fp8(bf16_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="is not an FP8 checkpoint .*nothing to convert"):
        cv.fp8_to_bf16(bf16_dir, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    assert main(["convert", "fp8-to-bf16", "--input", str(bf16_dir), "--output", str(tmp_path / "o")]) == 1
    captured = capsys.readouterr()
    assert "wrote" not in captured.out
    assert captured.err == f"dsv3 convert fp8-to-bf16: error: {bf16_dir} is not an FP8 checkpoint (no FP8 tensors, " \
                           "no quantization_config): nothing to convert\n"


def test_output_files_have_normal_modes(fp8_dir, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = cv.fp8_to_bf16(fp8_dir, tmp_path / "o", progress=False)
    finally:
        os.umask(old)
    for p in out.iterdir():
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
