"""SamplingParams validation and the batched Sampler against closed-form distributions."""

import math

import pytest
import torch

from dsv3.engine.sampling import SamplingParams, Sampler, sampling_probs

P = [0.4, 0.3, 0.15, 0.1, 0.05]  # a fixed next-token distribution; logits = log P


def logits_of(p, rows=1):
    return torch.tensor([[math.log(x) for x in p]] * rows, dtype=torch.float32)


def normalise(weights):
    total = sum(weights)
    return [w / total for w in weights]


def probs(params, outputs=None, p=P):
    return sampling_probs(logits_of(p), [params], outputs)[0].tolist()


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("top_k", 1.5),
    ("min_p", 1.1), ("max_tokens", 0), ("stop", [""]), ("stop_token_ids", [-1]), ("seed", "x"),
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("logprobs", 21), ("logprobs", -1),
])
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_stop_is_normalised_to_a_list():
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams().stop == [] and SamplingParams().stop_token_ids == []


def test_temperature_closed_form():
    for t in (0.5, 1.0, 2.0):
        want = normalise([x ** (1 / t) for x in P])
        assert probs(SamplingParams(temperature=t)) == pytest.approx(want, abs=1e-6)


def test_greedy_is_one_hot_argmax():
    assert probs(SamplingParams(temperature=0)) == [1.0, 0, 0, 0, 0]


def test_top_k_closed_form():
    assert probs(SamplingParams(top_k=2)) == pytest.approx(normalise(P[:2]) + [0, 0, 0], abs=1e-6)
    assert probs(SamplingParams(top_k=-1)) == pytest.approx(P, abs=1e-6)


def test_top_p_closed_form():
    # smallest prefix whose mass reaches p: 0.65 -> {0.4, 0.3}; 0.75 -> {0.4, 0.3, 0.15}
    assert probs(SamplingParams(top_p=0.65)) == pytest.approx(normalise(P[:2]) + [0, 0, 0], abs=1e-6)
    assert probs(SamplingParams(top_p=0.75)) == pytest.approx(normalise(P[:3]) + [0, 0], abs=1e-6)


EXACT = [0.5, 0.25, 0.125, 0.0625, 0.0625]  # powers of two: every prefix mass is exact in float32


def _f32_after(x: float, toward: float) -> float:
    """The next float32 after x toward `toward` (the sampler compares in float32)."""
    return torch.nextafter(torch.tensor(x), torch.tensor(toward)).item()


@pytest.mark.parametrize("top_p", [0.5, 0.75, 0.875, _f32_after(0.75, 1.0), _f32_after(0.75, 0.0)])
def test_top_p_boundary_where_the_mass_equals_p(top_p):
    """The documented rule, the smallest prefix of the sorted distribution whose mass reaches p (vLLM's
    convention): where a prefix's mass equals p exactly that prefix is the kept set, and the next token is out;
    one float32 step above p it is in, one step below the prefix still needs its last token."""
    assert logits_of(EXACT).softmax(dim=-1)[0].tolist() == EXACT  # the sampler sees these masses exactly
    k = next(k for k in range(1, len(EXACT) + 1) if sum(EXACT[:k]) >= top_p)  # closed form of the rule
    want = normalise(EXACT[:k]) + [0.0] * (len(EXACT) - k)
    got = probs(SamplingParams(top_p=top_p), p=EXACT)
    assert [x > 0 for x in got] == [x > 0 for x in want]  # which tokens can be drawn
    assert got == pytest.approx(want, abs=1e-6)
    torch.manual_seed(0)
    drawn = Sampler()(logits_of(EXACT, 2000), [SamplingParams(top_p=top_p)] * 2000).token_ids
    assert set(drawn.tolist()) == set(range(k))  # the draws stay inside (and, 2000 of them, cover) the kept set


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # after top-k=3 the masses are .47, .35, .18: the first two already reach 0.8
    got = probs(SamplingParams(top_k=3, top_p=0.8))
    assert got == pytest.approx(normalise(P[:2]) + [0, 0, 0], abs=1e-6)


