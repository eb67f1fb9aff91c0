"""Opt-in GPU decode for the engine (`LLM(..., fast=True)`): pure-decode steps of a CUDA `ModelRunner` run
through the fused kernels of `dsv3.model.fast`, replayed from the CUDA graphs of `dsv3.engine.cuda_graphs`.

1. `FastRunner.prepare(model)`, called by the runner before it sizes its cache: `prepare_fast` swaps in the
   fused MoE / MLP / RMSNorm modules in place (stacking the experts needs memory the cache would otherwise
   take). The runner's prefill and mixed steps then run these modules too (same values, fused kernels).
2. `FastRunner(runner, max_num_seqs)`, once the cache exists: a `FastDecoder` over the runner's own cache
   tensor, and `DecodeGraphs` captured for the sizes of `DEFAULT_BATCH_SIZES` below `max_num_seqs`, and
   `max_num_seqs` itself. Both paths share the cache: the layout is the same
   (`[n_layers, num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]`, token p of a sequence in slot
   `block_table[p // block_size] * block_size + p % block_size`), and so are the latents written
   (`[RMSNorm(c_kv) ; rope(k_pe)]`), so either path attends over what the other wrote.
3. `decode(out)` per step: when every scheduled sequence brings one token (a decode, or a one-token prefill
   chunk), it packs tokens, positions, slots and block tables into one host tensor, copies it to the device
   once, replays the graph of the nearest captured batch size (inert padding rows) and returns the logits
   of the sequences that sample. Any other step returns None and runs on the runner's PyTorch path.

`ModelRunner` refuses `fast=True` off CUDA. `FastRunner(runner, graphs=False)` itself captures nothing and
runs `FastDecoder.decode` eagerly, which also works on CPU (the kernels' PyTorch references): the tests use
it to check the step packing without a GPU.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

from dsv3.engine.cuda_graphs import DEFAULT_BATCH_SIZES, DecodeGraphs
from dsv3.engine.scheduler import SchedulerOutput
from dsv3.model import Transformer
from dsv3.model.fast import FastDecoder, prepare_fast

if TYPE_CHECKING:
    from dsv3.engine.model_runner import ModelRunner

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: the default ladder below `max_num_seqs`, then `max_num_seqs` itself."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    return [b for b in DEFAULT_BATCH_SIZES if b < max_num_seqs] + [max_num_seqs]


class FastRunner:
    """`FastDecoder` + `DecodeGraphs` over a CUDA `ModelRunner`'s paged latent cache."""

    @staticmethod
    def prepare(model: Transformer) -> None:
        """Check that `model` can take the fast path and swap in the fused modules (in place; a second
        call changes nothing)."""
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
            if tensor.dtype in FP8_DTYPES:
                raise ValueError(f"fast=True needs BF16/FP16/FP32 weights, but {name} is {tensor.dtype} "
                                 "(load the checkpoint with weights='bf16')")
        prepare_fast(model)
        if model.embed_tokens.weight.is_cuda:
            torch.cuda.empty_cache()  # the replaced per-expert tensors: free for the cache, which is sized next

    def __init__(self, runner: ModelRunner, max_num_seqs: int = 64, graphs: bool = True) -> None:
        """`graphs=False`: capture nothing, every step runs eagerly (see the module docstring)."""
        sizes = capture_sizes(max_num_seqs)
        self.prepare(runner.model)
        self.device = runner.device
        self.block_size = runner.block_size
        self.max_num_seqs = max_num_seqs
        # widest block table a sequence can need: positions stay below the model's and the cache's limit
        limit = min(runner.args.max_seq_len, runner.num_blocks * runner.block_size)
        self.decoder = FastDecoder(runner.model, runner.kv_cache)
        self.graphs = DecodeGraphs(self.decoder, max_blocks=-(-limit // runner.block_size), batch_sizes=sizes)
        if graphs:
            with torch.cuda.device(self.device):  # the capture streams belong to the model's GPU
                self.graphs.capture()
        self.num_steps = 0  # steps this path ran (the rest ran on the runner's PyTorch path)

    @torch.inference_mode()
    def decode(self, out: SchedulerOutput) -> torch.Tensor | None:
        """Logits `[M, vocab]` (float32) of the `M` sampling sequences of a step where every scheduled
        sequence brings one token, in `out.scheduled` order; None for any other step. The logits may be a
        view of a graph's output buffer: valid until the next call."""
        items = out.scheduled
        if not items or len(items) > self.max_num_seqs or any(item.num_tokens != 1 for item in items):
            return None
        bs = self.block_size
        heads: list[int] = []  # token, position, slot of each sequence
        tables: list[list[int]] = []
        for item in items:
            seq, pos = item.seq, item.start
            table = seq.block_table[: pos // bs + 1]  # the blocks holding positions 0..pos
            if len(table) * bs <= pos:
                raise RuntimeError(f"sequence {seq.seq_id} has {len(seq.block_table)} blocks for {pos + 1} tokens")
            heads += (seq.token_id_at(pos), pos, table[-1] * bs + pos % bs)
            tables.append(table)
        width = max(len(table) for table in tables)
        if width > self.graphs.max_blocks:
            return None
        b = len(items)
        flat = heads[0::3] + heads[1::3] + heads[2::3]  # tokens, positions, slots
        for table in tables:
            flat += table + [0] * (width - len(table))
        packed = torch.tensor(flat, dtype=torch.long).to(self.device, non_blocking=True)  # one copy to the device
        tokens, positions, slots = packed[: 3 * b].view(3, b)  # 3 x [B]
        block_tables = packed[3 * b:].view(b, width)  # [B, width]
        logits, _ = self.graphs.run(tokens, positions, slots, block_tables, positions + 1)  # [B, V]
        self.num_steps += 1
        sample = [i for i, item in enumerate(items) if item.sample]
        if len(sample) < len(items):
            logits = logits[torch.tensor(sample, dtype=torch.long, device=self.device)]
        return logits.float()
