"""The sync-free grouped MoE path (`MoE.routed_grouped`, training) against the reference loop
(`MoE.routed_loop`): same outputs and the same gradients for inputs, routing weights and every expert's
own Parameters, in float32 and under bf16 autocast; and `routed` picks each path where it should."""

import pytest
import torch

from dsv3.config import ModelArgs
from dsv3.model.moe import MoE
from test_train_shared import TINY_MODEL


def _moe(seed: int = 0, **overrides) -> MoE:
    torch.manual_seed(seed)
    args = ModelArgs(**{**TINY_MODEL, "vocab_size": 64, "dtype": "float32", **overrides})
    moe = MoE(args, dtype=torch.float32)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.2)
    return moe


def _run(moe: MoE, path: str, x: torch.Tensor, grad: torch.Tensor, skew: bool = False):
    """One forward/backward of `path` ('loop' or 'grouped'); returns output and all gradients."""
    moe.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    weights, indices = moe.gate(x)
    if skew:  # every token on experts 0 and 1: all other groups are empty
        indices = torch.stack([torch.zeros_like(indices[:, 0]), torch.ones_like(indices[:, 0])], dim=1)
    out = getattr(moe, f"routed_{path}")(x, weights, indices)
    out.backward(grad)
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in moe.named_parameters()}
    return out.detach(), x.grad.clone(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("skew", [False, True])
def test_grouped_equals_loop_float32(skew):
    moe = _moe()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, moe.dim, generator=g)
    grad = torch.randn(37, moe.dim, generator=g)
    out_l, dx_l, gr_l = _run(moe, "loop", x, grad, skew)
    out_g, dx_g, gr_g = _run(moe, "grouped", x, grad, skew)
    assert _rel(out_g, out_l) < 1e-6
    assert _rel(dx_g, dx_l) < 1e-6
    touched = 0
    for name, want in gr_l.items():
        got = gr_g[name]
        if want.abs().sum() == 0:  # experts that got no token: zero (or no) gradient on both paths
            assert got.abs().sum() == 0, name
            continue
        touched += 1
        assert _rel(got, want) < 1e-5, name
    assert touched >= (4 if skew else 10)  # gate weight + used experts' projections were checked


def test_grouped_equals_loop_under_bf16_autocast():
    moe = _moe(seed=3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, moe.dim, generator=g)
    grad = torch.randn(64, moe.dim, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_l, dx_l, gr_l = _run(moe, "loop", x, grad)
        out_g, dx_g, gr_g = _run(moe, "grouped", x, grad)
    assert out_g.dtype == out_l.dtype == torch.float32
    assert _rel(out_g, out_l) < 1e-2
    assert _rel(dx_g, dx_l) < 2e-2
    expert_w = "experts.3.down_proj.weight"
    assert gr_l[expert_w].abs().sum() > 0 and _rel(gr_g[expert_w], gr_l[expert_w]) < 2e-2


def test_routed_picks_grouped_in_training_and_loop_in_eval(monkeypatch):
    moe = _moe()
    calls = []
    monkeypatch.setattr(MoE, "routed_grouped", lambda self, *a: calls.append("grouped") or MoE.routed_loop(self, *a))
    x = torch.randn(5, moe.dim)
    moe.train()
    moe(x)
    moe.eval()
    with torch.no_grad():
        moe(x)
    assert calls == ["grouped"]


def test_fp8_training_linears_keep_the_loop():
    from dsv3.train.fp8_linear import swap_to_fp8
    moe = _moe()
    assert moe.grouped_ok()
    swap_to_fp8(moe, emulate=True)
    assert not moe.grouped_ok()  # emulated FP8 experts: the loop is the oracle path
