"""The CUDA FP8 training GEMMs (cuBLAS block-scaled, `dsv3.train.fp8_gemms`) against the emulated oracle of
`fp8_linear` (e4m3 codes dequantized, float32 matmuls): forward, dgrad and wgrad, for shapes that are and
are not multiples of 128; plus the sync-free grouped MoE and the SDPA attention on the GPU against their
reference paths (GPU-only, `gpu` marker); on CPU, the cuBLAS path's layouts through a fake `F.scaled_mm`
that enforces torch's documented contract."""

import pytest
import torch

from dsv3.train import fp8_gemms
from dsv3.train.fp8_linear import FP8LinearFunction



def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _run(x, w, dy, emulate):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = FP8LinearFunction.apply(x, w, emulate)
    y.backward(dy.to(y.dtype))
    return y.detach().float(), x.grad.float(), w.grad.float()


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", [(512, 1024, 768), (200, 256, 288), (4088, 512, 2048), (77, 128, 256)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_cublas_gemms_equal_emulation(m, k, n, x_dtype):
    assert fp8_gemms.blockwise_supported(torch.device("cuda")), f"cuBLAS block-scaled FP8: {fp8_gemms.probe_errors}"
    g = torch.Generator(device="cuda").manual_seed(m + n)
    x = torch.randn(m, k, device="cuda", generator=g).to(x_dtype)
    x[:, 3] *= 30.0  # an outlier channel
    w = torch.randn(n, k, device="cuda", generator=g) * 0.05
    dy = torch.randn(m, n, device="cuda", generator=g)
    got = [t.cpu() for t in _run(x, w, dy.to(x_dtype), emulate=False)]
    # the oracle on the CPU: its quantizers divide exactly (CUDA torch multiplies by a rounded 1/448)
    want = _run(x.cpu(), w.cpu(), dy.to(x_dtype).cpu(), emulate=True)
    x, w, dy = x.cpu(), w.cpu(), dy.cpu()
    exact = (x.float() @ w.T, dy.to(x_dtype).float() @ w, dy.to(x_dtype).float().T @ x.float())
    assert not fp8_gemms.refused, fp8_gemms.refused
    for name, a, b, e in zip(("forward", "dgrad", "wgrad"), got, want, exact):
        assert torch.isfinite(a).all(), name
        # same codes and scales; the tensor cores accumulate each 128-wide K block in reduced precision before
        # the fp32 promotion (seen: 1.3e-4 for fp32 wgrad), and bf16 outputs round (up to ~4e-3)
        tol = 1e-3 if x_dtype == torch.float32 else 8e-3
        assert _rel(a, b) < tol, f"{name}: {_rel(a, b):.2e} from the emulation"
        assert _rel(a, e) < 0.06, name


