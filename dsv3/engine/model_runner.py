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

Steps where every sequence brings one token (plain decoding) take a shorter path: index tensors from
Python lists, one rope frequency tensor for all layers, no mask unless contexts are padded, and queries
`[q_nope W_uk ; q_pe]` multiplied once with the cached `[c_kv ; k_pe]` rows. On CPU the runner re-stores
the model's float32 weights for single-token products (`dsv3.model.layers.cpu_decode_layout`: column-major
where that is faster, fused gate/up and q_a/kv_a, stacked expert tables, one huge-page buffer; values are
unchanged) and runs decode steps through `decode_hidden`, the blocks written out so that a MoE reads every
token's chosen experts with two embedding bags (`experts_decode`); single-token products with at most
512 outputs run as embedding bags too (`gemv_or_linear`), faster than MKL's GEMV on the AMD CPU measured.

`fast=True` (CUDA only, off by default): the model gets the fused GPU modules (`prepare_fast`, in place,
before the cache is sized) and pure-decode steps run through `dsv3.engine.fast_runner.FastRunner` (Triton
MLA decode over this same cache, replayed from CUDA graphs); prefill and mixed steps keep the path above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.engine.sampling import Sampler, SamplerOutput
from dsv3.engine.scheduler import SchedulerOutput
from dsv3.engine.sequence import Sequence, TokenLogprob
from dsv3.model import Transformer
from dsv3.model.layers import cpu_decode_layout, expert_tables, experts_decode
from dsv3.model.mla import MLA, rotation_matrices
from dsv3.model.moe import MoE

DEFAULT_CPU_CACHE_BYTES = 512 * 2**20
DEFAULT_GPU_MEMORY_FRACTION = 0.8  # of the free memory after loading the model
MAX_SCORE_ELEMENTS = 2**26  # attention scores materialised at once (256 MiB in float32); queries are tiled


def cache_bytes_per_block(model: Transformer, block_size: int, dtype: torch.dtype | None = None) -> int:
    """Bytes of one cache block: `block_size` tokens x layers x (kv_lora_rank + rope dim)."""
    args = model.args
    dtype = dtype or model.embed_tokens.weight.dtype
    elem = torch.empty((), dtype=dtype).element_size()
    return block_size * args.n_layers * (args.kv_lora_rank + args.qk_rope_head_dim) * elem


@dataclass
class AttentionGroup:
    """Sequences attended together: all decodes (T = 1), or one prefill chunk (b = 1); contexts padded
    to the longest, `S`."""

    query_index: torch.Tensor  # [b, T] index into the flat batch of each sequence's new tokens
    context_slots: torch.Tensor  # [b, S] cache slots of each sequence's context (padded)
    mask: torch.Tensor | None  # [b, T, S] additive float32: 0 where visible, -inf elsewhere; None: all visible
    flat_index: torch.Tensor  # [b * T] query_index flattened
    new_slots: torch.Tensor  # [b * T] cache slot of each new token, in flat_index order


@dataclass
class StepBatch:
    """Index tensors of one step, built once and shared by every layer."""

    tokens: torch.Tensor  # [1, N] int64
    positions: torch.Tensor  # [1, N] int64
    slots: torch.Tensor  # [N] cache slot of each new token
    groups: list[AttentionGroup]  # all decodes in one group, each prefill chunk in its own
    sample_index: torch.Tensor  # [M] flat index of the last token of each sampling sequence
    decode_only: bool = False  # one group of single-token queries whose flat indices are 0..N-1
    # per step: cos, sin, cos + i sin (interleaved rope) or None, rotation matrices [N, R, R] (CPU decode) or None
    rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None


