"""MTP accuracy: the batched training-path numbers equal a token-by-token count through the drafting path."""

import torch

from dsv3.config import ModelArgs
from dsv3.engine.speculative import SequenceCache
from dsv3.eval.mtp import evaluate_mtp
from dsv3.model import Transformer


class _IdsTokenizer:
    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]


def test_mtp_accuracy_equals_incremental_count():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("tiny").replace(vocab_size=16)).eval()
    docs = [" ".join(str(int(t)) for t in torch.randint(0, 16, (n,))) for n in (30, 17)]
    got = evaluate_mtp(model, _IdsTokenizer(), docs, max_len=64)
    hits = {"next": 0, "mtp": 0, "agree": 0}
    n_total = 0
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([_IdsTokenizer().encode(doc)])
            seq = SequenceCache(model, 64)  # the drafting path: MTP over a paged cache, one token at a time
            h = seq.hidden(ids[0].tolist(), 0)  # [T, D]
            main = model.lm_head(h).argmax(-1)
            for t in range(ids.shape[1] - 2):
                draft = seq.draft([int(ids[0, t + 1])], h[t:t + 1], t)
                hits["next"] += int(main[t] == ids[0, t + 1])
                hits["mtp"] += int(draft == ids[0, t + 2])
                hits["agree"] += int(draft == main[t + 1])
                n_total += 1
    assert got["positions"] == n_total
    assert got["next_token_acc"] == hits["next"] / n_total
    assert got["mtp_next_next_acc"] == hits["mtp"] / n_total
    assert got["mtp_agrees_with_greedy"] == hits["agree"] / n_total
