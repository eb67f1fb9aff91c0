"""Tests of dsv3.train.fp8_grouped: the FP8 grouped GEMM of the routed experts (forward, dgrad, wgrad).

Oracles: an independent hand computation (Python loops over experts and tiles, each tile's scale in closed
form, codes picked as the nearest entry of the table of all finite e4m3 values, float64 matmuls) for the
PyTorch reference; float32 autograd for its gradients (within e4m3 rounding); the reference for the Triton
kernels, whose quantized codes must match it bit for bit. The Triton tests run on a GPU (`gpu` marker) or, on
CPU, under `TRITON_INTERPRET=1` with triton installed (`TRITON_INTERPRET=1 pytest tests/test_train_fp8_grouped.py`).
"""

from __future__ import annotations

import pytest
import torch

from dsv3.config import ModelArgs
from dsv3.model.moe import MoE
from dsv3.train import fp8_grouped as G
from dsv3.kernels import fp8_grouped_triton as K
from test_train_shared import TINY_MODEL

E4M3 = torch.float8_e4m3fn
_codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(E4M3).to(torch.float64)
E4M3_VALUES = torch.unique(_codes[torch.isfinite(_codes)])  # sorted, both signs, zero once


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)


# ---- the hand computation ----

def _hand_tile(v: torch.Tensor) -> torch.Tensor:
    """One tile (any shape, float64): scale = amax / 448 (1 if all zero), nearest e4m3 code, times scale."""
    amax = v.abs().max().item()
    s = amax / 448.0 if amax > 0 else 1.0
    idx = ((v / s).reshape(-1, 1) - E4M3_VALUES[None, :]).abs().argmin(dim=1)
    return E4M3_VALUES[idx].view(v.shape) * s


def _hand_rows(x: torch.Tensor, block: int) -> torch.Tensor:
    """1 x block tiles along the columns of x [R, C]."""
    out = torch.empty_like(x)
    for r in range(x.shape[0]):
        for c0 in range(0, x.shape[1], block):
            out[r, c0:c0 + block] = _hand_tile(x[r, c0:c0 + block])
    return out


def _hand(x, w, dy, counts, block):
    """Forward, dgrad and wgrad of the FP8 recipe by loops (float64)."""
    x, w, dy = x.double(), w.double(), dy.double()
    y = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64)
    dx = torch.zeros_like(x)
    dw = torch.zeros_like(w)
    xq, dyq = _hand_rows(x, block), _hand_rows(dy, block)
    start = 0
    for e, count in enumerate(counts):
        end = start + count
        wq = torch.empty_like(w[e])
        for n0 in range(0, w.shape[1], block):
            for k0 in range(0, w.shape[2], block):
                wq[n0:n0 + block, k0:k0 + block] = _hand_tile(w[e, n0:n0 + block, k0:k0 + block])
        y[start:end] = xq[start:end] @ wq.T
        dx[start:end] = dyq[start:end] @ wq
        # wgrad: block x 1 tiles (block rows of one channel), counted from the expert's first row
        dyt = torch.zeros(count, dy.shape[1], dtype=torch.float64)
        xt = torch.zeros(count, x.shape[1], dtype=torch.float64)
        for r0 in range(start, end, block):
            r1 = min(end, r0 + block)
            for c in range(dy.shape[1]):
                dyt[r0 - start:r1 - start, c] = _hand_tile(dy[r0:r1, c])
            for c in range(x.shape[1]):
                xt[r0 - start:r1 - start, c] = _hand_tile(x[r0:r1, c])
        dw[e] = dyt.T @ xt
        start = end
    return y, dx, dw


def _case(counts, k, n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    m = sum(counts)
    # magnitudes vary across columns and rows so tile scales differ from tile to tile
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 1, k)[None, :] * (1 + torch.rand(m, 1, generator=g))
    w = torch.randn(len(counts), n, k, generator=g) * torch.logspace(0, -2, n)[None, :, None]
    dy = torch.randn(m, n, generator=g) * torch.logspace(-1, 1, n)[None, :]
    return x.to(dtype), w, dy.to(dtype), _offsets(counts)


