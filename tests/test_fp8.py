"""Tests of dsv3.kernels.fp8: block-wise e4m3 quantization against closed forms and loop references.

Oracles: the table of every finite e4m3 value (the quantized code must be a nearest one), the
closed-form rounding bound of a 3-bit mantissa, per-block Python loops, and fp32 matmuls of the
dequantized operands. GPU tests compare the Triton kernels with the PyTorch references.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv3.kernels import fp8

E4M3 = torch.float8_e4m3fn


def _finite_e4m3_values() -> torch.Tensor:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(E4M3).to(torch.float32)
    return torch.unique(codes[torch.isfinite(codes)])


E4M3_VALUES = _finite_e4m3_values()


def _loop_scales(w: torch.Tensor, block: int) -> torch.Tensor:
    """Per-block amax / 448 with Python loops (zero block -> 1)."""
    rows, cols = w.shape
    out = torch.empty(math.ceil(rows / block), math.ceil(cols / block))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            amax = w[i * block : (i + 1) * block, j * block : (j + 1) * block].abs().max().float()
            out[i, j] = amax / 448 if amax > 0 else 1.0
    return out


def _loop_dequant(q: torch.Tensor, s: torch.Tensor, block: int) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            sl = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            out[sl] = q[sl].to(torch.float32) * s[i, j]
    return out


def _assert_nearest_e4m3(q: torch.Tensor, target: torch.Tensor) -> None:
    """Every q must be a closest finite e4m3 value to target (ties either way)."""
    q = q.to(torch.float32).flatten()
    target = target.flatten().clamp(-448, 448)
    best = (target[:, None] - E4M3_VALUES[None, :]).abs().min(dim=1).values
    got = (target - q).abs()
    assert torch.all(got <= best * (1 + 1e-6) + 1e-12), float((got - best).max())


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # mix magnitudes across blocks so scales differ, with some tiny values to reach subnormals
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 1, cols)[None, :]
    return w


@pytest.mark.parametrize("shape", [(256, 256), (300, 200), (1, 129), (129, 1), (128, 384), (5, 5)])
def test_quantize_weight_picks_nearest_e4m3_with_amax_scale(shape):
    w = _weight(*shape)
    q, s = fp8.quantize_weight(w)
    assert q.dtype == E4M3 and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    torch.testing.assert_close(s, _loop_scales(w, 128), rtol=0, atol=0)
    # each code is the nearest e4m3 value of w / scale of its block
    s_full = s.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    _assert_nearest_e4m3(q, w / s_full)


@pytest.mark.parametrize("shape", [(300, 200), (1, 129), (256, 128)])
def test_round_trip_error_within_e4m3_precision(shape):
    w = _weight(*shape, seed=1)
    q, s = fp8.quantize_weight(w)
    deq = fp8.dequantize_weight(q, s, dtype=torch.float32)
    torch.testing.assert_close(deq, _loop_dequant(q, s, 128), rtol=0, atol=0)
    s_full = s.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    err = (deq - w).abs()
    # 3 mantissa bits: half-ulp relative error 2^-4 for normals; subnormal spacing 2^-9 (in block units)
    bound = 2.0**-4 * w.abs() + 2.0**-10 * s_full
    assert torch.all(err <= bound * (1 + 1e-6))
    amax = s_full * 448
    assert torch.all(err <= 2.0**-4 * amax)
    assert err.max() > 0  # it really quantized


def test_block_max_saturates_at_448():
    w = _weight(300, 200, seed=2)
    q, s = fp8.quantize_weight(w)
    qf = q.to(torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = qf[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            assert blk.abs().max() == 448.0
    assert torch.isfinite(qf).all()


def test_out_of_range_values_saturate_not_nan():
    x = torch.tensor([1e6, -1e6, 448.0, 500.0, -460.0])
    q = fp8._to_fp8(x.clone())
    assert q.to(torch.float32).tolist() == [448.0, -448.0, 448.0, 448.0, -448.0]


@pytest.mark.parametrize("shape", [(300, 200), (1, 129), (128, 128)])
def test_ue8m0_scales_are_powers_of_two_covering_amax(shape):
    w = _weight(*shape, seed=3)
    q, s = fp8.quantize_weight(w, scale_fmt="ue8m0")
    exact = _loop_scales(w, 128)
    log2 = torch.log2(s)
    assert torch.equal(log2, torch.round(log2))
    assert torch.all(s >= exact) and torch.all(s < 2 * exact)
    amax_q = [q.to(torch.float32)[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].abs().max()
              for i in range(s.shape[0]) for j in range(s.shape[1])]
    assert all(224.0 <= a <= 448.0 for a in amax_q)
    deq = fp8.dequantize_weight(q, s, dtype=torch.float32)
    s_full = s.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    assert torch.all((deq - w).abs() <= 2.0**-4 * w.abs() + 2.0**-10 * s_full)


def test_round_scale_ue8m0_exact_powers_kept():
    s = torch.tensor([0.25, 1.0, 3.0, 0.3, 2.0**-20, 1.5 * 2.0**-100])
    r = fp8.round_scale_ue8m0(s)
    assert r.tolist() == [0.25, 1.0, 4.0, 0.5, 2.0**-20, 2.0**-99]


def test_zero_blocks_give_unit_scale_and_zeros():
    w = _weight(256, 256, seed=4)
    w[:128, 128:] = 0
    for fmt in (None, "ue8m0"):
        q, s = fp8.quantize_weight(w, scale_fmt=fmt)
        assert s[0, 1] == 1.0
        assert torch.all(q[:128, 128:].to(torch.float32) == 0)
        deq = fp8.dequantize_weight(q, s, dtype=torch.float32)
        assert torch.isfinite(deq).all() and torch.all(deq[:128, 128:] == 0)
    q, s = fp8.quantize_weight(torch.zeros(3, 7))
    assert torch.equal(s, torch.ones(1, 1)) and torch.all(q.to(torch.float32) == 0)


def test_chunked_paths_equal_single_pass(monkeypatch):
    w = _weight(700, 300, seed=5).to(torch.bfloat16)
    q1, s1 = fp8.quantize_weight(w)
    d1 = fp8.dequantize_weight(q1, s1)
    monkeypatch.setattr(fp8, "_CHUNK_ELEMS", 128 * 128)  # one block row per chunk
    q2, s2 = fp8.quantize_weight(w)
    d2 = fp8.dequantize_weight(q2, s2)
    assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)
    assert torch.equal(d1, d2) and d1.dtype == torch.bfloat16


def test_other_block_sizes():
    w = _weight(70, 50, seed=6)
    q, s = fp8.quantize_weight(w, block=32)
    assert s.shape == (3, 2)
    torch.testing.assert_close(s, _loop_scales(w, 32), rtol=0, atol=0)
    torch.testing.assert_close(fp8.dequantize_weight(q, s, block=32, dtype=torch.float32), _loop_dequant(q, s, 32))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="scale_fmt"):
        fp8.quantize_weight(torch.ones(4, 4), scale_fmt="e5m2")
    with pytest.raises(ValueError, match="2-D"):
        fp8.quantize_weight(torch.ones(4))
    with pytest.raises(ValueError, match="block"):
        fp8.quantize_weight(torch.ones(4, 4), block=0)
    q, s = fp8.quantize_weight(torch.ones(300, 200))
    with pytest.raises(ValueError, match=r"expected \(3, 2\)"):
        fp8.dequantize_weight(q, s[:2])


@pytest.mark.parametrize("shape", [(4, 256), (2, 3, 300), (1, 129), (7,)])
def test_quantize_act_per_token_tiles(shape):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(*shape, generator=g) * 3
    x[..., :5] *= 100  # one tile dominated by outliers
    q, s = fp8.quantize_act(x)
    k = shape[-1]
    assert q.shape == x.shape and q.dtype == E4M3
    assert s.shape == (*shape[:-1], math.ceil(k / 128)) and s.dtype == torch.float32
    x2, q2, s2 = x.reshape(-1, k), q.reshape(-1, k), s.reshape(-1, s.shape[-1])
    for r in range(x2.shape[0]):
        for t in range(s2.shape[1]):
            tile = x2[r, t * 128 : (t + 1) * 128]
            assert s2[r, t] == tile.abs().max() / 448
            _assert_nearest_e4m3(q2[r, t * 128 : (t + 1) * 128], tile / s2[r, t])
            deq = q2[r, t * 128 : (t + 1) * 128].to(torch.float32) * s2[r, t]
            assert torch.all((deq - tile).abs() <= 2.0**-4 * tile.abs() + 2.0**-10 * s2[r, t])


def test_quantize_act_ue8m0_and_zeros():
    x = torch.randn(3, 256)
    x[1] = 0
    q, s = fp8.quantize_act(x, scale_fmt="ue8m0")
    assert torch.equal(torch.log2(s), torch.round(torch.log2(s)))
    assert torch.all(s[1] == 1.0) and torch.all(q[1].to(torch.float32) == 0)
    assert torch.all(s[0] >= x[0].view(2, 128).abs().amax(-1) / 448)


def _gemm_case(m_shape, n, k, seed=8):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*m_shape, k, generator=g)
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    aq, asc = fp8.quantize_act(a)
    wq, wsc = fp8.quantize_weight(w)
    a_deq = aq.to(torch.float32) * asc.repeat_interleave(128, -1)[..., :k]
    w_deq = _loop_dequant(wq, wsc, 128)
    return aq, asc, wq, wsc, a_deq @ w_deq.T


@pytest.mark.parametrize("m_shape,n,k", [((4,), 256, 256), ((2, 3), 300, 200), ((1,), 129, 129), ((5,), 1, 7)])
def test_fp8_gemm_equals_dequantized_matmul(m_shape, n, k):
    aq, asc, wq, wsc, ref = _gemm_case(m_shape, n, k)
    out32 = fp8.fp8_gemm(aq, asc, wq, wsc, out_dtype=torch.float32)
    assert out32.shape == (*m_shape, n)
    torch.testing.assert_close(out32, ref, rtol=1e-5, atol=1e-5)
    out = fp8.fp8_gemm(aq, asc, wq, wsc)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()) < 1e-2


def test_fp8_gemm_close_to_full_precision_matmul():
    g = torch.Generator().manual_seed(9)
    a, w = torch.randn(16, 512, generator=g), torch.randn(384, 512, generator=g)
    out = fp8.fp8_gemm(*fp8.quantize_act(a), *fp8.quantize_weight(w), out_dtype=torch.float32)
    ref = a @ w.T
    rel = (out - ref).norm() / ref.norm()
    assert 1e-3 < rel < 5e-2  # e4m3 on both operands: a few percent at most, but not exact


def test_fp8_gemm_shape_errors():
    aq, asc, wq, wsc, _ = _gemm_case((4,), 256, 256)
    with pytest.raises(ValueError, match="K="):
        fp8.fp8_gemm(aq[:, :128], asc[:, :1], wq, wsc)
    with pytest.raises(ValueError, match="w_scale"):
        fp8.fp8_gemm(aq, asc, wq, wsc[:1])
    with pytest.raises(ValueError, match="a_scale"):
        fp8.fp8_gemm(aq, asc[:, :1], wq, wsc)


def test_inputs_are_not_modified():
    for dtype in (torch.float32, torch.bfloat16):
        w = _weight(256, 128, seed=10).to(dtype)
        x = torch.randn(3, 256).to(dtype)
        w0, x0 = w.clone(), x.clone()
        q, s = fp8.quantize_weight(w)
        fp8.quantize_act(x)
        fp8.dequantize_weight(q, s)
        assert torch.equal(w, w0) and torch.equal(x, x0)


# ---- Triton kernels vs the references (`triton`: on a GPU, or on CPU under TRITON_INTERPRET=1, which
# tests/conftest.py sets when there is no GPU; the largest shapes are `gpu` only, for the interpreter's time) ----


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(4, 256), (3, 5, 300), (1, 129), (2, 1200), (2, 1),
                                   pytest.param((33, 7168), marks=pytest.mark.gpu)])  # 3 s a case interpreted
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_act_quant_matches_reference(triton_device, shape, scale_fmt, dtype):
    from dsv3.kernels import fp8_triton

    g = torch.Generator().manual_seed(11)
    x = (torch.randn(*shape, generator=g) * torch.logspace(-4, 2, shape[-1])).to(dtype)
    x.view(-1, shape[-1])[0, :128] = 0  # an all-zero tile
    q_ref, s_ref = fp8.quantize_act_ref(x, 128, scale_fmt)
    q, s = fp8_triton.act_quant(x.to(triton_device), 128, scale_fmt)
    assert q.shape == q_ref.shape and s.shape == s_ref.shape
    torch.testing.assert_close(s.cpu(), s_ref, rtol=0, atol=0)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
    if triton_device == "cuda":  # and the public wrapper dispatches to it
        q2, s2 = fp8.quantize_act(x.cuda(), scale_fmt=scale_fmt)
        assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)


GEMM_SHAPES = [
    ((1,), 256, 256),
    ((16,), 384, 512),
    ((2, 3), 300, 200),  # N, K not multiples of 128
    ((129,), 129, 129),
    ((70,), 1, 7),
    ((65,), 128, 128),  # M > SMALL_M with 16-byte aligned rows: "auto" takes TMA
    pytest.param((256,), 512, 1024, marks=pytest.mark.gpu),  # 14 s interpreted ("ptr")
]


@pytest.mark.triton
@pytest.mark.parametrize("m_shape,n,k", GEMM_SHAPES)
@pytest.mark.parametrize("variant", ["auto", "ptr", "tma"])
def test_triton_fp8_gemm_matches_reference(triton_device, m_shape, n, k, variant):
    from dsv3.kernels import fp8_triton

    aq, asc, wq, wsc, ref = _gemm_case(m_shape, n, k, seed=12)
    args = [t.to(triton_device) for t in (aq, asc, wq, wsc)]
    if variant == "tma" and k % 16:
        with pytest.raises(ValueError, match="K % 16"):
            fp8_triton.fp8_gemm(*args, torch.float32, variant=variant)
        return
    out32 = fp8_triton.fp8_gemm(*args, torch.float32, variant=variant)
    assert out32.shape == (*m_shape, n) and out32.dtype == torch.float32
    # FP8 tensor-core dots accumulate each 128-long K block in reduced precision: normwise 1e-3
    assert (out32.cpu() - ref).norm() / ref.norm() < 1e-3
    torch.testing.assert_close(out32.cpu(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    if triton_device == "cuda" and variant == "auto":  # the public wrapper dispatches to the kernel
        # split-K adds partial tiles atomically (order varies), so equal up to fp32 rounding
        torch.testing.assert_close(fp8.fp8_gemm(*args, out_dtype=torch.float32, backend="triton"), out32,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_triton_fp8_gemm_large_bf16_and_dispatch():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from dsv3.kernels import fp8_triton

    g = torch.Generator(device="cuda").manual_seed(13)
    for m in (1, 16, 64, 65, 1000):  # both launch families (split-K decode, large-M tiles)
        a = torch.randn(m, 2048, device="cuda", generator=g, dtype=torch.bfloat16)
        w = torch.randn(1536, 2048, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
        aq, asc = fp8.quantize_act(a)
        wq, wsc = fp8.quantize_weight(w)
        out = fp8.fp8_gemm(aq, asc, wq, wsc, backend="triton")
        ref = fp8.fp8_gemm_ref(aq, asc, wq, wsc, out_dtype=torch.float32)
        direct = fp8_triton.fp8_gemm(aq, asc, wq, wsc, torch.bfloat16)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, direct)  # same kernel; split-K order may flip a bf16 rounding
        assert (out.float() - ref).norm() / ref.norm() < 1e-2
        # and close to the unquantized product: FP8 costs a few percent at most
        full = a.float() @ w.float().T
        assert (out.float() - full).norm() / full.norm() < 5e-2


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_fp8_gemm_every_backend_equals_the_reference_on_the_gpu(out_dtype):
    """Whichever backend `gemm_backend` picks (cuBLAS' block-scaled `_scaled_mm` for large M on whole-block shapes,
    Triton otherwise), `fp8_gemm` equals the reference; where cuBLAS is picked, it and Triton agree as well."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(15)
    dev = torch.device("cuda")
    for m, n, k in ((65, 256, 384), (1000, 1536, 2048), (4096, 512, 7168), (300, 300, 256), (200, 256, 1024),
                    (16, 256, 512), (130, 256, 1152)):
        a = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
        aq, asc = fp8.quantize_act(a)
        wq, wsc = fp8.quantize_weight(w)
        ref = fp8.fp8_gemm_ref(aq, asc, wq, wsc, out_dtype=torch.float32)
        out = fp8.fp8_gemm(aq, asc, wq, wsc, out_dtype=out_dtype)
        assert out.dtype == out_dtype and out.shape == (m, n)
        assert (out.float() - ref).norm() / ref.norm() < 1e-2, (m, n, k)
        backend = fp8.gemm_backend(m, n, k, dev, out_dtype)
        assert backend == ("scaled_mm" if m > 64 and fp8.cublas_block_shape(n, k) else "triton")
        if backend == "scaled_mm":
            tri = fp8.fp8_gemm(aq, asc, wq, wsc, out_dtype=out_dtype, backend="triton")
            assert (out.float() - tri.float()).norm() / ref.norm() < 1e-2


