"""FP8 weights at inference: the one weight format (`FP8Linear`, stacked FP8 experts), its activation policies
(`w8a16`, `w8a8`, `auto`), and an FP8 checkpoint through `LLM` on the fast path.

Oracles: the model with its FP8 weights dequantized (W8A16 is exactly that model, up to the rounding of each
product), the reference block-scaled GEMM on quantized operands (W8A8), each expert's own `FP8Linear`s
(stacked experts), and the engine's PyTorch path (the fast path)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dsv3
from dsv3.config import ModelArgs
from dsv3.kernels import fp8 as fp8_ops
from dsv3.kernels import moe as moe_ops
from dsv3.model import Transformer
from dsv3.model.fp8_linear import FP8Linear, convert_linears_to_fp8, set_fp8_policy
from dsv3.model.fused import fuse_for_inference, stack_experts


def fp8_args(**changes) -> ModelArgs:
    """A tiny V3 whose expert width is one 128-block (stacked FP8 experts need whole blocks)."""
    base = dict(moe_inter_dim=128, inter_dim=128, n_layers=2, n_dense_layers=1, n_routed_experts=4,
                n_expert_groups=2, n_limited_groups=1, num_nextn_predict_layers=0, vocab_size=256)
    return ModelArgs.from_preset("tiny").replace(**{**base, **changes})


def fp8_model(seed: int = 0, dtype: str = "float32", policy: str = "w8a16") -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(fp8_args(dtype=dtype)).eval()
    with torch.no_grad():  # weights of a trained size (the default init is tiny), per-expert distinct scales
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0, 0.1)
    convert_linears_to_fp8(model)
    set_fp8_policy(model, policy)
    return model


def dequantized(model: Transformer, dtype: torch.dtype) -> Transformer:
    """The same model with every FP8Linear replaced by an nn.Linear holding its dequantized weight."""
    ref = copy.deepcopy(model)
    for module in list(ref.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, FP8Linear):
                lin = nn.Linear(child.in_features, child.out_features, bias=False, dtype=dtype)
                lin.weight.data = child.dequantized_weight(dtype)
                setattr(module, name, lin)
    return ref


# ---- the policy ------------------------------------------------------------------------------------
def test_resolve_policy_by_device_and_rows(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fp8_ops.resolve_policy("auto", cpu, 4096) == "w8a16"  # no FP8 tensor cores on a CPU
    assert fp8_ops.resolve_policy("w8a8", cpu, 1) == "w8a8"  # asked for: the reference GEMM, same numbers
    assert fp8_ops.resolve_policy("w8a16", cpu, 4096) == "w8a16"
    with pytest.raises(ValueError, match="FP8 policy must be one of"):
        fp8_ops.resolve_policy("w4a16", cpu, 1)
    monkeypatch.setattr(fp8_ops, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(fp8_ops, "_triton_kernels", lambda: object())
    rows = fp8_ops.AUTO_W8A8_MIN_ROWS
    assert fp8_ops.resolve_policy("auto", cuda, rows) == "w8a8"
    assert fp8_ops.resolve_policy("auto", cuda, rows - 1) == "w8a16"
    assert fp8_ops.resolve_policy("w8a8", cuda, 1) == "w8a8"
    assert fp8_ops.resolve_policy("w8a16", cuda, 10_000) == "w8a16"
    # an A100: no FP8 MMA, so everything dequantizes, said once
    monkeypatch.setattr(fp8_ops, "_capability", lambda device: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(fp8_ops, "_said_no_fp8_mma", set())
    messages = []
    monkeypatch.setattr(fp8_ops.logging.getLogger("dsv3"), "warning", lambda msg, *a: messages.append(msg % a))
    assert fp8_ops.resolve_policy("w8a8", cuda, 4096) == "w8a16"
    assert fp8_ops.resolve_policy("auto", cuda, 4096) == "w8a16"
    assert len(messages) == 1 and "A100" in messages[0] and "w8a16" in messages[0]


def test_set_fp8_policy_reaches_every_fp8_module_and_refuses_unknown():
    model = fp8_model()
    fuse_for_inference(model)
    count = set_fp8_policy(model, "w8a8")
    fp8_linears = [m for m in model.modules() if isinstance(m, FP8Linear)]
    stacked = [m.stacked for m in model.modules() if getattr(m, "stacked", None) is not None]
    assert count == len(fp8_linears) + len(stacked) and stacked and all(s.fp8 for s in stacked)
    assert all(m.policy == "w8a8" for m in fp8_linears + stacked)
    with pytest.raises(ValueError, match="FP8 policy must be one of"):
        set_fp8_policy(model, "fast")


# ---- W8A16 and W8A8 against their oracles ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a16_model_equals_the_dequantized_model(dtype):
    """W8A16 is the dequantized model: in float32 the dequantized e4m3 x fp32 scale is exact, so the FP8 model is
    the BF16-converted checkpoint *before* that conversion's rounding; in bf16 the two are the same weights."""
    model = fp8_model(dtype=str(dtype).removeprefix("torch."))
    ref = dequantized(model, dtype)
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens), atol=0, rtol=0)
    if dtype == torch.float32:  # a BF16 conversion rounds each dequantized weight: that, and only that, differs
        rounded = dequantized(model, torch.bfloat16).float()
        with torch.no_grad():
            diff = (model(tokens) - rounded(tokens)).abs().max()
        assert 0 < diff < 0.05 * model(tokens).abs().max()


