"""CUDA-graph capture of whole decode steps (`FastDecoder.decode`) for a set of batch sizes.

One graph per captured batch size, all sharing one memory pool and one set of static input buffers
(`tokens`, `positions`, `slots` `[max_batch]` int64, `block_tables [max_batch, max_blocks]` int32,
`seq_lens [max_batch]` int32). A step with `B` sequences copies its inputs into the first `B` rows, pads
up to the nearest captured size `>= B` with inert rows (slot -1: no cache write; length 0: zero
attention), replays, and returns views of the static outputs: logits `[B, vocab]` and the greedy
next tokens `[B]` (argmax on the device, inside the graph). A batch above the largest captured size runs
eagerly. Launch overhead of the ~20 kernels per layer disappears, and nothing in the step syncs with the
host: the caller decides when to read the tokens.

Typical use (the engine's model runner, on steps where every scheduled sequence decodes one token):

    graphs = DecodeGraphs(FastDecoder(model, runner.kv_cache), max_blocks=max_blocks_per_seq)
    graphs.capture()                                  # once, after warm-up allocations
    logits, greedy = graphs.run(tokens, positions, slots, block_tables, seq_lens)

`PrefillGraphs` does the same for fresh prompts (start position 0) of one sequence, padded up to the
nearest captured length (padding sits after the prompt: causal attention keeps it invisible, its
latents are not written). An eager prefill is bound by the host (about 40 launches per layer); a
replay is not.
"""

from __future__ import annotations

import bisect

import torch

from dsv3.model.fast import FastDecoder

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


def padded_size(batch: int, sizes: list[int] | tuple[int, ...]) -> int | None:
    """Smallest captured size `>= batch` (sizes sorted ascending), or None when none is large enough."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    i = bisect.bisect_left(sizes, batch)
    return sizes[i] if i < len(sizes) else None


class DecodeGraphs:
    """Static buffers + one captured `FastDecoder.decode` per batch size."""

    def __init__(self, decoder: FastDecoder, max_blocks: int,
                 batch_sizes: tuple[int, ...] | list[int] = DEFAULT_BATCH_SIZES) -> None:
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive, got {batch_sizes}")
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
        self.decoder = decoder
        self.sizes = sorted(set(int(b) for b in batch_sizes))
        self.max_blocks = max_blocks
        dev = decoder.kv_cache.device
        n = self.sizes[-1]
        self.tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    def _step(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.decoder.decode(self.tokens[:b], self.positions[:b], self.slots[:b], self.block_tables[:b],
                                     self.seq_lens[:b])
        return logits, logits.argmax(dim=-1)

    @torch.no_grad()
    def capture(self, warmup: int = 2) -> None:
        """Capture every batch size, largest first (the pool then serves the smaller ones)."""
        if not self.decoder.kv_cache.is_cuda:
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

    @torch.no_grad()
    def run(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor,
            seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step for `B` sequences -> (logits `[B, vocab]`, greedy tokens `[B]`), views of static
        buffers valid until the next call. Inputs as in `FastDecoder.decode`; `block_tables` may have
        fewer columns than `max_blocks`."""
        bsz = tokens.shape[0]
        if block_tables.shape[1] > self.max_blocks:
            raise ValueError(f"block_tables has {block_tables.shape[1]} columns; captured with max_blocks="
                             f"{self.max_blocks}")
        size = padded_size(bsz, self.sizes)
        if size is None or size not in self.graphs:
            logits = self.decoder.decode(tokens, positions, slots, block_tables.to(torch.int32), seq_lens.to(torch.int32))
            return logits, logits.argmax(dim=-1)
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


DEFAULT_PREFILL_LENGTHS = (128, 256, 512, 1024, 2048)


class PrefillGraphs:
    """One captured `FastDecoder.prefill` of a single fresh sequence per padded prompt length."""

    def __init__(self, decoder: FastDecoder, max_blocks: int,
                 lengths: tuple[int, ...] | list[int] = DEFAULT_PREFILL_LENGTHS) -> None:
        if not lengths or min(lengths) < 1:
            raise ValueError(f"lengths must be positive, got {lengths}")
        block = decoder.block_size
        if max(lengths) > max_blocks * block:
            raise ValueError(f"longest captured length {max(lengths)} needs {-(-max(lengths) // block)} blocks; "
                             f"max_blocks is {max_blocks}")
        self.decoder = decoder
        self.sizes = sorted(set(int(t) for t in lengths))
        dev = decoder.kv_cache.device
        self.tokens = torch.zeros(1, self.sizes[-1], dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(1, max_blocks, dtype=torch.int32, device=dev)
        self.lengths = torch.zeros(1, dtype=torch.long, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def _step(self, t: int) -> torch.Tensor:
        return self.decoder.prefill(self.tokens[:, :t], 0, self.block_tables, lengths=self.lengths)

    @torch.no_grad()
    def capture(self, warmup: int = 1) -> None:
        if not self.decoder.kv_cache.is_cuda:
            raise ValueError("CUDA graphs need the model and cache on a CUDA device")
        self.lengths.zero_()  # warm-up and capture write nothing to the cache
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for t in reversed(self.sizes):
                for _ in range(warmup):
                    self._step(t)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        for t in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[t] = self._step(t)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[t] = graph
        torch.cuda.synchronize()

    @torch.no_grad()
    def run(self, tokens: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
        """tokens `[T]` of one fresh prompt, its block table `[n]` int32 -> last-token logits `[1, vocab]`
        (a view of a static buffer). Longer prompts than the largest captured length run eagerly."""
        t = tokens.shape[0]
        size = padded_size(t, self.sizes)
        if size is None or size not in self.graphs:
            return self.decoder.prefill(tokens[None], 0, block_table[None].to(torch.int32))
        if block_table.shape[0] > self.block_tables.shape[1]:
            raise ValueError(f"block table has {block_table.shape[0]} entries; captured with "
                             f"{self.block_tables.shape[1]}")
        self.tokens[0, :t].copy_(tokens, non_blocking=True)
        self.block_tables[0, : block_table.shape[0]].copy_(block_table, non_blocking=True)
        self.lengths.fill_(t)
        self.graphs[size].replay()
        return self.outputs[size]
