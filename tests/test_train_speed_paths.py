"""The training fast paths against the model's own reference code, on CPU: SDPA attention vs `MLA.forward`
with the causal mask (outputs and gradients), `use_sdpa` on a whole model (same logits; cached decoding
untouched), what `compile_model` compiles, FP8 swapping that keeps routed experts on the grouped path, the
router's fusable `small_topk` against `topk` (alone and in a compiled gate), and a training block compiled
whole (no graph break)."""

import torch
from torch import nn

from dsv3.config import ModelArgs
from dsv3.model.mla import MLA
from dsv3.train.attention import sdpa_forward, use_sdpa
from dsv3.train.fp8_linear import FP8Linear, swap_to_fp8
from dsv3.train.parallelize import compile_model
from test_train_shared import TINY_MODEL, tiny_model


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _attention_pair(device="cpu", dtype=torch.float32, seq=24, grad=False):
    """(sdpa output, reference output[, their input/parameter gradients]) of one MLA on random input."""
    from dsv3.model.rope import Rotary
    torch.manual_seed(0)
    args = ModelArgs(**{**TINY_MODEL, "vocab_size": 64, "dtype": "float32"})
    mla = MLA(args, dtype=torch.float32).to(device)
    with torch.no_grad():
        for p in mla.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    rot = Rotary(args).to(device)
    cos, sin = rot(torch.arange(seq, device=device).expand(3, -1))
    mask = torch.full((seq, seq), float("-inf"), device=device).triu(1)
    x = torch.randn(3, seq, args.dim, device=device)
    outs = []
    for fn in (lambda h: sdpa_forward(mla, h, cos, sin), lambda h: mla(h, cos, sin, mask, absorb=False)):
        mla.zero_grad(set_to_none=True)
        h = x.clone().requires_grad_()
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            out = fn(h)
        if grad:
            out.float().pow(2).sum().backward()
            outs.append((out.detach(), h.grad, mla.kv_b_proj.weight.grad.clone(), mla.q_b_proj.weight.grad.clone()))
        else:
            outs.append(out.detach())
    return outs


def test_sdpa_attention_equals_reference_forward_and_backward():
    got, want = _attention_pair(grad=True)
    for a, b, name in zip(got, want, ("output", "dx", "kv_b_proj grad", "q_b_proj grad")):
        assert _rel(a, b) < 1e-5, name


def test_use_sdpa_model_logits_and_cache_untouched():
    model = tiny_model()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(tokens, absorb=False)
        model.setup_cache(2, 32)
        ref_dec = model(tokens[:, :5])
        model.clear_cache()
    assert use_sdpa(model) == len(model.blocks())
    assert use_sdpa(model) == 0  # applied once
    calls = []
    import dsv3.train.attention as att
    orig = att.sdpa_forward
    att.sdpa_forward = lambda *a: calls.append(1) or orig(*a)
    try:
        with torch.no_grad():
            got = model(tokens, absorb=False)
            model.setup_cache(2, 32)
            got_dec = model(tokens[:, :5])  # cached path: the reference MLA.forward
    finally:
        att.sdpa_forward = orig
    assert len(calls) == len(model.layers)  # the uncached forward went through SDPA, the cached one did not
    assert _rel(got, ref) < 1e-5
    assert torch.equal(got_dec, ref_dec)


def test_compile_model_takes_whole_blocks_only_on_the_grouped_path(monkeypatch):
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    model = tiny_model()
    assert compile_model(model) == "blocks"
    assert compiled == model.blocks()
    compiled.clear()
    model = tiny_model()
    swap_to_fp8(model, emulate=True)  # emulated FP8 experts: reference loop, data-dependent
    assert compile_model(model) == "parts"
    assert model.layers[1].self_attn in compiled and model.layers[1].mlp not in compiled


def test_swap_can_keep_routed_experts_plain():
    model = tiny_model()
    n_all = sum(type(m) is nn.Linear for m in model.modules()) - 1  # all but the head
    n = swap_to_fp8(model, routed_experts=False)
    moe = model.layers[1].mlp
    assert type(moe.experts[0].gate_proj) is nn.Linear and moe.grouped_ok()
    assert isinstance(moe.shared_experts.gate_proj, FP8Linear)
    assert isinstance(model.layers[1].self_attn.q_b_proj, FP8Linear)
    assert n == n_all - 3 * len(moe.experts) * sum(hasattr(b.mlp, "experts") for b in model.blocks())


def test_small_topk_selects_what_topk_selects():
    from dsv3.model.moe import small_topk
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    x[::3, 8:16] = float("-inf")  # a masked group, as group-limited routing leaves them (>= k finite per row)
    for k in (1, 2, 4, 8):
        values, indices = small_topk(x, k)
        ref_v, ref_i = x.topk(k, dim=-1)
        assert torch.equal(values, ref_v) and torch.equal(indices, ref_i)


def test_compiled_gate_routes_like_the_eager_gate():
    """Under torch.compile the gate takes `small_topk`; its weights and experts equal eager `topk` routing."""
    from dsv3.model.moe import Gate
    torch.manual_seed(0)
    args = ModelArgs(**{**TINY_MODEL, "vocab_size": 64, "dtype": "float32", "n_routed_experts": 16,
                        "n_expert_groups": 4, "n_limited_groups": 2, "n_activated_experts": 4})
    gate = Gate(args, dtype=torch.float32)
    with torch.no_grad():
        gate.weight.normal_(0.0, 0.5)
        gate.e_score_correction_bias.normal_(0.0, 0.1)
    x = torch.randn(50, args.dim)
    w_ref, i_ref = gate(x)
    w, i = torch.compile(gate, fullgraph=True, dynamic=False)(x)
    assert torch.equal(i.sort(-1)[0], i_ref.sort(-1)[0])
    torch.testing.assert_close(w.gather(1, i.argsort(-1)), w_ref.gather(1, i_ref.argsort(-1)))


def test_a_training_block_compiles_without_graph_breaks():
    """`compile_model` compiles whole blocks: on the training path (SDPA, grouped MoE, bf16 autocast) a MoE
    block must trace as one graph (fullgraph raises on any break, e.g. the complex rope's storage check)."""
    model = tiny_model()
    model.train()
    use_sdpa(model)
    block = model.layers[-1]
    assert hasattr(block.mlp, "experts")
    x = torch.randn(2, 16, model.args.dim, requires_grad=True)
    cos, sin = model.rotary(torch.arange(16).expand(2, -1))
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x, cos, sin, None, 0, False, None)
        ref = block(x, cos, sin, None, 0, False, None)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=1e-3)  # bf16; the rope's real form rounds apart
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
