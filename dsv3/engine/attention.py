"""Paged attention backends: MLA over the engine's paged latent cache.

Cache: one tensor `[layers, num_slots, C + R]` (the runner's `[layers, num_blocks, block_size, C + R]`,
flattened per layer; MTP modules, when cached, follow the main layers). Token p of a sequence lives in slot
`block_table[p // block_size] * block_size + p % block_size`; the row holds `[RMSNorm(c_kv) ; rope(k_pe)]`.

A step is a list of `Chunk`s (a sequence's new tokens: its block table, first position, count), flattened
into one batch of N tokens. `prepare(chunks)` builds the step's tensors once (`PagedStep`, shared by every
layer): the slots to write, the single-token chunks (decodes) as one group, and the longer chunks (prefill)
grouped by (length, start) so fresh prompts of one length attend in one batched call.

- `PagedAttention`: plain PyTorch, the reference (CPU, and GPU without kernels). Attention runs absorbed,
  in the latent space, for every group: decodes with their contexts gathered and padded, prefill chunks
  with a causal mask by position; score tensors are tiled to `MAX_SCORE_ELEMENTS`.
- `TritonPagedAttention`: the GPU kernels. Latents are normalised, rotated and written by one kernel;
  decodes run the split-K Triton MLA decode kernel over the block tables; prefill chunks expand keys and
  values with `kv_b_proj` and attend through `F.scaled_dot_product_attention`. A decode-only step has fixed
  shapes and no host sync, so `dsv3.engine.cuda_graphs` captures it with static `PagedStep` buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dsv3.kernels import mla_decode as mla_ops
from dsv3.model.attention import AttentionMeta
from dsv3.model.mla import MLA

MAX_SCORE_ELEMENTS = 2**26  # attention scores materialised at once (256 MiB in float32); queries are tiled


@dataclass
class Chunk:
    """One sequence's new tokens in a step: positions `start .. start + num_tokens - 1`."""

    block_table: list[int]
    start: int
    num_tokens: int


@dataclass
class PrefillGroup:
    """Chunks of equal length `T` and start `p0`: query rows `[b, T]`, context slots `[b, p0 + T]`."""

    rows: torch.Tensor  # [b, T] index into the flat batch
    context_slots: torch.Tensor  # [b, S]
    start: int


@dataclass
class PagedStep:
    """The tensors of one step (`AttentionMeta.step`). Decodes: `decode_rows` `[Bd]` flat rows (None: every
    row of the step, in order); the PyTorch backend reads `context_slots [Bd, S]` + `mask [Bd, 1, S]`, the
    Triton one `block_tables [Bd, W]` + `seq_lens [Bd]`."""

    slots: torch.Tensor  # [N] int64 cache slot of each new token (< 0: write nothing, graph padding)
    decode_rows: torch.Tensor | None = None
    context_slots: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    num_decodes: int = 0
    prefills: list[PrefillGroup] = field(default_factory=list)
    one_group: bool = False  # no decodes and a single prefill group whose rows are the flat batch in order