def test_w8a8_linear_is_the_reference_gemm_on_quantized_operands():
    torch.manual_seed(3)
    lin = FP8Linear.from_linear(nn.Linear(300, 200, bias=False))
    x = torch.randn(5, 7, 300)
    lin.policy = "w8a8"
    with torch.no_grad():
        got = lin(x)
    xq, xs = fp8_ops.quantize_act_ref(x)
    torch.testing.assert_close(got, fp8_ops.fp8_gemm_ref(xq, xs, lin.weight, lin.weight_scale_inv, torch.float32),
                               atol=0, rtol=0)
    lin.policy = "w8a16"
    with torch.no_grad():
        w16 = lin(x)
    assert not torch.equal(got, w16)  # the policy takes effect: the activations' quantization shows
    assert (got - w16).norm() / w16.norm() < 0.05
    x.requires_grad_(True)  # a gradient is wanted: the dequantized matmul, whatever the policy
    lin.policy = "w8a8"
    assert lin.mode(x) == "w8a16"
    lin(x).sum().backward()
    assert x.grad is not None


# ---- stacked FP8 experts ----------------------------------------------------------------------------------
def _fp8_moe():
    model = fp8_model(seed=4)
    moe = model.layers[1].mlp
    with torch.no_grad():  # every expert on its own scale: a stack that read one expert's scales for all would
        for e, expert in enumerate(moe.experts):  # be off by factors of 2
            for lin in (expert.gate_proj, expert.up_proj, expert.down_proj):
                lin.weight_scale_inv.mul_(2.0 ** (e - 2))
    return moe


@pytest.mark.parametrize("a8", [False, True])
def test_stacked_fp8_experts_use_every_experts_own_scales(a8):
    moe = _fp8_moe()
    experts = [copy.deepcopy(e) for e in moe.experts]
    shared = copy.deepcopy(moe.shared_experts)
    set_fp8_policy(moe, "w8a8")
    stacked = stack_experts(moe)
    assert stacked.fp8 and stacked.w_gate.dtype == torch.float8_e4m3fn
    assert stacked.policy == "w8a8"  # the experts' policy carries over to the stack
    n_exp = len(experts)
    x = torch.randn(6, moe.dim, generator=torch.Generator().manual_seed(5))
    policy = "w8a8" if a8 else "w8a16"
    for e, module in enumerate(experts + [shared]):
        set_fp8_policy(module, policy)
        ids = torch.full((x.shape[0], 1), e, dtype=torch.long)
        with torch.no_grad():
            got = moe_ops.fused_moe_ref(x, ids, torch.ones(x.shape[0], 1), stacked.w_gate, stacked.w_up,
                                        stacked.w_down, stacked.s_gate, stacked.s_up, stacked.s_down, a8=a8)
            want = module(x)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=f"expert {e} of {n_exp} (last: shared)")
    # the experts' own modules are now views into the stack
    assert moe.experts[2].up_proj.weight.data_ptr() == stacked.w_up[2].data_ptr()
    assert moe.experts[2].up_proj.policy == "w8a8"
    assert moe.experts[2].up_proj.weight_scale_inv.data_ptr() == stacked.s_up[2].data_ptr()


def test_stacking_refuses_mixed_formats():
    moe = _fp8_moe()
    moe.experts[1].gate_proj = nn.Linear(moe.dim, 128, bias=False)
    with pytest.raises(ValueError, match="all FP8 or all unquantized"):
        stack_experts(moe)


