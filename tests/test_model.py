"""The model against `transformers` (the oracle), and its own paths against each other."""

import pytest
import torch

import dsv3
from dsv3.config import ModelArgs
from dsv3.model import Transformer
from hf_models import V2_LITE_TINY, make_v2, make_v3

CASES = {
    "v3": (make_v3, {}),
    "v2_lite_shape": (make_v3, V2_LITE_TINY),
    "v2_softmax_greedy": (make_v2, dict(topk_method="greedy", num_experts_per_tok=3)),
    "v2_softmax_group_limited": (make_v2, dict(topk_method="group_limited_greedy", num_experts_per_tok=3)),
}


def _tokens(vocab=256, seed=1):
    return torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers_fp32(case, tmp_path):
    make, overrides = CASES[case]
    hf = make(tmp_path, **overrides)
    ours = dsv3.load_model(tmp_path, dtype=torch.float32)
    tokens = _tokens()
    with torch.no_grad():
        expected = hf(tokens).logits
        for absorb in (True, False):
            diff = (ours(tokens, absorb=absorb) - expected).abs().max().item()
            assert diff <= 1e-4, f"{case} absorb={absorb}: max |logit diff| {diff}"


def test_group_limit_changes_routing(tmp_path):
    """The two softmax cases above must not be vacuous: group limiting picks different experts."""
    make_v2(tmp_path / "a", topk_method="greedy", num_experts_per_tok=3)
    make_v2(tmp_path / "b", topk_method="group_limited_greedy", num_experts_per_tok=3)
    a = dsv3.load_model(tmp_path / "a", dtype=torch.float32)
    b = dsv3.load_model(tmp_path / "b", dtype=torch.float32)
    with torch.no_grad():
        assert (a(_tokens()) - b(_tokens())).abs().max() > 1e-3


def test_bf16_difference_is_reported(tmp_path):
    """bf16 is not bit-comparable (near-tied experts flip); our bf16 error against the fp32 oracle must be
    of the same size as `transformers`' own bf16 error."""
    hf = make_v3(tmp_path)
    ours = dsv3.load_model(tmp_path, dtype=torch.bfloat16)
    tokens = _tokens()
    with torch.no_grad():
        expected = hf(tokens).logits
        ours_err = (ours(tokens).float() - expected).abs()
        hf_err = (hf.to(torch.bfloat16)(tokens).logits.float() - expected).abs()
    print(f"bf16 vs fp32 oracle: ours max {ours_err.max():.3f} mean {ours_err.mean():.4f}; "
          f"transformers bf16 max {hf_err.max():.3f} mean {hf_err.mean():.4f}")
    assert ours_err.mean() <= 3 * hf_err.mean()


def _tiny(**changes) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("tiny").replace(**changes)).eval()
    with torch.no_grad():  # a bias large enough to change routing
        for block in model.blocks():
            if hasattr(block.mlp, "gate"):
                block.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("changes", [{}, dict(q_lora_rank=0, rope_interleave=False, rope_factor=1.0)])
def test_absorbed_equals_expanded(changes):
    model = _tiny(**changes)
    tokens = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        assert (model(tokens, absorb=True) - model(tokens, absorb=False)).abs().max() <= 1e-5


@pytest.mark.parametrize("absorb", [True, False])
def test_cached_decode_equals_full_forward(absorb):
    model = _tiny()
    tokens = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(max_batch=2, max_seq=64)
        pieces = [model(tokens[:, :17], absorb=absorb)]
        for pos in range(17, 40):
            pieces.append(model(tokens[:, pos:pos + 1], start_pos=pos, absorb=absorb))
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= 1e-5


def test_mtp_training_logits_equal_incremental_drafting():
    """Depth-1 MTP logits from the training path equal the drafting path run token by token with a cache."""
    model = _tiny()
    tokens = torch.randint(0, 512, (1, 24))
    with torch.no_grad():
        logits, (mtp,) = model(tokens, return_mtp=True)
        h = model.hidden(tokens)
        assert mtp.shape == (1, 23, 512)
        model.setup_cache(1, 32)
        steps = [model.mtp_step(0, tokens[:, t + 1:t + 2], h[:, t:t + 1], start_pos=t)[0] for t in range(23)]
    assert (torch.cat(steps, dim=1) - mtp).abs().max() <= 1e-5


def test_cache_overflow_is_a_clear_error():
    model = _tiny()
    model.setup_cache(1, 8)
    with pytest.raises(ValueError, match="cache holds 1 x 8 tokens"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.setup_cache(1, 10_000)
