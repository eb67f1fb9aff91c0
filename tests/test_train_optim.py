"""AdamW settings and the warm-up / constant / cosine / floor schedule against its closed form."""

import math

import pytest
import torch

from dsv3.train.optim import build_optimizer, build_scheduler, clip_in_fused_step, lr_at, param_groups
from test_train_shared import tiny_config, tiny_model

PEAK, FINAL, W, S, C = 2.2e-4, 2.2e-5, 10, 20, 30


def closed_form(step):
    if step < W:
        return PEAK * (step + 1) / W
    if step < W + S:
        return PEAK
    if step < W + S + C:
        progress = (step - W - S) / C
        return FINAL + (PEAK - FINAL) * (1 + math.cos(math.pi * progress)) / 2
    return FINAL


def test_schedule_values_at_given_steps():
    assert lr_at(0, PEAK, W, S, C, FINAL) == pytest.approx(PEAK / W)
    assert lr_at(W - 1, PEAK, W, S, C, FINAL) == pytest.approx(PEAK)
    assert lr_at(W + S - 1, PEAK, W, S, C, FINAL) == pytest.approx(PEAK)
    assert lr_at(W + S + C // 2, PEAK, W, S, C, FINAL) == pytest.approx((PEAK + FINAL) / 2)
    assert lr_at(W + S + C, PEAK, W, S, C, FINAL) == pytest.approx(FINAL)
    assert lr_at(10_000, PEAK, W, S, C, FINAL) == pytest.approx(FINAL)


def test_scheduler_drives_the_optimizer_along_the_closed_form():
    model = tiny_model()
    opt = build_optimizer(model, lr=PEAK)
    sched = build_scheduler(opt, PEAK, W, S, C, FINAL)
    seen = []
    for _ in range(W + S + C + 5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([closed_form(s) for s in range(len(seen))], rel=1e-12)


def test_recipe_schedule_splits_steps():
    cfg = tiny_config(steps=100, warmup_steps=10, decay_frac=0.25, lr=1e-3, final_lr=1e-4)
    assert (cfg.warmup_steps, cfg.stable_steps, cfg.decay_steps) == (10, 65, 25)
    assert cfg.lr_at(74) == pytest.approx(1e-3) and cfg.lr_at(99) < 1.1e-4
    assert cfg.mtp_weight_at(0) == 0.3 and cfg.mtp_weight_at(99) == 0.1


def test_adamw_hyperparameters_and_groups():
    model = tiny_model()
    opt = build_optimizer(model, lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["betas"] == (0.9, 0.95) and decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("norm.weight") for p in no_decay["params"])
    assert sum(len(g["params"]) for g in param_groups(model, 0.1)) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(model, lr=0.0)


@pytest.mark.parametrize("grad_size", [0.01, 50.0])  # below and above the clip norm
def test_clip_folded_into_fused_adamw_equals_clip_grad_norm(grad_size):
    """`clip_in_fused_step` + fused AdamW == `clip_grad_norm_` + AdamW over three steps (same norms, same weights)."""
    torch.manual_seed(0)
    params = [torch.randn(7, 5), torch.randn(130), torch.randn(3, 4, 2)]
    runs = []
    for folded in (False, True):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = torch.optim.AdamW(ps, lr=0.05, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        gen = torch.Generator().manual_seed(1)
        norms = []
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen) * grad_size
            norms.append(clip_in_fused_step(opt, 1.0) if folded else torch.nn.utils.clip_grad_norm_(ps, 1.0))
            opt.step()
        runs.append((torch.stack(norms), ps))
    (n_ref, p_ref), (n, p_new) = runs
    torch.testing.assert_close(n, n_ref)
    for a, b in zip(p_new, p_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (n_ref > 1.0).all() == (grad_size > 1)  # the large case really clips


def test_clip_in_fused_step_needs_a_fused_optimizer():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="fused"):
        clip_in_fused_step(torch.optim.AdamW([p], lr=0.1), 1.0)
