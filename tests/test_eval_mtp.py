"""MTP accuracy: the batched training-path numbers equal a token-by-token count through the drafting path."""

import torch

from dsv3.config import ModelArgs
from dsv3.engine.attention import Chunk, PagedAttention
from dsv3.eval.mtp import evaluate_mtp
from dsv3.model import Transformer
from dsv3.model.attention import AttentionMeta


class SequenceCache:
    """One sequence on the engine's paged PyTorch backend (a single block as long as the sequence), the MTP
    module's latents after the main layers': the drafting path, one forward at a time."""

    def __init__(self, model: Transformer, max_len: int) -> None:
        args = model.args
        cache = torch.zeros(args.n_layers + len(model.mtp), max_len, args.kv_lora_rank + args.qk_rope_head_dim)
        self.model = model
        self.backend = PagedAttention(cache, block_size=max_len, max_seq_len=args.max_seq_len)

    def _meta(self, start: int, n: int) -> tuple[torch.Tensor, AttentionMeta]:
        return torch.arange(start, start + n), AttentionMeta(self.backend, step=self.backend.prepare([Chunk([0], start, n)]))

    def hidden(self, tokens: list[int], start: int) -> torch.Tensor:
        positions, meta = self._meta(start, len(tokens))
        return self.model.hidden(torch.tensor(tokens), positions, meta)

    def draft(self, next_tokens: list[int], h: torch.Tensor, start: int) -> int:
        positions, meta = self._meta(start, len(next_tokens))
        h = self.model.mtp_hidden(0, torch.tensor(next_tokens), h, positions, meta)
        return int(self.model.lm_head(h[-1]).argmax())


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
    assert got["positions"] == n_total and got["n"] == len(docs)
    assert got["next_token_acc"] == hits["next"] / n_total
    assert got["mtp_next_next_acc"] == hits["mtp"] / n_total
    assert got["mtp_agrees_with_greedy"] == hits["agree"] / n_total
