"""Speculative rejection sampling keeps the main model's distribution exactly (`dsv3.engine.rejection.verify`).

Chi-square tests with fixed seeds on a tiny vocabulary: the kept tokens of many independent draws against the
target distribution computed in closed form from the sampling recipe (penalties, temperature, top-k, top-p), for
the first token and for the token after an accepted draft; greedy rows keep drafts exactly while they equal the
argmax; and end to end, `LLM(speculative="mtp")` sampling two tokens from a tiny random model matches the joint
distribution the main model gives (its own logits, no drafts involved)."""

import math

import pytest
import torch

from dsv3.config import ModelArgs
from dsv3.engine import LLM, SamplingParams
from dsv3.engine.rejection import verify
from dsv3.engine.sampling import sampling_probs
from dsv3.model import Transformer


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed `counts` under `probs` (cells with zero probability must be empty)."""
    n = counts.sum()
    support = probs > 0
    assert counts[~support].sum() == 0, "a token outside the distribution's support was drawn"
    expected = probs[support] * n
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=4, presence_penalty=0.8, frequency_penalty=0.3, repetition_penalty=1.4),
    SamplingParams(temperature=1.3, top_p=0.8),
]


@pytest.mark.parametrize("params", PARAMS, ids=["plain", "top_k_penalties", "top_p"])
def test_kept_tokens_follow_the_target_distribution(params):
    torch.manual_seed(0)
    vocab, n = 6, 8_000
    logits = torch.randn(2, vocab) * 1.5  # row 0: after the last token; row 1: after the draft
    history = [2, 2, 5]  # generated so far (penalties)
    prompt = [0, 3]  # the repetition penalty also counts the prompt
    target0 = sampling_probs(logits[:1], [params], [history], prompt_token_ids=[prompt])[0]
    for draft in (int(target0.argmax()), int(target0.argmin())):  # a likely and an unlikely (maybe filtered) draft
        target1 = sampling_probs(logits[1:], [params], [history + [draft]], prompt_token_ids=[prompt])[0]
        kept = verify(logits.repeat(n, 1), [params] * n, [history] * n, [[draft]] * n, prompts=[prompt] * n)
        first = torch.tensor([k[0] for k in kept])
        assert chi_square_p(torch.bincount(first, minlength=vocab).double(), target0.double()) > 1e-3
        accepted = [k for k in kept if len(k) == 2]
        assert all(k[0] == draft for k in accepted)
        assert abs(len(accepted) / n - float(target0[draft])) < 4 * math.sqrt(0.25 / n) + 1e-9  # P(accept) = p(d)
        if len(accepted) > 400:
            second = torch.tensor([k[1] for k in accepted])
            assert chi_square_p(torch.bincount(second, minlength=vocab).double(), target1.double()) > 1e-3


def test_greedy_rows_keep_drafts_while_they_are_the_argmax():
    logits = torch.tensor([[0.0, 3, 1, 2], [5, 0, 1, 2], [0, 1, 2, 9], [9, 0, 0, 0]])
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0, presence_penalty=0.1)):
        assert verify(logits, [params], [[]], [[1, 0, 3]]) == [[1, 0, 3, 0]]  # all accepted, bonus argmax
        assert verify(logits, [params], [[]], [[1, 2, 3]]) == [[1, 0]]  # the second draft differs: argmax instead
        assert verify(logits[:2], [params, params], [[], []], [[], []]) == [[1], [0]]  # no drafts: plain greedy


def test_seeded_rows_repeat_whatever_the_batch():
    logits = torch.randn(3, 10)
    seeded = SamplingParams(temperature=1.0, seed=5)
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(5)
        other = torch.Generator().manual_seed(int(torch.randint(0, 1000, ())))
        runs.append(verify(torch.cat([logits, logits[:1]]), [seeded, seeded], [[], []], [[3, 4], []], [gen, other])[0])
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="logits must be"):
        verify(logits, [seeded], [[]], [[1]])


def test_engine_samples_the_main_models_joint_distribution():
    """Three sampled tokens per request through the whole engine: the first from the prefill, the second and
    third from one verify step (an MTP draft from a random module, kept or rejected, then one more token). The
    joint distribution of the last two against the main model's, sum over x1 of p(x1) p(x2 | x1) p(x3 | x1, x2)."""
    torch.manual_seed(0)
    vocab = 6
    model = Transformer(ModelArgs.from_preset("tiny").replace(vocab_size=vocab, init_std=0.3)).eval()
    prompt = [0, 3, 2]
    params = SamplingParams(temperature=1.5, top_k=5, max_tokens=3, ignore_eos=True)
    n = 3000
    llm = LLM(model, num_blocks=1024, block_size=4, max_num_seqs=512, max_num_batched_tokens=2048,
              speculative="mtp", num_draft_tokens=2)
    outs = llm.generate([prompt] * n, params, use_tqdm=False)
    stats = llm.speculative_stats
    assert stats.drafted[0] == n and 0.05 * n < stats.accepted[0] < n  # one draft each (max_tokens), often kept
    counts = torch.zeros(vocab * vocab, dtype=torch.float64)
    for o in outs:
        counts[o.token_ids[1] * vocab + o.token_ids[2]] += 1
    with torch.no_grad():
        def probs(prefixes):
            logits = model(torch.tensor([prompt + x for x in prefixes]))[:, -1]
            return sampling_probs(logits, [params] * len(prefixes), prefixes).double()
        p1 = probs([[]])[0]  # [V]
        p2 = probs([[a] for a in range(vocab)])  # [V, V]
        p3 = probs([[a, b] for a in range(vocab) for b in range(vocab)]).view(vocab, vocab, vocab)
    joint = (p1[:, None, None] * p2[:, :, None] * p3).sum(0).flatten()
    assert chi_square_p(counts, joint) > 1e-3