@pytest.mark.gpu
def test_grouped_moe_equals_loop_on_gpu():
    from test_train_moe_grouped import _moe, _run as run_moe
    moe = _moe().cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, moe.dim, device="cuda", generator=g)
    grad = torch.randn(300, moe.dim, device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_l, dx_l, gr_l = run_moe(moe, "loop", x, grad)
        out_g, dx_g, gr_g = run_moe(moe, "grouped", x, grad)
    assert _rel(out_g, out_l) < 1e-2 and _rel(dx_g, dx_l) < 2e-2
    name = "experts.2.up_proj.weight"
    assert gr_l[name].abs().sum() > 0 and _rel(gr_g[name], gr_l[name]) < 2e-2


@pytest.mark.gpu
def test_sdpa_attention_equals_mla_on_gpu():
    from test_train_speed_paths import _attention_pair
    out, ref = _attention_pair(device="cuda", dtype=torch.bfloat16, seq=256)
    assert _rel(out, ref) < 2e-2


def _fake_scaled_mm(a, b, scale_a, recipe_a, scale_b, recipe_b, output_dtype=torch.bfloat16, **_):
    """cuBLAS block-scaled FP8 as torch documents it: the shape/stride checks of its DeepSeek recipes, then
    the dequantized float32 product (each scale covers 128 elements of the contraction)."""
    from torch.nn.functional import ScalingType
    m, k = a.shape
    n = b.shape[1]
    kb = -(-k // 128)
    assert a.dtype == b.dtype == torch.float8_e4m3fn and a.stride(1) == 1 and b.stride(0) == 1  # A row-, B column-major
    assert recipe_a == ScalingType.BlockWise1x128
    assert scale_a.shape == (m, kb) and scale_a.stride(0) == 1 and (kb == 1 or scale_a.stride(1) == m)
    a_f = a.float() * scale_a.repeat_interleave(128, dim=1)[:, :k]
    if recipe_b == ScalingType.BlockWise128x128:
        l4 = -(-kb // 4) * 4
        assert scale_b.shape == (l4, -(-n // 128)) and scale_b.stride(0) == 1
        assert scale_b.shape[1] == 1 or scale_b.stride(1) == l4
        per = scale_b[:kb].repeat_interleave(128, dim=0)[:k].repeat_interleave(128, dim=1)[:, :n]
    else:
        assert recipe_b == ScalingType.BlockWise1x128
        assert scale_b.shape == (n, kb) and scale_b.stride(0) == 1 and (kb == 1 or scale_b.stride(1) == n)
        per = scale_b.t().repeat_interleave(128, dim=0)[:k]
    return (a_f @ (b.float() * per)).to(output_dtype)


@pytest.mark.parametrize("m,k,n", [(200, 256, 288), (256, 384, 128), (77, 128, 256)])
def test_cublas_path_layouts_on_cpu_against_emulation(monkeypatch, m, k, n):
    """CPU: the cuBLAS path's operand/scale layouts and padding, through a fake `F.scaled_mm` that enforces
    torch's documented recipe contract, equal the emulated GEMMs."""
    import torch.nn.functional as F
    monkeypatch.setattr(F, "scaled_mm", _fake_scaled_mm)
    monkeypatch.setattr(fp8_gemms, "blockwise_supported", lambda device: True)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g)
    x[:, 7] *= 25.0
    w = torch.randn(n, k, generator=g) * 0.05
    dy = torch.randn(m, n, generator=g)
    got = _run(x, w, dy, emulate=False)
    monkeypatch.undo()
    want = _run(x, w, dy, emulate=True)
    for name, a, b in zip(("forward", "dgrad", "wgrad"), got, want):
        assert _rel(a, b) < 1e-6, name


@pytest.mark.gpu
@pytest.mark.parametrize("m,c,dtype,align", [(300, 200, torch.float32, 128), (4096, 1024, torch.bfloat16, 128),
                                             (300, 288, torch.bfloat16, 512)])
def test_triton_quantizers_equal_the_reference_bit_for_bit(m, c, dtype, align):
    import torch.nn.functional as F
    from dsv3.kernels.fp8 import quantize_act_ref, quantize_weight
    from dsv3.train import fp8_quant_triton
    g = torch.Generator(device="cuda").manual_seed(c)
    x = (torch.randn(m, c, device="cuda", generator=g) * 3).to(dtype)
    x[:, 5] *= 40
    x[:, 7] = 0  # an all-zero channel: scale 1
    q, s = fp8_quant_triton.quantize_tokens_t(x, align)
    m_pad = -(-m // align) * align
    # reference on the CPU, where its division is exact (CUDA torch multiplies by a rounded 1/448)
    q_ref, s_ref = quantize_act_ref(F.pad(x.cpu(), (0, 0, 0, m_pad - m)).t())  # [C, M'] 128-token tiles
    assert q.shape == (c, m_pad) and s.shape == (c, m_pad // 128) and s.stride() == (1, c)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s.cpu(), s_ref)
    w = torch.randn(c + 32, m, device="cuda", generator=g) * 0.05  # neither dim a multiple of 128
    w_q, w_qt, w_s = fp8_quant_triton.quantize_weight_t(w, align)
    n_pad, k_pad = -(-(c + 32) // align) * align, m_pad
    wq_ref, ws_ref = quantize_weight(F.pad(w.cpu(), (0, k_pad - m, 0, n_pad - c - 32)))
    assert torch.equal(w_q.cpu().view(torch.uint8), wq_ref.view(torch.uint8)) and torch.equal(w_s.cpu(), ws_ref)
    assert torch.equal(w_qt.cpu().view(torch.uint8), wq_ref.t().contiguous().view(torch.uint8))


def test_wrong_cublas_results_are_refused_and_emulated(monkeypatch):
    """A shape where the library returns a wrong product (here: a fake that drops one block's scale) is caught
    by the first-call check, remembered, and computed by the float32 emulation instead."""
    import torch.nn.functional as F

    def broken(a, b, scale_a, recipe_a, scale_b, recipe_b, output_dtype=torch.bfloat16, **kw):
        out = _fake_scaled_mm(a, b, scale_a, recipe_a, scale_b, recipe_b, output_dtype)
        out[:, :128] = float("nan") if out.shape[1] > 300 else out[:, :128] * 2
        return out

    monkeypatch.setattr(F, "scaled_mm", broken)
    monkeypatch.setattr(fp8_gemms, "blockwise_supported", lambda device: True)
    monkeypatch.setattr(fp8_gemms, "refused", {})
    monkeypatch.setattr(fp8_gemms, "_checked", set())
    g = torch.Generator().manual_seed(3)
    x, w, dy = torch.randn(64, 256, generator=g), torch.randn(640, 256, generator=g) * 0.05, torch.randn(64, 640, generator=g)
    got = _run(x, w, dy, emulate=False)
    assert len(fp8_gemms.refused) == 3  # forward, dgrad and wgrad shapes each refused once
    again = _run(x, w, dy, emulate=False)  # remembered: straight to the emulation
    monkeypatch.undo()
    want = _run(x, w, dy, emulate=True)
    for name, a, b, c in zip(("forward", "dgrad", "wgrad"), got, want, again):
        assert torch.isfinite(a).all() and _rel(a, b) < 1e-6 and torch.equal(a, c), name


def test_wrong_triton_quantizers_are_refused(monkeypatch):
    """CPU: a quantizer kernel whose codes do not dequantize to its input (here: transposed scales) is caught on
    its first call per shape and the PyTorch path is used instead."""
    from dsv3.kernels.fp8 import quantize_act_ref
    from dsv3.train import fp8_quant_triton

    def bad_tokens(x, align=128):
        q, s = quantize_act_ref(torch.nn.functional.pad(x, (0, 0, 0, -x.shape[0] % align)).t())
        return q, s.flip(0)  # right codes, scales of the wrong tiles

    monkeypatch.setattr(fp8_quant_triton, "quantize_tokens_t", bad_tokens)
    monkeypatch.setattr(fp8_gemms, "_use_triton", lambda t: True)
    monkeypatch.setattr(fp8_gemms, "refused", {})
    monkeypatch.setattr(fp8_gemms, "_checked", set())
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 2, 64)
    q, s = fp8_gemms.quantize_tokens_t(x)
    q_ref, s_ref = quantize_act_ref(torch.nn.functional.pad(x, (0, 0, 0, -256 % fp8_gemms.ALIGN_K)).t())
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    assert [k[0] for k in fp8_gemms.refused] == ["tokens"]