@pytest.mark.triton
@pytest.mark.parametrize("a8", [False, True])
def test_fused_moe_kernel_reads_every_experts_scales(triton_device, a8):
    """The Triton kernel on the stack (interpreted on CPU), one expert at a time, against the reference."""
    moe = _fp8_moe()
    stacked = stack_experts(moe)
    dev = triton_device
    st = [t.to(dev) for t in (stacked.w_gate, stacked.w_up, stacked.w_down, stacked.s_gate, stacked.s_up,
                              stacked.s_down)]
    x = torch.randn(3, moe.dim, device=dev, generator=torch.Generator(device=dev).manual_seed(6))
    for e in (3, 4):  # the last routed expert, the shared one
        ids = torch.full((3, 1), e, dtype=torch.int32, device=dev)
        w = torch.ones(3, 1, device=dev)
        got = moe_ops.fused_moe(x, ids, w, *st, a8=a8)
        want = moe_ops.fused_moe_ref(x, ids.long(), w, *st, a8=a8)
        assert (got - want).norm() / want.norm() < (2e-3 if a8 else 1e-5), f"expert {e}"


@pytest.mark.gpu
@pytest.mark.parametrize("n", [7, 130, 2000])
def test_fused_moe_w8a8_matches_reference_on_the_gpu(n):
    """FP8 x FP8 grouped GEMMs (activations quantized per 1x128 tile) against the reference W8A8 products, bf16."""
    torch.manual_seed(n)
    e, k, d, inter = 33, 4, 512, 256
    mats = [torch.randn(e, inter, d, device="cuda") * d ** -0.5, torch.randn(e, inter, d, device="cuda") * d ** -0.5,
            torch.randn(e, d, inter, device="cuda") * inter ** -0.5]
    q = [[fp8_ops.quantize_weight(w) for w in m] for m in mats]
    ws = [torch.stack([a for a, _ in m]) for m in q]
    ss = [torch.stack([s for _, s in m]) for m in q]
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    ids, w = moe_ops.route(torch.randn(n, e - 1, device="cuda"), None, topk=k, n_shared=1, score_func="softmax",
                           topk_method="greedy", norm=True, route_scale=2.0)
    got = moe_ops.fused_moe(x, ids, w, *ws, *ss, a8=True)
    want = moe_ops.fused_moe_ref(x, ids.long(), w, *ws, *ss, a8=True)
    w16 = moe_ops.fused_moe_ref(x, ids.long(), w, *ws, *ss)
    err = (got.float() - want.float()).norm() / want.float().norm()
    # the kernel and the reference round gate/up to bf16 in different summation orders, so a few SwiGLU outputs
    # land on the other side of an e4m3 rounding boundary before ffn2: ~1% apart, far below what the activations'
    # quantization itself costs (the W8A16 product is several percent away), and far below a wrong tile or scale
    w16_err = (w16.float() - want.float()).norm() / want.float().norm()
    assert err < 3e-2 and err < w16_err / 2, (float(err), float(w16_err))


