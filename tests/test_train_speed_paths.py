"""The training fast paths against the model's own reference code, on CPU: the causal attention backend's
SDPA form (`CausalAttention`, what `model(tokens [B, T])` runs in training) against the absorbed latent form and
against an explicit-mask reference backend written here (outputs and gradients), the model forward taking SDPA
once per layer, what `compile_model` compiles, FP8 swapping that keeps routed experts on the grouped path, the
router's fusable `small_topk` against `topk` (alone and in a compiled gate), a training block compiled whole (no
graph break; also under activation checkpointing), and activation checkpointing through torch's
`checkpoint_wrapper` (same names, losses and gradients)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelArgs
from dsv3.model.attention import AttentionMeta, causal_meta
from dsv3.model.mla import MLA
from dsv3.train.fp8_linear import FP8TrainingLinear, swap_to_fp8
from dsv3.train.parallelize import compile_model
from test_train_shared import TINY_MODEL, tiny_model


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


class MaskedReference:
    """An attention backend written out plainly: expanded keys and values, float32 scores, an explicit
    `[T, T]` causal mask of -inf, softmax, weighted sum. The oracle of the causal backend's two forms."""

    def write_latents(self, mla, kv_a, cos, sin, meta):
        return mla.latents(kv_a, cos, sin)

    def attend(self, mla, q_nope, q_pe, kv, k_pe, meta):
        b, t, h = meta.batch, meta.seqlen, mla.n_heads
        kv_full = mla.kv_b_proj(kv).view(b, t, h, mla.nope_dim + mla.v_dim)  # [B, T, H, nope + v]
        k_nope, v = kv_full.split([mla.nope_dim, mla.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).view(b, t, h, -1).float()  # [B, T, H, qk]
        k = torch.cat([k_nope, k_pe.view(b, t, 1, -1).expand(-1, -1, h, -1)], dim=-1).float()  # [B, T, H, qk]
        mask = torch.full((t, t), float("-inf"), device=q.device).triu(1)  # [T, S]
        scores = torch.einsum("bthd,bshd->bhts", q, k) * mla.softmax_scale + mask
        o = torch.einsum("bhts,bshd->bthd", scores.softmax(dim=-1), v.float())  # [B, T, H, v]
        return o.to(v.dtype).reshape(b * t, -1)


def _attention_pair(device="cpu", dtype=torch.float32, seq=24, grad=False, form="sdpa"):
    """(causal backend output, explicit-mask reference output), each with its input and parameter gradients
    when `grad`, of one MLA on random input `[3 * seq, D]` (3 rows). `form`: "sdpa" (expanded keys/values
    through `F.scaled_dot_product_attention`, the training form) or "absorbed" (attention in the latent space)."""
    from dsv3.model.rope import Rotary
    torch.manual_seed(0)
    args = ModelArgs(**{**TINY_MODEL, "vocab_size": 64, "dtype": "float32"})
    mla = MLA(args, dtype=torch.float32).to(device)
    with torch.no_grad():
        for p in mla.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    batch = 3
    cos, sin = Rotary(args).to(device)(torch.arange(seq, device=device).repeat(batch))  # [N, R/2]
    x = torch.randn(batch * seq, args.dim, device=device)
    metas = (causal_meta(batch, seq, absorb=form == "absorbed"),
             AttentionMeta(MaskedReference(), batch=batch, seqlen=seq))
    outs = []
    for meta in metas:
        mla.zero_grad(set_to_none=True)
        h = x.clone().requires_grad_()
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            out = mla(h, cos, sin, meta)
        if grad:
            out.float().pow(2).sum().backward()
            outs.append((out.detach(), h.grad, mla.kv_b_proj.weight.grad.clone(), mla.q_b_proj.weight.grad.clone(),
                         mla.kv_a_proj_with_mqa.weight.grad.clone()))
        else:
            outs.append(out.detach())
    return outs


def test_causal_sdpa_equals_masked_reference_forward_and_backward():
    got, want = _attention_pair(grad=True)
    for a, b, name in zip(got, want, ("output", "dx", "kv_b_proj grad", "q_b_proj grad", "kv_a grad")):
        assert _rel(a, b) < 1e-5, name


def test_causal_absorbed_equals_masked_reference_forward_and_backward():
    got, want = _attention_pair(grad=True, form="absorbed")
    for a, b, name in zip(got, want, ("output", "dx", "kv_b_proj grad", "q_b_proj grad", "kv_a grad")):
        assert _rel(a, b) < 1e-5, name


def test_causal_sdpa_under_bf16_autocast_tracks_the_reference():
    got, want = _attention_pair(dtype=torch.bfloat16, seq=40)
    assert _rel(got, want) < 2e-2


def test_training_forward_runs_sdpa_once_per_attention(monkeypatch):
    """`model(tokens, return_mtp=True)` (what the trainer calls) attends through SDPA in every layer and MTP
    module, with logits equal to the absorbed form's."""
    model = tiny_model().train()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(k) or sdpa(*a, **k))
    logits, mtp = model(tokens, return_mtp=True)
    assert len(calls) == len(model.blocks()) and all(k["is_causal"] for k in calls)
    monkeypatch.undo()
    ref, ref_mtp = model(tokens, return_mtp=True, absorb=True)
    assert _rel(logits, ref) < 1e-5 and _rel(mtp[0], ref_mtp[0]) < 1e-5


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
    assert isinstance(moe.shared_experts.gate_proj, FP8TrainingLinear)
    assert isinstance(model.layers[1].self_attn.q_b_proj, FP8TrainingLinear)
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


