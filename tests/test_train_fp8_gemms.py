"""The CUDA FP8 training GEMMs (cuBLAS block-scaled, `dsv3.train.fp8_gemms`) against the emulated oracle of
`fp8_linear` (e4m3 codes dequantized, float32 matmuls): forward, dgrad and wgrad, for shapes that are and
are not multiples of 128; plus the sync-free grouped MoE and the SDPA attention on the GPU against their
reference paths (GPU-only, `gpu` marker); on CPU, the cuBLAS path's layouts through a fake `F.scaled_mm`
that enforces torch's documented contract."""

import pytest
import torch

from dsv3.kernels import fp8_cublas
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
    assert fp8_gemms.blockwise_supported(torch.device("cuda")), f"cuBLAS block-scaled FP8: {fp8_cublas.probe_errors}"
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
    assert m % 16 == 0 and n % 16 == 0, f"{m}x{n}: cuBLAS refuses row counts that are not multiples of 16"
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


@pytest.mark.parametrize("m,k,n", [(200, 256, 288), (256, 384, 128), (77, 128, 256), (50, 1000, 200)])
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
    from dsv3.kernels import fp8_quant_triton
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


def test_a_failing_cublas_gemm_raises(monkeypatch):
    """No silent fallback: when the library refuses a product, the error reaches the caller (one decision per GPU,
    `blockwise_supported`; shapes made safe by padding; nothing checks results in the hot path)."""
    import torch.nn.functional as F

    def refuse(*args, **kwargs):
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")

    monkeypatch.setattr(F, "scaled_mm", refuse)
    monkeypatch.setattr(fp8_gemms, "blockwise_supported", lambda device: True)
    g = torch.Generator().manual_seed(3)
    x, w, dy = torch.randn(64, 256, generator=g), torch.randn(640, 256, generator=g) * 0.05, torch.randn(64, 640, generator=g)
    with pytest.raises(RuntimeError, match="CUBLAS_STATUS_NOT_SUPPORTED"):
        _run(x, w, dy, emulate=False)


