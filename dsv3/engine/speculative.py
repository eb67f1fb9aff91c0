"""Greedy decoding with the MTP module as a one-token draft (self-speculative decoding), batch 1.

Each step feeds two tokens to the main model: the token it chose last (`t`) and the MTP module's guess for
the token after it (`d`). If the main model's choice after `t` equals `d`, both are kept and its choice after
`d` is the next token for free; otherwise only `t` is kept. The output is exactly greedy decoding's (up to
float rounding between a one-token and a two-token forward); the gain is that an accepted draft yields two
tokens per main-model pass, which is nearly free when decoding is bound by reading the weights.

Cache: one sequence on the engine's paged PyTorch backend (`dsv3.engine.attention.PagedAttention`, a single
block as long as the sequence), the MTP module's latents after the main layers'; every pass is the model's
one forward (`Transformer.hidden` / `mtp_hidden`). A rejected draft leaves its latents past the kept length;
they are overwritten later and never attended to, since attention reads only up to the current position.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from dsv3.engine.attention import Chunk, PagedAttention
from dsv3.model import Transformer
from dsv3.model.attention import AttentionMeta


@dataclass
class SpeculativeResult:
    token_ids: list[int]
    main_passes: int = 0  # forward passes of the main model after the prefill
    drafts: int = 0
    accepted: int = 0
    seconds: float = 0.0
    finish_reason: str = "length"

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafts, 1)


class SequenceCache:
    """A paged cache for one sequence of up to `max_len` tokens, main layers and MTP modules."""

    def __init__(self, model: Transformer, max_len: int) -> None:
        args = model.args
        weight = model.embed_tokens.weight
        cache = torch.zeros(args.n_layers + len(model.mtp), max_len, args.kv_lora_rank + args.qk_rope_head_dim,
                            device=weight.device, dtype=weight.dtype)  # [layers, slots, C + R]
        self.model = model
        self.device = weight.device
        self.backend = PagedAttention(cache, block_size=max_len, max_seq_len=args.max_seq_len)

    def _meta(self, start: int, n: int) -> tuple[torch.Tensor, AttentionMeta]:
        positions = torch.arange(start, start + n, device=self.device)
        return positions, AttentionMeta(self.backend, step=self.backend.prepare([Chunk([0], start, n)]))

    def hidden(self, tokens: list[int], start: int) -> torch.Tensor:
        """The main model over `tokens` at positions `start...` -> hidden `[n, D]`."""
        positions, meta = self._meta(start, len(tokens))
        return self.model.hidden(torch.tensor(tokens, device=self.device), positions, meta)

    def draft(self, next_tokens: list[int], h: torch.Tensor, start: int) -> int:
        """MTP depth 1 over positions `start...` (hidden `h [n, D]`, the tokens one ahead): its guess after the
        last one."""
        positions, meta = self._meta(start, len(next_tokens))
        h = self.model.mtp_hidden(0, torch.tensor(next_tokens, device=self.device), h, positions, meta)
        return int(self.model.lm_head(h[-1]).argmax())


@torch.inference_mode()
def speculative_greedy(model: Transformer, prompt: list[int], max_new_tokens: int,
                       eos_ids: Iterable[int] = ()) -> SpeculativeResult:
    """Greedy continuation of `prompt` drafted by MTP depth 1. Needs a model with an MTP module."""
    if not len(model.mtp):
        raise ValueError("speculative decoding needs an MTP module (num_nextn_predict_layers >= 1)")
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    total = len(prompt) + max_new_tokens + 2
    if total > model.args.max_seq_len:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len "
                         f"({model.args.max_seq_len})")
    eos = set(eos_ids)
    start = time.perf_counter()
    seq = SequenceCache(model, total)
    h = seq.hidden(prompt, 0)  # [P, D]
    nxt = int(model.lm_head(h[-1]).argmax())
    pos = len(prompt) - 1  # position of the last token fed to the main model
    # one MTP pass per step: position t pairs h_t with the embedding of token t + 1; the last one drafts
    draft = seq.draft(prompt[1:] + [nxt], h, 0)
    out: list[int] = []
    result = SpeculativeResult(out)
    while len(out) < max_new_tokens:
        out.append(nxt)
        if nxt in eos:
            result.finish_reason = "stop"
            break
        if len(out) == max_new_tokens:
            break
        h2 = seq.hidden([nxt, draft], pos + 1)  # [2, D]
        choice = model.lm_head(h2).argmax(-1).tolist()  # greedy after nxt, after draft
        result.main_passes += 1
        result.drafts += 1
        if choice[0] == draft:
            result.accepted += 1
            out.append(draft)
            if draft in eos:
                result.finish_reason = "stop"
                break
            nxt, draft = choice[1], seq.draft([draft, choice[1]], h2, pos + 1)
            pos += 2
        else:
            nxt, draft = choice[0], seq.draft([choice[0]], h2[:1], pos + 1)
            pos += 1
    result.seconds = time.perf_counter() - start
    return result
