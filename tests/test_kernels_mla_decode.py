"""MLA decode attention and the fused step ops: references against the model (CPU), Triton against references
(GPU, or CPU under Triton's interpreter)."""

import pytest
import torch

from dsv3.config import ModelArgs
from dsv3.kernels import mla_decode as md
from dsv3.model.attention import causal_meta
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


# ---- CPU: references against the model (the `_ref` functions by name: on a CPU under TRITON_INTERPRET=1 the
# wrappers would run the interpreted kernels, which the `triton` tests below compare with these) -------------
def test_decode_ref_equals_absorbed_attention():
    """The last token of each row through the model's MLA (expanded keys and values, causal SDPA) equals its
    absorbed query attending over the paged latents through `mla_decode_ref`, then `W_uv` and `o_proj`."""
    args = ModelArgs.from_preset("tiny")
    torch.manual_seed(0)
    mla = MLA(args).eval()
    with torch.no_grad():
        for p in mla.parameters():
            p.normal_(0, 0.2)
    b, s = 3, 21
    x = torch.randn(b * s, args.dim)  # flat tokens, rows of s
    cos, sin = Rotary(args)(torch.arange(s).repeat(b))  # [B*S, R/2]
    with torch.no_grad():
        expected = mla(x, cos, sin, causal_meta(b, s)).view(b, s, -1)[:, -1]  # [B, D]
        kv, k_pe = mla.latents(mla.kv_a_proj_with_mqa(x), cos, sin)  # [B*S, C], [B*S, R]
        cache, tables = _paged(torch.cat([kv, k_pe], -1).view(b, s, -1), page=4, num_blocks=30)
        last = torch.arange(b) * s + s - 1
        q_nope, q_pe = mla.queries(x[last], cos[last], sin[last])  # [B, H, .]
        o_lat = md.mla_decode_ref(mla.absorb_query(q_nope), q_pe, cache, tables,
                                  torch.full((b,), s, dtype=torch.int32), mla.softmax_scale)  # [B, H, C]
        out = mla.o_proj(mla.value_heads(o_lat).flatten(1))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_decode_ref_respects_lengths():
    torch.manual_seed(0)
    lat = torch.randn(2, 12, 40)
    cache, tables = _paged(lat, page=4, num_blocks=10)
    q, qp = torch.randn(2, 3, 32), torch.randn(2, 3, 8)
    short = md.mla_decode_ref(q, qp, cache, tables, torch.tensor([5, 0], dtype=torch.int32), 0.2)
    cache2, tables2 = _paged(lat[:, :5], page=4, num_blocks=10, seed=3)
    expected = md.mla_decode_ref(q, qp, cache2, tables2, torch.tensor([5, 5], dtype=torch.int32), 0.2)
    torch.testing.assert_close(short[0], expected[0])
    assert torch.equal(short[1], torch.zeros_like(short[1]))  # empty sequence: zeros, not NaN


def test_rms_norm_and_rope_refs_equal_model():
    torch.manual_seed(0)
    norm = RMSNorm(48)
    with torch.no_grad():
        norm.weight.normal_()
    x, r = torch.randn(5, 48), torch.randn(5, 48)
    y, s = md.rms_norm_ref(x, norm.weight, norm.eps, residual=r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, norm(x + r))
    torch.testing.assert_close(md.rms_norm_ref(x, norm.weight, norm.eps)[0], norm(x))
    for interleave in (True, False):
        q = torch.randn(5, 3, 16)
        cos, sin = torch.randn(5, 8), torch.randn(5, 8)
        expected = apply_rope(q, cos[:, None], sin[:, None], interleave)
        torch.testing.assert_close(md.rope_ref(q, cos[:, None], sin[:, None], interleave), expected)


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
        kv, k_pe = mla.latents(mla.kv_a_proj_with_mqa(x), cos, sin)
        cache = torch.zeros(10, args.kv_lora_rank + args.qk_rope_head_dim)
        slots = torch.tensor([4, -1, 0, 9, 2, 3])
        out = md.store_latents_ref(mla.kv_a_proj_with_mqa(x), mla.kv_a_layernorm.weight, mla.kv_a_layernorm.eps, cos,
                                   sin, True, cache, slots)
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


