"""Sampling parameters and the batched sampler.

`SamplingParams` is one request's decoding recipe, validated once at construction. `Sampler` turns
a batch of next-token logits `[B, V]` into one token per row, each row with its own recipe, on the
logits' device. The order of the logit processors is fixed and documented, because top-p and
min-p give different answers in different orders:

0. the row's grammar mask (structured outputs: disallowed tokens get -inf, `dsv3.engine.grammar`)
   and its `logit_bias` (added to the raw logits, as OpenAI and vLLM do),
1. penalties: first the repetition penalty over the tokens of the prompt and the generated text
   (HF's and vLLM's definition: a seen token's logit is divided by `repetition_penalty` when positive,
   multiplied by it when negative), then presence / frequency penalties from the counts of the row's
   *generated* tokens (OpenAI semantics: `logit[t] -= presence * [count[t] > 0] + frequency * count[t]`),
2. temperature (below `GREEDY_TEMPERATURE` = 1e-5 means greedy, as in vLLM: argmax of the penalised
   logits, nothing below applies; so a tiny temperature never overflows float32),
3. top-k (keep the k largest),
4. top-p (keep the smallest prefix of the sorted, top-k-renormalised distribution whose mass
   reaches p; the most likely token is always kept, however small p is),
5. min-p (keep tokens whose probability is at least `min_p` times the largest one),

then a draw from the renormalised distribution. Draws use the exponential race
(`argmax(p / E)`, `E ~ Exp(1)`), which samples `p` exactly and lets a row with a `seed` take its
noise from its own `torch.Generator`, so a seeded request gives the same tokens whatever else is
in the batch. Log-probabilities reported back are those of the raw model distribution
(`log_softmax` of the logits before any processing), as vLLM does by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

# the most top log-probabilities one request may ask for (OpenAI's limit)
MAX_LOGPROBS = 20
# temperatures below this are greedy (vLLM's _SAMPLING_EPS): dividing by them overflows float32
GREEDY_TEMPERATURE = 1e-5
# logit_bias values are clamped to this range by OpenAI; outside it is refused here
MAX_LOGIT_BIAS = 100.0


@dataclass
class SamplingParams:
    """How to pick the tokens of one request.

    `max_tokens=None` lets a request run to the engine's model-length limit. `top_k` of 0 or -1
    and `top_p` of 1 and `min_p` of 0 switch those filters off. `logprobs=None` reports no
    log-probabilities; an integer N reports the chosen token's plus the N most likely ones.
    `logit_bias` maps token ids to a value in [-100, 100] added to their logits. `grammar` (a
    `dsv3.engine.grammar.Grammar`) constrains every generated token to it (structured outputs).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    grammar: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= 1, or 0 / -1 to disable, got {self.top_k!r}")
        if not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool)
                                            or not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {s!r}")
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"stop_token_ids must hold integers >= 0, got {t!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if (isinstance(self.repetition_penalty, bool) or not isinstance(self.repetition_penalty, (int, float))
                or not 0.0 < self.repetition_penalty <= 10.0):
            raise ValueError(f"repetition_penalty must be in (0, 10] (1 = off), got {self.repetition_penalty!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got {self.logprobs!r}")
        if self.logit_bias is not None:
            bias = {}
            for token, value in dict(self.logit_bias).items():
                if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                    raise ValueError(f"logit_bias keys must be token ids >= 0, got {token!r}")
                if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                        or abs(value) > MAX_LOGIT_BIAS):
                    raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                                     f"got {value!r} for token {token}")
                bias[token] = float(value)
            self.logit_bias = bias or None
        if self.grammar is not None and not callable(getattr(self.grammar, "state", None)):
            raise ValueError(f"grammar must be a dsv3.engine.grammar.Grammar, got {type(self.grammar).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclass
class SamplerOutput:
    """One step's draws. Top-logprob tensors are `[B, K]` with K the batch's largest request
    (rows asking fewer use a prefix); all None when no row asked for logprobs."""

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] float32, raw log-prob of the chosen token
    top_ids: torch.Tensor | None = None  # [B, K] int64
    top_logprobs: torch.Tensor | None = None  # [B, K] float32


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], output_token_ids: list[list[int]],
                    prompt_token_ids: list[list[int]] | None = None) -> torch.Tensor:
    """Row b: the repetition penalty on every token of its prompt (`prompt_token_ids[b]`, when given) and
    output (`logit / r` if positive, `logit * r` if not), then `logits[b, t] -= presence_b * [count > 0] +
    frequency_b * count` over its generated tokens."""
    prompts = prompt_token_ids if prompt_token_ids is not None else [[] for _ in params]
    rows = [b for b, p in enumerate(params) if p.has_penalties and (output_token_ids[b] or
                                                                     (p.repetition_penalty != 1 and prompts[b]))]
    if not rows:
        return logits
    logits = logits.clone()
    device = logits.device
    vocab = logits.shape[-1]
    for b in rows:  # one scatter per penalised row; rows are few and the lists are short
        p = params[b]
        if p.repetition_penalty != 1:
            seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            seen[torch.tensor([*prompts[b], *output_token_ids[b]], dtype=torch.long, device=device)] = True  # [V]
            row = logits[b]
            penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            logits[b] = torch.where(seen, penalised, row)
        if output_token_ids[b] and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(output_token_ids[b], dtype=torch.long, device=device)
            counts = torch.zeros(vocab, dtype=logits.dtype, device=device).scatter_add_(
                0, ids, torch.ones_like(ids, dtype=logits.dtype))  # [V]
            logits[b] -= p.presence_penalty * (counts > 0).to(logits.dtype) + p.frequency_penalty * counts
    return logits


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """Allowed tokens `[B, V]` bool from a packed bitmask `[B, ceil(V / 32)]` int32 (token t is bit
    `t % 32` of word `t // 32`), computed on the bitmask's device."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [B, W, 32]
    return bits.view(bitmask.shape[0], -1)[:, :vocab].bool()  # [B, V]


def apply_bias_and_mask(logits: torch.Tensor, params: list[SamplingParams],
                        bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """Step 0: each row's `logit_bias` added, then the tokens its grammar forbids (`bitmask`, packed as
    `unpack_bitmask` reads it, or None) set to -inf. Returns `logits` itself when nothing applies."""
    rows, cols, values = [], [], []
    vocab = logits.shape[-1]
    for b, p in enumerate(params):
        for token, value in (p.logit_bias or {}).items():
            if token < vocab:  # the server checks ids against the vocabulary; the sampler never fails a step
                rows.append(b)
                cols.append(token)
                values.append(value)
    if rows:
        device = logits.device
        logits = logits.index_put((torch.tensor(rows, device=device), torch.tensor(cols, device=device)),
                                  torch.tensor(values, dtype=logits.dtype, device=device), accumulate=True)
    if bitmask is not None:
        logits = logits.masked_fill(~unpack_bitmask(bitmask, vocab), float("-inf"))
    return logits


def processed_logits(logits: torch.Tensor, params: list[SamplingParams],
                     output_token_ids: list[list[int]] | None = None,
                     bitmask: torch.Tensor | None = None,
                     prompt_token_ids: list[list[int]] | None = None) -> torch.Tensor:
    """Logits `[B, V]` after the grammar mask and logit bias, penalties, temperature and the top-k /
    top-p / min-p filters (filtered entries are `-inf`). Greedy rows come back penalised but unscaled."""
    if logits.dim() != 2 or logits.shape[0] != len(params):
        raise ValueError(f"logits must be [B, V] with B = len(params) = {len(params)}, got {tuple(logits.shape)}")
    logits = apply_bias_and_mask(logits.float(), params, bitmask)
    if output_token_ids is not None:
        logits = apply_penalties(logits, params, output_token_ids, prompt_token_ids)
    device = logits.device
    batch, vocab = logits.shape
    # greedy rows are not scaled; a huge temperature is capped so masked -inf logits stay -inf (not nan)
    temps = torch.tensor([1.0 if p.greedy else min(float(p.temperature), 1e30) for p in params],
                         dtype=torch.float32, device=device)
    logits = logits / temps[:, None]
    sampled = [not p.greedy for p in params]
    need_sort = any(s and (0 < p.top_k < vocab or p.top_p < 1.0) for s, p in zip(sampled, params))
    if need_sort:
        ks = torch.tensor([p.top_k if s and p.top_k > 0 else vocab for s, p in zip(sampled, params)],
                          device=device)
        top_ps = torch.tensor([p.top_p if s else 1.0 for s, p in zip(sampled, params)],
                              dtype=torch.float32, device=device)
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
        rank = torch.arange(vocab, device=device)
        sorted_logits = sorted_logits.masked_fill(rank[None, :] >= ks[:, None], float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # [B, V] mass of the strictly more likely tokens
        cut = (mass_before >= top_ps[:, None]) & (rank[None, :] > 0)  # the most likely token always stays
        sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    min_ps = [p.min_p if s else 0.0 for s, p in zip(sampled, params)]
    if any(m > 0 for m in min_ps):
        min_p = torch.tensor(min_ps, dtype=torch.float32, device=device)
        probs = logits.softmax(dim=-1)
        keep = probs >= min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams],
                   output_token_ids: list[list[int]] | None = None,
                   bitmask: torch.Tensor | None = None,
                   prompt_token_ids: list[list[int]] | None = None) -> torch.Tensor:
    """The distribution `[B, V]` each row draws from; a greedy row is one-hot at its argmax."""
    processed = processed_logits(logits, params, output_token_ids, bitmask, prompt_token_ids)
    probs = processed.softmax(dim=-1)
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    if greedy.any():
        one_hot = torch.zeros_like(probs).scatter_(1, processed.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], one_hot, probs)
    return probs


class Sampler:
    """Batched token selection, one `SamplingParams` (and optional generator) per row.

    Rows whose params carry a `grammar` get a `dsv3.engine.grammar.GrammarState` each, kept here keyed
    by the row's `output_token_ids` list (one list per sequence, held so its id stays unique) for as
    long as the sequence keeps appearing in consecutive steps; a sequence that skips a step (preempted)
    gets a fresh state that replays its generated tokens, so no state outlives its sequence."""

    def __init__(self) -> None:
        self._grammar_states: dict[int, tuple[list[int], Any]] = {}

    def grammar_bitmask(self, params: list[SamplingParams], output_token_ids: list[list[int]] | None,
                        vocab: int, device: torch.device) -> torch.Tensor | None:
        """The packed allowed-token bitmask of this batch's grammar rows (on `device`), None without any."""
        if not any(p.grammar is not None for p in params):
            self._grammar_states.clear()
            return None
        if output_token_ids is None:
            raise ValueError("grammar rows need output_token_ids (the tokens each row generated so far)")
        from dsv3.engine.grammar import token_bitmask
        kept: dict[int, tuple[list[int], Any]] = {}
        states = []
        for p, out in zip(params, output_token_ids):
            if p.grammar is None:
                states.append(None)
                continue
            entry = self._grammar_states.get(id(out))
            if entry is None or entry[0] is not out:
                entry = (out, p.grammar.state())
            kept[id(out)] = entry
            states.append(entry[1])
        self._grammar_states = kept
        return token_bitmask(states, output_token_ids, vocab, device)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 output_token_ids: list[list[int]] | None = None,
                 generators: list[torch.Generator | None] | None = None,
                 prompt_token_ids: list[list[int]] | None = None) -> SamplerOutput:
        """Pick one token per row of `logits` `[B, V]`.

        `output_token_ids[b]` are row b's generated tokens (for the penalties), `prompt_token_ids[b]` its
        prompt's (for the repetition penalty); `generators[b]`, when given, is the row's own random stream
        (seeded requests).
        """
        batch, vocab = logits.shape
        if generators is not None and len(generators) != batch:
            raise ValueError(f"generators must have one entry per row ({batch}), got {len(generators)}")
        bitmask = self.grammar_bitmask(params, output_token_ids, vocab, logits.device)
        if (len(params) == batch and bitmask is None
                and all(p.greedy and not p.has_penalties and p.logprobs is None and not p.logit_bias for p in params)):
            return SamplerOutput(token_ids=logits.argmax(dim=-1))  # nothing to process: the plain argmax
        logits = logits.float()
        processed = processed_logits(logits, params, output_token_ids, bitmask, prompt_token_ids)  # [B, V]
        tokens = processed.argmax(dim=-1)  # [B] greedy choice
        sampled_rows = [b for b, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            probs = processed.softmax(dim=-1)  # [B, V]
            noise = torch.empty_like(probs)
            seeded = [b for b in sampled_rows if generators is not None and generators[b] is not None]
            unseeded = [b for b in sampled_rows if b not in set(seeded)]
            if unseeded:
                noise[unseeded] = torch.empty(len(unseeded), vocab, device=probs.device).exponential_()
            for b in seeded:
                noise[b] = torch.empty(vocab, device=probs.device).exponential_(generator=generators[b])
            noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # a zero draw would make 0/0 = nan
            drawn = (probs / noise).argmax(dim=-1)  # exponential race: P(drawn = t) = probs[t]
            mask = torch.zeros(batch, dtype=torch.bool, device=logits.device)
            mask[sampled_rows] = True
            tokens = torch.where(mask, drawn, tokens)
        out = SamplerOutput(token_ids=tokens)
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        if wanted:
            raw = logits.log_softmax(dim=-1)  # [B, V] raw model distribution
            out.logprobs = raw.gather(1, tokens[:, None]).squeeze(1)
            k = max(wanted)
            if k > 0:
                out.top_logprobs, out.top_ids = raw.topk(min(k, vocab), dim=-1)
        return out
