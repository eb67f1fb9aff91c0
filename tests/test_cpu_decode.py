"""The CPU decode plan (`dsv3.engine.cpu_decode`) against the plain forward: the weight re-layout keeps
Parameters, state dict and values; each packed product equals the plain module's; an engine decode step with
the plan equals the same step without it; greedy `LLM.generate` with the plan equals it without the plan and
`transformers` token for token; a re-laid-out model still trains (the plan is not used there); and the plain
MoE loop, the oracle of the expert tables, against its definition."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import dsv3
from dsv3.config import ModelArgs
from dsv3.engine import LLM, SamplingParams
from dsv3.engine.cpu_decode import BAG_MAX_OUT, CPUDecodePlan, Product
from dsv3.engine.model_runner import ModelRunner
from dsv3.engine.scheduler import ScheduledSeq, SchedulerOutput
from dsv3.engine.sequence import Sequence
from dsv3.model import Transformer
from dsv3.model.attention import AttentionMeta
from dsv3.model.moe import LocalExperts, MoE
from hf_models import make_v3

# the tiny preset (query LoRA, one shared expert stacked with the routed ones), and a V2-Lite-like shape (no
# query LoRA, two shared experts: a wider shared MLP kept apart from the expert tables)
SHAPES = {"v3": {}, "v2_lite": dict(q_lora_rank=0, n_shared_experts=2, n_activated_experts=3)}


def _model(shape: str = "v3", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(dataclasses.replace(ModelArgs.from_preset("tiny"), **SHAPES[shape])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.2)
            else:
                p.normal_(1, 0.1)
        for block in model.blocks():
            if isinstance(block.mlp, MoE):
                block.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return a.shape == b.shape and bool((a - b).abs().max() <= tol * (1 + b.abs().max()))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_layout_keeps_parameters_state_dict_and_values(shape):
    model = _model(shape)
    laid = copy.deepcopy(model)
    params = dict(laid.named_parameters())
    plan = CPUDecodePlan(laid)
    assert all(p is params[name] for name, p in laid.named_parameters())  # the same Parameter objects
    reference = model.state_dict()
    for name, tensor in laid.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    buffer = plan.buffer.untyped_storage().data_ptr()
    moved = [name for name, p in laid.named_parameters() if p.untyped_storage().data_ptr() == buffer]
    assert len(moved) == sum(1 for block in laid.layers for m in block.modules() if isinstance(m, torch.nn.Linear)) + 1
    assert not laid.lm_head.weight.is_contiguous()  # [vocab, dim]: stored column-major
    assert laid.layers[0].self_attn.kv_b_proj.weight.is_contiguous()  # row-major: W_uk rows of each head together
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert _close(laid(tokens), model(tokens))
    CPUDecodePlan(laid)  # a second plan re-lays the weights out again: values still unchanged
    for name, tensor in laid.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_supports_only_plain_float32_cpu_models():
    model = _model()
    assert CPUDecodePlan.supports(model)
    assert not CPUDecodePlan.supports(copy.deepcopy(model).to(torch.bfloat16))
    with pytest.raises(ValueError, match="float32"):
        CPUDecodePlan(copy.deepcopy(model).to(torch.bfloat16))
    runner = ModelRunner(copy.deepcopy(model).to(torch.bfloat16), block_size=4, num_blocks=4)
    assert runner.plan is None

    class OtherExperts(LocalExperts):  # e.g. expert parallel: not every routed expert runs here
        pass

    model.layers[1].mlp.set_experts_impl(OtherExperts())
    assert not CPUDecodePlan.supports(model)


def test_product_bag_and_linear_equal_f_linear():
    plan = CPUDecodePlan(_model())
    g = torch.Generator().manual_seed(0)
    for out_f, col in ((96, True), (BAG_MAX_OUT + 64, True), (96, False)):
        w = torch.randn(out_f, 40, generator=g)
        stored = w.t().contiguous().t() if col else w
        product = Product(stored, plan)
        assert (product.table is not None) == (col and out_f <= BAG_MAX_OUT)
        for rows in (1, 3):
            x = torch.randn(rows, 40, generator=g)
            assert _close(product(x), F.linear(x, w))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("rows", [1, 3])
def test_packed_products_equal_the_modules(shape, rows):
    model = _model(shape)
    ref = copy.deepcopy(model)
    plan = CPUDecodePlan(model)
    g = torch.Generator().manual_seed(2)
    cos, sin = model.rotary(torch.arange(5, 5 + rows))
    with torch.inference_mode():
        for block, ref_block in zip(model.layers, ref.layers):
            mla, ref_mla = block.self_attn, ref_block.self_attn
            x = torch.randn(rows, model.args.dim, generator=g)
            q, kv_a = plan.queries(mla, x, cos, sin)
            q_nope, q_pe = ref_mla.queries(x, cos, sin)
            assert _close(q, torch.cat([ref_mla.absorb_query(q_nope), q_pe], dim=-1), 1e-4)
            assert _close(kv_a, ref_mla.kv_a_proj_with_mqa(x))
            o_lat = torch.randn(rows, mla.n_heads, mla.kv_lora_rank, generator=g)
            assert _close(plan.value_heads(mla, o_lat), ref_mla.value_heads(o_lat).flatten(1))
            o = torch.randn(rows, mla.n_heads * mla.v_dim, generator=g)
            assert _close(plan.attn[mla.layer_id].o(o), ref_mla.o_proj(o))
            h = torch.randn(rows, model.args.dim, generator=g)
            assert _close(plan.norm(block.post_attention_layernorm, h), ref_block.post_attention_layernorm(h))
            assert _close(plan.ffn(block, h), ref_block.mlp(h))


def test_expert_tables_hold_every_expert():
    model = _model()
    plan = CPUDecodePlan(model)
    moe = model.layers[1].mlp
    tables = plan.experts[1]
    assert plan.experts[0] is None and plan.mlps[0] is not None  # the dense layer: fused gate/up
    assert tables.shared == moe.n_experts and plan.mlps[1] is None  # the shared expert stacked last
    x = torch.randn(2, model.args.dim, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        for e, expert in enumerate([*moe.experts, moe.shared_experts]):
            for t in range(2):  # one expert at a time, weight 1 (the shared one is added with weight 1)
                indices = torch.tensor([[e if e < moe.n_experts else 0]])
                weights = torch.tensor([[1.0 if e < moe.n_experts else 0.0]])
                want = expert(x[t:t + 1]) + (moe.shared_experts(x[t:t + 1]) if e < moe.n_experts else 0)
                assert _close(plan.experts_decode(tables, x[t:t + 1], weights, indices), want)
    v2 = _model("v2_lite")
    v2_plan = CPUDecodePlan(v2)
    assert v2_plan.experts[1].shared is None and v2_plan.mlps[1] is not None  # two shared experts: apart


def _prefill_then_decode(runner: ModelRunner, prompts: list[list[int]]) -> SchedulerOutput:
    """Prefill every prompt through the runner; return a decode step of one token each."""
    out = SchedulerOutput()
    seqs = []
    for i, prompt in enumerate(prompts):
        seq = Sequence(i, prompt, SamplingParams(temperature=0.0, max_tokens=4))
        seq.block_table = list(range(4 * i, 4 * i + 4))
        seqs.append(seq)
        out.scheduled.append(ScheduledSeq(seq, 0, len(prompt)))
    tokens = runner.execute(out)
    step = SchedulerOutput()
    for seq, (token, _) in zip(seqs, tokens):
        seq.num_computed_tokens = seq.num_tokens
        seq.append_token(token, None)
        step.scheduled.append(ScheduledSeq(seq, seq.num_tokens - 1, 1))
    return step


@pytest.mark.parametrize("shape", list(SHAPES))
def test_engine_decode_step_with_the_plan_equals_the_plain_step(shape):
    model = _model(shape)
    runner = ModelRunner(model, block_size=4, num_blocks=16)
    assert runner.plan is not None
    for prompts in ([[5, 9, 2, 7, 7]], [[5, 9, 2, 7, 7], [3, 3, 8]]):  # batch 1, and 2 with padded contexts
        step = _prefill_then_decode(runner, prompts)
        tokens = torch.tensor([item.seq.token_ids[-1] for item in step.scheduled])
        positions = torch.tensor([item.start for item in step.scheduled])
        hidden, written = {}, {}
        with torch.inference_mode():
            cache = runner.kv_cache.clone()
            for plan in (runner.plan, None):
                runner.kv_cache.copy_(cache)
                paged = runner.backend.prepare([_chunk(item) for item in step.scheduled])
                meta = AttentionMeta(runner.backend, step=paged, plan=plan)
                hidden[plan is None] = model.hidden(tokens, positions, meta)
                written[plan is None] = runner.kv_cache.clone()
        assert _close(hidden[False], hidden[True], 1e-4)
        assert _close(written[False], written[True])
        assert not torch.equal(written[True], cache)  # the step wrote its latents


def _chunk(item: ScheduledSeq):
    from dsv3.engine.attention import Chunk
    return Chunk(item.seq.block_table, item.start, item.num_tokens)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tiny_v3")
    hf = make_v3(folder)
    yield folder, hf
    torch.set_num_threads(threads)


def test_generate_with_the_plan_equals_without_and_transformers(ckpt):
    folder, hf = ckpt
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 17, 9)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = LLM(folder, dtype=torch.float32, num_blocks=64, block_size=4)
    assert llm.runner.plan is not None
    with_plan = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    plain = LLM(folder, dtype=torch.float32, num_blocks=64, block_size=4)
    plain.runner.plan = None
    assert [o.token_ids for o in plain.generate(prompts, params, use_tqdm=False)] == with_plan
    single = [o.token_ids for o in llm.generate(prompts[:1], params, use_tqdm=False)]  # batch 1: the bags
    assert single == with_plan[:1]
    with torch.no_grad():
        for prompt, tokens in zip(prompts, with_plan):
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
            assert tokens == out[0, len(prompt):].tolist()


def test_a_laid_out_model_still_trains():
    model = _model().train()
    ref = copy.deepcopy(model)
    CPUDecodePlan(model)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(5))
    for m in (model, ref):
        logits, mtp = m(tokens, return_mtp=True)
        (F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()) + mtp[0].square().mean()).backward()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None and _close(p.grad, grads[name].grad, 1e-4), name
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()  # in place, into the buffer the Parameters are views of
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p -= 0.1 * p.grad
    with torch.inference_mode():
        assert _close(model.eval()(tokens), ref.eval()(tokens), 1e-4)


@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_routed_loop_equals_token_by_token_sum(tokens):
    """The plain MoE (the plan's oracle above) against the definition: each token's weighted expert sum."""
    torch.manual_seed(0)
    moe = MoE(ModelArgs.from_preset("tiny"))
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    x = torch.randn(tokens, moe.dim)
    with torch.no_grad():
        weights, indices = moe.gate(x)
        out = moe.routed(x, weights, indices)
        expected = torch.stack([
            sum(weights[t, k] * moe.experts[int(indices[t, k])](x[t:t + 1])[0] for k in range(indices.shape[1]))
            for t in range(tokens)])
    assert (out - expected).abs().max() <= 1e-5
