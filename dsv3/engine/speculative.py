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
(`dsv3.engine.cuda_graphs.DecodeGraphs` with `mtp=` the module index). On the fast path, a step whose sampling
sequences are all plain greedy keeps everything on the device (`propose_greedy`): acceptance, a catch-up over
every row of the step, the chained drafts, then one copy of kept tokens and drafts to the host. `propose` (the
host path: acceptance first, then a catch-up over the kept rows only) serves every other step and is the
reference the tests compare it with.
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
        self.graphs: dict[int, DecodeGraphs] = {}  # per MTP module index, set by the runner (fast path)
        self.fused = False  # all-greedy steps keep their drafts on the device (`propose_greedy`), set by the runner
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
                self.graph_steps += graphs.captured(n)
                _, greedy, hidden = graphs.run(tokens, pos, slot, packed[2 * n:].view(n, width), pos + 1,
                                               h_prev=h_prev, hidden=True)
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

    # ---- all-greedy steps on the fast path: one host sync ------------------------------------------------
    @torch.inference_mode()
    def propose_greedy(self, items: list, starts: list[int], tokens: list[int], chunks: list[Chunk],
                       sample_rows: list[int], logits: torch.Tensor, h: torch.Tensor,
                       inputs: tuple[torch.Tensor, ...] | None) -> list[list[tuple[int, None]]]:
        """A step whose sampling sequences are all plain greedy, after the main forward (`logits [M, V]` of the
        sampling rows, hidden `h [N, D]` of every row; `inputs`: the step's packed decode inputs, or None when it
        holds a prefill chunk): acceptance, the MTP catch-up and the chained drafts stay on the device, and one
        copy to the host returns the kept tokens and the next drafts.

        The catch-up runs over every row of the step with the token the step makes the next one (the prompt's,
        or the main model's argmax): rows past a sequence's accepted drafts write latents at positions that
        are not verified yet, which the next step's catch-up (starting at the first unverified position)
        overwrites before anything reads them, like the main model's own rejected rows. Returns the kept tokens
        per sampling item, as `ModelRunner.execute` does; sets `seq.draft_token_ids`."""
        dev = self.device
        bs = self.block_size
        targets = logits.argmax(dim=-1)  # [M] the main model's choice at each sampling row
        nxt: list[int] = []  # the token after each row's position (0: the step's target, filled on the device)
        next_draft: list[int] = []  # per sampling row: the draft it judges, -1 after the last
        first: list[int] = []  # per sampling item: its first sampling row (in the step) and in `targets`
        first_m: list[int] = []
        base: list[int] = []  # per sampling item: the position of its first sampling row
        cap: list[int] = []  # per sampling item: positions its cache slots reach (and max_seq_len)
        tables: list[list[int]] = []
        sampling = []
        for item, row in zip(items, starts):
            seq, start = item.seq, item.start
            own = item.num_tokens - len(item.drafts)
            if not item.sample:
                nxt += seq.token_slice(start + 1, start + own + 1)
                continue
            nxt += seq.token_slice(start + 1, start + own) + [0] * (len(item.drafts) + 1)
            first_m.append(len(next_draft))
            next_draft += item.drafts + [-1]
            first.append(row + own - 1)
            base.append(start + own - 1)
            table = seq.block_table[: self.graphs[0].max_blocks]
            cap.append(min(len(table) * bs, self.max_seq_len))
            tables.append(table)
            sampling.append(item)
        width = max(len(t) for t in tables)
        k1 = self.k + 1
        index = [[m + t if t <= len(item.drafts) else len(next_draft) for t in range(k1)]
                 for m, item in zip(first_m, sampling)]
        host = (nxt + sample_rows + next_draft + [r for row in index for r in row] + first + base + cap
                + [b for t in tables for b in t + [0] * (width - len(t))])
        packed = torch.tensor(host, dtype=torch.long).to(dev, non_blocking=True)  # one copy to the device
        n, m, j = len(nxt), len(sample_rows), len(sampling)
        nxt_d, rows_d, draft_d, index_d, first_d, base_d, cap_d, table_d = packed.split(
            [n, m, m, j * k1, j, j, j, j * width])
        nxt_d = nxt_d.index_copy(0, rows_d, targets)
        ok = torch.cat([targets == draft_d, torch.zeros(1, dtype=torch.bool, device=dev)])
        accepted = ok[index_d.view(j, k1)].long().cumprod(dim=1).sum(dim=1)  # [J] leading drafts equal to targets
        # catch-up over every row of the step
        graphs = self.graphs[0]
        if inputs is not None:
            _, pos, slot, block_tables, seq_lens = inputs
            self.graph_steps += graphs.captured(n)
            _, greedy, hidden = graphs.run(nxt_d, pos, slot, block_tables, seq_lens, h_prev=h, hidden=True)
        else:
            positions = [p for c in chunks for p in range(c.start, c.start + c.num_tokens)]
            hidden = self.model.mtp_hidden(0, nxt_d, h, torch.tensor(positions, device=dev),
                                           AttentionMeta(self.backend, step=self.backend.prepare(chunks)))
            greedy = self.model.lm_head(hidden).argmax(dim=-1)
        row = first_d + accepted
        hidden, guess = hidden[row], greedy[row]  # [J, D], [J]
        guesses = [guess]
        table_d = table_d.view(j, width).to(torch.int32)
        for i in range(1, self.k):  # chained drafts, one position further each; past a sequence's slots: no write
            pos = base_d + accepted + i
            valid = pos < cap_d
            pos = torch.minimum(pos, cap_d - 1)
            slot = table_d.gather(1, (pos // bs)[:, None])[:, 0].long() * bs + pos % bs
            slot = torch.where(valid, slot, torch.full_like(slot, -1))
            graphs = self.graphs[min(i, len(self.model.mtp) - 1)]
            self.graph_steps += graphs.captured(j)
            _, guess, hidden = graphs.run(guess, pos, slot, table_d, (pos + 1).to(torch.int32), h_prev=hidden,
                                          hidden=True)
            guess, hidden = guess.clone(), hidden.clone()  # views of the graph's outputs: the next run reuses them
            guesses.append(guess)
        flat = torch.cat([targets, accepted, torch.stack(guesses, dim=1).flatten()]).tolist()  # the one sync
        target_h, acc_h, drafts_h = flat[:m], flat[m:m + j], flat[m + j:]
        kept = []
        for b, item in enumerate(sampling):
            a = acc_h[b]
            kept.append([(t, None) for t in target_h[first_m[b]:first_m[b] + a + 1]])
            reach = sum(1 for i in range(1, self.k) if base[b] + a + i < cap[b])
            item.seq.draft_token_ids = drafts_h[b * self.k: b * self.k + 1 + reach]
        return kept
