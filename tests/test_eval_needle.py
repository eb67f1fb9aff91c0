"""Needle in a haystack: context construction, scoring consistent with greedy decoding, PNG + JSON output."""

from __future__ import annotations

import json

import pytest
import torch

from dsv3.eval.needle import NEEDLE, QUESTION, build_context, run_needle, save_needle
from test_eval_support import CORPUS, tiny_model

FILLER = [CORPUS[:1500], CORPUS[1500:3000]]


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_build_context_places_needle_and_fits(depth):
    _, tok = tiny_model()
    filler_ids = tok.encode("\n\n".join(FILLER), add_special_tokens=False)
    ctx, ans = build_context(tok, filler_ids, 200, depth, "4817263")
    assert len(ctx) + len(ans) <= 200 and len(ctx) + len(ans) >= 180  # fills the requested length
    assert ctx[0] == tok.bos_id
    text = tok.decode(ctx[1:])
    needle = NEEDLE.format("4817263").strip()
    assert text.count(needle) == 1 and text.endswith(QUESTION)
    at = text.index(needle) / len(text[:-len(QUESTION)])
    assert abs(at - depth) < 0.2
    assert tok.decode(ans) == " 4817263."


@torch.no_grad()
def test_run_needle_found_equals_greedy_decoding_and_writes_png_json(tmp_path):
    model, tok = tiny_model()
    result = run_needle(model, tok, FILLER, lengths=[128, 256, 10_000], depths=[0.0, 0.5, 1.0], trials=2,
                        batch_size=4, progress=False)
    assert result["lengths"] == [128, 256]  # 10,000 is beyond the model's 512-token window
    assert len(result["accuracy"]) == 3 and all(len(row) == 2 for row in result["accuracy"])
    assert len(result["trials"]) == 2 * 3 * 2
    # `found` is "greedy decoding writes the number": check one trial by decoding greedily by hand
    trial = result["trials"][0]
    filler_ids = tok.encode("\n\n".join(FILLER), add_special_tokens=False)
    ctx, ans = build_context(tok, filler_ids, trial["length"], trial["depth"], trial["number"])
    ids, out = list(ctx), []
    for _ in range(len(ans)):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
    assert trial["found"] == (out == ans) and trial["tokens"] == len(ctx) + len(ans)
    for i, d in enumerate(result["depths"]):
        for j, L in enumerate(result["lengths"]):
            cell = [t["found"] for t in result["trials"] if t["depth"] == d and t["length"] == L]
            assert result["accuracy"][i][j] == sum(cell) / len(cell)
            lps = [t["logprob"] for t in result["trials"] if t["depth"] == d and t["length"] == L]
            assert result["answer_logprob"][i][j] == pytest.approx(sum(lps) / len(lps))

    json_path, png_path = save_needle(result, tmp_path / "out")
    assert json.loads(json_path.read_text())["accuracy"] == result["accuracy"]
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    assert matplotlib.image.imread(png_path).ndim == 3


def test_needle_errors():
    model, tok = tiny_model()
    with pytest.raises(ValueError, match="depths"):
        run_needle(model, tok, FILLER, lengths=[64], depths=[1.5], progress=False)
    with pytest.raises(ValueError, match="window"):
        run_needle(model, tok, FILLER, lengths=[100_000], progress=False)
    with pytest.raises(ValueError, match="too short"):
        run_needle(model, tok, FILLER, lengths=[16], depths=[0.5], progress=False)