def test_gemm_backend_shape_rules():
    """The dispatcher decides from shape and capability alone: cuBLAS only on sm90+ for M > 64 with N % 128 == 0 and
    K % 512 == 0 (K = 256, 384, 640, 1152 gave wrong numbers there) and bf16/fp32 output; Triton on sm89+; the
    reference on CPU and older GPUs."""
    cuda, h100, ada, ampere = torch.device("cuda"), (9, 0), (8, 9), (8, 0)
    assert fp8.gemm_backend(4096, 7168, 7168, torch.device("cpu")) == "ref"
    assert fp8.gemm_backend(65, 256, 512, cuda, capability=h100) == "scaled_mm"
    assert fp8.gemm_backend(4096, 18432, 7168, cuda, torch.float32, capability=h100) == "scaled_mm"
    for m, n, k, out in ((64, 256, 512, torch.bfloat16), (1, 7168, 7168, torch.bfloat16),
                         (4096, 256, 384, torch.bfloat16), (4096, 256, 1152, torch.bfloat16),
                         (4096, 300, 512, torch.bfloat16), (4096, 256, 512, torch.float16)):
        assert fp8.gemm_backend(m, n, k, cuda, out, capability=h100) == "triton", (m, n, k, out)
    assert fp8.gemm_backend(4096, 256, 512, cuda, capability=ada) == "triton"
    assert fp8.gemm_backend(4096, 256, 512, cuda, capability=ampere) == "ref"
    for n, k in ((128, 512), (256, 7168), (18432, 7168)):
        assert fp8.cublas_block_shape(n, k)
    for n, k in ((128, 256), (128, 384), (128, 640), (128, 1152), (100, 512)):
        assert not fp8.cublas_block_shape(n, k)


