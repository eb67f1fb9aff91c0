"""MTP self-speculative greedy decoding equals plain greedy decoding, token for token."""

import pytest
import torch

from dsv3.engine.speculative import speculative_greedy


def _greedy(model, prompt, n):
    """Plain greedy decoding by whole-sequence forwards (no cache): the oracle."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([prompt + out]))[0, -1].argmax()))
    return out


@pytest.fixture(scope="module")
def model():
    """The shipped default model: a real MTP module, so drafts are accepted and rejected."""
    import dsv3
    return dsv3.load_model(dsv3.default_model_path(), dtype=torch.float32, progress=False)


@pytest.mark.parametrize("prompt", [[0], [0, 1489, 344, 263, 2250, 301, 1160, 16]])
def test_equals_greedy(model, prompt):
    with torch.no_grad():
        expected = _greedy(model, prompt, 40)
    got = speculative_greedy(model, prompt, 40)
    assert got.token_ids == expected
    assert got.drafts > 0 and 0 < got.accepted < got.drafts  # accepted and rejected drafts both happened
    # plain greedy needs len - 1 passes after the prefill; each accepted draft saves one (the last may overshoot)
    assert len(expected) - 1 - got.accepted <= got.main_passes <= len(expected) - got.accepted


def test_stops_at_eos_and_checks_inputs(model):
    with torch.no_grad():
        expected = _greedy(model, [3, 4], 30)
    eos = expected[10]
    got = speculative_greedy(model, [3, 4], 30, eos_ids=[eos])
    assert got.token_ids == expected[: expected.index(eos) + 1] and got.finish_reason == "stop"
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        speculative_greedy(model, [1], 100_000)
    with pytest.raises(ValueError, match="at least one token"):
        speculative_greedy(model, [], 4)
