"""Log-likelihood tasks: multiple choice (HellaSwag, ARC, PIQA, WinoGrande, MMLU) and LAMBADA.

As in lm-evaluation-harness:
- a (context, continuation) pair is tokenized by encoding `context + continuation` whole and taking the
  tokens past the context's own encoding as the continuation; whitespace at the end of the context moves
  to the front of the continuation first. We prefix the context with BOS (EOS without one) so an empty
  context still has a token to condition on. Pairs longer than `max_len` lose tokens from the left.
- `acc`: the option with the highest summed log-likelihood is the gold one. `acc_norm`: the same after
  dividing each option's log-likelihood by the character length of its text (`len(choice)`).
- LAMBADA: `acc` = the last word is the greedy continuation (every token is the argmax), `ppl` =
  exp(-mean log-likelihood of the last word over passages).
Standard errors are the sample standard deviation over items / sqrt(n).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from dsv3.eval.perplexity import Span, prefix_token, score_spans
from dsv3.eval.tasks import ChoiceItem, LambadaItem

__all__ = ["encode_pair", "pair_span", "choose", "evaluate_choice", "evaluate_lambada", "stderr"]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with the BOS/EOS prefix, continuation ids), split the lm-eval-harness way."""
    stripped = context.rstrip()
    if len(stripped) != len(context):
        continuation = context[len(stripped):] + continuation
        context = stripped
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False) if context else []
    cont = whole[len(ctx):]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    return [prefix_token(tokenizer), *ctx], cont


def pair_span(tokenizer: Any, context: str, continuation: str, max_len: int) -> Span:
    """The span scoring `continuation` after `context`, cut from the left to `max_len` input tokens."""
    ctx, cont = encode_pair(tokenizer, context, continuation)
    tokens = (ctx + cont)[-(max_len + 1):]
    return Span(tuple(tokens), max(1, len(tokens) - len(cont)))


def choose(logprobs: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(argmax of log-likelihood, argmax of log-likelihood / len(choice)); ties go to the first."""
    raw = max(range(len(logprobs)), key=lambda i: logprobs[i])
    norm = max(range(len(logprobs)), key=lambda i: logprobs[i] / max(len(choices[i]), 1))
    return raw, norm


def stderr(values: Sequence[float]) -> float:
    """Standard error of the mean: sample standard deviation / sqrt(n) (0 for n < 2)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _max_len(model: Any, max_len: int | None) -> int:
    return min(max_len or model.args.max_seq_len, model.args.max_seq_len)


def evaluate_choice(model: Any, tokenizer: Any, items: Sequence[ChoiceItem], max_len: int | None = None,
                    batch_size: int = 8, desc: str | None = None, progress: bool = True,
                    acc_norm: bool = True) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """acc and, with `acc_norm`, acc_norm (with standard errors) over the items, and one record per item."""
    if not items:
        raise ValueError("no items to evaluate")
    max_len = _max_len(model, max_len)
    spans = [pair_span(tokenizer, c, k, max_len) for item in items for c, k in zip(item.contexts, item.continuations)]
    scores = score_spans(model, spans, batch_size=batch_size, desc=desc, progress=progress)
    acc, normed, records, k = [], [], [], 0
    for item in items:
        lls = [s.logprob for s in scores[k:k + len(item.choices)]]
        k += len(item.choices)
        raw, norm = choose(lls, item.choices)
        acc.append(float(raw == item.gold))
        normed.append(float(norm == item.gold))
        records.append({"id": item.id, "gold": item.gold, "pred": raw, "pred_norm": norm, "logprobs": lls})
    metrics = {"acc": sum(acc) / len(acc), "acc_stderr": stderr(acc)}
    if acc_norm:
        metrics.update(acc_norm=sum(normed) / len(normed), acc_norm_stderr=stderr(normed))
    metrics["n"] = len(items)
    return metrics, records


def evaluate_lambada(model: Any, tokenizer: Any, items: Sequence[LambadaItem], max_len: int | None = None,
                     batch_size: int = 8, progress: bool = True) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Last-word accuracy (greedy) and perplexity (exp of minus the mean passage log-likelihood)."""
    if not items:
        raise ValueError("no items to evaluate")
    max_len = _max_len(model, max_len)
    spans = [pair_span(tokenizer, item.context, item.target, max_len) for item in items]
    scores = score_spans(model, spans, batch_size=batch_size, desc="lambada", progress=progress)
    acc = [float(s.greedy) for s in scores]
    lls = [s.logprob for s in scores]
    metrics = {"acc": sum(acc) / len(acc), "acc_stderr": stderr(acc),
               "ppl": math.exp(-sum(lls) / len(lls)), "n": len(items)}
    records = [{"id": it.id, "target": it.target, "logprob": s.logprob, "greedy": s.greedy}
               for it, s in zip(items, scores)]
    return metrics, records