# ---- Triton kernels against the references (`triton`: on a GPU, or on CPU under Triton's interpreter) ------
# bf16 is `gpu` only: Triton's interpreter has no bf16 arithmetic (a documented limitation): it keeps bf16 as raw
# uint16, so `tl.dot` multiplies the bit patterns and float32 -> bf16 truncates instead of rounding to nearest.
# The large shapes are `gpu` only, for the interpreter's time.
_GPU = pytest.mark.gpu


@pytest.mark.triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), pytest.param(torch.bfloat16, 1e-2, marks=_GPU)])
@pytest.mark.parametrize("shape", [
    pytest.param(dict(h=16, c=512, r=64, page=16, lens=[1, 37, 513, 3000]), marks=_GPU),
    pytest.param(dict(h=128, c=512, r=64, page=64, lens=[0, 1, 700]), marks=_GPU),
    dict(h=5, c=32, r=8, page=4, lens=[3, 0, 50]),
    dict(h=20, c=24, r=8, page=8, lens=[40, 2]),  # two head groups (BH = 16), the second partly masked; C < BC
], ids=["h16", "h128", "h5", "h20"])
@pytest.mark.parametrize("splits", [None, 1, 4])
def test_mla_decode_triton_matches_reference(triton_device, dtype, tol, shape, splits):
    dev = triton_device
    torch.manual_seed(0)
    b, h, c, r, page = len(shape["lens"]), shape["h"], shape["c"], shape["r"], shape["page"]
    s = max(shape["lens"])
    lat = torch.randn(b, s, c + r, dtype=dtype)
    cache, tables = _paged(lat, page, num_blocks=b * (-(-s // page)) + 3)
    cache, tables = cache.to(dev), tables.to(dev)
    q = torch.randn(h, b, c, device=dev, dtype=dtype).transpose(0, 1)  # strided like the decoder's
    qp = torch.randn(b, h, 3 * r, device=dev, dtype=dtype)[..., r:2 * r]
    lens = torch.tensor(shape["lens"], dtype=torch.int32, device=dev)
    out = torch.full((b, h, c), float("nan"), device=dev, dtype=dtype)
    assert md._use_triton(q)  # the wrapper takes the kernel, not its reference
    md.mla_decode(q, qp, cache, tables, lens, 0.1, num_splits=splits, out=out)
    ref = md.mla_decode_ref(q, qp, cache, tables, lens, 0.1)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < tol


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=_GPU)])
def test_step_ops_triton_match_reference(triton_device, dtype):
    """RMSNorm (+ residual), rope in place on a strided slice, and the latent store, at DeepSeek-V3's widths on
    a GPU (7168, 128 heads x 192, 512 + 64) and at small odd ones in the interpreter."""
    dev = triton_device
    big = dev == "cuda"
    d, heads, nope, rope, lat = (7168, 128, 128, 64, 512) if big else (300, 3, 16, 16, 40)
    tol = 1e-6 if dtype == torch.float32 else 5e-3
    torch.manual_seed(0)
    x = torch.randn(7, d, device=dev, dtype=dtype)
    r = torch.randn(7, d, device=dev, dtype=dtype)
    w = torch.randn(d, device=dev, dtype=dtype)
    assert md._use_triton(x)
    y, s = md.rms_norm(x, w, 1e-6, residual=r)
    y0, s0 = md.rms_norm_ref(x, w, 1e-6, residual=r)
    assert torch.equal(s, s0)
    assert _rel(y, y0) < tol
    for interleave in (True, False):
        q = torch.randn(9, heads, nope + rope, device=dev, dtype=dtype)
        cos, sin = torch.randn(9, rope // 2, device=dev), torch.randn(9, rope // 2, device=dev)
        expected = q.clone()
        expected[..., nope:] = md.rope_ref(q[..., nope:], cos[:, None], sin[:, None], interleave)
        md.rope_(q[..., nope:], cos, sin, interleave)
        assert _rel(q, expected) < tol
        kva = torch.randn(9, lat + rope, device=dev, dtype=dtype)
        wn = torch.randn(lat, device=dev, dtype=dtype)
        cache, cache0 = (torch.zeros(40, lat + rope, device=dev, dtype=dtype) for _ in range(2))
        slots = torch.tensor([5, -1, 0, 39, 7, 8, 9, 10, 11], device=dev)
        out = md.store_latents(kva, wn, 1e-6, cos, sin, interleave, cache, slots)
        out0 = md.store_latents_ref(kva, wn, 1e-6, cos, sin, interleave, cache0, slots)
        assert _rel(out, out0) < tol
        assert _rel(cache, cache0) < tol
