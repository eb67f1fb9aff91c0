"""The model runner: owns the paged latent cache, the attention backend and the CUDA graphs, and runs one
scheduler step through the model's one forward (`Transformer.hidden`).

Cache layout: one tensor `[n_layers, num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]` in the
model dtype; per layer it is viewed as `[num_slots, C + R]` and a token at position p of a sequence lives in
slot `block_table[p // block_size] * block_size + p % block_size`. Only the MLA latents are cached (576
numbers per token per layer for DeepSeek-V3).

A step flattens the scheduled chunks of all sequences into one batch of N tokens with their positions, has
the backend build the step's attention tensors once (`dsv3.engine.attention`), runs the forward, then
computes logits only at the last token of the sequences that sample this step and samples on the device.

The backend is chosen once, here:
- `fast=False`: `PagedAttention`, plain PyTorch, the reference (CPU and GPU);
- `fast=True`: the model is readied for the GPU kernels (`dsv3.model.fused.fuse_for_inference`: stacked
  experts and the fused MoE, fused norms, SwiGLU and rope; in place, before the cache is sized) and
  `TritonPagedAttention` runs every step: prefill, decode and mixed. Steps where every sequence brings one
  token replay a CUDA graph of that same forward (`dsv3.engine.cuda_graphs`), captured for the decode batch
  sizes up to `max_num_seqs`.

A float32 model on the CPU (`fast=False`) also gets a `CPUDecodePlan` (`dsv3.engine.cpu_decode`), built once
here: its weights are re-stored for single-token products (same Parameters, same values) and decode-only steps
pass the plan in their `AttentionMeta`, so the forward's attention and FFN run from its packed weights.
"""

from __future__ import annotations

import itertools

import torch

from dsv3.engine.attention import Chunk, PagedAttention, TritonPagedAttention
from dsv3.engine.cpu_decode import CPUDecodePlan
from dsv3.engine.cuda_graphs import DecodeGraphs, capture_sizes
from dsv3.engine.sampling import Sampler, SamplerOutput
from dsv3.engine.scheduler import SchedulerOutput
from dsv3.engine.sequence import Sequence, TokenLogprob
from dsv3.model import Transformer
from dsv3.model.attention import AttentionMeta
from dsv3.model.fused import fuse_for_inference

DEFAULT_CPU_CACHE_BYTES = 512 * 2**20
DEFAULT_GPU_MEMORY_FRACTION = 0.8  # of the free memory after loading the model
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def cache_bytes_per_block(model: Transformer, block_size: int, dtype: torch.dtype | None = None) -> int:
    """Bytes of one cache block: `block_size` tokens x layers x (kv_lora_rank + rope dim)."""
    args = model.args
    dtype = dtype or model.embed_tokens.weight.dtype
    elem = torch.empty((), dtype=dtype).element_size()
    return block_size * args.n_layers * (args.kv_lora_rank + args.qk_rope_head_dim) * elem


def check_fusable(model: Transformer) -> None:
    """`fast=True` needs BF16/FP16/FP32 weights (the FP8 checkpoint format is not on the fast path yet)."""
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.dtype in FP8_DTYPES and "stacked" not in name:
            raise ValueError(f"fast=True needs BF16/FP16/FP32 weights, but {name} is {tensor.dtype} "
                             "(load the checkpoint with weights='bf16')")