@pytest.mark.parametrize("counts,k,n,block", [
    ([5, 0, 6, 1], 6, 10, 4),  # an empty expert, a 1-row expert, partial tiles on every axis
    ([9, 3], 8, 4, 4),  # whole tiles along K and N, 9 rows: tiles of 4, 4, 1 from the expert's first row
    ([130, 7], 130, 3, 128),  # the real tile: 2 row tiles in expert 0, a 2-wide K tail
])
def test_reference_matches_hand_computation(counts, k, n, block):
    x, w, dy, offsets = _case(counts, k, n, seed=sum(counts) + k)
    x.requires_grad_()
    w.requires_grad_()
    y = G.fp8_grouped_mm_ref(x, w, offsets, block=block)
    y.backward(dy)
    y_h, dx_h, dw_h = _hand(x.detach(), w.detach(), dy, counts, block)
    assert y.dtype == torch.float32 and y.shape == (sum(counts), n)
    torch.testing.assert_close(y.double(), y_h, rtol=1e-5, atol=1e-5 * y_h.abs().max().item())
    torch.testing.assert_close(x.grad.double(), dx_h, rtol=1e-5, atol=1e-5 * dx_h.abs().max().item())
    torch.testing.assert_close(w.grad.double(), dw_h, rtol=1e-5, atol=1e-5 * dw_h.abs().max().item())
    if 0 in counts:
        assert w.grad[counts.index(0)].abs().sum() == 0


def test_reference_gradients_track_float32_autograd():
    counts = [300, 0, 1, 211]
    x, w, dy, offsets = _case(counts, 256, 192, seed=5)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    G.fp8_grouped_mm_ref(xr, wr, offsets).backward(dy)
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    bounds = offsets.tolist()
    y = torch.cat([xf[a:b] @ wf[e].T for e, (a, b) in enumerate(zip([0] + bounds[:-1], bounds))])
    y.backward(dy)
    for got, want in ((xr.grad, xf.grad), (wr.grad, wf.grad)):
        err = _rel(got, want)
        # e4m3 keeps 3 mantissa bits (relative rounding <= 1/16 per operand): a few percent normwise, and not 0
        assert 1e-3 < err < 0.06, err


def test_reference_rejects_bad_inputs():
    x, w, _, _ = _case([3, 2], 8, 4, seed=0)
    with pytest.raises(ValueError, match="end at the row count 5"):
        G.fp8_grouped_mm_ref(x, w, _offsets([3, 1]))
    with pytest.raises(ValueError, match="non-decreasing"):
        G.fp8_grouped_mm_ref(x, w, torch.tensor([6, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        G.fp8_grouped_mm(x, w, _offsets([3, 2]).long())
    with pytest.raises(ValueError, match="K=8"):
        G.fp8_grouped_mm(x[:, :6], w, _offsets([3, 2]))


# ---- Triton kernels vs the reference (H200; or `triton`: on CPU under the TRITON_INTERPRET=1 that tests/conftest.py
# sets without a GPU) ----

@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("interpret", marks=pytest.mark.triton)])
def device(request):
    if request.param == "cuda":
        if not (torch.cuda.is_available() and K.available()):
            pytest.skip("needs Triton and a CUDA GPU")
        return "cuda"
    if not (K._INTERPRET and K.triton is not None):
        pytest.skip("needs TRITON_INTERPRET=1 and triton installed")
    return "cpu"


def _tiles(counts: list[int]) -> list[tuple[int, int]]:
    """(first row, end row) of each 128-row tile, expert by expert: the slots of quant_act's column tiles."""
    out, start = [], 0
    for count in counts:
        out += [(r0, min(start + count, r0 + 128)) for r0 in range(start, start + count, 128)]
        start += count
    return out


CASES = [
    ([0, 1, 200, 37, 0, 130], 192, 160),  # empty experts, a 1-row expert, rows/K/N not multiples of 128
    ([64, 64], 256, 128),  # whole tiles everywhere
    ([129, 0, 0, 3], 128, 256),  # one long expert (a 1-row last tile), trailing small one, BLOCK_N > 128 blocks
]


@pytest.mark.parametrize("counts,k,n", CASES)
def test_triton_kernels_match_reference(device, counts, k, n):
    x, w, dy, offsets = _case(counts, k, n, seed=len(counts) * k + n)
    m = sum(counts)
    xd, wd, dyd, od = (t.to(device) for t in (x, w, dy, offsets))
    # quantization: codes x scales equal the reference's fake-quantized values exactly
    q, s, qt, st = K.quant_act(xd, od)
    _, _, qt3, st3 = K.quant_act(xd, od, pack3d=not K.QUANT_PACK3D)  # the other column-tile load
    used = len(_tiles(counts))  # tile slots past the experts' last tile are never written
    assert torch.equal(qt3[:, :used * 128].view(torch.uint8), qt[:, :used * 128].view(torch.uint8))
    assert torch.equal(st3[:used], st[:used])
    assert torch.equal((q.float() * s.t().repeat_interleave(128, 1)[:, :k]).cpu(), G.fake_quant_rows(x))
    for t, (a, b) in enumerate(_tiles(counts)):
        got = qt[:, t * 128:t * 128 + b - a].float() * st[t][:, None]
        assert torch.equal(got.cpu(), G.fake_quant_rows(x[a:b].T)), (t, a, b)
        assert torch.all(qt[:, t * 128 + b - a:(t + 1) * 128].float() == 0)  # padding rows are zero codes
    wq, wqt, ws = K.quant_weight(wd)
    for e in range(len(counts)):
        full = ws[e].repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
        assert torch.equal((wq[e].float() * full).cpu(), G.fake_quant_blocks(w[e]))
        assert torch.equal(wqt[e].view(torch.uint8), wq[e].T.contiguous().view(torch.uint8))
    # the three GEMMs, float32 out, against the reference's forward and gradients
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = G.fp8_grouped_mm_ref(xr, wr, offsets)
    y_ref.backward(dy)
    dq, ds, dqt, dst = K.quant_act(dyd, od)
    variants = [("ptr", None, None), ("tma", None, None),  # pointer loads, TMA tile loads
                ("tma", {"BLOCK_M": 64, "BLOCK_N": 128}, {"BLOCK_N": 64, "BLOCK_K": 128})]
    if counts == CASES[0][0]:  # explicit configs (the benchmark's), BLOCK_N above one scale block
        variants += [("tma", {"BLOCK_M": 64, "BLOCK_N": 256}, {"BLOCK_N": 128, "BLOCK_K": 256}),
                     ("ptr", {"BLOCK_M": 64, "BLOCK_N": 256}, {"BLOCK_N": 256, "BLOCK_K": 128})]
    if device == "cpu":  # interpreted, each variant's three GEMMs take seconds: each case runs one of them
        variants = [variants[{0: 3, 1: 1, 2: 2}[CASES.index((counts, k, n))]]]
    for variant, cfg, wcfg in variants:
        y = K.grouped_gemm(q, s, wq, ws, od, torch.float32, variant=variant, config=cfg)
        dx = K.grouped_gemm(dq, ds, wqt, ws, od, torch.float32, transpose_b_scales=True, variant=variant, config=cfg)
        dw = K.grouped_wgrad(dqt, dst, qt, st, od, m, variant=variant, config=wcfg)
        # the interpreter sums in float32 like the reference; FP8 tensor cores accumulate 128-long blocks in
        # reduced precision (why the report promotes every 128 elements): normwise 1e-3 there
        tol = 1e-5 if device == "cpu" else 1e-3
        for got, want in ((y, y_ref), (dx, xr.grad), (dw, wr.grad)):
            assert _rel(got.cpu(), want) < tol, (variant, cfg)
        for e in [i for i, c in enumerate(counts) if c == 0]:
            assert torch.all(dw[e] == 0)


@pytest.mark.parametrize("n", [260, 130])
def test_quant_weight_transposed_codes(device, n):
    """The transposed weight codes equal the codes transposed, from the kernel's packed words (N % 4 == 0) or
    the copy (other N), partial blocks at both edges."""
    w = torch.randn(2, n, 200, generator=torch.Generator().manual_seed(n)).to(device)
    q, qt, s = K.quant_weight(w)
    assert torch.equal(qt.view(torch.uint8), q.transpose(1, 2).contiguous().view(torch.uint8))
    for e in range(2):
        full = s[e].repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :200]
        assert torch.equal((q[e].float() * full).cpu(), G.fake_quant_blocks(w[e].cpu()))


