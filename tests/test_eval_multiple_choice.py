"""Multiple-choice and LAMBADA scoring against log-likelihoods computed by hand from the model's logits."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from dsv3.eval.multiple_choice import choose, encode_pair, evaluate_choice, evaluate_lambada, pair_span, stderr
from dsv3.eval.tasks import ChoiceItem, LambadaItem
from test_eval_support import tiny_model, token_logprobs


def hand_loglik(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | BOS + context), tokens split as lm-eval-harness splits them."""
    ctx = [tok.bos_id] + tok.encode(context.rstrip(), add_special_tokens=False)
    moved = context[len(context.rstrip()):] + continuation
    whole = [tok.bos_id] + tok.encode(context.rstrip() + moved, add_special_tokens=False)
    assert whole[:len(ctx)] == ctx
    return token_logprobs(model, whole)[len(ctx) - 1:].sum().item()


ITEMS = [
    ChoiceItem("q0", ["Question: What is the capital of France?\nAnswer:"] * 3,
               [" Paris", " the lazy dog", " 2024"], ["Paris", "the lazy dog", "2024"], 0),
    ChoiceItem("q1", ["A man is sitting on a roof. He"] * 4,
               [" starts pulling up roofing.", " sings.", " is a fox.", " eats."],
               ["starts pulling up roofing.", "sings.", "is a fox.", "eats."], 2),
    # WinoGrande-style partial scoring: the contexts differ, the continuation is shared
    ChoiceItem("q2", ["Sarah was a better surgeon than Maria so Sarah", "Sarah was a better surgeon than Maria so Maria"],
               [" always got the easier cases."] * 2, ["Sarah", "Maria"], 1),
    ChoiceItem("q3", ["Answer: "] * 2, ["yes", "no"], ["yes", "no"], 1),  # trailing space moves to the option
]


def test_choice_scores_and_predictions_match_hand_computation():
    model, tok = tiny_model()
    metrics, records = evaluate_choice(model, tok, ITEMS, batch_size=3, progress=False)
    acc, acc_norm = [], []
    for item, rec in zip(ITEMS, records):
        hand = [hand_loglik(model, tok, c, k) for c, k in zip(item.contexts, item.continuations)]
        assert rec["logprobs"] == pytest.approx(hand, rel=1e-5, abs=1e-6)
        best = max(range(len(hand)), key=hand.__getitem__)
        best_norm = max(range(len(hand)), key=lambda i: hand[i] / len(item.choices[i]))
        assert (rec["pred"], rec["pred_norm"]) == (best, best_norm)
        acc.append(float(best == item.gold))
        acc_norm.append(float(best_norm == item.gold))
    assert metrics["n"] == len(ITEMS)
    assert metrics["acc"] == pytest.approx(sum(acc) / len(acc))
    assert metrics["acc_norm"] == pytest.approx(sum(acc_norm) / len(acc_norm))


def test_gold_set_to_the_hand_argmax_scores_one():
    model, tok = tiny_model()
    items = []
    for item in ITEMS:
        hand = [hand_loglik(model, tok, c, k) for c, k in zip(item.contexts, item.continuations)]
        best = max(range(len(hand)), key=hand.__getitem__)
        items.append(ChoiceItem(item.id, item.contexts, item.continuations, item.choices, best))
        items.append(ChoiceItem(item.id + "-wrong", item.contexts, item.continuations, item.choices,
                                (best + 1) % len(hand)))
    metrics, _ = evaluate_choice(model, tok, items, batch_size=8, progress=False, acc_norm=False)
    assert metrics["acc"] == pytest.approx(0.5) and "acc_norm" not in metrics  # as WinoGrande and MMLU report


def test_choose_and_acc_norm_use_character_length():
    # raw: option 0 (-4 > -6); per character: option 1 (-6/12 = -0.5 > -4/2 = -2)
    assert choose([-4.0, -6.0], ["ab", "abcdefghijkl"]) == (0, 1)
    assert choose([-1.0, -1.0], ["a", "a"]) == (0, 0)  # ties go to the first, as numpy.argmax


def test_encode_pair_moves_trailing_space_and_matches_whole_encoding():
    _, tok = tiny_model()
    ctx, cont = encode_pair(tok, "Answer: ", "Paris")
    assert ctx[0] == tok.bos_id
    assert ctx + cont == [tok.bos_id] + tok.encode("Answer: Paris", add_special_tokens=False)
    assert tok.decode(cont) == " Paris"


def test_pair_span_truncates_from_the_left():
    _, tok = tiny_model()
    context = "The quick brown fox jumps over the lazy dog. " * 4
    ctx, cont = encode_pair(tok, context, " Paris")
    span = pair_span(tok, context, " Paris", max_len=10)
    assert len(span.tokens) == 11
    assert list(span.tokens) == (ctx + cont)[-11:]
    assert list(span.tokens[span.start:]) == cont


def test_lambada_accuracy_and_perplexity_by_hand():
    model, tok = tiny_model()
    passages = [("The quick brown fox jumps over the lazy", " dog"), ("It was a truth universally", " acknowledged"),
                ("So the answer is", " 18")]
    items = [LambadaItem(str(i), c, t) for i, (c, t) in enumerate(passages)]
    metrics, records = evaluate_lambada(model, tok, items, batch_size=2, progress=False)
    lls, hits = [], []
    for c, t in passages:
        cx, ct = encode_pair(tok, c, t)
        lp = token_logprobs(model, cx + ct)
        lls.append(lp[len(cx) - 1:].sum().item())
        with torch.no_grad():
            logits = model(torch.tensor([cx + ct]))[0]
        hits.append(all(int(logits[len(cx) - 1 + j].argmax()) == ct[j] for j in range(len(ct))))
    assert [r["greedy"] for r in records] == hits
    assert metrics["acc"] == pytest.approx(sum(hits) / len(hits))
    assert metrics["ppl"] == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-5)


def test_stderr_is_sample_std_over_sqrt_n():
    values = [1.0, 0.0, 0.0, 1.0, 1.0]
    assert stderr(values) == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))
    assert stderr([1.0]) == 0.0


def test_bad_items_are_rejected():
    with pytest.raises(ValueError, match="gold 3"):
        ChoiceItem("x", ["a", "b"], [" c", " d"], ["c", "d"], 3)
    with pytest.raises(ValueError, match="same length"):
        ChoiceItem("x", ["a"], [" c", " d"], ["c", "d"], 0)
    model, tok = tiny_model()
    with pytest.raises(ValueError, match="no items"):
        evaluate_choice(model, tok, [], progress=False)
