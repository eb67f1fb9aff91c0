"""Bits-per-byte / perplexity and span scoring against hand computations from the model's logits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dsv3.eval.perplexity import Span, document_spans, evaluate_perplexity, read_texts, score_spans
from test_eval_support import tiny_model, token_logprobs

TEXT = "It was a truth universally acknowledged, that a single man must be in want of a wife. Ünïcödé ✓."
LONG = ("The quick brown fox jumps over the lazy dog; numbers 2024 and 3.14 follow. " * 3).strip()


def test_bits_per_byte_equals_hand_computation():
    model, tok = tiny_model()
    ids = [tok.bos_id] + tok.encode(TEXT, add_special_tokens=False)
    nll = -token_logprobs(model, ids).sum().item()
    n_bytes = len(TEXT.encode("utf-8"))
    assert n_bytes > len(TEXT)  # multi-byte characters: bytes, not characters, are counted
    res = evaluate_perplexity(model, tok, [TEXT], progress=False)
    assert res.bytes == n_bytes and res.tokens == len(ids) - 1 and res.documents == 1
    assert res.nll == pytest.approx(nll, rel=1e-5)
    assert res.bits_per_byte == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert res.byte_perplexity == pytest.approx(2 ** res.bits_per_byte, rel=1e-9)
    assert res.token_perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)


def test_batched_documents_sum_per_document_hand_values():
    """Two documents of different lengths in one padded batch give the sum of their solo computations."""
    model, tok = tiny_model()
    docs = [TEXT, "Short one.", LONG[:150]]
    nll = sum(-token_logprobs(model, [tok.bos_id] + tok.encode(d, add_special_tokens=False)).sum().item()
              for d in docs)
    res = evaluate_perplexity(model, tok, docs, batch_size=3, progress=False)
    assert res.documents == 3 and res.bytes == sum(len(d.encode()) for d in docs)
    assert res.nll == pytest.approx(nll, rel=1e-5)


def test_sliding_window_equals_one_full_window_when_text_fits():
    model, tok = tiny_model()
    n = len(tok.encode(TEXT, add_special_tokens=False))
    full = evaluate_perplexity(model, tok, [TEXT], max_len=512, stride=512, progress=False)
    for max_len, stride in ((n, 1), (n, n // 2), (n + 5, 3), (512, 7)):
        res = evaluate_perplexity(model, tok, [TEXT], max_len=max_len, stride=stride, progress=False)
        assert res.tokens == full.tokens
        assert res.nll == pytest.approx(full.nll, rel=1e-6)


def hf_reference_nll(model, seq: list[int], window: int, stride: int) -> tuple[float, int]:
    """The `transformers` docs' fixed-length-model perplexity loop, windows of `window` tokens."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(seq), stride):
        end = min(begin + window, len(seq))
        trg_len = end - prev_end
        lp = token_logprobs(model, seq[begin:end])  # predicts seq[begin+1:end]
        lp = lp[-min(trg_len, len(lp)):]
        nll -= lp.sum().item()
        count += len(lp)
        prev_end = end
        if end == len(seq):
            break
    return nll, count


@pytest.mark.parametrize("max_len,stride", [(16, 5), (16, 16), (12, 1), (9, 8)])
def test_sliding_window_matches_reference_loop(max_len, stride):
    model, tok = tiny_model()
    ids = tok.encode(LONG, add_special_tokens=False)
    assert len(ids) > 3 * max_len
    nll, count = hf_reference_nll(model, [tok.bos_id] + ids, max_len + 1, stride)
    res = evaluate_perplexity(model, tok, [LONG], max_len=max_len, stride=stride, batch_size=4, progress=False)
    assert count == len(ids) == res.tokens
    assert res.nll == pytest.approx(nll, rel=1e-5)


@pytest.mark.parametrize("n,max_len,stride", [(1, 4, 2), (10, 4, 4), (37, 8, 3), (37, 8, 1), (100, 16, 10)])
def test_document_spans_cover_each_token_once_with_enough_context(n, max_len, stride):
    ids = list(range(10, 10 + n))
    seq = [1] + ids  # prefix token 1, every value distinct
    spans = document_spans(ids, 1, max_len, stride)
    scored = []
    for s in spans:
        assert len(s.tokens) - 1 <= max_len
        first = seq.index(s.tokens[0])
        assert list(s.tokens) == seq[first:first + len(s.tokens)]
        for j in range(s.start, len(s.tokens)):
            pos = first + j  # index in the full sequence
            scored.append(pos)
            assert j >= min(pos, max_len - stride)  # context seen by this token
    assert scored == list(range(1, n + 1))


def test_score_spans_greedy_flag_and_order():
    model, tok = tiny_model()
    ctx = [tok.bos_id] + tok.encode("The quick brown", add_special_tokens=False)
    with torch.no_grad():
        g1 = int(model(torch.tensor([ctx]))[0, -1].argmax())
        g2 = int(model(torch.tensor([ctx + [g1]]))[0, -1].argmax())
    other = (g2 + 7) % model.args.vocab_size
    spans = [Span(tuple(ctx + [g1, g2]), len(ctx)), Span(tuple(ctx + [g1, other]), len(ctx)),
             Span(tuple(ctx[:2] + [g1]), 2)]
    scores = score_spans(model, spans, batch_size=2, progress=False)
    assert [s.greedy for s in scores[:2]] == [True, False]
    for span, score in zip(spans, scores):
        expected = token_logprobs(model, list(span.tokens))[span.start - 1:].sum().item()
        assert score.logprob == pytest.approx(expected, rel=1e-5)
        assert score.num_tokens == len(span.tokens) - span.start


def test_errors_for_people(tmp_path):
    model, tok = tiny_model()
    with pytest.raises(ValueError, match="stride"):
        document_spans([1, 2, 3], 0, 4, 5)
    with pytest.raises(ValueError, match="start"):
        Span((1, 2), 0)
    with pytest.raises(ValueError, match="max_seq_len"):
        score_spans(model, [Span(tuple(range(model.args.max_seq_len + 2)), 1)], progress=False)
    with pytest.raises(ValueError, match="no non-empty text"):
        evaluate_perplexity(model, tok, ["", ""], progress=False)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_texts(tmp_path / "nope.jsonl")


def test_read_texts_jsonl_and_plain(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "source": "s"}) for t in ["a", "b ✓", "c"]) + "\n\n")
    assert read_texts(path) == ["a", "b ✓", "c"]
    assert read_texts(path, limit=2) == ["a", "b ✓"]
    plain = tmp_path / "doc.txt"
    plain.write_text("line one\nline two\n")
    assert read_texts(plain) == ["line one\nline two\n"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_texts(bad)
