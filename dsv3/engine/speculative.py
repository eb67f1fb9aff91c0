"""Greedy decoding with the MTP module as a one-token draft (self-speculative decoding), batch 1.

Each step feeds two tokens to the main model: the token it chose last (`t`) and the MTP module's guess for
the token after it (`d`). If the main model's choice after `t` equals `d`, both are kept and its choice after
`d` is the next token for free; otherwise only `t` is kept. The output is exactly greedy decoding's (up to
float rounding between a one-token and a two-token forward); the gain is that an accepted draft yields two
tokens per main-model pass, which is nearly free when decoding is bound by reading the weights.

Caches: the model's contiguous latent caches (`setup_cache`), main blocks and MTP block alike. A rejected
draft leaves its latents past the kept length; they are overwritten later and never attended to, since
attention reads only up to the current position.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from dsv3.model import Transformer


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


def _draft(model: Transformer, next_tokens: list[int], h: torch.Tensor, start_pos: int) -> int:
    """Run MTP depth 1 over positions `start_pos...` (hidden `h [1, n, D]`, the tokens one ahead) and return
    its guess after the last one."""
    tokens = torch.tensor([next_tokens], device=h.device)
    return int(model.mtp_step(0, tokens, h, start_pos=start_pos)[0][0, -1].argmax())


@torch.no_grad()
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
    device = model.embed_tokens.weight.device
    start = time.perf_counter()
    model.setup_cache(1, total)
    try:
        ids = torch.tensor([prompt], device=device)
        h = model.hidden(ids)  # [1, P, D], fills the main caches
        nxt = int(model.lm_head(h[:, -1]).argmax(-1))
        pos = len(prompt) - 1  # position of the last token fed to the main model
        # one MTP pass per step: position t pairs h_t with the embedding of token t + 1; the last one drafts
        draft = _draft(model, prompt[1:] + [nxt], h, 0)
        out: list[int] = []
        result = SpeculativeResult(out)
        while len(out) < max_new_tokens:
            out.append(nxt)
            if nxt in eos:
                result.finish_reason = "stop"
                break
            if len(out) == max_new_tokens:
                break
            h2 = model.hidden(torch.tensor([[nxt, draft]], device=device), start_pos=pos + 1)  # [1, 2, D]
            choice = model.lm_head(h2)[0].argmax(-1).tolist()  # greedy after nxt, after draft
            result.main_passes += 1
            result.drafts += 1
            if choice[0] == draft:
                result.accepted += 1
                out.append(draft)
                if draft in eos:
                    result.finish_reason = "stop"
                    break
                nxt, draft = choice[1], _draft(model, [draft, choice[1]], h2, pos + 1)
                pos += 2
            else:
                nxt, draft = choice[0], _draft(model, [choice[0]], h2[:, :1], pos + 1)
                pos += 1
        result.seconds = time.perf_counter() - start
        return result
    finally:
        model.clear_cache()
