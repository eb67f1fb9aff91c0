"""MTP speculative decoding: the drafter that runs the model's MTP module(s) inside the engine.

Speculation is one path through the engine (`LLM(speculative="mtp", num_draft_tokens=k)`): the scheduler gives
each decoding sequence its last token plus the drafts left in `seq.draft_token_ids`, the model runner verifies
all drafts of all sequences in one main-model forward (each of a sequence's `1 + k` tokens is a decode row over
the paged cache, attending up to its own position), `dsv3.engine.rejection.verify` keeps the accepted drafts and
one token more, and then `MTPDrafter.propose` (here) drafts the next step's guesses.

The MTP module at position t reads the main model's final-normed hidden state `h(t)` and the embedding of token
t + 1, and predicts token t + 2. Its latents live in the same paged cache, in the layer after the main layers,
so preemption, prefix sharing and block bookkeeping are the main layers'. Per step, `propose`:
1. catches up: runs MTP module 0 over every position whose main hidden state the step computed and kept (a
   prefill chunk's tokens, or a verified sequence's first token and its accepted drafts), each with the token
   after it. This writes the module's latents there (rows of rejected drafts are never written: the main
   model's rows past the accepted ones are left out), and its last row's output is the first draft;
2. chains: for k > 1 it drafts again from its own output (the hidden state after `shared_head.norm`) and its own
   last guess, one position further each time, with MTP module min(i, D - 1) for draft i + 1 (the last module
   chained on its own output, as SGLang's NextN does). Those latents are provisional: the next step's catch-up
   rewrites every position from the first unverified one before anything reads them as settled.
No hidden state is carried between steps: the catch-up starts from the main model's rows of the same step.
Chained drafts stop where the sequence's cache slots or `max_seq_len` end (the scheduler reserves k - 1 slots
when it can). With D > 1 modules, modules past the first only see the latents they wrote while chaining.

A latent of the last position of a block shared through the prefix cache was written with the token that
followed it in the sequence that computed it; another sequence sharing the block may continue differently,
which can only change its drafts (and so its acceptance), never its output.

Steps where every row is one token replay CUDA graphs of the MTP module when the runner captured them
(`dsv3.engine.cuda_graphs.DecodeGraphs` with `mtp=` the module index).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.engine.attention import Chunk, PagedAttention
from dsv3.engine.cuda_graphs import DecodeGraphs
from dsv3.engine.sequence import Sequence
from dsv3.model import Transformer
from dsv3.model.attention import AttentionMeta


@dataclass
class DraftJob:
    """One scheduled sequence's part of the catch-up: positions `start .. start + len(next_tokens) - 1`, whose
    main hidden states are rows `rows` of the step, each paired with the token after it. `single`: run them as
    one-token rows (decode-shaped); `draft`: the sequence samples this step and wants new drafts."""

    seq: Sequence
    start: int
    rows: list[int]
    next_tokens: list[int]
    single: bool
    draft: bool


class MTPDrafter:
    """Drafts `num_draft_tokens` tokens per sequence with the MTP module(s), on the runner's backend."""

    def __init__(self, model: Transformer, backend: PagedAttention, num_draft_tokens: int, block_size: int) -> None:
        if not len(model.mtp):
            raise ValueError("speculative='mtp' needs a model with an MTP module (num_nextn_predict_layers >= 1)")
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
        self.model = model
        self.backend = backend
        self.k = num_draft_tokens
        self.block_size = block_size
        self.max_seq_len = model.args.max_seq_len
        self.device = model.embed_tokens.weight.device
        self.graphs: dict[int, DecodeGraphs] = {}  # per MTP module index, set by the runner
        self.graph_steps = 0

    @property
    def modules_used(self) -> list[int]:
        """Indices of the MTP modules the drafts run through."""
        return list(range(min(self.k, len(self.model.mtp))))

    def _run(self, module: int, tokens: torch.Tensor, h_prev: torch.Tensor, positions: list[int],
             chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module `module` over flat rows (tokens `[N]` on the device) -> (normed hidden `[N, D]`, greedy next
        tokens `[N]`), from a CUDA graph when every row is one token and one was captured for the module."""
        dev = self.device
        graphs = self.graphs.get(module)
        if graphs is not None and all(c.num_tokens == 1 for c in chunks) and len(chunks) <= graphs.sizes[-1]:
            bs = self.block_size
            tables = [c.block_table[: c.start // bs + 1] for c in chunks]
            width = max(len(t) for t in tables)
            if width <= graphs.max_blocks:
                slots = [t[-1] * bs + c.start % bs for t, c in zip(tables, chunks)]
                flat = positions + slots
                for t in tables:
                    flat += t + [0] * (width - len(t))
                n = len(chunks)
                packed = torch.tensor(flat, dtype=torch.long).to(dev, non_blocking=True)
                pos, slot = packed[: 2 * n].view(2, n)
                _, greedy, hidden = graphs.run(tokens, pos, slot, packed[2 * n:].view(n, width), pos + 1,
                                               h_prev=h_prev, hidden=True)
                self.graph_steps += 1
                return hidden, greedy
        step = self.backend.prepare(chunks)
        h = self.model.mtp_hidden(module, tokens, h_prev, torch.tensor(positions, device=dev),
                                  AttentionMeta(self.backend, step=step))
        return h, self.model.lm_head(h).argmax(dim=-1)

    @torch.inference_mode()
    def propose(self, jobs: list[DraftJob], h: torch.Tensor) -> None:
        """Catch the MTP cache up over the jobs' kept positions (main hidden states `h [N, D]`) and set
        `seq.draft_token_ids` of the jobs that draft."""
        if not jobs:
            return
        tokens: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        chunks: list[Chunk] = []
        last: list[int] = []  # per drafting job: its last catch-up row
        for job in jobs:
            n = len(job.next_tokens)
            tokens += job.next_tokens
            positions += range(job.start, job.start + n)
            rows += job.rows
            table = job.seq.block_table
            chunks += [Chunk(table, p, 1) for p in range(job.start, job.start + n)] if job.single else \
                [Chunk(table, job.start, n)]
            if job.draft:
                last.append(len(tokens) - 1)
        dev = self.device
        h_rows = h[torch.tensor(rows, device=dev)] if len(rows) < h.shape[0] or rows != list(range(len(rows))) else h
        hidden, greedy = self._run(0, torch.tensor(tokens, device=dev), h_rows, positions, chunks)
        drafting = [job for job in jobs if job.draft]
        if not drafting:
            return
        pick = torch.tensor(last, device=dev)
        hidden, guess = hidden[pick], greedy[pick]  # [J, D], [J]
        guesses = [guess]  # per chain step: the guesses of the jobs in `members` of that step
        members = [list(range(len(drafting)))]
        pos = [job.start + len(job.next_tokens) - 1 for job in drafting]  # the position the first draft came from
        for i in range(1, self.k):  # chain: one position further, while the sequence has a cache slot there
            alive = members[-1]
            room = [j for j in alive if pos[j] + i < min(len(drafting[j].seq.block_table) * self.block_size,
                                                        self.max_seq_len)]
            if not room:
                break
            if len(room) < len(alive):
                keep = torch.tensor([alive.index(j) for j in room], device=dev)
                hidden, guess = hidden[keep], guess[keep]
            module = min(i, len(self.model.mtp) - 1)
            chunks = [Chunk(drafting[j].seq.block_table, pos[j] + i, 1) for j in room]
            hidden, guess = self._run(module, guess, hidden, [pos[j] + i for j in room], chunks)
            guesses.append(guess)
            members.append(room)
        flat = torch.cat(guesses).tolist() if len(guesses) > 1 else guesses[0].tolist()  # the one host sync
        for job in drafting:
            job.seq.draft_token_ids = []
        at = 0
        for room in members:
            for j in room:
                drafting[j].seq.draft_token_ids.append(flat[at])
                at += 1
