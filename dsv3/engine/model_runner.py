"""The model runner: owns the paged latent cache and runs one scheduler step through the model.

Cache layout: one tensor `[n_layers, num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]` in the
model dtype; per layer it is viewed as `[num_slots, C + R]` and a token at position p of a sequence
lives in slot `block_table[p // block_size] * block_size + p % block_size`. Only the MLA latents are
cached (576 numbers per token per layer for DeepSeek-V3), so attention runs absorbed: `kv_b_proj`'s
key half is folded into the queries and its value half applied after attending over the latents.

A step packs the scheduled tokens of all sequences into one flat batch `[1, N]` with per-token
positions, runs the model with an attention hook (`Transformer.hidden(..., attention=...)`) that
writes each layer's new latents into their slots and attends every sequence over its own blocks,
then computes logits only at the last token of the sequences that sample this step and samples on
the device. The attention is plain PyTorch, so it runs on CPU as well as GPU: all decoding sequences
attend in one batch (their context slots gathered and padded to `[B, S_max]`), each prefill chunk
on its own with a causal mask by position (padding a long chunk with many short decodes would
waste `T x S` memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.engine.sampling import Sampler, SamplerOutput
from dsv3.engine.scheduler import SchedulerOutput
from dsv3.engine.sequence import Sequence, TokenLogprob
from dsv3.model import Transformer
from dsv3.model.mla import MLA

DEFAULT_CPU_CACHE_BYTES = 512 * 2**20
DEFAULT_GPU_MEMORY_FRACTION = 0.8  # of the free memory after loading the model


def cache_bytes_per_block(model: Transformer, block_size: int, dtype: torch.dtype | None = None) -> int:
    """Bytes of one cache block: `block_size` tokens x layers x (kv_lora_rank + rope dim)."""
    args = model.args
    dtype = dtype or model.embed_tokens.weight.dtype
    elem = torch.empty((), dtype=dtype).element_size()
    return block_size * args.n_layers * (args.kv_lora_rank + args.qk_rope_head_dim) * elem


@dataclass
class AttentionGroup:
    """Sequences attended together: their queries and contexts padded to `[b, T]` and `[b, S]`."""

    query_index: torch.Tensor  # [b, T] index into the flat batch of each sequence's new tokens (padded)
    query_valid: torch.Tensor  # [b, T] bool, real (not padding) queries
    context_slots: torch.Tensor  # [b, S] cache slots of each sequence's context (padded with slot 0)
    mask: torch.Tensor  # [b, T, S] additive float32: 0 where the query may see the key, -inf elsewhere
    flat_index: torch.Tensor  # [n] flat index of each valid query, in `query_valid` order


@dataclass
class StepBatch:
    """Index tensors of one step, built once and shared by every layer."""

    tokens: torch.Tensor  # [1, N] int64
    positions: torch.Tensor  # [1, N] int64
    slots: torch.Tensor  # [N] cache slot of each new token
    groups: list[AttentionGroup]  # all decodes in one group, each prefill chunk in its own
    sample_index: torch.Tensor  # [M] flat index of the last token of each sampling sequence


class ModelRunner:
    """Paged latent cache + one forward per scheduler step + sampling."""

    def __init__(self, model: Transformer, block_size: int = 16, num_blocks: int | None = None,
                 cache_memory: int | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.model = model
        self.args = model.args
        self.block_size = block_size
        weight = model.embed_tokens.weight
        self.device = weight.device
        self.dtype = weight.dtype
        self.kv_lora_rank = self.args.kv_lora_rank
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
        self.sampler = Sampler()

    def _default_cache_memory(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * DEFAULT_GPU_MEMORY_FRACTION)
        return DEFAULT_CPU_CACHE_BYTES

    @property
    def cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    # ---- batch preparation ------------------------------------------------------------------
    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def prepare(self, out: SchedulerOutput) -> StepBatch:
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decodes: list[tuple[int, int, list[int]]] = []  # (flat index, position, context slots)
        groups: list[AttentionGroup] = []
        sample_index: list[int] = []
        bs = self.block_size
        for item in out.scheduled:
            seq, start, n = item.seq, item.start, item.num_tokens
            end = start + n
            table = seq.block_table
            if len(table) * bs < end:
                raise RuntimeError(f"sequence {seq.seq_id} has {len(table)} blocks for {end} tokens")
            context = [table[p // bs] * bs + p % bs for p in range(end)]
            first = len(tokens)
            tokens += seq.token_slice(start, end)
            positions += range(start, end)
            slots += context[start:end]
            if n == 1:
                decodes.append((first, start, context))
            else:
                groups.append(self._group([(list(range(first, first + n)), start, context)]))
            if item.sample:
                sample_index.append(len(tokens) - 1)
        if decodes:
            groups.append(self._group([([i], pos, ctx) for i, pos, ctx in decodes]))
        dev = self.device
        return StepBatch(
            tokens=torch.tensor([tokens], dtype=torch.long, device=dev),
            positions=torch.tensor([positions], dtype=torch.long, device=dev),
            slots=torch.tensor(slots, dtype=torch.long, device=dev),
            groups=groups,
            sample_index=torch.tensor(sample_index, dtype=torch.long, device=dev),
        )

    def _group(self, members: list[tuple[list[int], int, list[int]]]) -> AttentionGroup:
        """members: (flat indices of the new tokens, position of the first, context slots)."""
        b = len(members)
        max_t = max(len(m[0]) for m in members)
        max_s = max(len(m[2]) for m in members)
        query_index = torch.zeros(b, max_t, dtype=torch.long)
        query_valid = torch.zeros(b, max_t, dtype=torch.bool)
        query_pos = torch.zeros(b, max_t, dtype=torch.long)  # padded queries see key 0 only (no NaN)
        context_slots = torch.zeros(b, max_s, dtype=torch.long)
        context_len = torch.zeros(b, dtype=torch.long)
        for i, (flat, start, context) in enumerate(members):
            t = len(flat)
            query_index[i, :t] = torch.tensor(flat)
            query_valid[i, :t] = True
            query_pos[i, :t] = torch.arange(start, start + t)
            context_slots[i, :len(context)] = torch.tensor(context)
            context_len[i] = len(context)
        key_pos = torch.arange(max_s)
        visible = ((key_pos[None, None, :] <= query_pos[:, :, None])
                   & (key_pos[None, None, :] < context_len[:, None, None]))  # [b, T, S]
        mask = torch.zeros(b, max_t, max_s).masked_fill(~visible, float("-inf"))
        dev = self.device
        return AttentionGroup(query_index=query_index.to(dev), query_valid=query_valid.to(dev),
                              context_slots=context_slots.to(dev), mask=mask.to(dev),
                              flat_index=query_index[query_valid].to(dev))

    # ---- attention over the paged cache -----------------------------------------------------
    def paged_attention(self, batch: StepBatch, layer_id: int, mla: MLA, x: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The `attention` hook: x `[1, N, D]` -> `[1, N, D]`, writing this layer's latents to the cache."""
        if layer_id >= self.args.n_layers:
            raise ValueError(f"layer {layer_id} has no paged cache (MTP layers are not run by the engine)")
        q_nope, q_pe = mla.queries(x[0], cos[0], sin[0])  # [N, H, nope], [N, H, R]
        kv, k_pe = mla.latents(x[0], cos[0], sin[0])  # [N, C], [N, R]
        cache = self.kv_cache[layer_id].view(-1, self.kv_cache.shape[-1])  # [slots, C + R]
        cache[batch.slots] = torch.cat([kv, k_pe], dim=-1).to(cache.dtype)
        q_lat = mla.absorb_query(q_nope)  # [N, H, C]
        o_lat = torch.empty_like(q_lat)
        for group in batch.groups:
            context = cache[group.context_slots]  # [b, S, C + R]
            ctx_kv, ctx_pe = context.split([self.kv_lora_rank, context.shape[-1] - self.kv_lora_rank], dim=-1)
            scores = (torch.einsum("bthc,bsc->bhts", q_lat[group.query_index], ctx_kv)
                      + torch.einsum("bthr,bsr->bhts", q_pe[group.query_index], ctx_pe))  # [b, H, T, S]
            scores = scores.float() * mla.softmax_scale + group.mask[:, None]
            probs = scores.softmax(dim=-1)
            o = torch.einsum("bhts,bsc->bthc", probs.to(ctx_kv.dtype), ctx_kv)  # [b, T, H, C]
            o_lat[group.flat_index] = o[group.query_valid].to(o_lat.dtype)
        return mla.latent_output(o_lat)[None]  # [1, N, D]

    # ---- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[tuple[int, TokenLogprob | None]]:
        """Run the scheduled chunks; return `(token, logprob)` for each sequence that samples, in
        `out.scheduled` order."""
        if out.is_empty:
            return []
        batch = self.prepare(out)

        def attention(layer_id: int, mla: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            return self.paged_attention(batch, layer_id, mla, x, cos, sin)

        h = self.model.hidden(batch.tokens, positions=batch.positions, attention=attention)  # [1, N, D]
        sampling = [item.seq for item in out.scheduled if item.sample]
        if not sampling:
            return []
        logits = self.model.lm_head(h[0, batch.sample_index]).float()  # [M, V]
        result = self.sample(logits, sampling)
        return self._to_python(result, sampling)

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