def test_fp8_gemm_backend_choice_on_cpu():
    aq, asc, wq, wsc, ref = _gemm_case((5,), 256, 256, seed=16)
    torch.testing.assert_close(fp8.fp8_gemm(aq, asc, wq, wsc, out_dtype=torch.float32, backend="ref"), ref)
    torch.testing.assert_close(fp8.fp8_gemm(aq, asc, wq, wsc, out_dtype=torch.float32), ref)  # auto on CPU: ref
    with pytest.raises(ValueError, match="backend must be"):
        fp8.fp8_gemm(aq, asc, wq, wsc, backend="cutlass")


# ---- FP8Linear (weights kept FP8 in memory) ----

from torch import nn  # noqa: E402

from dsv3.model.fp8_linear import FP8Linear, convert_linears_to_fp8, keep_bf16  # noqa: E402


def _linear(in_f, out_f, bias=False, seed=14, dtype=torch.float32):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-2, 1, in_f, dtype=dtype))  # blocks of very different scales
    return lin


@pytest.mark.parametrize("in_f,out_f,bias", [(256, 384, False), (200, 300, True), (129, 1, False)])
def test_fp8_linear_from_linear_layout_and_forward(in_f, out_f, bias):
    lin = _linear(in_f, out_f, bias)
    q = FP8Linear.from_linear(lin)
    w_ref, s_ref = fp8.quantize_weight(lin.weight.detach())
    assert q.weight.dtype == E4M3 and not q.weight.requires_grad
    assert torch.equal(q.weight.view(torch.uint8), w_ref.view(torch.uint8)) and torch.equal(q.weight_scale_inv, s_ref)
    sd = q.state_dict()
    assert set(sd) == {"weight", "weight_scale_inv"} | ({"bias"} if bias else set())
    assert sd["weight_scale_inv"].shape == (math.ceil(out_f / 128), math.ceil(in_f / 128))
    x = torch.randn(2, 3, in_f)
    y = q(x)
    deq = _loop_dequant(w_ref, s_ref, 128)
    ref = x @ deq.T + (lin.bias.detach() if bias else 0)
    assert y.shape == (2, 3, out_f) and y.dtype == x.dtype
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # vs the unquantized layer: within the closed-form e4m3 bound, summed over the inputs
    full = lin(x).detach()
    s_full = s_ref.repeat_interleave(128, 0)[:out_f].repeat_interleave(128, 1)[:, :in_f]
    bound = x.abs() @ (2.0**-4 * lin.weight.detach().abs() + 2.0**-10 * s_full).T
    assert torch.all((y - full).abs() <= bound + 1e-5)