# ---- an FP8 checkpoint through the engine ------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp8_folder(tmp_path_factory):
    """A tiny checkpoint in the released layout: BF16 written by `save_model`, then `bf16_to_fp8`."""
    from dsv3.checkpoint.convert import bf16_to_fp8

    root = tmp_path_factory.mktemp("fp8_ckpt")
    torch.manual_seed(0)
    model = Transformer(fp8_args(dtype="bfloat16"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0, 0.1)
    dsv3.save_model(model, root / "bf16")
    bf16_to_fp8(root / "bf16", root / "fp8")
    return root / "fp8"


def _greedy(n):
    from dsv3.engine import SamplingParams
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def _prompts():
    g = torch.Generator().manual_seed(9)
    return [torch.randint(3, 256, (k,), generator=g).tolist() for k in (5, 9, 2)]


@pytest.mark.triton
def test_fp8_checkpoint_on_the_kernel_backend_equals_the_pytorch_path_on_cpu(fp8_folder):
    """`weights="fp8"` on CPU, float32: the kernel backend (interpreted, no graphs) with stacked FP8 experts gives
    the PyTorch path's greedy tokens, and both those of the dequantized model (W8A16 is exact in float32)."""
    from dsv3.engine import LLM
    from dsv3.engine.model_runner import ModelRunner

    def engine(weights, fast):
        model = dsv3.load_model(fp8_folder, dtype=torch.float32, weights=weights, progress=False)
        llm = LLM(model, num_blocks=16, block_size=4, max_num_seqs=3, max_num_batched_tokens=16)
        if fast:
            llm.runner = ModelRunner(model, block_size=4, num_blocks=16, fast=True, max_num_seqs=3, cuda_graphs=False)
        return llm

    prompts, n = _prompts(), 3
    slow = engine("fp8", False).generate(prompts, _greedy(n), use_tqdm=False)
    fast_llm = engine("fp8", True)
    stacked = [m.stacked for m in fast_llm.model.modules() if getattr(m, "stacked", None) is not None]
    assert stacked and all(s.fp8 for s in stacked)
    fast = fast_llm.generate(prompts, _greedy(n), use_tqdm=False)
    deq = engine("bf16", False).generate(prompts, _greedy(n), use_tqdm=False)  # dequantized to float32 at load
    for s, f, d in zip(slow, fast, deq):
        assert f.token_ids == s.token_ids == d.token_ids


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["w8a16", "w8a8"])
def test_fp8_checkpoint_through_llm_takes_the_fast_path_on_the_gpu(fp8_folder, policy):
    """`LLM(fp8_folder)` on CUDA keeps FP8 (weights="auto") and runs fused kernels + CUDA graphs by default. W8A16:
    its greedy tokens equal the PyTorch path's (float32) and its log-probabilities the dequantized model's. W8A8:
    the two paths quantize the same activations but sum in different orders, so a SwiGLU output near an e4m3
    rounding boundary may take the other code, and the fast path's absorbed attention multiplies unquantized latents
    by the dequantized `kv_b` (seen on the H200: this near-uniform random model's top tokens, 0.01-0.03 apart in
    log-probability, come out reordered); the log-probabilities agree within FP8 tolerance."""
    from dsv3.engine import LLM, SamplingParams

    kw = dict(device="cuda", dtype=torch.float32, num_blocks=64, block_size=4, max_num_seqs=4,
              max_num_batched_tokens=32, fp8_policy=policy)
    fast = LLM(fp8_folder, **kw)
    assert fast.runner.graphs is not None
    assert any(isinstance(m, FP8Linear) for m in fast.model.modules())
    assert all(m.stacked.fp8 for m in fast.model.modules() if getattr(m, "stacked", None) is not None)
    slow = LLM(fp8_folder, fast=False, **kw)
    prompts, n = _prompts(), 8
    got = fast.generate(prompts, _greedy(n), use_tqdm=False)
    want = slow.generate(prompts, _greedy(n), use_tqdm=False)
    if policy == "w8a16":
        for f, s in zip(got, want):
            assert f.token_ids == s.token_ids
    assert fast.runner.graph_steps > 0 and fast.block_manager.num_free_blocks == 64
    if policy == "w8a8":  # numbers: test_fused_w8a8_forward_equals_the_plain_w8a8_forward_on_the_gpu
        return
    deq = LLM(fp8_folder, weights="bf16", fast=False, **{k: v for k, v in kw.items() if k != "fp8_policy"})
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=20)
    for x, y in zip(fast.generate(prompts, params, use_tqdm=False), deq.generate(prompts, params, use_tqdm=False)):
        assert x.token_ids == y.token_ids and [t for t, _ in x.logprobs[0].top] == [t for t, _ in y.logprobs[0].top]
        torch.testing.assert_close(torch.tensor([v for _, v in x.logprobs[0].top]),
                                   torch.tensor([v for _, v in y.logprobs[0].top]), atol=1e-4, rtol=0)


@pytest.mark.gpu
def test_fused_w8a8_forward_equals_the_plain_w8a8_forward_on_the_gpu():
    """W8A8 on the fused kernels (FP8 x FP8 grouped experts, cuBLAS/Triton block-scaled GEMMs) equals W8A8 on the
    plain modules (each expert's FP8Linear): the same quantized operands, float32 sums in other orders. Against the
    dequantized model W8A8 is off by the activations' quantization, a sizeable share of this near-uniform random
    model's logit spread, which is why token-level checks through the engine would only test near-ties."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    base = fp8_model(dtype="float32", policy="w8a8").cuda()
    fast = fuse_for_inference(copy.deepcopy(base))
    tokens = torch.randint(3, 256, (2, 9), device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))

    def centred(x):
        return x - x.mean(-1, keepdim=True)

    with torch.no_grad():
        slow_logits, fast_logits = centred(base(tokens)), centred(fast(tokens))
        deq_logits = centred(dequantized(base, torch.float32)(tokens))
    assert (fast_logits - slow_logits).norm() / slow_logits.norm() < 1e-4
    assert 1e-3 < (slow_logits - deq_logits).norm() / deq_logits.norm() < 0.3  # W8A8 is on: activations quantized