def test_triton_autograd_bf16_matches_reference(device):
    counts = [3, 0, 150, 1, 90]
    x, w, dy, offsets = _case(counts, 256, 128, seed=9, dtype=torch.bfloat16)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = G.fp8_grouped_mm_ref(xr, wr, offsets)
    y_ref.backward(dy)
    xd, wd = x.to(device).requires_grad_(), w.to(device).requires_grad_()
    with torch.autocast(xd.device.type, dtype=torch.bfloat16):
        y = G.fp8_grouped_mm(xd, wd, offsets.to(device))
    y.backward(dy.to(device))
    assert y.dtype == torch.bfloat16 and xd.grad.dtype == torch.bfloat16 and wd.grad.dtype == torch.float32
    assert _rel(y.cpu(), y_ref) < 1e-2
    assert _rel(xd.grad.cpu(), xr.grad) < 1e-2
    assert _rel(wd.grad.cpu(), wr.grad) < 1e-3  # fp32 out: only the accumulation order differs
    assert torch.all(wd.grad[1] == 0)


@pytest.mark.gpu
def test_triton_large_uneven_routing_cuda():
    if not (torch.cuda.is_available() and K.available()):
        pytest.skip("needs Triton and a CUDA GPU")
    counts = [0, 1, 2000, 517, 3, 0, 1400, 255]
    x, w, dy, offsets = _case(counts, 512, 384, seed=4, dtype=torch.bfloat16)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    G.fp8_grouped_mm_ref(xr, wr, offsets, out_dtype=torch.float32).backward(dy)
    xd, wd = x.cuda().requires_grad_(), w.cuda().requires_grad_()
    y = G.fp8_grouped_mm(xd, wd, offsets.cuda())
    y.backward(dy.cuda())
    with torch.no_grad():
        y_ref = G.fp8_grouped_mm_ref(x, w, offsets, out_dtype=torch.float32)
    assert _rel(y.cpu(), y_ref) < 1e-2 and _rel(xd.grad.cpu(), xr.grad) < 1e-2 and _rel(wd.grad.cpu(), wr.grad) < 1e-3


