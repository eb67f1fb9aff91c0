"""How well the MTP module predicts one token further: the draft quality behind speculative decoding.

On held-out text, windows of `max_len` tokens (BOS first) go through `model(tokens, return_mtp=True)`.
At position t the main head predicts token t+1 and MTP depth k predicts token t+k+1 (from the main
model's hidden state at t and the embedding of token t+k). Reported: top-1 accuracy of each, and for
depth 1 how often its guess equals the main model's own greedy choice one step later (what a draft must
match to be accepted under greedy verification).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def evaluate_mtp(model: Any, tokenizer: Any, texts: Iterable[str], max_len: int = 512,
                 max_tokens: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Accuracies over every position t that has a token t+2 (text tokens, teacher-forced); `n` is the number
    of documents read, `positions` the positions scored."""
    if not len(model.mtp):
        raise ValueError("the model has no MTP module (num_nextn_predict_layers = 0)")
    device = next(model.parameters()).device
    counts = {"next": 0, "mtp": 0, "agree": 0, "positions": 0}
    texts = list(texts)
    documents = 0
    for text in tqdm(texts, desc="mtp", unit="doc", disable=not progress, leave=False):
        documents += 1
        ids = tokenizer.encode(text)
        for i in range(0, len(ids), max_len):
            window = ids[i:i + max_len]
            n = len(window) - 2  # positions t with a token t+2
            if n < 1:
                continue
            tokens = torch.tensor([window], device=device)
            logits, mtp = model(tokens, return_mtp=True)
            main_pred = logits[0].argmax(-1)  # [T]: token t+1
            mtp_pred = mtp[0][0].argmax(-1)  # [T-1]: token t+2
            counts["next"] += int((main_pred[:n] == tokens[0, 1:n + 1]).sum())
            counts["mtp"] += int((mtp_pred[:n] == tokens[0, 2:n + 2]).sum())
            counts["agree"] += int((mtp_pred[:n] == main_pred[1:n + 1]).sum())
            counts["positions"] += n
        if max_tokens and counts["positions"] >= max_tokens:
            break
    n = max(counts["positions"], 1)
    return {"next_token_acc": counts["next"] / n, "mtp_next_next_acc": counts["mtp"] / n,
            "mtp_agrees_with_greedy": counts["agree"] / n, "positions": counts["positions"], "n": documents}
