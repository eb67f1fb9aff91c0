"""`--fp8` picks per layer (`dsv3.train.fp8_select`): the plan of a DeepSeek-V3-width model and of the ~1B
benchmark model (`MOE_1B` of benchmarks/train.py) against their GEMM shapes written out here, `apply_fp8` swapping
exactly what the plan names, `fp8_layers all` swapping every linear, the start-up summary, and the recipe, CLI
and resume handling of the new setting. Models are built on the meta device: widths cost nothing."""

import json

import pytest
import torch

from dsv3.cli import main
from dsv3.config import PRESET_DIR, ModelArgs, read_json
from dsv3.model import Transformer
from dsv3.model.moe import LocalExperts, MoE
from dsv3.train.fp8_linear import FP8TrainingLinear
from dsv3.train.fp8_select import MIN_SHAPE, fp8_pays, plan_fp8
from dsv3.train.parallelize import apply_fp8
from test_train_shared import make_shards, tiny_config

# the released model's widths: 3 main layers (dense, MoE, MoE) + 1 MTP module, 8 routed experts (one GPU's share
# under expert parallel, as the full-width benchmark has them)
V3 = dict(n_layers=3, n_dense_layers=1, n_routed_experts=8, n_activated_experts=8, n_expert_groups=1,
          n_limited_groups=1)
# each GEMM of a block (and the head): (N out, K in), and whether N >= 2048 and K >= 2048 (the rule's MIN_SHAPE:
# a change of the thresholds changes these expectations)
V3_GEMMS = {
    "self_attn.q_a_proj": (1536, 7168, False),
    "self_attn.q_b_proj": (128 * 192, 1536, False),
    "self_attn.kv_a_proj_with_mqa": (512 + 64, 7168, False),
    "self_attn.kv_b_proj": (128 * 256, 512, False),
    "self_attn.o_proj": (7168, 128 * 128, True),
    "mlp.gate_proj": (18432, 7168, True),  # the dense layer's MLP
    "mlp.up_proj": (18432, 7168, True),
    "mlp.down_proj": (7168, 18432, True),
    "mlp.shared_experts.gate_proj": (2048, 7168, True),
    "mlp.shared_experts.up_proj": (2048, 7168, True),
    "mlp.shared_experts.down_proj": (7168, 2048, True),
    "mlp.experts[w13]": (2 * 2048, 7168, True),  # routed experts: gate and up stacked
    "mlp.experts[w2]": (7168, 2048, True),
    "eh_proj": (7168, 2 * 7168, True),  # MTP
    "lm_head": (129280, 7168, False),  # the output head: never FP8
}
MOE_1B = {  # benchmarks/train.py's MOE_1B widths, 3 layers
    "dim": 1024, "inter_dim": 4096, "moe_inter_dim": 512, "n_layers": 3, "n_dense_layers": 1, "n_heads": 16,
    "q_lora_rank": 512, "kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64,
    "n_routed_experts": 32, "n_shared_experts": 1, "n_activated_experts": 4, "n_expert_groups": 4,
    "n_limited_groups": 2, "num_nextn_predict_layers": 1, "rope_factor": 1.0, "max_seq_len": 4096,
    "vocab_size": 8192,
}
MOE_1B_GEMMS = {  # no GEMM has both sides >= 2048
    "self_attn.q_a_proj": (512, 1024), "self_attn.q_b_proj": (16 * 96, 512),
    "self_attn.kv_a_proj_with_mqa": (256 + 32, 1024), "self_attn.kv_b_proj": (16 * 128, 256),
    "self_attn.o_proj": (1024, 16 * 64), "mlp.gate_proj": (4096, 1024), "mlp.up_proj": (4096, 1024),
    "mlp.down_proj": (1024, 4096), "mlp.shared_experts.gate_proj": (512, 1024),
    "mlp.shared_experts.up_proj": (512, 1024), "mlp.shared_experts.down_proj": (1024, 512),
    "mlp.experts[w13]": (1024, 1024), "mlp.experts[w2]": (1024, 512), "eh_proj": (1024, 2048),
    "lm_head": (8192, 1024),
}


def meta_model(spec: dict) -> Transformer:
    with torch.device("meta"):
        return Transformer(ModelArgs(**{**spec, "dtype": "float32"}), dtype=torch.float32)


def v3_model() -> Transformer:
    return meta_model({**read_json(PRESET_DIR / "671B.json"), **V3})


