"""One request as the engine sees it: its tokens, its place in the paged cache, its state.

A `Sequence` is plain Python (no tensors) so the block manager and the scheduler can be tested
without a model. Its tokens are the prompt followed by the generated tokens; `num_computed_tokens`
counts the leading tokens whose latents are already in the cache (after a prefix-cache hit that
count starts above zero; after a preemption it goes back to zero and the tokens are recomputed).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # sampling.py imports torch; this module stays plain Python
    from dsv3.engine.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """Log-probability of one generated token, plus the most likely alternatives at that step."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


class Sequence:
    """A request: prompt token ids, generated token ids, status, block table and sampling state."""

    def __init__(self, seq_id: int, prompt_token_ids: list[int], params: SamplingParams | None = None,
                 arrival: int | None = None, prompt: str | None = None) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {seq_id}: prompt must hold at least one token")
        self.seq_id = seq_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        if params is None:
            from dsv3.engine.sampling import SamplingParams
            params = SamplingParams()
        self.params = params
        self.arrival = seq_id if arrival is None else arrival  # first-come order
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.block_table: list[int] = []  # physical block id of each logical block
        self.num_computed_tokens = 0  # leading tokens whose latents are in the cache
        self.num_cached_tokens = 0  # of those, how many came from the prefix cache at admission
        self.num_hashed_blocks = 0  # leading blocks already entered in the prefix cache
        self.num_preemptions = 0
        self.output_logprobs: list[TokenLogprob] = []
        self.generator = None  # torch.Generator of a seeded request, made by the model runner
        # speculative decoding: the MTP module's guesses for the tokens after the last one, checked next step
        self.draft_token_ids: list[int] = []

    # ---- tokens -----------------------------------------------------------------------------
    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def token_id_at(self, pos: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[pos] if pos < n else self.output_token_ids[pos - n]

    def token_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    def append_token(self, token_id: int, logprob: TokenLogprob | None = None) -> None:
        self.output_token_ids.append(int(token_id))
        if logprob is not None:
            self.output_logprobs.append(logprob)

    # ---- state ------------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def num_blocks_needed(self, block_size: int, num_tokens: int | None = None) -> int:
        n = self.num_tokens if num_tokens is None else num_tokens
        return (n + block_size - 1) // block_size

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, status={self.status.value}, tokens={self.num_prompt_tokens}"
                f"+{self.num_output_tokens}, computed={self.num_computed_tokens}, blocks={self.block_table})")