def test_min_p_closed_form():
    # keep p >= 0.3 * 0.4 = 0.12
    assert probs(SamplingParams(min_p=0.3)) == pytest.approx(normalise(P[:3]) + [0, 0], abs=1e-6)
    # top-p 0.9 keeps four, then min-p keeps three of them
    assert probs(SamplingParams(top_p=0.9, min_p=0.3)) == pytest.approx(normalise(P[:3]) + [0, 0], abs=1e-6)


def test_temperature_then_top_k():
    want = normalise([x ** 2 for x in P[:3]]) + [0, 0]
    assert probs(SamplingParams(temperature=0.5, top_k=3)) == pytest.approx(want, abs=1e-6)


def test_penalties_closed_form():
    pres, freq = 0.5, 0.25
    outputs = [[0, 0, 2]]
    counts = [2, 0, 1, 0, 0]
    want = normalise([x * math.exp(-(pres * (c > 0) + freq * c)) for x, c in zip(P, counts)])
    got = probs(SamplingParams(presence_penalty=pres, frequency_penalty=freq), outputs)
    assert got == pytest.approx(want, abs=1e-6)


def test_penalties_change_the_greedy_choice():
    # token 0 penalised by 2.0 in logit: 0.4 e^-2 < 0.3, so greedy moves to token 1
    got = probs(SamplingParams(temperature=0, presence_penalty=2.0), [[0]])
    assert got == [0, 1.0, 0, 0, 0]


def test_draws_follow_the_distribution():
    torch.manual_seed(0)
    rows = 40000
    params = SamplingParams(temperature=0.7, top_k=4, min_p=0.2)
    want = sampling_probs(logits_of(P), [params])[0]
    tokens = Sampler()(logits_of(P, rows), [params] * rows).token_ids
    freq = torch.bincount(tokens, minlength=len(P)).double() / rows
    sigma = (want.double() * (1 - want.double()) / rows).sqrt()
    assert (freq - want.double()).abs().max() <= (4 * sigma).max() + 1e-9
    assert freq[want == 0].sum() == 0


def test_seeded_rows_are_reproducible_whatever_the_batch():
    vocab = 1000
    flat = torch.zeros(1, vocab)
    sampler = Sampler()

    def run(seed, position, neighbours, steps=12):
        gen = torch.Generator().manual_seed(seed)
        drawn = []
        for _ in range(steps):
            rows = neighbours + 1
            logits = flat.expand(rows, vocab).clone()
            params = [SamplingParams(temperature=1.0)] * rows
            gens = [None] * rows
            gens[position] = gen
            drawn.append(int(sampler(logits, params, generators=gens).token_ids[position]))
        return drawn

    a = run(seed=7, position=0, neighbours=0)
    b = run(seed=7, position=3, neighbours=5)
    c = run(seed=8, position=0, neighbours=0)
    assert a == b
    assert a != c


def test_logprobs_are_the_raw_model_log_probabilities():
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=2.0, top_k=1, logprobs=0),
              SamplingParams(temperature=0)]
    out = Sampler()(logits_of(P, 3), params)
    assert out.token_ids.tolist() == [0, 0, 0]
    assert out.logprobs.tolist() == pytest.approx([math.log(0.4)] * 3, abs=1e-6)
    assert out.top_ids[0].tolist() == [0, 1, 2]
    assert out.top_logprobs[0].tolist() == pytest.approx([math.log(x) for x in P[:3]], abs=1e-6)


def test_no_logprobs_requested_gives_none():
    out = Sampler()(logits_of(P, 2), [SamplingParams(), SamplingParams(temperature=0)])
    assert out.logprobs is None and out.top_ids is None
    assert out.token_ids[1].item() == 0
