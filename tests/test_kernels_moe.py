"""Fused MoE: the references against the model's own MoE (CPU), the Triton kernels against the references (GPU,
or CPU under Triton's interpreter)."""

import pytest
import torch

from dsv3.config import ModelArgs
from dsv3.kernels import moe
from dsv3.kernels.fp8 import dequantize_weight, quantize_weight
from dsv3.model.moe import MoE

GATES = {
    "v3_noaux_tc": dict(score_func="sigmoid", topk_method="noaux_tc", n_expert_groups=4, n_limited_groups=2,
                        norm_topk_prob=True, route_scale=2.5, correction_bias=True),
    "v2_greedy": dict(score_func="softmax", topk_method="greedy", n_expert_groups=1, n_limited_groups=1,
                      norm_topk_prob=False, route_scale=1.0, correction_bias=False),
    "v2_group_limited": dict(score_func="softmax", topk_method="group_limited_greedy", n_expert_groups=4,
                             n_limited_groups=2, norm_topk_prob=False, route_scale=1.0, correction_bias=False),
}


def _moe(gate: str, dtype=torch.float32, seed: int = 0, **changes) -> MoE:
    args = ModelArgs.from_preset("tiny").replace(**GATES[gate], **changes)
    torch.manual_seed(seed)
    m = MoE(args, dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
        if m.gate.e_score_correction_bias is not None:
            m.gate.e_score_correction_bias.normal_(0, 0.1)
    return m.eval()


def _route_args(m: MoE) -> dict:
    g = m.gate
    return dict(topk=g.topk, score_func=g.score_func, topk_method=g.topk_method, n_groups=g.n_groups,
                topk_groups=g.topk_groups, norm=g.norm_topk_prob, route_scale=g.route_scale)


def _sorted(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = ids.long().sort(dim=1)
    return order.values, weights.gather(1, order.indices)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# ---- CPU: references against the model (the `_ref` functions by name: on a CPU under TRITON_INTERPRET=1 the
# wrappers would run the interpreted kernels, which the `triton` tests below compare with these) -------------
@pytest.mark.parametrize("gate", list(GATES))
def test_route_ref_equals_gate(gate):
    m = _moe(gate)
    x = torch.randn(37, m.dim)
    weights, indices = m.gate(x)
    logits = torch.nn.functional.linear(x, m.gate.weight)
    ids, w = moe.route_ref(logits, m.gate.e_score_correction_bias, n_shared=2, **_route_args(m))
    assert ids.shape == (37, m.gate.topk + 2) and ids.dtype == torch.int32
    assert torch.equal(ids[:, :-2].long(), indices)
    torch.testing.assert_close(w[:, :-2], weights)
    assert torch.equal(ids[:, -2:], torch.tensor([m.n_experts, m.n_experts + 1], dtype=torch.int32).expand(37, 2))
    assert torch.equal(w[:, -2:], torch.ones(37, 2))


@pytest.mark.parametrize("gate", list(GATES))
def test_fused_moe_ref_equals_moe_forward(gate):
    from dsv3.model.fused import stack_experts

    m = _moe(gate)
    x = torch.randn(2, 11, m.dim)
    with torch.no_grad():
        expected = m(x)
        m.stacked = stack_experts(m)  # routed experts + shared slices; the CPU forward stays the reference
        st = m.stacked
        assert st.w_gate.shape[0] == m.n_experts + st.n_shared_slices
        logits = torch.nn.functional.linear(x.reshape(-1, m.dim), st.router_weight)
        ids, w = moe.route_ref(logits, m.gate.e_score_correction_bias, n_shared=st.n_shared_slices, **_route_args(m))
        out = moe.fused_moe_ref(x.reshape(-1, m.dim), ids.long(), w, st.w_gate, st.w_up, st.w_down)
        torch.testing.assert_close(out.view_as(expected), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m(x), expected)  # the fused module's CPU path


def test_stacked_experts_share_storage():
    from dsv3.model.fused import stack_experts

    m = _moe("v3_noaux_tc")
    st = stack_experts(m)
    w = m.experts[3].down_proj.weight
    assert w.data_ptr() == st.w_down[3].data_ptr()


def test_fp8_reference_equals_dequantized():
    torch.manual_seed(1)
    n, d, inter, e = 9, 256, 128, 3
    x = torch.randn(n, d)
    mats = {k: [quantize_weight(torch.randn(*shape)) for _ in range(e)]
            for k, shape in (("g", (inter, d)), ("u", (inter, d)), ("d", (d, inter)))}
    w8 = {k: torch.stack([q for q, _ in v]) for k, v in mats.items()}
    s8 = {k: torch.stack([s for _, s in v]) for k, v in mats.items()}
    deq = {k: torch.stack([dequantize_weight(q, s, dtype=torch.float32) for q, s in v]) for k, v in mats.items()}
    ids = torch.stack([torch.randperm(e)[:2] for _ in range(n)]).int()
    w = torch.rand(n, 2)
    out = moe.fused_moe_ref(x, ids.long(), w, w8["g"], w8["u"], w8["d"], s8["g"], s8["u"], s8["d"])
    ref = moe.fused_moe_ref(x, ids.long(), w, deq["g"], deq["u"], deq["d"])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(moe.linear_ref(x, w8["g"][1], s8["g"][1]), x @ deq["g"][1].T)


def test_errors_name_the_problem():
    x = torch.randn(4, 8)
    w = torch.randn(3, 16, 8)
    ids = torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="w_down"):
        moe.fused_moe(x, ids, torch.ones(4, 2), w, w, torch.randn(3, 16, 8))
    with pytest.raises(ValueError, match="ids"):
        moe.fused_moe(x, ids[:3], torch.ones(4, 2), w, w, w.transpose(1, 2))
    with pytest.raises(ValueError, match="topk"):
        moe.route(torch.randn(4, 8), None, topk=9)
    with pytest.raises(ValueError, match="topk_method"):
        moe.route(torch.randn(4, 8), None, topk=2, topk_method="best")
    with pytest.raises(ValueError, match="needs"):
        moe.linear(x, torch.randn(4, 8).to(torch.float8_e4m3fn))


# ---- Triton kernels against the references (`triton`: on a GPU, or on CPU under Triton's interpreter) ------
# bf16 is `gpu` only: Triton's interpreter has no bf16 arithmetic (a documented limitation): it keeps bf16 as raw
# uint16, so `tl.dot` multiplies the bit patterns. The interpreter runs float32 activations instead, with FP8
# weights too (the kernels widen the e4m3 tile to the activation dtype). Large shapes only on a GPU: interpreted,
# a fused_moe call at these tiny shapes already takes about a second.
_GPU = pytest.mark.gpu


def _experts(e, d, inter, dtype, fp8, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    mats = [torch.randn(e, inter, d, device=device, generator=g) * d ** -0.5,
            torch.randn(e, inter, d, device=device, generator=g) * d ** -0.5,
            torch.randn(e, d, inter, device=device, generator=g) * inter ** -0.5]
    if not fp8:
        return [m.to(dtype) for m in mats], [None] * 3
    ws, ss = [], []
    for m in mats:
        q = [quantize_weight(w) for w in m]
        ws.append(torch.stack([a for a, _ in q]))
        ss.append(torch.stack([s for _, s in q]))
    return ws, ss


def _tol(tol: float, dtype: torch.dtype, fp8: bool, dev: str) -> float:
    """The same tolerance everywhere: FP8 weights with float32 activations multiply in IEEE float32 on a GPU too
    (`input_precision="ieee"`, as the unquantized float32 path), not in TF32."""
    return tol


@pytest.mark.triton
@pytest.mark.parametrize("case", [
    dict(e=256, k=8, s=1, sf="sigmoid", tm="noaux_tc", g=8, tg=4, norm=True, scale=2.5, bias=True),
    dict(e=64, k=6, s=2, sf="softmax", tm="greedy", g=1, tg=1, norm=False, scale=1.0, bias=False),
    dict(e=160, k=6, s=2, sf="softmax", tm="group_limited_greedy", g=8, tg=3, norm=False, scale=16.0, bias=False),
])
def test_route_triton_matches_reference(triton_device, case):
    dev = triton_device
    torch.manual_seed(0)
    logits = torch.randn(300 if dev == "cuda" else 4, case["e"], device=dev)  # interpreted: one program per token
    bias = torch.randn(case["e"], device=dev) * 0.1 if case["bias"] else None
    kw = dict(topk=case["k"], n_shared=case["s"], score_func=case["sf"], topk_method=case["tm"],
              n_groups=case["g"], topk_groups=case["tg"], norm=case["norm"], route_scale=case["scale"])
    assert moe._use_triton(logits)  # the wrapper takes the kernel, not its reference
    ids, w = moe.route(logits, bias, **kw)
    ids_r, w_r = moe.route_ref(logits, bias, **kw)
    ids, w = _sorted(ids, w)
    ids_r, w_r = _sorted(ids_r, w_r)
    assert torch.equal(ids, ids_r)
    torch.testing.assert_close(w, w_r, atol=1e-6, rtol=1e-5)


def _moe_cases(tols: dict, sizes: tuple[int, ...], interpreted: set) -> list:
    """(dtype, fp8, tol, rows) for every dtype/weight kind and row count on a GPU; those in `interpreted` also
    on CPU under the interpreter (each call there takes seconds)."""
    return [pytest.param(dtype, fp8, tol, n, marks=() if (dtype, fp8, n) in interpreted else _GPU,
                         id=f"{str(dtype)[6:]}{'-fp8' if fp8 else ''}-{n}")
            for (dtype, fp8), tol in tols.items() for n in sizes]


@pytest.mark.triton
@pytest.mark.parametrize("dtype,fp8,tol,n", _moe_cases(
    {(torch.float32, False): 1e-5, (torch.float32, True): 1e-5, (torch.bfloat16, False): 2e-2,
     (torch.bfloat16, True): 2e-2}, (1, 7, 20, 130, 2000),
    {(torch.float32, False, 1), (torch.float32, False, 20), (torch.float32, True, 7)}))
def test_fused_moe_triton_matches_reference(triton_device, dtype, fp8, tol, n):
    dev = triton_device
    if dev == "cuda":
        e, k, d, inter = 33, 4, 384, 256  # 32 routed + 1 shared, K not a power-of-two multiple of the tile
    else:  # 4 routed + 1 shared; D, I not multiples of the interpreter's 32-deep K tile, I not of its 16-wide N
        e, k, d, inter = 5, 2, 48, 40  # tile; n=20: the shared expert's rows fill two 16-row chunks (both splits)
    (wg, wu, wd), (sg, su, sd) = _experts(e, d, inter, dtype, fp8, device=dev)
    torch.manual_seed(n)
    x = torch.randn(n, d, device=dev, dtype=dtype)
    ids, w = moe.route(torch.randn(n, e - 1, device=dev), None, topk=k, n_shared=1, score_func="softmax",
                       topk_method="greedy", norm=True, route_scale=2.0)
    stats = torch.zeros(1, dtype=torch.int32, device=dev)
    assert moe._use_triton(x)
    out = moe.fused_moe(x, ids, w, wg, wu, wd, sg, su, sd, stats=stats)
    ref = moe.fused_moe_ref(x, ids.long(), w, wg, wu, wd, sg, su, sd)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < _tol(tol, dtype, fp8, dev)
    assert int(stats) == torch.unique(ids).numel()


@pytest.mark.triton
@pytest.mark.parametrize("dtype,fp8,tol,m", _moe_cases(
    {(torch.float32, False): 1e-5, (torch.float32, True): 1e-5, (torch.bfloat16, False): 1.5e-2,
     (torch.bfloat16, True): 1.5e-2}, (1, 20, 64, 1000),
    {(torch.float32, False, 20), (torch.float32, True, 1)}))
def test_dense_swiglu_and_linear_match_reference(triton_device, dtype, fp8, tol, m):
    dev = triton_device
    d, inter = (320, 384) if dev == "cuda" else (48, 40)
    (wg, wu, wd), (sg, su, sd) = _experts(1, d, inter, dtype, fp8, device=dev, seed=m)
    x = torch.randn(m, d, device=dev, dtype=dtype)
    assert moe._use_triton(x)
    h = moe.swiglu(x, wg[0], wu[0], None if sg is None else sg[0], None if su is None else su[0])
    tol = _tol(tol, dtype, fp8, dev)
    assert _rel(h, moe.swiglu_ref(x, wg[0], wu[0], None if sg is None else sg[0], None if su is None else su[0])) < tol
    y = moe.linear(h, wd[0], None if sd is None else sd[0])
    assert _rel(y, moe.linear_ref(h, wd[0], None if sd is None else sd[0])) < tol


@pytest.mark.gpu
def test_fused_moe_has_no_host_sync():
    """Capturing in a CUDA graph fails on any host sync; replay with fresh inputs must still be right."""
    e, k, d, inter, n = 17, 2, 256, 128, 24
    (wg, wu, wd), _ = _experts(e, d, inter, torch.bfloat16, False)
    logits = torch.randn(n, e - 1, device="cuda")
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    kw = dict(topk=k, n_shared=1, score_func="sigmoid", topk_method="noaux_tc", n_groups=4, topk_groups=2)

    def step():
        ids, w = moe.route(logits, None, **kw)
        return moe.fused_moe(x, ids, w, wg, wu, wd)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    logits.copy_(torch.randn_like(logits))
    x.copy_(torch.randn_like(x))
    graph.replay()
    ids, w = moe.route_ref(logits, None, **kw)
    assert _rel(out, moe.fused_moe_ref(x, ids.long(), w, wg, wu, wd)) < 2e-2