def test_cublas_backend_matches_reference(device):
    """The per-expert cuBLAS backend (on CPU: its expert-blocked quantization interpreted, each expert's product
    emulated in float32) against the reference: empty experts, a 1-row expert, experts of several 512-row
    blocks, so the padded blocks overflow into the next experts' rows and the token contractions are padded."""
    counts = [0, 1, 700, 37, 0, 130]
    x, w, dy, offsets = _case(counts, 512, 512, seed=21)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = G.fp8_grouped_mm_ref(xr, wr, offsets, out_dtype=torch.float32)
    y_ref.backward(dy)
    xd, wd = x.to(device).requires_grad_(), w.to(device).requires_grad_()
    if device == "cuda":
        from dsv3.kernels.fp8_cublas import blockwise_supported
        if not blockwise_supported(xd.device):
            pytest.skip("cuBLAS has no block-scaled FP8 recipes on this GPU")
    y = G.fp8_grouped_mm(xd, wd, offsets.to(device), out_dtype=torch.float32, impl="cublas")
    y.backward(dy.to(device))
    tol = 1e-5 if device == "cpu" else 1e-3
    assert y.shape == y_ref.shape
    for got, want in ((y, y_ref), (xd.grad, xr.grad), (wd.grad, wr.grad)):
        assert _rel(got.cpu(), want) < tol
    assert torch.all(wd.grad[0] == 0) and torch.all(wd.grad[4] == 0)


@pytest.mark.parametrize("impl", ["reference", "triton", "cublas"])
def test_backend_choice(monkeypatch, impl):
    """`backend` picks cuBLAS where it applies (Hopper, N and K multiples of 512), else Triton, else the
    reference; `fp8_grouped_mm` runs the one asked for and refuses unknown names."""
    from dsv3.kernels import fp8_grouped_cublas as C
    monkeypatch.setattr(C, "applies", lambda x, n, k: impl == "cublas")
    monkeypatch.setattr(G, "triton_applies", lambda x: impl != "reference")
    x, w = torch.zeros(4, 512), torch.zeros(2, 512, 512)
    assert G.backend(x, w) == impl
    with pytest.raises(ValueError, match="impl must be one of"):
        G.fp8_grouped_mm(x, w, torch.tensor([2, 4], dtype=torch.int32), impl="fast")


# ---- FP8 grouped experts in MoE.routed_grouped ----

def test_fp8_grouped_experts_route_the_grouped_moe_through_fp8(monkeypatch):
    # the reference on a CPU, also under the TRITON_INTERPRET=1 that tests/conftest.py sets without a GPU (the
    # interpreted kernels take 15 s here; the `triton` tests above compare them with the reference)
    monkeypatch.setattr(G, "triton_applies", lambda x: False)
    torch.manual_seed(0)
    args = ModelArgs(**{**TINY_MODEL, "vocab_size": 64, "dtype": "float32"})
    moe = MoE(args, dtype=torch.float32).train()
    with torch.no_grad():  # the module leaves its weights uninitialised
        for p in moe.parameters():
            p.normal_(0.0, 0.2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, moe.dim, generator=g)
    grad = torch.randn(40, moe.dim, generator=g)

    def run():
        moe.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        weights, indices = moe.gate(xi)
        out = moe.routed_grouped(xi, weights, indices)
        out.backward(grad)
        return out.detach(), xi.grad, moe.experts[0].up_proj.weight.grad.clone()

    out0, dx0, dw0 = run()
    moe.set_experts_impl(G.FP8GroupedExperts())
    calls = []

    class Counting(G.FP8GroupedExperts):
        def grouped_mm(self, a, w, offsets):
            calls.append((w.dtype, tuple(w.shape)))
            return super().grouped_mm(a, w, offsets)

    moe.set_experts_impl(Counting())
    out1, dx1, dw1 = run()
    e, i, d = args.n_routed_experts, args.moe_inter_dim, args.dim
    assert calls == [(torch.float32, (e, 2 * i, d)), (torch.float32, (e, d, i))]  # master weights, both GEMMs
    assert dw0.abs().sum() > 0
    for got, want in ((out1, out0), (dx1, dx0), (dw1, dw0)):
        assert 1e-3 < _rel(got, want) < 0.1  # quantized (not equal), within e4m3 rounding