def test_fp8_linear_slabs_equal_single_pass(monkeypatch):
    import dsv3.model.fp8_linear as fl

    q = FP8Linear.from_linear(_linear(300, 700))
    x = torch.randn(5, 300, dtype=torch.bfloat16)
    whole = q(x)
    monkeypatch.setattr(fl, "_CHUNK_ELEMS", 300 * 128)  # one 128-row block per slab: 6 slabs
    slabs = q(x)
    assert slabs.dtype == torch.bfloat16
    torch.testing.assert_close(slabs, whole, rtol=0, atol=0)
    torch.testing.assert_close(whole.float(), x.float() @ q.dequantized_weight(torch.float32).T, rtol=2e-2, atol=1e-2)


def test_fp8_linear_matches_transformers_fine_grained_fp8_layout():
    tf_fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    ours = FP8Linear.from_linear(_linear(300, 200))
    theirs = tf_fp8.FP8Linear(300, 200, block_size=(128, 128))
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert set(ours_sd) == set(theirs_sd)
    for k in ours_sd:
        assert ours_sd[k].shape == theirs_sd[k].shape and ours_sd[k].dtype == theirs_sd[k].dtype, k
    # and transformers' own dequantization of our tensors is ours
    theirs_deq = tf_fp8._dequantize_fp8_weight(ours.weight, ours.weight_scale_inv, [128, 128], torch.float32)
    torch.testing.assert_close(ours.dequantized_weight(torch.float32), theirs_deq, rtol=0, atol=0)


