"""`EngineConfig`: each field is checked at construction with a ValueError naming it; `LLM` reads its
settings through it, with keyword overrides on top of a given config."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsv3.engine.config import DTYPES, EngineConfig, resolve_dtype, with_overrides


@pytest.mark.parametrize("field,value", [
    ("device", "tpu"), ("device", "cuda:x"), ("device", "cpu:0"), ("dtype", "bf16"), ("dtype", "fp32"),
    ("dtype", torch.int8), ("num_blocks", 0), ("num_blocks", 2.5), ("cache_memory", -1), ("block_size", 0),
    ("max_num_seqs", 0), ("max_num_batched_tokens", 0), ("max_model_len", 1), ("enable_prefix_caching", "yes"),
    ("fast", "auto"), ("block_size", True),
])
def test_bad_field_is_a_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


def test_cross_field_checks():
    with pytest.raises(ValueError, match="num_blocks and cache_memory"):
        EngineConfig(num_blocks=4, cache_memory=2**20)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\) must be >= max_num_seqs \(16\)"):
        EngineConfig(max_num_seqs=16, max_num_batched_tokens=8)
    EngineConfig(max_num_seqs=16, max_num_batched_tokens=16)  # equal is enough


def test_torch_types_are_stored_by_name():
    cfg = EngineConfig(device=torch.device("cuda", 1), dtype=torch.float16)
    assert (cfg.device, cfg.dtype, cfg.torch_dtype) == ("cuda:1", "float16", torch.float16)
    for name in DTYPES[1:]:
        assert EngineConfig(dtype=getattr(torch, name)).dtype == name


@pytest.mark.parametrize("device,want", [("cpu", "float32"), ("cuda", "bfloat16"), ("cuda:3", "bfloat16")])
def test_auto_dtype_is_float32_on_cpu_bfloat16_on_gpu(device, want):
    assert EngineConfig(device=device, dtype="auto").resolved_dtype == want
    assert resolve_dtype("auto", device) == want
    for name in DTYPES[1:]:
        assert resolve_dtype(name, device) == name


def test_overrides_replace_fields_and_revalidate():
    base = EngineConfig(block_size=4, max_num_seqs=8)
    cfg = with_overrides(base, {"num_blocks": 32, "dtype": torch.float32})
    assert cfg == dataclasses.replace(base, num_blocks=32, dtype="float32") and base.num_blocks is None
    assert with_overrides(None, {}) == EngineConfig()
    assert with_overrides(base, {}) is base
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        with_overrides(base, {"max_num_batched_tokens": 4})
    with pytest.raises(TypeError, match="num_block"):
        with_overrides(base, {"num_block": 3})
    with pytest.raises(ValueError, match="EngineConfig"):
        with_overrides({"num_blocks": 3}, {})


def test_llm_takes_a_config_and_keyword_overrides():
    from dsv3.config import ModelArgs
    from dsv3.engine import LLM
    from dsv3.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("tiny").replace(dtype="float32"))
    cfg = EngineConfig(num_blocks=8, block_size=4, max_num_seqs=2, max_num_batched_tokens=8, max_model_len=20,
                       enable_prefix_caching=False)
    llm = LLM(model, config=cfg)
    assert llm.config is cfg
    assert (llm.runner.num_blocks, llm.block_manager.block_size, llm.max_model_len) == (8, 4, 20)
    assert llm.block_manager.enable_prefix_caching is False
    assert llm.scheduler.max_num_seqs == 2
    keyword = LLM(model, config=cfg, num_blocks=6, enable_prefix_caching=True)  # overrides win
    assert keyword.runner.num_blocks == 6 and keyword.block_manager.enable_prefix_caching
    plain = LLM(model, num_blocks=5, block_size=4)  # the keyword-only form of before
    assert plain.runner.num_blocks == 5 and plain.config == EngineConfig(num_blocks=5, block_size=4)
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(model, config=cfg, max_num_seqs=0)
