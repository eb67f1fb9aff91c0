"""Speculative verification: which drafts of a step are kept, and the token that follows them.

A sequence that brought drafts `d_1 .. d_n` ran `n + 1` rows through the main model: row j holds the logits
after its last token and `d_1 .. d_j`. Row j's target distribution `p_j` is exactly what the plain sampler
draws from at that point (`dsv3.engine.sampling.sampling_probs`: penalties counted over the generated tokens
plus `d_1 .. d_j`, the repetition penalty over the prompt too, logit bias, temperature, top-k, top-p, min-p;
one-hot at the argmax for temperature 0).
Requests with a grammar bring no drafts and are sampled by the plain `Sampler`, which holds their grammar state.

The drafts are the MTP module's argmax, a one-hot draft distribution, so speculative rejection sampling
(Leviathan et al. 2023; Chen et al. 2023) reduces to: accept `d_{j+1}` with probability `p_j(d_{j+1})`;
at the first rejection draw from `p_j` with `d_{j+1}` removed (the residual `max(0, p_j - q_j)`,
renormalised); when every draft is accepted, draw one more token from `p_n`. Each kept token then has
exactly the distribution plain sampling would give it. At temperature 0 this is greedy acceptance: a draft is
kept while it equals the argmax, and the first argmax that differs is the step's own token.

Draws use the exponential race of the plain sampler (`argmax(p / E)`, scale-free, so the residual needs no
renormalising); a seeded request takes its uniforms and exponentials from its own generator, in row order.
"""

from __future__ import annotations

import torch

from dsv3.engine.sampling import SamplingParams, sampling_probs


def _plain_greedy(params: list[SamplingParams]) -> bool:
    """Every row an argmax of the raw logits (no penalties or logit bias to apply first)."""
    return all(p.greedy and not p.has_penalties and not getattr(p, "logit_bias", None) for p in params)


def verify(logits: torch.Tensor, params: list[SamplingParams], histories: list[list[int]],
           drafts: list[list[int]], generators: list[torch.Generator | None] | None = None,
           prompts: list[list[int]] | None = None) -> list[list[int]]:
    """Tokens each sequence keeps: its accepted drafts, then one token of its own (`len = accepted + 1`).

    logits `[R, V]`: sequence b's `len(drafts[b]) + 1` rows, sequences in order. `histories[b]`: its generated
    tokens before this step (for the penalties), `prompts[b]` its prompt (for the repetition penalty);
    `generators[b]`: its own random stream, or None."""
    counts = [len(d) + 1 for d in drafts]
    if logits.dim() != 2 or logits.shape[0] != sum(counts):
        raise ValueError(f"logits must be [{sum(counts)}, V] for drafts of lengths {[len(d) for d in drafts]}, "
                         f"got {tuple(logits.shape)}")
    if _plain_greedy(params):
        target = logits.argmax(dim=-1).tolist()  # the one host sync
        return _greedy_keep(target, drafts, counts)
    device = logits.device
    row_params = [p for p, n in zip(params, counts) for _ in range(n)]
    row_hist = [hist + d[:j] for hist, d in zip(histories, drafts) for j in range(len(d) + 1)]
    row_prompts = None if prompts is None else [p for p, n in zip(prompts, counts) for _ in range(n)]
    probs = sampling_probs(logits.float(), row_params, row_hist, prompt_token_ids=row_prompts)  # [R, V]
    next_draft = torch.tensor([d[j] if j < len(d) else -1 for d in drafts for j in range(len(d) + 1)],
                              device=device)  # [R] the draft each row judges, -1 after the last
    has = next_draft >= 0
    index = next_draft.clamp(min=0)[:, None]
    p_draft = probs.gather(1, index)[:, 0].masked_fill(~has, 0.0)  # [R]
    residual = probs.scatter(1, index, 0.0)  # p without the draft ...
    residual = torch.where(has[:, None], residual, probs)  # ... only on rows that judge one
    uniform = torch.empty_like(p_draft)
    noise = torch.empty_like(probs)
    vocab = probs.shape[1]
    seeded_rows: list[int] = []
    row = 0
    for b, n in enumerate(counts):
        gen = generators[b] if generators is not None else None
        if gen is not None:  # its own stream, in row order: uniforms, then exponentials
            uniform[row:row + n] = torch.rand(n, generator=gen, device=device)
            noise[row:row + n] = torch.empty(n, vocab, device=device).exponential_(generator=gen)
            seeded_rows += range(row, row + n)
        row += n
    if len(seeded_rows) < row:
        free = torch.ones(row, dtype=torch.bool, device=device)
        free[seeded_rows] = False
        uniform[free] = torch.rand(int(free.sum()), device=device)
        noise[free] = torch.empty(int(free.sum()), vocab, device=device).exponential_()
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    accept = uniform < p_draft  # [R]; a one-hot row accepts exactly its argmax
    drawn = (residual / noise).argmax(dim=-1)  # [R] the token after a rejection (or after the last draft)
    greedy_rows = torch.tensor([p.greedy for p in row_params], device=device)
    drawn = torch.where(greedy_rows, residual.argmax(dim=-1), drawn)
    accept, drawn = torch.stack([accept.long(), drawn]).tolist()  # the one host sync
    kept: list[list[int]] = []
    row = 0
    for d, n in zip(drafts, counts):
        a = 0
        while a < len(d) and accept[row + a]:
            a += 1
        kept.append(d[:a] + [drawn[row + a]])
        row += n
    return kept


def _greedy_keep(target: list[int], drafts: list[list[int]], counts: list[int]) -> list[list[int]]:
    kept = []
    row = 0
    for d, n in zip(drafts, counts):
        a = 0
        while a < len(d) and target[row + a] == d[a]:
            a += 1
        kept.append(d[:a] + [target[row + a]])
        row += n
    return kept