def slots_of(table: list[int], start: int, n: int, block_size: int) -> list[int]:
    """Cache slots of positions `start .. start + n - 1` of a sequence with block table `table`."""
    return [table[p // block_size] * block_size + p % block_size for p in range(start, start + n)]


class PagedAttention:
    """Absorbed MLA over the paged cache in plain PyTorch (see the module docstring)."""

    kernels = False

    def __init__(self, cache: torch.Tensor, block_size: int, max_seq_len: int) -> None:
        """cache `[layers, num_slots, C + R]`."""
        self.cache = cache
        self.block_size = block_size
        self.device = cache.device
        self._key_positions = torch.arange(max_seq_len, device=self.device)
        self._block_offsets = torch.arange(block_size, device=self.device)

    # ---- step preparation ---------------------------------------------------------------------
    def prepare(self, chunks: list[Chunk]) -> PagedStep:
        """The step's tensors, for chunks in flat order (each chunk's tokens follow the previous chunk's)."""
        bs = self.block_size
        slots: list[int] = []
        decodes: list[tuple[int, Chunk]] = []
        groups: dict[tuple[int, int], list[tuple[int, Chunk]]] = {}
        for chunk in chunks:
            end = chunk.start + chunk.num_tokens
            if len(chunk.block_table) * bs < end:
                raise RuntimeError(f"a sequence has {len(chunk.block_table)} blocks for {end} tokens")
            row = len(slots)
            slots += slots_of(chunk.block_table, chunk.start, chunk.num_tokens, bs)
            if chunk.num_tokens == 1:
                decodes.append((row, chunk))
            else:
                groups.setdefault((chunk.num_tokens, chunk.start), []).append((row, chunk))
        dev = self.device
        step = PagedStep(slots=torch.tensor(slots, dtype=torch.long, device=dev), num_decodes=len(decodes))
        if decodes:
            if len(decodes) < len(slots):
                step.decode_rows = torch.tensor([r for r, _ in decodes], dtype=torch.long, device=dev)
            self._prepare_decodes(step, [c for _, c in decodes])
        for (t, start), members in groups.items():
            s = start + t
            n_blocks = -(-s // bs)
            rows = torch.tensor([r for r, _ in members], device=dev)[:, None] + torch.arange(t, device=dev)  # [b, T]
            table = torch.tensor([c.block_table[:n_blocks] for _, c in members], device=dev)  # [b, n_blocks]
            context = (table[:, :, None] * bs + self._block_offsets).flatten(1)[:, :s]  # [b, S]
            step.prefills.append(PrefillGroup(rows, context, start))
        step.one_group = not decodes and len(groups) == 1
        return step

    def _prepare_decodes(self, step: PagedStep, chunks: list[Chunk]) -> None:
        """Gathered contexts `[Bd, S]` padded to the longest, and a mask hiding each row's padding."""
        bs = self.block_size
        positions = [c.start for c in chunks]
        max_s = max(positions) + 1
        n_blocks = -(-max_s // bs)
        dev = self.device
        table = torch.tensor([c.block_table[:n_blocks] + [0] * (n_blocks - len(c.block_table[:n_blocks]))
                              for c in chunks], device=dev)  # [Bd, n_blocks]
        step.context_slots = (table[:, :, None] * bs + self._block_offsets).flatten(1)[:, :max_s]  # [Bd, S]
        if min(positions) + 1 < max_s:  # padded contexts: hide the keys past each sequence's position
            pos = torch.tensor(positions, device=dev)
            hidden = self._key_positions[:max_s][None, :] > pos[:, None]  # [Bd, S]
            step.mask = torch.zeros(len(chunks), 1, max_s, device=dev).masked_fill_(hidden[:, None], float("-inf"))

    # ---- the backend ----------------------------------------------------------------------------
    def write_latents(self, mla: MLA, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      meta: AttentionMeta) -> tuple[torch.Tensor, torch.Tensor]:
        kv, k_pe = mla.latents(kv_a, cos, sin)
        cache = self.cache[mla.layer_id]  # [slots, C + R]
        latent = torch.cat([kv, k_pe], dim=-1)
        cache.index_copy_(0, meta.step.slots, latent if latent.dtype == cache.dtype else latent.to(cache.dtype))
        return kv, k_pe

    def attend(self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
               meta: AttentionMeta) -> torch.Tensor:
        step: PagedStep = meta.step
        cache = self.cache[mla.layer_id]
        dtype = q_nope.dtype
        q = torch.cat([mla.absorb_query(q_nope), q_pe.to(q_nope.dtype)], dim=-1)  # [N, H, C + R]
        if q.dtype != cache.dtype:
            q = q.to(cache.dtype)
        c = mla.kv_lora_rank
        if step.num_decodes == q.shape[0]:  # decode only: one group in flat order
            return mla.value_heads(self.attend_latents(mla, q, meta).to(dtype)).flatten(1)
        o_lat = torch.empty(q.shape[0], q.shape[1], c, dtype=cache.dtype, device=q.device)
        if step.num_decodes:
            o_lat[step.decode_rows] = self._attend_decode(mla, q[step.decode_rows], cache, step.context_slots,
                                                          step.mask)
        heads = q.shape[1]
        for group in step.prefills:
            b, t = group.rows.shape
            s = group.context_slots.shape[1]
            tile = max(1, MAX_SCORE_ELEMENTS // (b * heads * s))  # bound [b, T, H, S]
            for lo in range(0, t, tile):
                rows = group.rows[:, lo:lo + tile]  # [b, t']
                q_pos = torch.arange(group.start + lo, group.start + lo + rows.shape[1], device=q.device)
                hidden = self._key_positions[:s][None, :] > q_pos[:, None]  # [t', S] causal
                o = self._attend(mla, q[rows], cache, group.context_slots, hidden)  # [b, t', H, C]
                o_lat[rows.flatten()] = o.flatten(0, 1)
        return mla.value_heads(o_lat.to(dtype)).flatten(1)  # [N, H * v]

    def attend_latents(self, mla: MLA, q: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        """A decode-only step's absorbed queries `[q_nope W_uk ; q_pe]` `[N, H, C + R]` (the cache dtype) ->
        latent outputs `[N, H, C]`, one product with the cached `[c_kv ; k_pe]` rows (also the CPU decode
        plan's attention, `dsv3.engine.cpu_decode`)."""
        step: PagedStep = meta.step
        return self._attend_decode(mla, q, self.cache[mla.layer_id], step.context_slots, step.mask)

    @staticmethod
    def _attend_decode(mla: MLA, q: torch.Tensor, cache: torch.Tensor, context_slots: torch.Tensor,
                       mask: torch.Tensor | None) -> torch.Tensor:
        """One query per sequence: q `[b, H, C + R]` over `context_slots [b, S]`, mask `[b, 1, S]` additive or
        None -> `[b, H, C]`."""
        context = cache[context_slots]  # [b, S, C + R]
        scores = torch.bmm(q, context.transpose(1, 2))  # [b, H, S]
        scores = scores.mul_(mla.softmax_scale) if scores.dtype == torch.float32 else \
            scores.float().mul_(mla.softmax_scale)
        if mask is not None:
            scores = scores.add_(mask)
        probs = scores.softmax(dim=-1)
        if probs.dtype != context.dtype:
            probs = probs.to(context.dtype)
        return torch.bmm(probs, context[..., : mla.kv_lora_rank])  # [b, H, C]

    @staticmethod
    def _attend(mla: MLA, q: torch.Tensor, cache: torch.Tensor, context_slots: torch.Tensor,
                hidden: torch.Tensor) -> torch.Tensor:
        """Queries q `[b, T, H, C + R]` over the cached rows `context_slots [b, S]`, `hidden [T, S]` the keys
        each query may not see. Returns latent outputs `[b, T, H, C]`."""
        b, t, heads, _ = q.shape
        context = cache[context_slots]  # [b, S, C + R]
        scores = torch.bmm(q.reshape(b, t * heads, -1), context.transpose(1, 2))  # [b, T * H, S]
        scores = scores.float().mul_(mla.softmax_scale).view(b, t, heads, -1)
        scores = scores.masked_fill_(hidden[None, :, None], float("-inf")).view(b, t * heads, -1)
        probs = scores.softmax(dim=-1).to(context.dtype)
        o = torch.bmm(probs, context[..., : mla.kv_lora_rank])  # [b, T * H, C]
        return o.view(b, t, heads, -1)


class TritonPagedAttention(PagedAttention):
    """The GPU kernels over the same cache (see the module docstring). Keeps each layer's absorbed weights
    `W_uk [H, nope, C]` and `W_uv^T [H, C, v]` contiguous, built once from the model."""

    kernels = True

    def __init__(self, cache: torch.Tensor, block_size: int, max_seq_len: int, mlas: list[MLA],
                 num_splits: int | None = None) -> None:
        super().__init__(cache, block_size, max_seq_len)
        self.num_splits = num_splits
        self.w_uk: dict[int, torch.Tensor] = {}
        self.w_uv_t: dict[int, torch.Tensor] = {}
        dtype = cache.dtype
        for mla in mlas:
            w_uk, w_uv_t = mla.kv_b_halves(dtype)
            self.w_uk[mla.layer_id] = w_uk.contiguous()
            self.w_uv_t[mla.layer_id] = w_uv_t.contiguous()

    def _prepare_decodes(self, step: PagedStep, chunks: list[Chunk]) -> None:
        bs = self.block_size
        width = max(c.start // bs + 1 for c in chunks)
        tables = [c.block_table[: c.start // bs + 1] for c in chunks]
        flat = [c.start + 1 for c in chunks]
        for table in tables:
            flat += table + [0] * (width - len(table))
        packed = torch.tensor(flat, dtype=torch.int32).to(self.device, non_blocking=True)
        step.seq_lens = packed[: len(chunks)]
        step.block_tables = packed[len(chunks):].view(len(chunks), width)

    def write_latents(self, mla: MLA, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      meta: AttentionMeta) -> tuple[torch.Tensor, torch.Tensor]:
        lat = mla_ops.store_latents(kv_a, mla.kv_a_layernorm.weight, mla.kv_a_layernorm.eps, cos, sin,
                                    mla.interleave, self.cache[mla.layer_id], meta.step.slots)  # [N, C + R]
        return lat.split([mla.kv_lora_rank, mla.rope_dim], dim=-1)

    def attend(self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
               meta: AttentionMeta) -> torch.Tensor:
        step: PagedStep = meta.step
        n = q_nope.shape[0]
        if step.num_decodes == n:
            return self._decode(mla, q_nope, q_pe, step)
        cache = self.cache[mla.layer_id]
        if step.one_group:  # rows in order: views, no gathers, no scatter
            group = step.prefills[0]
            b, t = group.rows.shape
            return self._prefill(mla, *(x.view(b, t, *x.shape[1:]) for x in (q_nope, q_pe, kv, k_pe)), cache, group)
        out = torch.empty(n, mla.n_heads * mla.v_dim, dtype=q_nope.dtype, device=q_nope.device)
        if step.num_decodes:
            rows = step.decode_rows
            out[rows] = self._decode(mla, q_nope[rows], q_pe[rows], step)
        for group in step.prefills:
            r = group.rows
            out[r.flatten()] = self._prefill(mla, q_nope[r], q_pe[r], kv[r], k_pe[r], cache, group)
        return out

    def _decode(self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, step: PagedStep) -> torch.Tensor:
        """One query per sequence -> `[B, H * v]`: absorbed, through the Triton MLA decode kernel."""
        layer = mla.layer_id
        bsz = q_nope.shape[0]
        q_lat = torch.bmm(q_nope.transpose(0, 1), self.w_uk[layer])  # [H, B, C]
        o_lat = torch.empty_like(q_lat)  # [H, B, C], written through a [B, H, C] view
        blocks = self.cache[layer].view(-1, self.block_size, self.cache.shape[-1])
        mla_ops.mla_decode(q_lat.transpose(0, 1), q_pe, blocks, step.block_tables, step.seq_lens,
                           mla.softmax_scale, self.num_splits, out=o_lat.transpose(0, 1))
        o = torch.bmm(o_lat, self.w_uv_t[layer])  # [H, B, v]
        return o.transpose(0, 1).reshape(bsz, -1)

    @staticmethod
    def _prefill(mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                 cache: torch.Tensor, group: PrefillGroup) -> torch.Tensor:
        """Chunks `[b, T]` (queries, and their own latents kv `[b, T, C]`, k_pe `[b, T, R]`) over their contexts
        `[b, S]`: expanded keys/values and SDPA -> `[b * T, H * v]`. Fresh prompts (start 0) attend over their
        own latents; later chunks read the whole context back from the cache."""
        b, t = group.rows.shape
        s = group.context_slots.shape[1]
        if group.start:
            lat = cache[group.context_slots]  # [b, S, C + R]
            kv, k_pe = lat.split([mla.kv_lora_rank, mla.rope_dim], dim=-1)
        kvb = mla.kv_b_proj(kv).view(b, s, mla.n_heads, -1)  # [b, S, H, nope + v]
        k_nope, v = kvb.split([mla.nope_dim, mla.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, mla.n_heads, -1)], dim=-1)  # [b, S, H, nope + R]
        q = torch.cat([q_nope, q_pe], dim=-1)  # [b, T, H, nope + R]
        mask = None
        if group.start:
            q_pos = torch.arange(group.start, group.start + t, device=q.device)
            mask = torch.arange(s, device=q.device)[None, :] <= q_pos[:, None]  # [T, S] visible
        pad = mla.qk_dim - mla.v_dim if mask is None and q.is_cuda else 0
        if pad > 0:  # flash attention (causal, no mask) wants equal head dims: zero columns, dropped below
            v = F.pad(v, (0, pad))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, is_causal=mask is None, scale=mla.softmax_scale)
        return o.transpose(1, 2)[..., : mla.v_dim].reshape(b * t, -1)  # [b * T, H * v]
