"""CUDA-graph capture of whole decode steps of the model's one forward, for a set of batch sizes.

One graph per captured batch size, all sharing one memory pool and one set of static inputs: `tokens`,
`positions`, `slots` `[max_batch]` int64 and the attention backend's decode tensors `block_tables
[max_batch, max_blocks]` int32 and `seq_lens [max_batch]` int32, handed to `Transformer.hidden` as a static
`PagedStep`. A step with `B` sequences copies its inputs into the first `B` rows, pads up to the nearest
captured size `>= B` with inert rows (slot -1: no cache write; length 0: zero attention), replays, and
returns views of the static outputs: logits `[B, vocab]` and the greedy next tokens `[B]` (argmax on the
device, inside the graph). A batch above the largest captured size runs eagerly. Launch overhead of the
~20 kernels per layer disappears, and nothing in the step syncs with the host.
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
                 batch_sizes: tuple[int, ...] | list[int] = DEFAULT_BATCH_SIZES) -> None:
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
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        step = PagedStep(slots=slots, block_tables=block_tables, seq_lens=seq_lens, num_decodes=tokens.shape[0])
        h = self.model.hidden(tokens, positions, AttentionMeta(self.backend, step=step))
        logits = self.model.lm_head(h)
        return logits, logits.argmax(dim=-1)

    def _step(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._forward(self.tokens[:b], self.positions[:b], self.slots[:b], self.block_tables[:b],
                             self.seq_lens[:b])

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

    @torch.inference_mode()
    def run(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor,
            seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step for `B` sequences -> (logits `[B, vocab]`, greedy tokens `[B]`), views of static
        buffers valid until the next call. tokens/positions/slots `[B]`, block_tables `[B, <= max_blocks]`,
        seq_lens `[B]` (position + 1)."""
        bsz = tokens.shape[0]
        if block_tables.shape[1] > self.max_blocks:
            raise ValueError(f"block_tables has {block_tables.shape[1]} columns; captured with max_blocks="
                             f"{self.max_blocks}")
        size = padded_size(bsz, self.sizes)
        if size is None or size not in self.graphs:
            return self._forward(tokens, positions, slots, block_tables.to(torch.int32), seq_lens.to(torch.int32))
        self.tokens[:bsz].copy_(tokens, non_blocking=True)
        self.positions[:bsz].copy_(positions, non_blocking=True)
        self.slots[:bsz].copy_(slots, non_blocking=True)
        self.block_tables[:bsz, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        self.seq_lens[:bsz].copy_(seq_lens, non_blocking=True)
        if size > bsz:  # inert padding rows
            self.slots[bsz:size].fill_(-1)
            self.seq_lens[bsz:size].zero_()
        self.graphs[size].replay()
        logits, greedy = self.outputs[size]
        return logits[:bsz], greedy[:bsz]
