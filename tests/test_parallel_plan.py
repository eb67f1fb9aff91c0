"""The memory planner (`dsv3.model.memory`, `dsv3 info --tp --ep`) against the bytes of models really split
(`parallelize_for_inference` on the meta device) and the engine's cache block size; `dsv3 convert shard` writes
each rank exactly its slices of the checkpoint, MTP layer included."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import dsv3
from dsv3.cli import main
from dsv3.config import ModelArgs
from dsv3.engine.model_runner import cache_bytes_per_block
from dsv3.model import Transformer
from dsv3.model.fp8_linear import convert_linears_to_fp8
from dsv3.model.layers import skip_torch_init
from dsv3.model.memory import plan_memory
from dsv3.model.parallel import parallelize_for_inference
from dsv3.parallel import ParallelContext, ParallelLayout

TINY = ModelArgs.from_preset("tiny")  # float32, one MTP module, dims below one FP8 block
# dims that split on 128-blocks over tp=2: FP8 weights can be split too
ALIGNED = TINY.replace(dim=256, inter_dim=512, moe_inter_dim=256, n_heads=4, q_lora_rank=128, kv_lora_rank=128,
                       qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64)


def _split_bytes(args: ModelArgs, tp: int, ep: int, weights: str) -> list[int]:
    """Bytes of every rank's state dict, the model built on meta and split as parallel inference splits it."""
    sizes = []
    for rank in range(tp * ep):
        with torch.device("meta"), skip_torch_init():
            model = Transformer(args)
            if weights == "fp8":
                convert_linears_to_fp8(model)
        parallelize_for_inference(model, ParallelContext(ParallelLayout(tp, ep, rank), torch.device("meta")))
        sizes.append(sum(t.numel() * t.element_size() for t in model.state_dict().values()))
    return sizes


@pytest.mark.parametrize("args,tp,ep,weights", [
    (TINY, 1, 1, "bf16"), (TINY, 2, 1, "bf16"), (TINY, 1, 2, "bf16"), (TINY, 2, 2, "bf16"), (TINY, 1, 4, "fp8"),
    (ALIGNED, 2, 2, "fp8"), (ALIGNED, 2, 1, "bf16")])
def test_plan_equals_the_bytes_of_split_models(args, tp, ep, weights):
    plan = plan_memory(args, tp, ep, weights, dtype_bytes=torch.empty((), dtype=args.torch_dtype).element_size())
    assert _split_bytes(args, tp, ep, weights) == [plan.weight_bytes] * (tp * ep)
    with torch.device("meta"), skip_torch_init():
        model = Transformer(args)
    assert plan.cache_bytes_per_token == cache_bytes_per_block(model, 1)  # what the engine sizes its cache by


def test_plan_refuses_fp8_splits_off_the_blocks():
    with pytest.raises(ValueError, match="128-blocks"):
        plan_memory(TINY, 2, 1, "fp8")
    with pytest.raises(ValueError, match=r"routed experts \(8\) does not divide over 3 ranks; choose --ep"):
        plan_memory(TINY, 1, 3)


def test_info_prints_the_plan(capsys):
    assert main(["info", "--preset", "671B", "--tp", "8", "--weights", "fp8"]) == 0
    out = capsys.readouterr().out
    plan = plan_memory(ModelArgs.from_preset("671B"), 8, 1, "fp8")
    assert f"weights per GPU               {plan.weight_bytes / 2**30:,.2f} GiB" in out
    assert "H200 (140.4 GiB): fits" in out and "H100 (79.6 GiB): does not fit" in out
    assert main(["info", "--preset", "tiny", "--tp", "3"]) == 2  # one line, no traceback
    assert "vocabulary size (512) does not divide over 3 ranks" in capsys.readouterr().err


def test_convert_shard_writes_each_rank_its_slices(tmp_path):
    src = dsv3.default_model_path()  # has an MTP layer (model.layers.6)
    out = tmp_path / "split"
    assert main(["convert", "shard", "--input", str(src), "--output", str(out), "--tp", "2", "--ep", "2"]) == 0
    assert json.loads((out / "parallel.json").read_text()) == {"tp": 2, "ep": 2}
    args = ModelArgs.from_hf_config(src)
    full = {}
    for f in src.glob("*.safetensors"):
        with safe_open(f, "pt") as g:
            full.update({k: g.get_tensor(k) for k in g.keys()})
    from dsv3.checkpoint.names import hf_to_ours, shared_copy_of
    seen = set()
    for rank in range(4):
        with torch.device("meta"), skip_torch_init():
            model = Transformer(args)
        plan = parallelize_for_inference(model, ParallelContext(ParallelLayout(2, 2, rank),
                                                                torch.device("meta"))).shard_plan
        with safe_open(out / f"rank-{rank}" / "model.safetensors", "pt") as g:
            names = list(g.keys())
            assert any(n.startswith(f"model.layers.{args.n_layers}.") for n in names)  # MTP kept
            for name in names:
                key = hf_to_ours(name, args.n_layers)
                key = shared_copy_of(key) or key
                want = full[name]
                if key in plan.slices:
                    dim, lo, hi = plan.slices[key]
                    want = want.narrow(dim, lo, hi - lo)
                assert torch.equal(g.get_tensor(name), want), (rank, name)
                seen.add(name)
    assert seen == set(full)  # every tensor went to some rank
    assert main(["convert", "shard", "--input", str(src), "--output", str(tmp_path / "x"), "--tp", "3"]) == 1
    assert not (tmp_path / "x").exists()
