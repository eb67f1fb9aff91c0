"""Continuous batching: which sequences run this step, and how many of their tokens.

Every step the scheduler fills a token budget (`max_num_batched_tokens`) and a sequence budget
(`max_num_seqs`), in this order:

1. running sequences that are decoding (one token each), oldest (by arrival) first; one that needs a new
   cache block and finds none preempts the *youngest* running sequence (its blocks are freed,
   it goes back to the front of the waiting queue and is later recomputed from its tokens),
2. running sequences still in prefill, oldest first, each with as many of its remaining prompt
   tokens as the budget allows (chunked prefill) but, in a step that also decodes, at most
   `long_prefill_token_threshold` tokens of any one sequence: a long prompt is prefilled in slices
   interleaved with the others' decode steps, so it cannot stall their streams for long,
3. waiting sequences in arrival order: each is given cache blocks for all its tokens (sharing
   prefix-cached blocks) and a first prefill chunk (capped as in 2). Admission stops at the first sequence that
   does not fit, so nobody is overtaken (no starvation), and stops for this step once anything
   was preempted (so a freed block is not handed straight to a newcomer).

The output lists, per scheduled sequence, the first position and the number of tokens to run;
when the chunk reaches the sequence's last token, the step also samples its next token.
`postprocess` advances the sequences with the sampled tokens and retires finished ones.
No model code here; the module is tested with fakes.

Speculative decoding (`num_draft_tokens` k > 0): a decoding sequence brings its last token plus the drafts
the model runner left in `seq.draft_token_ids` (at most k, fewer near `max_tokens`, `max_model_len`, the
token budget or when free blocks run short: drafts are dropped before anyone is preempted for them), and
gets cache slots for them plus k - 1 more, where the MTP module writes its chained guesses. The runner
verifies all of them in the step and returns the tokens it keeps (the accepted drafts and one more);
`postprocess` appends them, counts acceptance per draft position (`spec_drafted`, `spec_accepted`), marks
only the kept tokens computed, and gives back the blocks past them (`BlockManager.trim`), so rejected
drafts leave no trace in the block tables or the prefix cache.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from dsv3.engine.block_manager import BlockManager
from dsv3.engine.sequence import Sequence, SequenceStatus, TokenLogprob


@dataclass
class ScheduledSeq:
    """Run tokens `[start, start + num_tokens)` of `seq`; sample its next token if `sample`. With `drafts`, the
    last `len(drafts)` of those tokens are the drafts (positions past the sequence's tokens), to verify."""

    seq: Sequence
    start: int
    num_tokens: int
    drafts: list[int] = field(default_factory=list)
    sample: bool = field(init=False)

    def __post_init__(self) -> None:
        self.sample = self.start + self.num_tokens - len(self.drafts) == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # retired while scheduling (no room ever)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Waiting queue + running list over one `BlockManager`."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 max_model_len: int | None = None, eos_token_ids: list[int] | None = None,
                 num_draft_tokens: int = 0, long_prefill_token_threshold: int | None = None) -> None:
        """`long_prefill_token_threshold`: the most prompt tokens one sequence prefills in a step that also
        decodes (None: a quarter of `max_num_batched_tokens`; 0: no limit)."""
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({max_num_seqs}) so every running sequence can decode in one step")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len if max_model_len is not None else block_manager.capacity_tokens
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        self.eos_token_ids = set(eos_token_ids or [])
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # by arrival: oldest first, youngest (first preempted) last
        self.num_preemptions = 0
        if num_draft_tokens < 0:
            raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}")
        self.num_draft_tokens = num_draft_tokens
        self.spec_drafted = [0] * num_draft_tokens  # per draft position: drafts verified
        self.spec_accepted = [0] * num_draft_tokens  # of those, accepted
        if long_prefill_token_threshold is None:
            long_prefill_token_threshold = max(1, max_num_batched_tokens // 4)
        if isinstance(long_prefill_token_threshold, bool) or long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {long_prefill_token_threshold}")
        self.long_prefill_token_threshold = long_prefill_token_threshold

    # ---- requests ---------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.num_tokens >= self.max_model_len:
            raise ValueError(f"request {seq.seq_id}: prompt has {seq.num_tokens} tokens, the limit is "
                             f"max_model_len - 1 = {self.max_model_len - 1}")
        if seq.num_blocks_needed(self.block_manager.block_size, seq.num_tokens + 1) > self.block_manager.num_blocks:
            raise ValueError(f"request {seq.seq_id}: prompt of {seq.num_tokens} tokens does not fit the cache "
                             f"({self.block_manager.capacity_tokens} tokens)")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, seq_id: int) -> Sequence | None:
        """Remove a request wherever it is; returns it (finished, reason "abort") or None."""
        for seq in list(self.waiting):
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
                self._finish(seq, "abort")
                return seq
        for seq in self.running:
            if seq.seq_id == seq_id:
                self.running.remove(seq)
                self._finish(seq, "abort")
                return seq
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        scheduled_ids: set[int] = set()

        # 1. decodes, oldest first; make room by preempting the youngest
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_uncomputed_tokens != 1:
                i += 1
                continue
            while not bm.can_append(seq):
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:
                    # it holds every block and still needs one more: it can never grow further
                    self.running.pop()
                    self._finish(seq, "length")
                    out.finished.append(seq)
                    break
                self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # it was preempted or retired; running[i] is now another sequence (or none)
            drafts = self._drafts(seq, budget)
            bm.append_slots(seq, self._reserve(seq, len(drafts)))
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, 1 + len(drafts), drafts))
            scheduled_ids.add(seq.seq_id)
            budget -= 1 + len(drafts)
            i += 1

        # 2. running prefills (chunked), oldest first; in a step with decodes, each in slices
        cap = self.long_prefill_token_threshold if scheduled_ids and self.long_prefill_token_threshold else None
        for seq in self.running:
            if budget <= 0:
                break
            if seq.seq_id in scheduled_ids or seq.num_uncomputed_tokens <= 1:
                continue
            n = min(seq.num_uncomputed_tokens, budget, cap or budget)
            self._reserve_chain(seq, n)
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
            scheduled_ids.add(seq.seq_id)
            budget -= n

        # 3. admissions in arrival order; stop at the first that does not fit
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not bm.can_allocate(seq):
                break
            self.waiting.popleft()
            bm.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            n = min(seq.num_uncomputed_tokens, budget, cap or budget)
            self._reserve_chain(seq, n)
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
            budget -= n
        return out

    # ---- speculative slots ------------------------------------------------------------------
    def _drafts(self, seq: Sequence, budget: int) -> list[int]:
        """The drafts `seq` brings this step: its runner's guesses, as many as the limits and free blocks allow."""
        if not self.num_draft_tokens or not seq.draft_token_ids or getattr(seq.params, "grammar", None) is not None:
            return []  # a grammar's state advances token by token in the sampler: no drafts
        n = min(len(seq.draft_token_ids), self.num_draft_tokens, budget - 1,
                self.max_model_len - seq.num_tokens - 1)  # each kept draft is one more token
        if seq.params.max_tokens is not None:
            n = min(n, seq.params.max_tokens - seq.num_output_tokens - 1)
        while n > 0 and not self.block_manager.can_append(seq, self._reserve(seq, n)):
            n -= 1  # fewer drafts rather than a preemption for them
        return seq.draft_token_ids[:max(n, 0)]

    def _reserve(self, seq: Sequence, num_drafts: int) -> int:
        """Tokens a decoding sequence's blocks hold this step: its tokens, its drafts, and up to k - 1 slots for
        the MTP module's chained guesses (as many as fit; the runner drafts no further than the slots go)."""
        base = seq.num_tokens + num_drafts
        extra = max(self.num_draft_tokens - 1, 0)
        while extra and not self.block_manager.can_append(seq, base + extra):
            extra -= 1
        return base + extra

    def _reserve_chain(self, seq: Sequence, n: int) -> None:
        """A prefill chunk that ends the prompt also drafts: slots for the chained guesses, when free."""
        if self.num_draft_tokens > 1 and seq.num_computed_tokens + n == seq.num_tokens:
            self.block_manager.append_slots(seq, self._reserve(seq, 0))

    def postprocess(self, out: SchedulerOutput, sampled: list[int | tuple[int, TokenLogprob | None]]) -> list[Sequence]:
        """Advance the scheduled sequences by their chunks and append the sampled tokens.

        `sampled` holds one entry per scheduled sequence with `sample` true, in `out.scheduled`
        order: a token id, or `(token id, TokenLogprob)`. Returns the sequences that finished.
        """
        to_sample = [s for s in out.scheduled if s.sample]
        if len(sampled) != len(to_sample):
            raise ValueError(f"expected {len(to_sample)} sampled tokens, got {len(sampled)}")
        finished: list[Sequence] = list(out.finished)
        tokens = iter(sampled)
        bm = self.block_manager
        for item in out.scheduled:
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                if item.sample:
                    next(tokens)
                continue  # aborted between schedule and postprocess
            if not item.sample:
                seq.num_computed_tokens = item.start + item.num_tokens
                bm.commit(seq)
                continue
            entries = next(tokens)
            entries = entries if isinstance(entries, list) else [entries]
            accepted = len(entries) - 1  # kept drafts; the last entry is the step's own token
            if not 0 <= accepted <= len(item.drafts):
                raise ValueError(f"sequence {seq.seq_id}: {len(entries)} tokens for {len(item.drafts)} drafts")
            for j in range(len(item.drafts)):
                self.spec_drafted[j] += 1
                self.spec_accepted[j] += j < accepted
            reason = None
            for entry in entries:
                token, logprob = entry if isinstance(entry, tuple) else (entry, None)
                seq.append_token(token, logprob)
                reason = self.check_stop(seq)
                if reason is not None:
                    break
            # computed: the chunk's own tokens and the kept drafts, never the newest token
            seq.num_computed_tokens = min(item.start + item.num_tokens - len(item.drafts) + accepted,
                                          seq.num_tokens - 1)
            bm.commit(seq)
            bm.trim(seq, seq.num_computed_tokens)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def check_stop(self, seq: Sequence) -> str | None:
        """"stop" on an EOS (unless ignore_eos) or a stop token id, "length" at max_tokens or
        max_model_len; None to go on. Stop strings are checked on text by the caller."""
        token = seq.last_token_id
        p = seq.params
        if (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids:
            return "stop"
        if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            return "length"
        if seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a running or waiting sequence from outside (e.g. a stop string matched)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, reason)

    # ---- internals --------------------------------------------------------------------------
    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.draft_token_ids = []
        if seq.block_table:
            self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.draft_token_ids = []  # its prefill, recomputed, drafts again
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