def test_fp8_linear_survives_dtype_casts_and_moves():
    q = FP8Linear.from_linear(_linear(256, 128, bias=True))
    w0, s0 = q.weight.clone(), q.weight_scale_inv.clone()
    q.to(torch.bfloat16)
    assert q.weight.dtype == E4M3 and q.weight_scale_inv.dtype == torch.float32 and q.bias.dtype == torch.bfloat16
    assert torch.equal(q.weight.view(torch.uint8), w0.view(torch.uint8)) and torch.equal(q.weight_scale_inv, s0)
    q.half().float()
    assert q.weight.dtype == E4M3 and torch.equal(q.weight_scale_inv, s0)
    meta = FP8Linear(256, 128, device="meta")
    meta.to_empty(device="cpu")
    assert meta.weight.dtype == E4M3 and meta.weight.device.type == "cpu"


def test_fp8_linear_gradient_flows_to_input():
    q = FP8Linear.from_linear(_linear(128, 64))
    x = torch.randn(3, 128, requires_grad=True)
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, q.dequantized_weight(torch.float32).sum(0).expand(3, -1))


def test_fp8_linear_rejects_wrong_width():
    with pytest.raises(ValueError, match="128 input features"):
        FP8Linear.from_linear(_linear(128, 64))(torch.randn(2, 127))


