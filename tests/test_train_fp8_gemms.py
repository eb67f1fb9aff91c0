"""The CUDA FP8 training GEMMs (cuBLAS block-scaled, `dsv3.train.fp8_gemms`) against the emulated oracle of
`fp8_linear` (e4m3 codes dequantized, float32 matmuls): forward, dgrad and wgrad, for shapes that are and
are not multiples of 128; plus the sync-free grouped MoE and the SDPA attention on the GPU against their
reference paths. GPU-only (`gpu` marker)."""

import pytest
import torch

from dsv3.train import fp8_gemms
from dsv3.train.fp8_linear import FP8LinearFunction

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _run(x, w, dy, emulate):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = FP8LinearFunction.apply(x, w, emulate)
    y.backward(dy.to(y.dtype))
    return y.detach().float(), x.grad.float(), w.grad.float()


@pytest.mark.parametrize("m,k,n", [(512, 1024, 768), (200, 256, 288), (4096, 512, 2048)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_cublas_gemms_equal_emulation(m, k, n, x_dtype):
    assert fp8_gemms.blockwise_supported(torch.device("cuda")), "cuBLAS block-scaled FP8 is not available"
    g = torch.Generator(device="cuda").manual_seed(m + n)
    x = torch.randn(m, k, device="cuda", generator=g).to(x_dtype)
    x[:, 3] *= 30.0  # an outlier channel
    w = torch.randn(n, k, device="cuda", generator=g) * 0.05
    dy = torch.randn(m, n, device="cuda", generator=g)
    got = _run(x, w, dy.to(x_dtype), emulate=False)
    want = _run(x, w, dy.to(x_dtype), emulate=True)
    exact = (x.float() @ w.T, dy.to(x_dtype).float() @ w, dy.to(x_dtype).float().T @ x.float())
    for name, a, b, e in zip(("forward", "dgrad", "wgrad"), got, want, exact):
        assert torch.isfinite(a).all(), name
        tol = 1e-5 if x_dtype == torch.float32 and name == "wgrad" else 8e-3  # bf16 outputs round
        assert _rel(a, b) < tol, f"{name}: {_rel(a, b):.2e} from the emulation"
        assert _rel(a, e) < 0.06, name


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


def test_sdpa_attention_equals_mla_on_gpu():
    from test_train_speed_paths import _attention_pair
    out, ref = _attention_pair(device="cuda", dtype=torch.bfloat16, seq=256)
    assert _rel(out, ref) < 2e-2
