"""Log-likelihood scoring of token spans, and bits-per-byte / perplexity on held-out text.

`score_spans` is the one place the model is run for log-likelihoods (multiple choice, LAMBADA and the
needle test reuse it). A `Span` is a token list and the index from which its tokens are scored: token
i (i >= start) contributes log P(tokens[i] | tokens[:i]). Spans are sorted by length, right-padded and
batched; the model is causal, so padding after a row's last token changes nothing before it. Only the
scored positions go through the output head (`model.hidden` then `model.lm_head` on the gathered
rows, in chunks), so a 129K vocabulary does not need a `[B, T, V]` float32 tensor.

Held-out text: each document is encoded without special tokens and prefixed with BOS (or EOS when a
tokenizer has no BOS, as lm-evaluation-harness does), so every text token is predicted. Documents
longer than the window are scored with a sliding window: windows of `max_len` input tokens start every
`stride` tokens and each scores only the tokens the previous one did not, so after the first window
each token sees at least `max_len - stride` tokens of context. Bits per byte = total NLL in nats /
(ln 2 x UTF-8 bytes of the text); token perplexity = exp(total NLL / scored tokens).
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

__all__ = ["Span", "SpanScore", "PerplexityResult", "score_spans", "document_spans", "prefix_token",
           "evaluate_perplexity", "read_texts"]

LOGIT_CHUNK = 4096  # scored rows per output-head call (4096 x 129280 x 4 B = 2 GiB float32)


@dataclass(frozen=True)
class Span:
    """Score `tokens[start:]`, each given all tokens before it (start >= 1)."""

    tokens: tuple[int, ...]
    start: int

    def __post_init__(self) -> None:
        if not 1 <= self.start < len(self.tokens):
            raise ValueError(f"span start must be in [1, {len(self.tokens) - 1}], got {self.start}")


@dataclass
class SpanScore:
    logprob: float  # sum of log P over the scored tokens, in nats
    num_tokens: int
    greedy: bool  # every scored token was the argmax (greedy decoding would produce them)


# rows x width per forward pass: bounds the [B, H, T, T] attention scores when windows are long
MAX_BATCH_TOKENS = 16384


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_spans(model: Any, spans: Sequence[Span], batch_size: int = 8, desc: str | None = None,
                progress: bool = True) -> list[SpanScore]:
    """Log-likelihood, token count and greedy flag of each span (results in input order)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    limit = model.args.max_seq_len
    for s in spans:
        if len(s.tokens) - 1 > limit:
            raise ValueError(f"span of {len(s.tokens) - 1} input tokens exceeds the model's max_seq_len ({limit})")
    device = _model_device(model)
    order = sorted(range(len(spans)), key=lambda i: -len(spans[i].tokens))
    out: list[SpanScore | None] = [None] * len(spans)
    with tqdm(total=len(spans), desc=desc or "scoring", unit="seq", disable=not progress, leave=False) as bar:
        starts = []  # batches of at most batch_size rows and MAX_BATCH_TOKENS padded tokens (longest first)
        b0 = 0
        while b0 < len(order):
            starts.append(b0)
            b0 += max(1, min(batch_size, MAX_BATCH_TOKENS // max(len(spans[order[b0]].tokens) - 1, 1)))
        for b0, b1 in zip(starts, starts[1:] + [len(order)]):
            batch = [spans[i] for i in order[b0:b1]]
            width = max(len(s.tokens) for s in batch) - 1
            inputs = torch.zeros(len(batch), width, dtype=torch.long)  # [B, T], right padded with id 0
            rows, cols, targets = [], [], []
            for r, s in enumerate(batch):
                toks = torch.tensor(s.tokens, dtype=torch.long)
                inputs[r, :len(toks) - 1] = toks[:-1]
                n = len(toks) - s.start
                rows.append(torch.full((n,), r, dtype=torch.long))
                cols.append(torch.arange(s.start - 1, len(toks) - 1))  # position t predicts token t + 1
                targets.append(toks[s.start:])
            row = torch.cat(rows).to(device)
            col = torch.cat(cols).to(device)
            target = torch.cat(targets).to(device)  # [N]
            h = model.row_hidden(inputs.to(device))  # [B, T, D]
            logprob = torch.empty(len(target), device=device)  # [N]
            hit = torch.empty(len(target), dtype=torch.bool, device=device)
            for c0 in range(0, len(target), LOGIT_CHUNK):
                sl = slice(c0, c0 + LOGIT_CHUNK)
                logits = model.lm_head(h[row[sl], col[sl]]).float()  # [n, V]
                logprob[sl] = torch.log_softmax(logits, dim=-1).gather(1, target[sl, None])[:, 0]
                hit[sl] = logits.argmax(dim=-1) == target[sl]
            sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, row, logprob.double())
            misses = torch.zeros(len(batch), dtype=torch.long, device=device).index_add_(0, row, (~hit).long())
            for r, (total, miss) in enumerate(zip(sums.tolist(), misses.tolist())):
                s = batch[r]
                out[order[b0 + r]] = SpanScore(total, len(s.tokens) - s.start, miss == 0)
            bar.update(len(batch))
    return out  # type: ignore[return-value]


def prefix_token(tokenizer: Any) -> int:
    """The token every scored text is conditioned on: BOS, else EOS."""
    for name in ("bos_id", "eos_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition the first text token on")


def document_spans(ids: Sequence[int], prefix: int, max_len: int, stride: int) -> list[Span]:
    """Sliding windows over `[prefix] + ids` that score every id exactly once.

    A window holds at most `max_len` input tokens (`max_len + 1` tokens with the last target); windows
    start every `stride` tokens; each scores the tokens past the previous window's end."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in [1, max_len={max_len}], got {stride}")
    seq = (int(prefix), *map(int, ids))
    spans, begin, scored_to = [], 0, 1
    while scored_to < len(seq):
        end = min(begin + max_len + 1, len(seq))
        spans.append(Span(seq[begin:end], scored_to - begin))
        scored_to = end
        begin += stride
    return spans


@dataclass
class PerplexityResult:
    bits_per_byte: float
    byte_perplexity: float
    token_perplexity: float
    nll: float  # total, nats
    tokens: int
    bytes: int
    documents: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def evaluate_perplexity(model: Any, tokenizer: Any, texts: Iterable[str], max_len: int | None = None,
                        stride: int | None = None, batch_size: int = 8, progress: bool = True) -> PerplexityResult:
    """Bits per byte and perplexity of `texts` (documents); `max_len` defaults to the model's
    max_seq_len, `stride` to half of `max_len`."""
    max_len = min(max_len or model.args.max_seq_len, model.args.max_seq_len)
    stride = stride or max(1, max_len // 2)
    prefix = prefix_token(tokenizer)
    spans: list[Span] = []
    n_bytes = n_docs = 0
    for text in texts:
        if not text:
            continue
        ids = tokenizer.encode(text, add_special_tokens=False)
        spans.extend(document_spans(ids, prefix, max_len, stride))
        n_bytes += len(text.encode("utf-8"))
        n_docs += 1
    if n_docs == 0:
        raise ValueError("no non-empty text to score")
    scores = score_spans(model, spans, batch_size=batch_size, desc="ppl", progress=progress)
    nll = -sum(s.logprob for s in scores)
    n_tokens = sum(s.num_tokens for s in scores)
    bpb = nll / (math.log(2) * n_bytes)
    return PerplexityResult(bpb, 2.0 ** bpb, math.exp(nll / n_tokens), nll, n_tokens, n_bytes, n_docs)


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Documents of a held-out file: `.jsonl` / `.jsonl.gz` (field "text", one object a line, as
    `dsv3 data prepare` writes val.jsonl) or any other file as one plain-text document."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    name = path.name
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        opener = gzip.open if name.endswith(".gz") else open
        texts = []
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ValueError(f"{path}:{n}: expected a JSON object with a string 'text' field")
                texts.append(obj["text"])
                if limit is not None and len(texts) >= limit:
                    break
        return texts
    return [path.read_text(encoding="utf-8")]