def test_keep_bf16_follows_the_official_checkpoint():
    for name in ("lm_head", "model.layers.3.mlp.gate", "mtp.0.eh_proj", "model.layers.61.shared_head.head"):
        assert keep_bf16(name), name
    for name in ("layers.0.self_attn.q_a_proj", "layers.0.self_attn.kv_b_proj", "layers.2.mlp.experts.7.down_proj",
                 "layers.2.mlp.shared_experts.gate_proj", "layers.0.mlp.gate_proj", "layers.1.self_attn.o_proj"):
        assert not keep_bf16(name), name


def _tiny_model(dtype=torch.float32):
    from dsv3.config import ModelArgs
    from dsv3.model import Transformer

    args = ModelArgs.from_preset("tiny").replace(dim=256, inter_dim=384, moe_inter_dim=160, q_lora_rank=160,
                                                 kv_lora_rank=128, n_layers=2)
    torch.manual_seed(0)
    return Transformer(args, dtype).eval(), args


def test_convert_linears_to_fp8_on_a_tiny_model():
    model, args = _tiny_model()
    tokens = torch.randint(0, args.vocab_size, (2, 9))
    with torch.no_grad():
        ref = model(tokens)
    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    converted = convert_linears_to_fp8(model)
    assert set(converted) == {n for n in linears if not keep_bf16(n)} and "lm_head" not in converted
    assert any(".experts." in n for n in converted) and any("kv_b_proj" in n for n in converted)
    sd = model.state_dict()
    for n in converted:
        assert sd[f"{n}.weight"].dtype == E4M3 and sd[f"{n}.weight_scale_inv"].dtype == torch.float32
    assert sd["lm_head.weight"].dtype == torch.float32 and "lm_head.weight_scale_inv" not in sd
    with torch.no_grad():
        out = model(tokens)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.1, rel  # FP8 weights: a small, non-zero change of the logits


def test_convert_on_meta_then_load_state_dict():
    model, args = _tiny_model()
    convert_linears_to_fp8(model)
    with torch.device("meta"):
        empty, _ = _tiny_model()
    names = convert_linears_to_fp8(empty)
    assert names and all(empty.get_submodule(n).weight.is_meta for n in names)
    empty.to_empty(device="cpu")
    empty.load_state_dict(model.state_dict())
    empty.rotary.reset()
    tokens = torch.randint(0, args.vocab_size, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(empty(tokens), model(tokens), rtol=0, atol=0)


def test_dequantize_accepts_e8m0_scales():
    """transformers stores ue8m0 scales as float8_e8m0fnu; the values (powers of two) are the same."""
    q, s = fp8.quantize_weight(_weight(300, 200, seed=15), scale_fmt="ue8m0")
    s8 = s.to(torch.float8_e8m0fnu)
    assert torch.equal(s8.to(torch.float32), s)
    assert torch.equal(fp8.dequantize_weight(q, s8, dtype=torch.float32), fp8.dequantize_weight(q, s, dtype=torch.float32))