def _hard_operand(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Values over twelve decades (per column), an outlier column, an all-zero row and column, and one row of
    exact e4m3 midpoints (1.0625, 17, ...) with max-abs 448, i.e. scale 1: ties must round to even."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-6, 6, cols)[torch.randperm(cols, generator=g)]
    x[:, cols // 2] *= 1e3
    x[rows // 3] = 0
    x[:, 1] = 0
    ties = torch.tensor([1.0625, -17.0, 3.25 + 0.125, 0.5 + 1 / 32, 448.0, -0.0])
    x[2, : min(cols, 6)] = ties[: min(cols, 6)]
    x[2, 6:] = 0
    return x.to(dtype)


def _quantize_all(x, w, rows, cols, tok_rows, w_rows, w_cols):
    return (*fp8_gemms.quantize_rows_torch(x, rows, cols), *fp8_gemms.quantize_tokens_t_torch(x, tok_rows),
            *fp8_gemms.quantize_blocks_torch(w, w_rows, w_cols), fp8_gemms.quantize_weight_padded(w, 512)[1])


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("m,c,dtype", [(77, 200, torch.float32), (130, 300, torch.bfloat16), (3, 129, torch.float32)])
def test_torch_quantizers_equal_the_reference_bit_for_bit(m, c, dtype):
    """The torch-op quantizers (what inductor fuses) give exactly `quantize_act` / `quantize_weight`'s codes and
    scales, eagerly and compiled by inductor (CPU), on shapes that are not multiples of 128."""
    import torch.nn.functional as F
    from dsv3.kernels.fp8 import quantize_act, quantize_weight
    x = _hard_operand(m, c, dtype, seed=m)
    w = _hard_operand(c + 40, m, torch.float32, seed=c) * 0.01  # [N, K], neither a multiple of 128
    rows, cols = m + 13, -(-c // 128) * 128 + 128  # extra zero rows / tiles too
    tok_rows, w_rows, w_cols = -(-m // 512) * 512, -(-(c + 40) // 128) * 128, -(-m // 512) * 512
    xq_ref, xs_ref = quantize_act(F.pad(x, (0, cols - c, 0, rows - m)))  # [rows, cols], [rows, cols/128]
    tq_ref, ts_ref = quantize_act(F.pad(x, (0, 0, 0, tok_rows - m)).t())  # [C, tok_rows]: 128 tokens per tile
    wq_ref, ws_ref = quantize_weight(F.pad(w, (0, w_cols - m, 0, w_rows - c - 40)))
    wt_ref = quantize_weight(F.pad(w, (0, -m % 512, 0, -(c + 40) % 512)))[0].t()  # codes of Wᵀ (dgrad operand)
    want = (xq_ref, xs_ref.t(), tq_ref, ts_ref.t(), wq_ref, ws_ref, wt_ref)
    eager = _quantize_all(x, w, rows, cols, tok_rows, w_rows, w_cols)
    compiled = torch.compile(_quantize_all, fullgraph=True, dynamic=False)(x, w, rows, cols, tok_rows, w_rows, w_cols)
    names = ("row codes", "row scales", "token codes", "token scales", "weight codes", "weight scales",
             "transposed weight codes")
    for name, e, c_, r in zip(names, eager, compiled, want):
        assert e.shape == r.shape and e.is_contiguous(), name
        assert torch.equal(_bits(e), _bits(r)), f"eager {name}"
        assert torch.equal(_bits(c_), _bits(r)), f"compiled {name}"
    # the unpadded weight codes are the unpadded reference's
    wq0, ws0 = quantize_weight(w)
    assert torch.equal(_bits(eager[4][: c + 40, :m]), _bits(wq0)) and torch.equal(eager[5][: ws0.shape[0], : ws0.shape[1]], ws0)


def test_float64_product_is_the_float32_quotient():
    """The quantizers' division: f32(f64(x) * (1 / f64(s))) equals IEEE float32 x / s (checked on a million
    random float32 pairs spanning 2^±60, and on bf16-valued numerators)."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 20
    x = (torch.rand(n, generator=g) * 2 - 1) * torch.exp2(torch.randint(-60, 60, (n,), generator=g).float())
    s = (torch.rand(n, generator=g) + 0.5) * torch.exp2(torch.randint(-60, 60, (n,), generator=g).float())
    for num in (x, x.bfloat16().float()):
        got = (num.double() * s.double().reciprocal()).float()
        assert torch.equal(got, num / s)
    amax = x.abs()
    assert torch.equal((amax.double() / 448.0).float(), amax / 448.0)


@pytest.mark.gpu
def test_compiled_quantizers_equal_the_reference_on_gpu():
    """Inductor's Triton code for the torch-op quantizers (float64 division, see fp8_gemms) gives the CPU
    reference's codes and scales bit for bit."""
    import torch.nn.functional as F
    from dsv3.kernels.fp8 import quantize_act_ref, quantize_weight
    m, c = 1000, 700
    x = _hard_operand(m, c, torch.bfloat16, seed=1)
    w = _hard_operand(c, m, torch.float32, seed=2) * 0.01
    args = (m + 8, 768, 1024, 768, 1024)
    got = torch.compile(_quantize_all, fullgraph=True, dynamic=False)(x.cuda(), w.cuda(), *args)
    xq, xs = quantize_act_ref(F.pad(x, (0, 768 - c, 0, 8)))
    tq, ts = quantize_act_ref(F.pad(x, (0, 0, 0, 1024 - m)).t())
    wq, ws = quantize_weight(F.pad(w, (0, 1024 - m, 0, 768 - c)))
    wt = quantize_weight(F.pad(w, (0, 1024 - m, 0, 1024 - c)))[0].t()
    names = ("row codes", "row scales", "token codes", "token scales", "weight codes", "weight scales",
             "transposed weight codes")
    for name, a, r in zip(names, got, (xq, xs.t(), tq, ts.t(), wq, ws, wt)):
        assert torch.equal(_bits(a.cpu()), _bits(r)), name


@pytest.mark.gpu
def test_compiled_fp8_linear_equals_eager_on_gpu():
    """Two FP8 linears compiled whole by inductor (fullgraph: no graph break; torch-op quantizers, the GEMM a
    custom op) give the eager result (Triton quantizers, same cuBLAS GEMMs) and its gradients."""
    from dsv3.train.fp8_linear import FP8TrainingLinear
    torch.manual_seed(0)
    net = torch.nn.Sequential(FP8TrainingLinear(1000, 768, emulate=False), FP8TrainingLinear(768, 1000, emulate=False)).cuda()
    x = torch.randn(4, 333, 1000, device="cuda")

    def run(fn):
        net.zero_grad()
        xx = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(xx)
        y.float().square().sum().backward()
        return [y.detach(), xx.grad, *(p.grad.clone() for p in net.parameters())]

    eager = run(net)
    compiled = run(torch.compile(net, fullgraph=True))
    for name, a, b in zip(("y", "dx", "dW1", "dW2"), compiled, eager):
        print(name, "bitwise equal" if torch.equal(a, b) else f"relative difference {_rel(a, b):.2e}")
        assert _rel(a, b) < 1e-5, name
