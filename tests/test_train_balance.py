"""Auxiliary-loss-free balancing: the bias moves by ±γ toward balance from the step's counts, stops when
frozen, is never touched by the optimizer, and flattens a deliberately skewed router."""

import pytest
import torch

from dsv3.train.balance import BiasBalancer
from dsv3.train.losses import moe_gates
from dsv3.train.optim import build_optimizer
from test_train_shared import tiny_model


def _tokens(seed, batch=4, seq=16):
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_bias_moves_toward_balance_by_gamma():
    model = tiny_model()
    gamma = 0.01
    balancer = BiasBalancer(model, update_rate=gamma)
    counts = []
    with torch.no_grad():
        for seed in (0, 1):  # two micro-batches in one step
            model(_tokens(seed), return_mtp=True, absorb=False)
            counts.append([torch.bincount(g.last_indices.flatten(), minlength=g.n_experts) for g in moe_gates(model)])
            balancer.observe()
    before = [g.e_score_correction_bias.clone() for g in moe_gates(model)]
    stats = balancer.step(tokens=128)
    for layer, gate in enumerate(moe_gates(model)):
        total = (counts[0][layer] + counts[1][layer]).float()
        mean = total.mean()
        delta = gate.e_score_correction_bias - before[layer]
        for i in range(gate.n_experts):
            want = -gamma if total[i] > mean else gamma if total[i] < mean else 0.0
            assert abs(float(delta[i]) - want) < 1e-9, (layer, i, float(total[i]), float(mean))
        assert abs(float(stats.max_ratio[layer]) - float(total.max() / mean)) < 1e-6
        assert abs(float(stats.min_ratio[layer]) - float(total.min() / mean)) < 1e-6


def test_frozen_bias_does_not_move():
    for kwargs in ({"freeze_after_steps": 1}, {"freeze_after_tokens": 100}):
        model = tiny_model()
        balancer = BiasBalancer(model, update_rate=0.01, **kwargs)
        history = []
        with torch.no_grad():
            for step in range(3):
                model(_tokens(step), return_mtp=True, absorb=False)
                balancer.observe()
                balancer.step(tokens=100)
                history.append(torch.cat([g.e_score_correction_bias.clone() for g in moe_gates(model)]))
        assert history[0].abs().max() > 0, kwargs  # the first step updates
        assert torch.equal(history[0], history[1]) and torch.equal(history[1], history[2]), kwargs
        assert balancer.frozen() and balancer.current_rate() == 0.0


def test_early_rate_then_regular_rate():
    model = tiny_model()
    balancer = BiasBalancer(model, update_rate=0.001, early_rate=0.01, early_steps=2, freeze_after_steps=3)
    deltas = []
    with torch.no_grad():
        for step in range(4):
            before = torch.cat([g.e_score_correction_bias.clone() for g in moe_gates(model)])
            model(_tokens(step), return_mtp=True, absorb=False)
            balancer.observe()
            balancer.step(tokens=64)
            deltas.append((torch.cat([g.e_score_correction_bias for g in moe_gates(model)]) - before).abs().max().item())
    assert deltas == pytest.approx([0.01, 0.01, 0.001, 0.0])


def test_optimizer_never_touches_the_bias():
    model = tiny_model()
    gates = moe_gates(model)
    for g in gates:
        g.e_score_correction_bias.fill_(0.25)
    opt = build_optimizer(model, lr=0.1, weight_decay=0.1)
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not any(id(g.e_score_correction_bias) in in_opt for g in gates)
    weight_before = gates[0].weight.detach().clone()
    for step in range(2):
        logits, mtp = model(_tokens(step), return_mtp=True, absorb=False)
        (logits.float().logsumexp(-1).mean() + sum(m.float().logsumexp(-1).mean() for m in mtp)).backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(gates[0].weight, weight_before)  # the optimizer did update the router ...
    assert all(torch.equal(g.e_score_correction_bias, torch.full_like(g.e_score_correction_bias, 0.25))
               for g in gates)  # ... and not the bias (no gradient, no weight decay)


@torch.no_grad()
def _skewed_load(gamma: float, steps: int = 60) -> float:
    """Max/mean expert load, averaged over the last 10 of `steps` bias updates, of routers with diverse
    random weights (so tokens disagree on the ranking) plus a large push toward expert 0 along the mean
    gate input."""
    model = tiny_model(seed=3)
    inputs = {}
    hooks = [g.register_forward_hook(lambda m, a, out, key=i: inputs.__setitem__(key, a[0]))
             for i, g in enumerate(moe_gates(model))]
    model(_tokens(100), return_mtp=True, absorb=False)
    for h in hooks:
        h.remove()
    gen = torch.Generator().manual_seed(0)
    for i, gate in enumerate(moe_gates(model)):
        mean_input = inputs[i].float().mean(0)  # [D]
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=gen) * 0.7 / mean_input.norm())
        gate.weight[0] += 25.0 * mean_input / mean_input.norm() ** 2
    balancer = BiasBalancer(model, update_rate=gamma)
    ratios = []
    for step in range(steps):
        model(_tokens(step, batch=8, seq=32), return_mtp=True, absorb=False)
        balancer.observe()
        ratios.append(balancer.step(tokens=256).worst_max)
    return sum(ratios[-10:]) / 10


def test_bias_updates_flatten_a_skewed_router():
    skewed = _skewed_load(gamma=0.0)
    balanced = _skewed_load(gamma=0.01)
    print(f"max/mean expert load over the last 10 of 60 steps: gamma=0 {skewed:.2f}, gamma=0.01 {balanced:.2f}")
    assert skewed > 1.8
    assert balanced < 0.7 * skewed and balanced < 1.4