class ModelRunner:
    """Paged latent cache + one forward per scheduler step + sampling."""

    def __init__(self, model: Transformer, block_size: int = 16, num_blocks: int | None = None,
                 cache_memory: int | None = None, fast: bool = False, max_num_seqs: int = 64,
                 cuda_graphs: bool | None = None) -> None:
        """`fast`: the GPU kernels for every step (see the module docstring); `max_num_seqs`: the largest
        decode batch, whose graph is captured. `cuda_graphs` (default: `fast` on CUDA) captures the decode
        steps; `fast=True` without graphs also runs on CPU, with the kernels' PyTorch references."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.model = model
        self.args = model.args
        self.block_size = block_size
        weight = model.embed_tokens.weight
        self.device = weight.device
        self.dtype = weight.dtype
        if cuda_graphs is None:
            cuda_graphs = fast and self.device.type == "cuda"
        if cuda_graphs and (not fast or self.device.type != "cuda"):
            raise ValueError(f"CUDA graphs need fast=True and a CUDA device, got fast={fast} on {self.device}")
        if fast:
            capture_sizes(max_num_seqs)  # checks max_num_seqs before any work
            check_fusable(model)
            fuse_for_inference(model)  # stacking the experts needs memory the cache would otherwise take
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.plan = None  # the CPU decode plan, for float32 CPU models
        if not fast and self.device.type == "cpu" and CPUDecodePlan.supports(model):
            self.plan = CPUDecodePlan(model)
        per_block = cache_bytes_per_block(model, block_size, self.dtype)
        if num_blocks is None:
            if cache_memory is None:
                cache_memory = self._default_cache_memory()
            if cache_memory < per_block:
                raise ValueError(f"cache_memory ({cache_memory} bytes) is below one block ({per_block} bytes)")
            num_blocks = cache_memory // per_block
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = int(num_blocks)
        latent = self.args.kv_lora_rank + self.args.qk_rope_head_dim
        self.kv_cache = torch.zeros(self.args.n_layers, self.num_blocks, block_size, latent,
                                    device=self.device, dtype=self.dtype)  # [L, blocks, block_size, C + R]
        layers = self.kv_cache.view(self.args.n_layers, -1, latent)  # [L, slots, C + R]
        if fast:
            self.backend: PagedAttention = TritonPagedAttention(layers, block_size, self.args.max_seq_len,
                                                                [b.self_attn for b in model.layers])
        else:
            self.backend = PagedAttention(layers, block_size, self.args.max_seq_len)
        self.sampler = Sampler()
        self.graphs: DecodeGraphs | None = None
        self.graph_steps = 0  # steps replayed from a CUDA graph
        if cuda_graphs:
            limit = min(self.args.max_seq_len, self.num_blocks * block_size)  # widest block table a sequence needs
            self.graphs = DecodeGraphs(model, self.backend, max_blocks=-(-limit // block_size),
                                       batch_sizes=capture_sizes(max_num_seqs))
            with torch.cuda.device(self.device):  # the capture streams belong to the model's GPU
                self.graphs.capture()

    def _default_cache_memory(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * DEFAULT_GPU_MEMORY_FRACTION)
        return DEFAULT_CPU_CACHE_BYTES

    @property
    def cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    # ---- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[tuple[int, TokenLogprob | None]]:
        """Run the scheduled chunks; return `(token, logprob)` for each sequence that samples, in
        `out.scheduled` order."""
        if out.is_empty:
            return []
        items = out.scheduled
        sampling = [item.seq for item in items if item.sample]
        logits = self._replay(out) if self.graphs is not None else None  # [M, V]; None: not a graph step
        if logits is None:
            tokens: list[int] = []
            positions: list[int] = []
            sample_rows: list[int] = []
            for item in items:
                tokens += item.seq.token_slice(item.start, item.start + item.num_tokens)
                positions += range(item.start, item.start + item.num_tokens)
                if item.sample:
                    sample_rows.append(len(tokens) - 1)
            if max(positions) >= self.args.max_seq_len:
                raise ValueError(f"position {max(positions)} is beyond max_seq_len ({self.args.max_seq_len})")
            step = self.backend.prepare([Chunk(item.seq.block_table, item.start, item.num_tokens) for item in items])
            dev = self.device
            plan = self.plan if step.num_decodes == len(tokens) else None  # decode-only steps
            h = self.model.hidden(torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev),
                                  AttentionMeta(self.backend, step=step, plan=plan))  # [N, D]
            if not sampling:
                return []
            rows = torch.tensor(sample_rows, device=dev) if len(sample_rows) < len(tokens) else None
            logits = self.model.lm_head(h if rows is None else h[rows]).float()  # [M, V]
        if not sampling:
            return []
        return self._to_python(self.sample(logits, sampling), sampling)

    def _replay(self, out: SchedulerOutput) -> torch.Tensor | None:
        """Logits `[M, vocab]` (float32) of the sampling sequences of a step where every scheduled sequence
        brings one token, from a CUDA graph; None for any other step. The logits may be a view of a graph's
        output buffer: valid until the next call."""
        items = out.scheduled
        graphs = self.graphs
        if len(items) > graphs.sizes[-1] or any(item.num_tokens != 1 for item in items):
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
        if width > graphs.max_blocks:
            return None
        b = len(items)
        flat = heads[0::3] + heads[1::3] + heads[2::3]  # tokens, positions, slots
        for table in tables:
            flat += table + [0] * (width - len(table))
        packed = torch.tensor(flat, dtype=torch.long).to(self.device, non_blocking=True)  # one copy to the device
        tokens, positions, slots = packed[: 3 * b].view(3, b)  # 3 x [B]
        logits, _ = graphs.run(tokens, positions, slots, packed[3 * b:].view(b, width), positions + 1)  # [B, V]
        self.graph_steps += 1
        sample = [i for i, item in enumerate(items) if item.sample]
        if len(sample) < len(items):
            logits = logits[torch.tensor(sample, dtype=torch.long, device=self.device)]
        return logits.float()

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        generators = []
        for seq in seqs:
            if seq.params.seed is not None and seq.generator is None:
                seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed)
            generators.append(seq.generator)
        return self.sampler(logits, [s.params for s in seqs], [s.output_token_ids for s in seqs], generators)

    @staticmethod
    def _to_python(result: SamplerOutput, seqs: list[Sequence]) -> list[tuple[int, TokenLogprob | None]]:
        tokens = result.token_ids.tolist()  # the one host sync of a step
        if result.logprobs is None:
            return [(t, None) for t in tokens]
        chosen = result.logprobs.tolist()
        top_ids = result.top_ids.tolist() if result.top_ids is not None else None
        top_lp = result.top_logprobs.tolist() if result.top_logprobs is not None else None
        out = []
        for b, (seq, t) in enumerate(zip(seqs, tokens)):
            k = seq.params.logprobs
            if k is None:
                out.append((t, None))
                continue
            top = list(zip(top_ids[b][:k], top_lp[b][:k])) if k and top_ids is not None else []
            out.append((t, TokenLogprob(t, chosen[b], top)))
        return out
