"""The CPU decode fast paths against the plain reference: weight re-layout, fused gate/up, routed experts."""

import copy

import pytest
import torch

from dsv3.config import ModelArgs
from dsv3.model import Transformer
from dsv3.model.layers import MLP, cpu_decode_layout
from dsv3.model.moe import MoE


def _tiny() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("tiny")).eval()
    with torch.no_grad():  # a bias large enough to change routing
        for block in model.blocks():
            if hasattr(block.mlp, "gate"):
                block.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


def test_layout_keeps_outputs_parameters_and_state_dict():
    model = _tiny()
    laid = copy.deepcopy(model)
    params = dict(laid.named_parameters())
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    moved = cpu_decode_layout(laid)
    assert moved > 0
    assert cpu_decode_layout(laid) == 0  # weights already in place stay there
    assert all(p is params[name] for name, p in laid.named_parameters())  # same Parameter objects
    reference = model.state_dict()
    for name, tensor in laid.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    assert not laid.lm_head.weight.is_contiguous()  # [vocab, dim] stored column-major
    with torch.inference_mode():
        assert (laid(tokens) - model(tokens)).abs().max() <= 1e-5
    with torch.no_grad():
        assert (laid(tokens) - model(tokens)).abs().max() <= 1e-5


def test_fused_gate_up_only_in_inference_and_gradients_still_flow():
    torch.manual_seed(0)
    mlp = MLP(32, 48)
    ref = copy.deepcopy(mlp)
    cpu_decode_layout(mlp)
    x = torch.randn(5, 32)
    with torch.inference_mode():
        assert mlp._fused_gate_up() is not None
        assert (mlp(x) - ref(x)).abs().max() <= 1e-6
    assert mlp._fused_gate_up() is None  # grad mode: the separate Parameters, so autograd sees them
    mlp(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert (mlp.gate_proj.weight.grad - ref.gate_proj.weight.grad).abs().max() <= 1e-5
    with torch.no_grad():  # a weight replaced by a new tensor: the fused view is stale and not used
        mlp.up_proj.weight.data = mlp.up_proj.weight.data.clone() * 2
    with torch.inference_mode():
        assert mlp._fused_gate_up() is None
        assert (mlp(x) - ref.down_proj(torch.nn.functional.silu(ref.gate_proj(x)) * ref.up_proj(x) * 2)).abs().max() <= 1e-5


@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_routed_equals_token_by_token_sum(tokens):
    torch.manual_seed(0)
    moe = MoE(ModelArgs.from_preset("tiny"))
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    x = torch.randn(tokens, moe.dim)
    with torch.no_grad():
        weights, indices = moe.gate(x)
        out = moe.routed(x, weights, indices)
        expected = torch.stack([
            sum(weights[t, k] * moe.experts[int(indices[t, k])](x[t:t + 1])[0] for k in range(indices.shape[1]))
            for t in range(tokens)])
    assert (out - expected).abs().max() <= 1e-5
