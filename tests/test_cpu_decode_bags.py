"""The single-token embedding-bag products of the CPU decode path against their plain references: GEMV,
stacked experts, fused q_a/kv_a, absorbed MLA query and output, and the runner's written-out decode step."""

import copy

import torch
import torch.nn.functional as F

from dsv3.config import ModelArgs
from dsv3.engine.model_runner import ModelRunner
from dsv3.engine.scheduler import ScheduledSeq, SchedulerOutput
from dsv3.engine.sequence import Sequence
from dsv3.engine.sampling import SamplingParams
from dsv3.model import Transformer
from dsv3.model.layers import cpu_decode_layout, decode_linear, expert_tables, experts_decode, gemv_or_linear
from dsv3.model.moe import MoE


def _tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.from_preset("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for block in model.blocks():
            if hasattr(block.mlp, "gate"):
                block.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


def test_gemv_bag_equals_linear_and_falls_back():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 40, generator=g)
    col = w.t().contiguous().t()  # same values, column-major
    x = torch.randn(1, 40, generator=g)
    with torch.inference_mode():
        assert (gemv_or_linear(x, col) - F.linear(x, w)).abs().max() <= 1e-5
        assert (gemv_or_linear(x[None], col) - F.linear(x[None], w)).abs().max() <= 1e-5  # [1, 1, in]
        xs = torch.randn(3, 40, generator=g)  # several rows: MKL, bitwise the plain product
        assert torch.equal(gemv_or_linear(xs, col), F.linear(xs, col))
        assert torch.equal(gemv_or_linear(x, w), F.linear(x, w))  # row-major: plain product
    xg = x.clone().requires_grad_()
    gemv_or_linear(xg, col).sum().backward()  # grad mode: plain product, gradients flow
    assert torch.allclose(xg.grad, w.sum(0, keepdim=True))


def test_decode_linear_uses_the_module_when_not_plain():
    lin = torch.nn.Linear(16, 8, bias=True)
    x = torch.randn(1, 16)
    with torch.inference_mode():
        assert torch.equal(decode_linear(x, lin), lin(x))  # a bias: the module itself


def test_layout_tables_and_experts_decode_equal_the_reference():
    model = _tiny()
    ref = copy.deepcopy(model)
    cpu_decode_layout(model)
    g = torch.Generator().manual_seed(3)
    for layer, ref_layer in zip(model.layers, ref.layers):
        if not isinstance(layer.mlp, MoE):
            assert expert_tables(layer.mlp) is None
            continue
        moe, ref_moe = layer.mlp, ref_layer.mlp
        with torch.inference_mode():
            tables = expert_tables(moe)
            assert tables is not None and tables.n == moe.n_experts + 1  # the shared expert is stacked too
            for rows in (1, 1, 3, 8):
                x = torch.randn(rows, moe.dim, generator=g)
                weights, indices = moe.gate(x)
                y = experts_decode(tables, x, weights, indices, moe.n_experts)
                expected = ref_moe(x)  # reference: experts one by one, plus the shared expert
                assert (y - expected).abs().max() <= 1e-5 * (1 + expected.abs().max())
                routed_only = experts_decode(tables, x, weights, indices, None)
                with_shared = routed_only + ref_moe.shared_experts(x)
                assert (with_shared - expected).abs().max() <= 1e-5 * (1 + expected.abs().max())
        assert expert_tables(moe) is None  # grad mode: no tables
        with torch.no_grad():  # a weight moved out of the tables: they are no longer used
            last = moe.shared_experts.down_proj
            last.weight.data = last.weight.data.clone()
        with torch.inference_mode():
            assert expert_tables(moe) is None


def test_mla_single_token_paths_equal_the_batched_products():
    model = _tiny()
    ref = copy.deepcopy(model)
    cpu_decode_layout(model)
    mla, ref_mla = model.layers[1].self_attn, ref.layers[1].self_attn
    assert mla._fused_qkv_a() is None  # grad mode
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, model.args.dim, generator=g)
    cos, sin = model.rotary(torch.tensor([[5]]))
    with torch.inference_mode():
        assert mla._fused_qkv_a() is not None
        got = mla.project(x, cos[0], sin[0])
        want = ref_mla.project(x, cos[0], sin[0])
        for a, b in zip(got, want):
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-5
        q_nope = torch.randn(1, mla.n_heads, mla.nope_dim, generator=g)
        assert (mla.absorb_query(q_nope) - ref_mla.absorb_query(q_nope)).abs().max() <= 1e-5
        o_lat = torch.randn(1, mla.n_heads, mla.kv_lora_rank, generator=g)
        assert (mla.latent_output(o_lat) - ref_mla.latent_output(o_lat)).abs().max() <= 1e-5
        several = torch.randn(3, mla.n_heads, mla.kv_lora_rank, generator=g)  # the batched path still works
        assert (mla.latent_output(several) - ref_mla.latent_output(several)).abs().max() <= 1e-5
    with torch.no_grad():  # kv_b changed in place: the W_uv^T copy is stale and must not be used
        mla.kv_b_proj.weight.mul_(2)
        ref_mla.kv_b_proj.weight.mul_(2)
    with torch.inference_mode():
        assert (mla.latent_output(o_lat) - ref_mla.latent_output(o_lat)).abs().max() <= 1e-5