@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_training_block_compiles_without_graph_breaks(monkeypatch, checkpointed):
    """`compile_model` compiles whole blocks: on the training path (causal SDPA, grouped MoE, bf16 autocast) a MoE
    block must trace as one graph (fullgraph raises on any break, e.g. the complex rope's storage check), also
    inside activation checkpointing's wrapper (the gate's routing record is a side effect there)."""
    from dsv3.train.parallelize import apply_activation_checkpointing
    real_compile = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: real_compile(self, backend="eager", fullgraph=True))
    model, plain = tiny_model().train(), tiny_model().train()
    if checkpointed:
        apply_activation_checkpointing(model)
    assert compile_model(model) == "blocks"
    block, ref_block = model.layers[-1], plain.layers[-1]
    assert hasattr(block.mlp, "experts")
    x = torch.randn(2 * 16, model.args.dim, requires_grad=True)  # [N, D]: 2 rows of 16 tokens
    residual = torch.randn(2 * 16, model.args.dim)
    cos, sin = model.rotary(torch.arange(16).repeat(2))
    meta = causal_meta(2, 16)
    block.mlp.gate.last_scores = block.mlp.gate.last_indices = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, res = block(x, residual, cos, sin, meta)
        ref, ref_res = ref_block(x, residual, cos, sin, meta)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=1e-3)  # bf16; the rope's real form rounds apart
    torch.testing.assert_close(res, ref_res)
    assert block.mlp.gate.last_indices.shape == (2 * 16, model.args.n_activated_experts)  # routing recorded
    (out.float().sum() + block.mlp.gate.last_scores.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_activation_checkpointing_wraps_blocks_and_keeps_names_losses_and_gradients(monkeypatch):
    """`apply_activation_checkpointing` puts torch's `checkpoint_wrapper` around every block: the forward runs
    again in backward (twice the attention calls), losses and every gradient equal the plain model's, and the
    state dict (what `save_model` writes and the trainer reloads) keeps the plain keys both ways."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from dsv3.checkpoint.save import hf_state_dict
    from dsv3.train.parallelize import apply_activation_checkpointing, plain_name

    plain, wrapped = tiny_model().train(), tiny_model().train()
    assert apply_activation_checkpointing(wrapped) == len(wrapped.blocks())
    assert all(isinstance(b, CheckpointWrapper) for b in wrapped.blocks()) and "CheckpointWrapper" in repr(wrapped)
    assert wrapped.state_dict().keys() == plain.state_dict().keys()
    assert hf_state_dict(wrapped).keys() == hf_state_dict(plain).keys()
    assert {plain_name(n) for n, _ in wrapped.named_parameters()} == {n for n, _ in plain.named_parameters()}
    wrapped.load_state_dict(plain.state_dict())  # loads back through the wrapper's hook

    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    results = []
    for model in (plain, wrapped):
        calls.clear()
        logits, mtp = model(tokens, return_mtp=True)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten()) + mtp[0].square().mean()
        loss.backward()
        grads = {plain_name(n): p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, len(calls)))
    (loss_p, grads_p, calls_p), (loss_w, grads_w, calls_w) = results
    assert calls_p == len(plain.blocks()) and calls_w == 2 * calls_p  # recomputed in backward
    assert torch.equal(loss_w, loss_p)
    assert grads_w.keys() == grads_p.keys() and len(grads_p) > 20
    for name, g in grads_p.items():
        assert torch.equal(grads_w[name], g), name