def block_name(label: str) -> str:
    """`layers.2.mlp.experts[w13]` -> `mlp.experts[w13]`; `lm_head` stays."""
    parts = label.split(".")
    return ".".join(parts[2:]) if parts[0] in ("layers", "mtp") else label


def linear_paths(model, cls) -> set[str]:
    return {name for name, m in model.named_modules() if type(m) is cls}


def test_rule_boundary():
    """FP8 from the thresholds on (inclusive), on both sides; the reason names the short side(s)."""
    for kind, (n, k) in MIN_SHAPE.items():
        assert fp8_pays(kind, n, k) == (True, f"N >= {n}, K >= {k}")
        assert fp8_pays(kind, n - 1, 10 * k) == (False, f"N {n - 1} < {n}")
        assert fp8_pays(kind, 10 * n, k - 1) == (False, f"K {k - 1} < {k}")
        assert fp8_pays(kind, n // 2, k // 4) == (False, f"N {n // 2} < {n}, K {k // 4} < {k}")


def test_plan_of_the_released_widths_on_a_gpu():
    model = v3_model()
    plan = plan_fp8(model, "cuda")
    seen = {}
    for g in plan.gemms:
        name = block_name(g.label)
        n, k, fp8 = V3_GEMMS[name]
        assert (g.n, g.k, g.fp8) == (n, k, fp8), g
        seen[name] = seen.get(name, 0) + 1
    # every block's attention (3 layers + MTP), 1 dense MLP, 3 MoE layers (2 main + MTP), one head
    assert seen == {name: 1 if name in ("eh_proj", "lm_head") or name.startswith("mlp.") and "experts" not in name
                    else 3 if "experts" in name else 4 for name in V3_GEMMS}
    moes = {name for name, m in model.named_modules() if isinstance(m, MoE)}
    assert plan.experts == {name: "grouped" for name in moes} and plan.experts_path == "grouped"
    assert plan.linears == {g.path for g in plan.gemms if g.kind == "dense" and g.fp8}
    assert {block_name(p) for p in plan.linears} == {n for n, (_, _, f) in V3_GEMMS.items() if f and "[" not in n}
    # the reasons name the side that is too small
    assert {g.reason for g in plan.gemms if block_name(g.label) == "self_attn.kv_b_proj"} == {"K 512 < 2048"}


def test_plan_of_the_1b_model_keeps_everything_bf16_on_a_gpu_and_fp8_on_a_cpu():
    model = meta_model(MOE_1B)
    plan = plan_fp8(model, "cuda")
    assert {block_name(g.label): (g.n, g.k) for g in plan.gemms} == MOE_1B_GEMMS
    assert not any(g.fp8 for g in plan.gemms) and plan.linears == frozenset()
    assert plan.experts_path == "bf16"
    assert {g.reason for g in plan.gemms if g.kind == "grouped"} == {"w13 N 1024 < 2048, K 1024 < 2048; w2 N 1024 < "
                                                                     "2048, K 512 < 2048"}
    # on a CPU FP8 is emulated (numerics, not speed): auto keeps every linear but the head, experts on the loop
    cpu = plan_fp8(model, "cpu")
    assert [g.label for g in cpu.gemms if not g.fp8] == ["lm_head"] and cpu.experts_path == "loop"
    assert cpu.linears == linear_paths(model, torch.nn.Linear) - {"lm_head"}


def test_apply_fp8_swaps_exactly_the_plan():
    from dsv3.train.fp8_grouped import FP8GroupedExperts
    model = v3_model()
    keys = set(model.state_dict())
    plan = plan_fp8(model, "cuda")
    assert apply_fp8(model, plan) == len(plan.linears) == 4 + 3 + 3 * 3 + 1  # o_proj, dense MLP, shared, eh_proj
    assert linear_paths(model, FP8TrainingLinear) == plan.linears
    assert all(type(m.experts_impl) is FP8GroupedExperts and m.grouped_ok() for m in model.modules()
               if isinstance(m, MoE))
    assert set(model.state_dict()) == keys  # names unchanged: checkpoints and resume see the same model

    model = v3_model()  # all: every linear but the head and the routed experts (bf16 on a GPU, as before)
    plan = plan_fp8(model, "cuda", "all")
    plain = linear_paths(model, torch.nn.Linear)
    apply_fp8(model, plan)
    assert linear_paths(model, FP8TrainingLinear) == {p for p in plain if p != "lm_head" and ".experts." not in p}
    assert all(type(m.experts_impl) is LocalExperts for m in model.modules() if isinstance(m, MoE))

    model = v3_model()  # a CPU: every linear, the routed experts' too (their loop)
    apply_fp8(model, plan_fp8(model, "cpu"))
    assert linear_paths(model, torch.nn.Linear) == {"lm_head"}

    model = v3_model()  # fp8_experts forces the experts' path whatever the rule says
    plan = plan_fp8(model, "cuda", experts="bf16")
    apply_fp8(model, plan)
    assert plan.experts_path == "bf16" and all(type(m.experts_impl) is LocalExperts for m in model.modules()
                                               if isinstance(m, MoE))
    assert any(g.kind == "dense" and g.fp8 for g in plan.gemms)


def test_expert_parallel_keeps_its_experts_path():
    """Under expert parallel each rank runs its experts one by one: the rule keeps them bf16 (the dense choices
    stand), and forcing the grouped FP8 GEMM, which would replace the all-to-all, is refused."""
    from dsv3.train.expert_parallel import ExpertParallel
    model = v3_model()
    for m in model.modules():
        if isinstance(m, MoE):
            m.set_experts_impl(ExpertParallel(None, 0, 8, 1))
    plan = plan_fp8(model, "cuda")
    assert plan.experts_path == "bf16"
    assert {g.reason for g in plan.gemms if g.kind == "grouped"} == {"ExpertParallel: no grouped FP8 path"}
    assert {block_name(p) for p in plan.linears} == {n for n, (_, _, f) in V3_GEMMS.items() if f and "[" not in n}
    with pytest.raises(ValueError, match="fp8_experts grouped does not apply to layers.1.mlp"):
        plan_fp8(model, "cuda", experts="grouped")


def test_start_summary_names_the_groups():
    lines = plan_fp8(v3_model(), "cuda").describe()
    # groups: 5 attention + 3 dense MLP + 3 shared + 2 routed + head + eh_proj = 15, FP8: o_proj + 3 + 3 + 2 + 1
    assert lines[0].startswith("fp8: 10 of 15 GEMM groups in FP8 (rule: dense GEMMs with N >= 2048 and K >= 2048")
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert len(rows) == 15
    assert rows["{layers,mtp}.*.self_attn.o_proj"][:3] == ["16384->7168", "x4", "fp8"]
    assert rows["{layers,mtp}.*.self_attn.q_b_proj"][:4] == ["1536->24576", "x4", "bf16", "K"]
    assert rows["layers.*.mlp.down_proj"][:3] == ["18432->7168", "x1", "fp8"]
    assert rows["{layers,mtp}.*.mlp.experts[w13]"][:4] == ["7168->4096", "x3", "fp8", "grouped"]
    assert rows["mtp.*.eh_proj"][:3] == ["14336->7168", "x1", "fp8"] and rows["lm_head"][2] == "bf16"
    cpu = plan_fp8(meta_model(MOE_1B), "cpu").describe()
    assert cpu[0] == ("fp8: 14 of 15 GEMM groups in FP8 (fp8_layers auto on cpu = all: FP8 is only emulated there, "
                      "for numerics; every linear but the output head, routed experts loop)")


def test_bad_settings_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="fp8_layers must be one of"):
        tiny_config(fp8=True, fp8_layers="some")
    with pytest.raises(ValueError, match="fp8_layers must be one of"):
        plan_fp8(meta_model(MOE_1B), "cuda", "most")
    assert main(["train", "--config", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--fp8-layers", "half"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dsv3 train: error: fp8_layers must be one of ('auto', 'all'), got 'half'"]


def test_trainer_prints_the_plan_and_resumes_with_another_choice(tmp_path, capsys):
    """The start lines carry the plan; fp8_layers (like fp8 itself) may change on resume: it changes no
    parameter, and only the schedule change is reported."""
    data = make_shards(tmp_path / "data")
    cfg = tiny_config(steps=1, ckpt_every=1, fp8=True, fp8_layers="all")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(cfg.to_json()))
    run = ["train", "--config", str(recipe), "--data", str(data), "--out", str(tmp_path / "run")]
    assert main(run) == 0
    out = capsys.readouterr().out
    assert "fp8: 14 of 15 GEMM groups in FP8 (fp8_layers all on cpu = all" in out
    assert "{layers,mtp}.*.mlp.experts[w13]" in out and "fp8 loop" in out
    assert main(run + ["--resume", "--steps", "2", "--allow-changed-settings", "--fp8-layers", "auto"]) == 0
    out = capsys.readouterr().out
    assert "warning: resuming with a changed schedule: steps 1 -> 2\n" in out
    assert "fp8: 14 of 15 GEMM groups in FP8 (fp8_layers auto on cpu = all" in out