def _decode_step(runner: ModelRunner, prompts: list[list[int]]) -> SchedulerOutput:
    """Prefill every prompt through the runner, then return a decode step of one token each."""
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


def test_runner_decode_hidden_equals_the_model_hooks():
    model = _tiny()
    runner = ModelRunner(model, block_size=4, num_blocks=16)
    for prompts in ([[5, 9, 2, 7, 7]], [[5, 9, 2, 7, 7], [3, 3, 8]]):  # batch 1 (bags) and 2 (padded contexts)
        step = _decode_step(runner, prompts)
        with torch.inference_mode():
            batch = runner.prepare(step)
            cache = runner.kv_cache.clone()
            fast = runner.decode_hidden(batch)
            runner.kv_cache.copy_(cache)
            batch = runner.prepare(step)

            def attention(layer_id, mla, x, cos, sin):
                return runner.paged_attention(batch, layer_id, mla, x, cos, sin)

            plain = model.hidden(batch.tokens, positions=batch.positions, attention=attention)
        assert fast.shape == plain.shape
        assert (fast - plain).abs().max() <= 1e-4 * (1 + plain.abs().max())


def test_greedy_sampler_shortcut_equals_the_processed_argmax():
    from dsv3.engine.sampling import Sampler, processed_logits
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 50, generator=g)
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1  # a tie: the first index wins in both
    params = [SamplingParams(temperature=0.0) for _ in range(4)]
    got = Sampler()(logits, params, [[1, 2]] * 4)
    assert got.logprobs is None
    assert torch.equal(got.token_ids, processed_logits(logits, params, [[1, 2]] * 4).argmax(dim=-1))
    assert int(got.token_ids[2]) == 7
    penalised = [SamplingParams(temperature=0.0, frequency_penalty=2.0)] * 4  # not the shortcut: penalties apply
    best = logits.argmax(dim=-1)
    assert not torch.equal(Sampler()(logits, penalised, [[int(t)] * 5 for t in best]).token_ids, best)


def test_rms_norm_row_equals_forward():
    from dsv3.model.layers import RMSNorm
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
    g = torch.Generator().manual_seed(6)
    for shape in [(48,), (1, 48), (1, 1, 48)]:
        x = torch.randn(shape, generator=g) * 3
        with torch.inference_mode():
            got = norm.row(x)
        assert got.shape == x.shape and (got - norm(x)).abs().max() <= 1e-5
    x = torch.randn(3, 48, generator=g)  # several rows, or grad mode: forward itself
    with torch.inference_mode():
        assert torch.equal(norm.row(x), norm(x))
    assert torch.equal(norm.row(x[:1]), norm(x[:1]))


def test_rotation_matrices_equal_apply_rope_in_both_layouts():
    from dsv3.model.mla import rotation_matrices
    from dsv3.model.rope import apply_rope
    g = torch.Generator().manual_seed(7)
    angles = torch.rand(3, 4, generator=g) * 6
    cos, sin = angles.cos(), angles.sin()
    x = torch.randn(3, 5, 8, generator=g)  # [N, H, R]
    for interleave in (True, False):
        m = rotation_matrices(cos, sin, interleave)
        expected = apply_rope(x, cos[:, None], sin[:, None], interleave)
        assert (torch.bmm(x, m) - expected).abs().max() <= 1e-6


def test_mla_project_with_rotation_equals_freqs():
    from dsv3.model.mla import rotation_matrices
    model = _tiny()
    mla = model.layers[2].self_attn
    x = torch.randn(2, model.args.dim, generator=torch.Generator().manual_seed(8))
    cos, sin = model.rotary(torch.tensor([[3, 40]]))
    with torch.inference_mode():
        plain = mla.project(x, cos[0], sin[0])
        rotated = mla.project(x, cos[0], sin[0], None, rotation_matrices(cos[0], sin[0], mla.interleave))
    for a, b in zip(plain, rotated):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5


def test_absorbed_queries_equal_project_then_absorb():
    from dsv3.model.mla import rotation_matrices
    model = _tiny()
    ref = copy.deepcopy(model)
    cpu_decode_layout(model)
    mla, ref_mla = model.layers[1].self_attn, ref.layers[1].self_attn
    assert "_q_absorbed" in mla.__dict__
    x = torch.randn(1, model.args.dim, generator=torch.Generator().manual_seed(9))
    cos, sin = model.rotary(torch.tensor([[17]]))
    rotation = rotation_matrices(cos[0], sin[0], mla.interleave)

    def expected():
        q_nope, q_pe, kv, k_pe = ref_mla.project(x, cos[0], sin[0])
        return torch.cat([ref_mla.absorb_query(q_nope), q_pe], dim=-1), kv, k_pe

    for change in (False, True):
        if change:  # q_b changed in place: the absorbed weight is stale and must not be used
            with torch.no_grad():
                mla.q_b_proj.weight.mul_(1.5)
                ref_mla.q_b_proj.weight.mul_(1.5)
        with torch.inference_mode():
            want = expected()
            for got in (mla.absorbed_queries(x, cos[0], sin[0], None, rotation),
                        mla.absorbed_queries(x, cos[0], sin[0])):
                for a, b in zip(got, want):
                    assert a.shape == b.shape and (a - b).abs().max() <= 1e-4 * (1 + b.abs().max())
