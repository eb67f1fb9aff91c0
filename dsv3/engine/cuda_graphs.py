"""CUDA-graph capture of whole decode steps of the model's one forward, for a set of batch sizes.

One graph per captured batch size, all sharing one memory pool and one set of static inputs: `tokens`,
`positions`, `slots` `[max_batch]` int64 and the attention backend's decode tensors `block_tables
[max_batch, max_blocks]` int32 and `seq_lens [max_batch]` int32, handed to `Transformer.hidden` as a static
`PagedStep`. A step with `B` sequences copies its inputs into the first `B` rows, pads up to the nearest
captured size `>= B` with inert rows (slot -1: no cache write; length 0: zero attention), replays, and
returns views of the static outputs: logits `[B, vocab]` and the greedy next tokens `[B]` (argmax on the
device, inside the graph). A batch above the largest captured size runs eagerly. Launch overhead of the
~20 kernels per layer disappears, and nothing in the step syncs with the host.

Speculative decoding replays the same graphs: a verify step is a decode step with `1 + k` rows per sequence
(each row its own position and context length), so the runner captures the batch sizes `B` and `B * (1 + k)`.
With `mtp=m` the graphs hold MTP module m instead of the main model (`Transformer.mtp_hidden`, with a static
`h_prev [max_batch, D]` input); `run(..., hidden=True)` also returns the static hidden states `[B, D]`.
"""

from __future__ import annotations

import bisect

import torch
from torch import nn

from dsv3.engine.attention import PagedAttention, PagedStep
from dsv3.model.attention import AttentionMeta

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: the default ladder below `max_num_seqs`, then `max_num_seqs` itself."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    return [b for b in DEFAULT_BATCH_SIZES if b < max_num_seqs] + [max_num_seqs]


def padded_size(batch: int, sizes: list[int] | tuple[int, ...]) -> int | None:
    """Smallest captured size `>= batch` (sizes sorted ascending), or None when none is large enough."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    i = bisect.bisect_left(sizes, batch)
    return sizes[i] if i < len(sizes) else None


class DecodeGraphs:
    """Static buffers + one captured decode step (`hidden`, `lm_head`, argmax) per batch size."""

    def __init__(self, model: nn.Module, backend: PagedAttention, max_blocks: int,
                 batch_sizes: tuple[int, ...] | list[int] = DEFAULT_BATCH_SIZES, mtp: int | None = None) -> None:
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive, got {batch_sizes}")
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
        self.model = model
        self.backend = backend
        model.rotary.to(backend.device)  # its frequencies (a buffer): a capture cannot copy them from the host
        self.sizes = sorted(set(int(b) for b in batch_sizes))
        self.max_blocks = max_blocks
        dev = backend.device
        n = self.sizes[-1]
        self.tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.mtp = mtp
        self.h_prev = None
        if mtp is not None:
            weight = model.embed_tokens.weight
            self.h_prev = torch.zeros(n, weight.shape[1], dtype=weight.dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 h_prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        step = PagedStep(slots=slots, block_tables=block_tables, seq_lens=seq_lens, num_decodes=tokens.shape[0])
        meta = AttentionMeta(self.backend, step=step)
        if self.mtp is None:
            h = self.model.hidden(tokens, positions, meta)
        else:
            h = self.model.mtp_hidden(self.mtp, tokens, h_prev, positions, meta)
        logits = self.model.lm_head(h)
        return logits, logits.argmax(dim=-1), h

    def _step(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._forward(self.tokens[:b], self.positions[:b], self.slots[:b], self.block_tables[:b],
                             self.seq_lens[:b], None if self.h_prev is None else self.h_prev[:b])

    @torch.inference_mode()
    def capture(self, warmup: int = 2) -> None:
        """Capture every batch size, largest first (the pool then serves the smaller ones)."""
        if not self.tokens.is_cuda:
            raise ValueError("CUDA graphs need the model and cache on a CUDA device")
        self.slots.fill_(-1)
        self.seq_lens.zero_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.sizes):  # compile kernels and settle allocations outside capture
                for _ in range(warmup):
                    self._step(b)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        for b in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[b] = self._step(b)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def captured(self, batch: int) -> bool:
        """Whether a step of `batch` rows replays a graph (else `run` runs it eagerly)."""
        size = padded_size(batch, self.sizes) if batch >= 1 else None
        return size is not None and size in self.graphs

    @torch.inference_mode()
    def run(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor,
            seq_lens: torch.Tensor, h_prev: torch.Tensor | None = None,
            hidden: bool = False) -> tuple[torch.Tensor, ...]:
        """One decode step for `B` rows -> (logits `[B, vocab]`, greedy tokens `[B]`, and with `hidden` the
        hidden states `[B, D]`), views of static buffers valid until the next call. tokens/positions/slots `[B]`,
        block_tables `[B, <= max_blocks]`, seq_lens `[B]` (position + 1); `h_prev [B, D]` for MTP graphs."""
        bsz = tokens.shape[0]
        if block_tables.shape[1] > self.max_blocks:
            raise ValueError(f"block_tables has {block_tables.shape[1]} columns; captured with max_blocks="
                             f"{self.max_blocks}")
        if (h_prev is None) != (self.mtp is None):
            raise ValueError("h_prev is the input of MTP graphs (mtp=...), and only of them")
        size = padded_size(bsz, self.sizes)
        if size is None or size not in self.graphs:
            out = self._forward(tokens, positions, slots, block_tables.to(torch.int32), seq_lens.to(torch.int32),
                                h_prev)
            return out if hidden else out[:2]
        self.tokens[:bsz].copy_(tokens, non_blocking=True)
        if h_prev is not None:
            self.h_prev[:bsz].copy_(h_prev, non_blocking=True)
        self.positions[:bsz].copy_(positions, non_blocking=True)
        self.slots[:bsz].copy_(slots, non_blocking=True)
        self.block_tables[:bsz, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        self.seq_lens[:bsz].copy_(seq_lens, non_blocking=True)
        if size > bsz:  # inert padding rows
            self.slots[bsz:size].fill_(-1)
            self.seq_lens[bsz:size].zero_()
        self.graphs[size].replay()
        logits, greedy, h = self.outputs[size]
        return (logits[:bsz], greedy[:bsz], h[:bsz]) if hidden else (logits[:bsz], greedy[:bsz])
