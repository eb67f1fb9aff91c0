"""MLA decode attention and the fused step ops: references against the model (CPU), Triton against references (GPU)."""

import pytest
import torch

from dsv3.config import ModelArgs
from dsv3.kernels import mla_decode as md
from dsv3.model.layers import RMSNorm
from dsv3.model.mla import MLA
from dsv3.model.rope import Rotary, apply_rope


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _paged(latents: torch.Tensor, page: int, num_blocks: int, seed: int = 0):
    """Contiguous latents `[B, S, W]` -> (paged cache `[num_blocks, page, W]`, block tables `[B, nb]` int32)."""
    b, s, w = latents.shape
    nb = -(-s // page)
    g = torch.Generator().manual_seed(seed)
    tables = torch.randperm(num_blocks, generator=g)[: b * nb].view(b, nb).int()
    cache = torch.randn(num_blocks, page, w, generator=g, dtype=latents.dtype)  # garbage outside the sequences
    flat = cache.view(-1, w)
    pos = torch.arange(s)
    for i in range(b):
        flat[tables[i, pos // page].long() * page + pos % page] = latents[i]
    return cache, tables


# ---- CPU: references against the model ------------------------------------------------------------
def test_decode_ref_equals_absorbed_attention():
    args = ModelArgs.from_preset("tiny")
    torch.manual_seed(0)
    mla = MLA(args).eval()
    with torch.no_grad():
        for p in mla.parameters():
            p.normal_(0, 0.2)
    b, s = 3, 21
    x_ctx = torch.randn(b, s, args.dim)
    rot = Rotary(args)
    cos, sin = rot(torch.arange(s).expand(b, -1))
    with torch.no_grad():
        kv, k_pe = mla.latents(x_ctx, cos, sin)  # [B, S, C], [B, S, R]
        q_nope, q_pe = mla.queries(x_ctx[:, -1:], cos[:, -1:], sin[:, -1:])  # [B, 1, H, .]
        expected = mla.attend(q_nope, q_pe, kv, k_pe, mask=None)  # [B, 1, D]
        cache, tables = _paged(torch.cat([kv, k_pe], -1), page=4, num_blocks=30)
        q_lat = mla.absorb_query(q_nope[:, 0])  # [B, H, C]
        o_lat = md.mla_decode(q_lat, q_pe[:, 0], cache, tables, torch.full((b,), s, dtype=torch.int32),
                              mla.softmax_scale)
        out = mla.latent_output(o_lat)
    torch.testing.assert_close(out, expected[:, 0], atol=1e-5, rtol=1e-4)


def test_decode_ref_respects_lengths():
    torch.manual_seed(0)
    lat = torch.randn(2, 12, 40)
    cache, tables = _paged(lat, page=4, num_blocks=10)
    q, qp = torch.randn(2, 3, 32), torch.randn(2, 3, 8)
    short = md.mla_decode(q, qp, cache, tables, torch.tensor([5, 0], dtype=torch.int32), 0.2)
    cache2, tables2 = _paged(lat[:, :5], page=4, num_blocks=10, seed=3)
    expected = md.mla_decode(q, qp, cache2, tables2, torch.tensor([5, 5], dtype=torch.int32), 0.2)
    torch.testing.assert_close(short[0], expected[0])
    assert torch.equal(short[1], torch.zeros_like(short[1]))  # empty sequence: zeros, not NaN


def test_rms_norm_and_rope_refs_equal_model():
    torch.manual_seed(0)
    norm = RMSNorm(48)
    with torch.no_grad():
        norm.weight.normal_()
    x, r = torch.randn(5, 48), torch.randn(5, 48)
    y, s = md.rms_norm(x, norm.weight, norm.eps, residual=r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, norm(x + r))
    torch.testing.assert_close(md.rms_norm(x, norm.weight, norm.eps)[0], norm(x))
    for interleave in (True, False):
        q = torch.randn(5, 3, 16)
        cos, sin = torch.randn(5, 8), torch.randn(5, 8)
        expected = apply_rope(q, cos[:, None], sin[:, None], interleave)
        md.rope_(q, cos, sin, interleave)
        torch.testing.assert_close(q, expected)


def test_store_latents_ref_equals_mla_latents():
    args = ModelArgs.from_preset("tiny")
    torch.manual_seed(0)
    mla = MLA(args).eval()
    with torch.no_grad():
        for p in mla.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(6, args.dim)
    cos, sin = Rotary(args)(torch.arange(6) * 3)
    with torch.no_grad():
        kv, k_pe = mla.latents(x, cos, sin)
        cache = torch.zeros(10, args.kv_lora_rank + args.qk_rope_head_dim)
        slots = torch.tensor([4, -1, 0, 9, 2, 3])
        out = md.store_latents(mla.kv_a_proj_with_mqa(x), mla.kv_a_layernorm.weight, mla.kv_a_layernorm.eps, cos, sin,
                               True, cache, slots)
    torch.testing.assert_close(out, torch.cat([kv, k_pe], -1))
    torch.testing.assert_close(cache[slots[slots >= 0]], out[slots >= 0])
    assert cache[[1, 5, 6, 7, 8]].abs().sum() == 0  # the skipped slot (-1) wrote nothing


def test_errors_name_the_problem():
    q, qp = torch.randn(2, 3, 32), torch.randn(2, 3, 8)
    cache = torch.randn(4, 4, 40)
    tables = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="cache"):
        md.mla_decode(q, qp, torch.randn(4, 4, 41), tables, torch.ones(2, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="seq_lens"):
        md.mla_decode(q, qp, cache, tables, torch.ones(3, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="num_splits"):
        md.mla_decode(q, qp, cache, tables, torch.ones(2, dtype=torch.int32), 1.0, num_splits=3)
    with pytest.raises(ValueError, match="rope_"):
        md.rope_(torch.randn(2, 3, 7), torch.randn(2, 3), torch.randn(2, 3))


# ---- GPU: Triton kernels against the references -----------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [
    dict(h=16, c=512, r=64, page=16, lens=[1, 37, 513, 3000]),
    dict(h=128, c=512, r=64, page=64, lens=[0, 1, 700]),
    dict(h=5, c=32, r=8, page=4, lens=[3, 0, 50]),
], ids=["h16", "h128", "h5"])
@pytest.mark.parametrize("splits", [None, 1, 4])
def test_mla_decode_triton_matches_reference(dtype, tol, shape, splits):
    torch.manual_seed(0)
    b, h, c, r, page = len(shape["lens"]), shape["h"], shape["c"], shape["r"], shape["page"]
    s = max(shape["lens"])
    lat = torch.randn(b, s, c + r, dtype=dtype)
    cache, tables = _paged(lat, page, num_blocks=b * (-(-s // page)) + 3)
    cache, tables = cache.cuda(), tables.cuda()
    q = torch.randn(h, b, c, device="cuda", dtype=dtype).transpose(0, 1)  # strided like the decoder's
    qp = torch.randn(b, h, 3 * r, device="cuda", dtype=dtype)[..., r:2 * r]
    lens = torch.tensor(shape["lens"], dtype=torch.int32, device="cuda")
    out = torch.full((b, h, c), float("nan"), device="cuda", dtype=dtype)
    md.mla_decode(q, qp, cache, tables, lens, 0.1, num_splits=splits, out=out)
    ref = md.mla_decode_ref(q, qp, cache, tables, lens, 0.1)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_ops_triton_match_reference(dtype):
    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(7, 7168, device=dev, dtype=dtype)
    r = torch.randn(7, 7168, device=dev, dtype=dtype)
    w = torch.randn(7168, device=dev, dtype=dtype)
    y, s = md.rms_norm(x, w, 1e-6, residual=r)
    y0, s0 = md.rms_norm_ref(x, w, 1e-6, residual=r)
    assert torch.equal(s, s0)
    assert _rel(y, y0) < (1e-6 if dtype == torch.float32 else 5e-3)
    for interleave in (True, False):
        q = torch.randn(9, 128, 192, device=dev, dtype=dtype)
        cos, sin = torch.randn(9, 32, device=dev), torch.randn(9, 32, device=dev)
        expected = q.clone()
        expected[..., 128:] = md.rope_ref(q[..., 128:], cos[:, None], sin[:, None], interleave)
        md.rope_(q[..., 128:], cos, sin, interleave)
        assert _rel(q, expected) < (1e-6 if dtype == torch.float32 else 5e-3)
        kva = torch.randn(9, 576, device=dev, dtype=dtype)
        wn = torch.randn(512, device=dev, dtype=dtype)
        cache, cache0 = (torch.zeros(40, 576, device=dev, dtype=dtype) for _ in range(2))
        slots = torch.tensor([5, -1, 0, 39, 7, 8, 9, 10, 11], device=dev)
        out = md.store_latents(kva, wn, 1e-6, cos, sin, interleave, cache, slots)
        out0 = md.store_latents_ref(kva, wn, 1e-6, cos, sin, interleave, cache0, slots)
        assert _rel(out, out0) < (1e-6 if dtype == torch.float32 else 5e-3)
        assert _rel(cache, cache0) < (1e-6 if dtype == torch.float32 else 5e-3)