class ModelRunner:
    """Paged latent cache + one forward per scheduler step + sampling."""

    def __init__(self, model: Transformer, block_size: int = 16, num_blocks: int | None = None,
                 cache_memory: int | None = None, fast: bool = False, max_num_seqs: int = 64) -> None:
        """`fast`: decode steps through the fused kernels and CUDA graphs (CUDA only); `max_num_seqs`: the
        largest decode batch, whose graph is captured (only used with `fast`)."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.model = model
        self.args = model.args
        self.block_size = block_size
        weight = model.embed_tokens.weight
        self.device = weight.device
        self.dtype = weight.dtype
        if fast:
            if self.device.type != "cuda":
                raise ValueError(f"fast=True needs a CUDA device, got {self.device}")
            from dsv3.engine.fast_runner import FastRunner, capture_sizes
            capture_sizes(max_num_seqs)  # checks max_num_seqs before any work
            FastRunner.prepare(model)  # fused modules first: stacking the experts needs memory the cache would take
        if self.device.type == "cpu":
            cpu_decode_layout(model)  # faster single-token GEMVs (see its docstring)
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
        self._block_offsets = torch.arange(block_size, device=self.device)
        self._key_positions = torch.arange(self.args.max_seq_len, device=self.device)
        self.layer_caches = list(self.kv_cache.view(self.args.n_layers, -1, latent).unbind(0))  # L x [slots, C + R]
        self.sampler = Sampler()
        self.fast_runner = FastRunner(self, max_num_seqs) if fast else None  # captures the decode graphs

    def _default_cache_memory(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * DEFAULT_GPU_MEMORY_FRACTION)
        return DEFAULT_CPU_CACHE_BYTES

    @property
    def cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    # ---- batch preparation ------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput) -> StepBatch:
        """Flatten the scheduled chunks into one batch and build every index tensor of the step."""
        if out.scheduled and all(item.num_tokens == 1 for item in out.scheduled):
            return self._prepare_decode(out)
        tokens: list[int] = []
        positions: list[int] = []
        decodes: list[tuple[int, int, list[int]]] = []  # (flat index, position, block table)
        groups: list[AttentionGroup] = []
        sample_index: list[int] = []
        for item in out.scheduled:
            seq, start, n = item.seq, item.start, item.num_tokens
            end = start + n
            if len(seq.block_table) * self.block_size < end:
                raise RuntimeError(f"sequence {seq.seq_id} has {len(seq.block_table)} blocks for {end} tokens")
            first = len(tokens)
            tokens += seq.token_slice(start, end)
            positions += range(start, end)
            if n == 1:
                decodes.append((first, start, seq.block_table))
            else:
                groups.append(self._group(torch.arange(first, first + n)[None], torch.arange(start, end)[None],
                                          [seq.block_table]))
            if item.sample:
                sample_index.append(len(tokens) - 1)
        if decodes:
            flat, pos, tables = zip(*decodes)
            groups.append(self._group(torch.tensor(flat)[:, None], torch.tensor(pos)[:, None], list(tables)))
        slots = torch.empty(len(tokens), dtype=torch.long, device=self.device)
        for group in groups:
            slots[group.flat_index] = group.new_slots
        dev = self.device
        return StepBatch(
            tokens=torch.tensor([tokens], dtype=torch.long, device=dev),
            positions=torch.tensor([positions], dtype=torch.long, device=dev),
            slots=slots,
            groups=groups,
            sample_index=torch.tensor(sample_index, dtype=torch.long, device=dev),
        )

    def _prepare_decode(self, out: SchedulerOutput) -> StepBatch:
        """`prepare` for a step where every sequence brings one token: one group, tables padded in Python and
        turned into slots with a handful of tensor ops (the general path costs a few ops per sequence)."""
        bs = self.block_size
        tokens: list[int] = []
        positions: list[int] = []
        tables: list[list[int]] = []
        sample_index: list[int] = []
        for i, item in enumerate(out.scheduled):
            seq, pos = item.seq, item.start
            if len(seq.block_table) * bs <= pos:
                raise RuntimeError(f"sequence {seq.seq_id} has {len(seq.block_table)} blocks for {pos + 1} tokens")
            tokens += seq.token_slice(pos, pos + 1)
            positions.append(pos)
            tables.append(seq.block_table)
            if item.sample:
                sample_index.append(i)
        b, max_s = len(tokens), max(positions) + 1
        if max_s > self.args.max_seq_len:
            raise ValueError(f"position {max_s - 1} is beyond max_seq_len ({self.args.max_seq_len})")
        n_blocks = (max_s + bs - 1) // bs
        dev = self.device
        table = torch.tensor([row[:n_blocks] + [0] * (n_blocks - len(row)) for row in tables], device=dev)
        context_slots = (table[:, :, None] * bs + self._block_offsets).flatten(1)[:, :max_s]  # [b, S]
        new_slots = torch.tensor([row[p // bs] * bs + p % bs for row, p in zip(tables, positions)], device=dev)
        pos = torch.tensor([positions], device=dev)  # [1, b]
        mask = None
        if min(positions) + 1 < max_s:  # padded contexts: hide the keys past each sequence's position
            hidden = self._key_positions[:max_s][None, :] > pos[0, :, None]  # [b, S]
            mask = torch.zeros(b, 1, max_s, device=dev).masked_fill_(hidden[:, None], float("-inf"))
        query_index = torch.arange(b, device=dev)
        group = AttentionGroup(query_index=query_index[:, None], context_slots=context_slots, mask=mask,
                               flat_index=query_index, new_slots=new_slots)
        return StepBatch(tokens=torch.tensor([tokens], device=dev), positions=pos, slots=new_slots, groups=[group],
                         sample_index=torch.tensor(sample_index, dtype=torch.long, device=dev), decode_only=True)

    def _group(self, query_index: torch.Tensor, query_pos: torch.Tensor, tables: list[list[int]]) -> AttentionGroup:
        """Sequences that attend together: `query_index`/`query_pos` `[b, T]` (flat index and position of
        each new token, all rows full), `tables` their block tables."""
        b, t = query_index.shape
        bs = self.block_size
        context_len = query_pos[:, -1] + 1  # [b] a chunk sees everything up to its last token
        max_s = int(context_len.max())
        n_blocks = (max_s + bs - 1) // bs
        table = torch.zeros(b, n_blocks, dtype=torch.long)
        for i, row in enumerate(tables):
            k = min(len(row), n_blocks)
            table[i, :k] = torch.tensor(row[:k])
        context_slots = (table[:, :, None] * bs + torch.arange(bs)).flatten(1)[:, :max_s]  # [b, S]
        new_slots = context_slots.gather(1, query_pos)  # [b, T]
        dev = self.device
        mask = None
        if t > 1 or bool((context_len < max_s).any()):  # causal, or single queries over padded contexts
            key_pos = torch.arange(max_s)
            visible = key_pos[None, None, :] <= query_pos[:, :, None]  # [b, T, S] causal (and within the context)
            mask = torch.zeros(b, t, max_s).masked_fill(~visible, float("-inf")).to(dev)
        return AttentionGroup(query_index=query_index.to(dev), context_slots=context_slots.to(dev),
                              mask=mask, flat_index=query_index.flatten().to(dev),
                              new_slots=new_slots.flatten().to(dev))

    # ---- attention over the paged cache -----------------------------------------------------
    def paged_attention(self, batch: StepBatch, layer_id: int, mla: MLA, x: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The `attention` hook: x `[1, N, D]` -> `[1, N, D]`, writing this layer's latents to the cache."""
        return self.attention_rows(batch, layer_id, mla, x[0], cos[0], sin[0])[None]

    def attention_rows(self, batch: StepBatch, layer_id: int, mla: MLA, x: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`paged_attention` on the rows: x `[N, D]`, cos/sin `[N, R/2]` -> `[N, D]`."""
        if layer_id >= self.args.n_layers:
            raise ValueError(f"layer {layer_id} has no paged cache (MTP layers are not run by the engine)")
        if batch.rope is None:  # the same for every layer of the step
            if batch.decode_only and x.dtype == torch.float32 and not x.is_cuda:  # matrices: fewer ops per layer
                batch.rope = cos, sin, None, rotation_matrices(cos, sin, mla.interleave)
            else:
                batch.rope = cos, sin, torch.complex(cos, sin) if mla.interleave else None, None
        # latent queries next to the rope queries: one product with the cached [c_kv ; k_pe] rows
        q, kv, k_pe = mla.absorbed_queries(x, *batch.rope)  # [N, H, C + R], [N, C], [N, R]
        dtype = q.dtype
        cache = self.layer_caches[layer_id]  # [slots, C + R]
        latent = torch.cat([kv, k_pe], dim=-1)  # [N, C + R]
        cache[batch.slots] = latent if latent.dtype == cache.dtype else latent.to(cache.dtype)
        if q.dtype != cache.dtype:
            q = q.to(cache.dtype)
        if batch.decode_only:  # one group of single-token queries, in flat order
            group = batch.groups[0]
            o_lat = self._attend_decode(mla, q, cache, group.context_slots, group.mask)  # [N, H, C]
            return mla.latent_output(o_lat if o_lat.dtype == dtype else o_lat.to(dtype))
        o_lat = torch.empty(q.shape[0], q.shape[1], self.kv_lora_rank, dtype=cache.dtype, device=q.device)
        heads = q.shape[1]
        for group in batch.groups:
            b, t = group.query_index.shape
            tile = max(1, MAX_SCORE_ELEMENTS // (b * heads * group.context_slots.shape[1]))  # bound [b, T, H, S]
            for lo in range(0, t, tile):
                index = group.query_index[:, lo:lo + tile]  # [b, t']
                mask = None if group.mask is None else group.mask[:, lo:lo + tile]
                o = self._attend(mla, q[index], cache, group.context_slots, mask)  # [b, t', H, C]
                o_lat[index.flatten()] = o.flatten(0, 1)
        return mla.latent_output(o_lat.to(dtype))  # [N, D]

    def _attend_decode(self, mla: MLA, q: torch.Tensor, cache: torch.Tensor, context_slots: torch.Tensor,
                       mask: torch.Tensor | None) -> torch.Tensor:
        """`_attend` for one query per sequence: q `[b, H, C + R]`, mask `[b, 1, S]` or None -> `[b, H, C]`."""
        context = cache[context_slots]  # [b, S, C + R]
        scores = torch.bmm(q, context.transpose(1, 2))  # [b, H, S]
        scores = scores.mul_(mla.softmax_scale) if scores.dtype == torch.float32 else \
            scores.float().mul_(mla.softmax_scale)
        if mask is not None:
            scores = scores.add_(mask)
        probs = scores.softmax(dim=-1)
        if probs.dtype != context.dtype:
            probs = probs.to(context.dtype)
        return torch.bmm(probs, context[..., : self.kv_lora_rank])  # [b, H, C]

    def _attend(self, mla: MLA, q: torch.Tensor, cache: torch.Tensor, context_slots: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """Queries q `[b, T, H, C + R]` over the cached rows `context_slots` `[b, S]`; mask `[b, T, S]` additive
        (None: every key visible). Returns latent outputs `[b, T, H, C]`."""
        b, t, heads, _ = q.shape
        context = cache[context_slots]  # [b, S, C + R]
        scores = torch.bmm(q.reshape(b, t * heads, -1), context.transpose(1, 2))  # [b, T * H, S]
        scores = scores.float().mul_(mla.softmax_scale)  # a fresh tensor either way
        if mask is not None:
            scores = (scores.view(b, t, heads, -1) + mask[:, :, None]).view(b, t * heads, -1)
        probs = scores.softmax(dim=-1).to(context.dtype)
        o = torch.bmm(probs, context[..., : self.kv_lora_rank])  # [b, T * H, C]
        return o.view(b, t, heads, -1)

    # ---- CPU decode ---------------------------------------------------------------------------
    def decode_hidden(self, batch: StepBatch) -> torch.Tensor:
        """`model.hidden` for a decode-only step, written out (the blocks' `forward` on `[N, D]` rows) so that a
        MoE runs through `experts_decode` over its stacked expert tables. -> `[1, N, D]`."""
        model = self.model
        cos, sin = model.rotary(batch.positions[0])  # [N, R/2]
        h = model.embed_tokens(batch.tokens[0])  # [N, D]
        for i, layer in enumerate(model.layers):
            h = h + self.attention_rows(batch, i, layer.self_attn, layer.input_layernorm.row(h), cos, sin)
            x = layer.post_attention_layernorm.row(h)
            mlp = layer.mlp
            tables = expert_tables(mlp) if isinstance(mlp, MoE) else None
            if tables is None:
                h = h + mlp(x)
                continue
            weights, indices = mlp.gate(x)
            shared = mlp.n_experts if tables.n > mlp.n_experts else None
            y = experts_decode(tables, x, weights, indices, shared)  # [N, D] float32
            if shared is None and mlp.shared_experts is not None:
                y = y + mlp.shared_experts(x)
            h = h + y
        return model.norm.row(h)[None]

    # ---- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[tuple[int, TokenLogprob | None]]:
        """Run the scheduled chunks; return `(token, logprob)` for each sequence that samples, in
        `out.scheduled` order."""
        if out.is_empty:
            return []
        if self.fast_runner is not None:
            logits = self.fast_runner.decode(out)  # [M, V] of the sampling sequences; None: not a decode step
            if logits is not None:
                sampling = [item.seq for item in out.scheduled if item.sample]
                return self._to_python(self.sample(logits, sampling), sampling) if sampling else []
        batch = self.prepare(out)
        if batch.decode_only and self.device.type == "cpu":
            h = self.decode_hidden(batch)  # [1, N, D]
        else:
            def attention(layer_id: int, mla: MLA, x: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor) -> torch.Tensor:
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
