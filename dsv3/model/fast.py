"""The GPU fast path of the model: fused modules (`prepare_fast`) and a paged decode/prefill step (`FastDecoder`).

`prepare_fast(model, fp8=False)` rewrites a loaded `Transformer` in place, keeping every reference path:

- each `MoE` becomes a `FusedMoE` (a subclass, by `__class__` swap): its routed experts are stacked into
  `[E + S, I, D]` / `[E + S, D, I]` tensors (the `S` shared experts appended as `moe_inter_dim`-wide
  slices, always chosen with weight 1), and the expert `Linear`s become views into the stacks (no second
  copy; the shared-expert MLP keeps its own weights). On CUDA `forward` runs fp32 router logits (cuBLAS),
  then `dsv3.kernels.moe.route` and `fused_moe` (no host sync); elsewhere `MoE.forward`.
- dense `MLP`s become `FusedMLP` (fused gate/up + SiLU kernel, then the down projection), `RMSNorm`s
  become `FusedRMSNorm` (one kernel); both fall back to the parent `forward` off CUDA.
- `fp8=True` quantizes every projection except the embedding, output head and router to FP8 with
  128x128 block scales (`FP8Linear`, weight-only: activations stay BF16), as the released checkpoint does.

A subclass swap rather than a flag: the model code stays the reference, `isinstance(m, MoE)` keeps
holding, and a module is either prepared or not (no global switch).

`FastDecoder(model, kv_cache)` runs whole steps over the engine's paged latent cache
`[n_layers, num_blocks, block_size, C + R]` with the fused kernels: `decode` (one token per sequence,
absorbed MLA through `dsv3.kernels.mla_decode`, fixed shapes for a given batch, no host sync: the unit
`dsv3.engine.cuda_graphs` captures) and `prefill` (chunks of equal padded length, expanded MLA through
PyTorch's SDPA, latents written to the cache; fresh prompts can be captured too). On CPU it runs the same code with the kernels' references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.kernels import fp8 as fp8_ops
from dsv3.kernels import mla_decode as mla_ops
from dsv3.kernels import moe as moe_ops
from dsv3.model.layers import MLP, RMSNorm, dense_weight
from dsv3.model.mla import MLA
from dsv3.model.moe import MoE

FP8_SKIP = ("embed_tokens", "lm_head", "gate")


def _fused(x: torch.Tensor) -> bool:
    """Use the Triton kernels for this tensor (CUDA, or the Triton interpreter in development)."""
    return moe_ops._use_triton(x)


class FP8Linear(nn.Module):
    """A bias-free Linear with a `float8_e4m3fn` weight `[out, in]` and its `weight_scale_inv` block scale."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale_inv", scale)

    @classmethod
    def quantize(cls, linear: nn.Linear) -> "FP8Linear":
        return cls(*fp8_ops.quantize_weight(linear.weight.detach()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return moe_ops.linear(x, self.weight, self.weight_scale_inv)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8"


def _weight_and_scale(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return module.weight, getattr(module, "weight_scale_inv", None)


class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fused(x):
            return super().forward(x)
        return mla_ops.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps)[0].view(x.shape)


class FusedMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fused(x):
            return super().forward(x)
        x2 = x.reshape(-1, x.shape[-1])
        wg, sg = _weight_and_scale(self.gate_proj)
        wu, su = _weight_and_scale(self.up_proj)
        wd, sd = _weight_and_scale(self.down_proj)
        h = moe_ops.swiglu(x2, wg, wu, sg, su)
        return moe_ops.linear(h, wd, sd).view(*x.shape[:-1], wd.shape[0])


class FusedMoE(MoE):
    """`MoE` with stacked expert weights and the fused kernels (set up by `prepare_fast`)."""

    w_gate: torch.Tensor  # [E + S, I, D]
    w_up: torch.Tensor  # [E + S, I, D]
    w_down: torch.Tensor  # [E + S, D, I]
    s_gate: torch.Tensor | None  # FP8 block scales, [E + S, ceil(I/128), ceil(D/128)]
    s_up: torch.Tensor | None
    s_down: torch.Tensor | None
    router_weight: torch.Tensor  # [E, D] float32
    n_shared_slices: int
    active_experts: torch.Tensor  # [1] int32: experts (shared slices included) that got tokens last call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fused(x):
            return super().forward(x)
        shape = x.shape
        x2 = x.reshape(-1, self.dim)  # [N, D]
        gate = self.gate
        logits = F.linear(x2.float(), self.router_weight)  # [N, E]
        ids, weights = moe_ops.route(logits, gate.e_score_correction_bias, gate.topk, self.n_shared_slices,
                                     gate.score_func, gate.topk_method, gate.n_groups, gate.topk_groups,
                                     gate.norm_topk_prob, gate.route_scale)
        out = moe_ops.fused_moe(x2, ids, weights, self.w_gate, self.w_up, self.w_down, self.s_gate, self.s_up,
                                self.s_down, stats=self.active_experts if x2.is_cuda else None)
        return out.view(shape)


# ---- preparation ---------------------------------------------------------------------------------
def _quantize_linears(module: nn.Module, skip: tuple[str, ...] = FP8_SKIP) -> None:
    for name, child in list(module.named_children()):
        if name in skip or isinstance(child, (FP8Linear, MoE)):
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, FP8Linear.quantize(child))
        else:
            _quantize_linears(child, skip)


@torch.no_grad()
def _stack_experts(moe: MoE, fp8: bool) -> None:
    """Stack routed experts + shared slices; routed expert Linears become views into the stacks."""
    inter = moe.experts[0].gate_proj.weight.shape[0]
    shared = moe.shared_experts
    n_shared = 0 if shared is None else shared.gate_proj.weight.shape[0] // inter
    if fp8 and inter % 128:
        raise ValueError(f"FP8 experts need moe_inter_dim divisible by 128, got {inter}")
    if fp8 and shared is not None:
        _quantize_linears(shared, ())
    n_exp = len(moe.experts)
    names = ("gate_proj", "up_proj", "down_proj")

    def slices(name: str) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per-slice (weight, scale) of the shared MLP's projection `name`."""
        if shared is None:
            return []
        w, s = _weight_and_scale(getattr(shared, name))
        if name == "down_proj":  # [D, S*I]: column slices
            return [(w[:, i * inter:(i + 1) * inter], None if s is None else s[:, i * inter // 128:(i + 1) * inter // 128])
                    for i in range(n_shared)]
        return [(w[i * inter:(i + 1) * inter], None if s is None else s[i * inter // 128:(i + 1) * inter // 128])
                for i in range(n_shared)]

    for name in names:
        if fp8:
            first = moe.experts[0]
            shape = tuple(getattr(first, name).weight.shape)
            device = getattr(first, name).weight.device
            w8 = torch.empty(n_exp + n_shared, *shape, dtype=fp8_ops.FP8_DTYPE, device=device)
            s8 = torch.empty(n_exp + n_shared, *fp8_ops.scale_shape(*shape), dtype=torch.float32, device=device)
            for e, expert in enumerate(moe.experts):
                lin = getattr(expert, name)
                if isinstance(lin, FP8Linear):
                    w8[e], s8[e] = lin.weight, lin.weight_scale_inv
                else:
                    w8[e], s8[e] = fp8_ops.quantize_weight(lin.weight.detach())
                setattr(expert, name, FP8Linear(w8[e], s8[e]))
            for i, (w, s) in enumerate(slices(name)):
                w8[n_exp + i], s8[n_exp + i] = w, s
            setattr(moe, f"w_{name[:-5]}", w8)
            setattr(moe, f"s_{name[:-5]}", s8)
        else:
            weights = [getattr(expert, name).weight.detach() for expert in moe.experts]
            stack = torch.stack(weights + [w for w, _ in slices(name)])
            for e, expert in enumerate(moe.experts):
                getattr(expert, name).weight = nn.Parameter(stack[e], requires_grad=False)
            setattr(moe, f"w_{name[:-5]}", stack)
            setattr(moe, f"s_{name[:-5]}", None)
    moe.router_weight = moe.gate.weight.detach().float()
    moe.n_shared_slices = n_shared
    moe.active_experts = torch.zeros(1, dtype=torch.int32, device=moe.router_weight.device)
    moe.__class__ = FusedMoE


@torch.no_grad()
def prepare_fast(model: nn.Module, fp8: bool = False) -> nn.Module:
    """Swap in the fused modules (and FP8 weights with `fp8=True`) in place; returns the model.

    Call after the model is on its device: the stacked expert weights are plain attributes that
    `.to()` does not move. Parameters lose `requires_grad` (inference only)."""
    for module in list(model.modules()):
        if isinstance(module, MoE) and not isinstance(module, FusedMoE):
            _stack_experts(module, fp8)
    if fp8:
        _quantize_linears(model)
    for module in model.modules():
        if type(module) is MLP:
            module.__class__ = FusedMLP
        elif type(module) is RMSNorm:
            module.__class__ = FusedRMSNorm
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _module_bytes(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return _nbytes(*module.parameters(), *module.buffers())


def decode_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Weight bytes one decode step of a prepared model reads: `dense` (all but routed experts: attention
    with the absorbed `kv_b_proj` copies, norms, routers, dense MLPs, final norm, output head) and
    `per_expert` (one stacked expert slice of one MoE layer; a step reads it once per expert that got
    tokens, shared slices included). Embedding rows are not counted (one row per token)."""
    dense = _module_bytes(model.norm) + _module_bytes(model.lm_head)
    per_expert = 0
    for layer in model.layers:
        mla = layer.self_attn
        for name in ("q_a_proj", "q_a_layernorm", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
                     "o_proj"):
            dense += _module_bytes(getattr(mla, name, None))
        dense += mla.n_heads * (mla.nope_dim + mla.v_dim) * mla.kv_lora_rank * model.embed_tokens.weight.element_size()
        dense += _module_bytes(layer.input_layernorm) + _module_bytes(layer.post_attention_layernorm)
        mlp = layer.mlp
        if isinstance(mlp, FusedMoE):
            dense += _nbytes(mlp.router_weight, mlp.gate.e_score_correction_bias)
            per_expert = _nbytes(mlp.w_gate[0], mlp.w_up[0], mlp.w_down[0], *(
                None if s is None else s[0] for s in (mlp.s_gate, mlp.s_up, mlp.s_down)))
        else:
            dense += _module_bytes(mlp)
    return {"dense": dense, "per_expert": per_expert}


# ---- whole steps over the paged cache ---------------------------------------------------------------
class _AbsorbedMLA:
    """Per-layer absorbed weights: `w_uk [H, nope, C]` and `w_uv_t [H, C, v]` (model dtype, contiguous)."""

    def __init__(self, mla: MLA, dtype: torch.dtype) -> None:
        w = dense_weight(mla.kv_b_proj, dtype).view(mla.n_heads, mla.nope_dim + mla.v_dim, -1)
        self.w_uk = w[:, : mla.nope_dim].contiguous()
        self.w_uv_t = w[:, mla.nope_dim:].transpose(1, 2).contiguous()


class FastDecoder:
    """Decode and prefill steps of a (prepared) `Transformer` over the paged latent cache.

    kv_cache `[n_layers, num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]` in the model dtype
    (`ModelRunner.kv_cache`). Slot of token p of a sequence: `block_table[p // bs] * bs + p % bs`."""

    def __init__(self, model: nn.Module, kv_cache: torch.Tensor) -> None:
        args = model.args
        if kv_cache.dim() != 4 or kv_cache.shape[0] != args.n_layers or \
                kv_cache.shape[-1] != args.kv_lora_rank + args.qk_rope_head_dim:
            raise ValueError(f"kv_cache must be [n_layers={args.n_layers}, num_blocks, block_size, "
                             f"{args.kv_lora_rank + args.qk_rope_head_dim}], got {tuple(kv_cache.shape)}")
        self.model = model
        self.args = args
        self.kv_cache = kv_cache
        self.block_size = kv_cache.shape[2]
        self.dtype = model.embed_tokens.weight.dtype
        self.absorbed = [_AbsorbedMLA(layer.self_attn, self.dtype) for layer in model.layers]
        model.rotary.to(kv_cache.device)  # its frequencies must live where the step runs (graph capture)

    # -- shared pieces --
    def _queries(self, mla: MLA, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """h `[N, D]` -> q `[N, H, nope + R]` with the rope part rotated in place."""
        if mla.q_lora_rank:
            c = mla.q_a_layernorm(mla.q_a_proj(h))
            q = mla.q_b_proj(c)
        else:
            q = mla.q_proj(h)
        q = q.view(h.shape[0], mla.n_heads, mla.qk_dim)
        mla_ops.rope_(q[..., mla.nope_dim:], cos, sin, mla.interleave)
        return q

    def _latents(self, layer_id: int, mla: MLA, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 slots: torch.Tensor) -> torch.Tensor:
        cache = self.kv_cache[layer_id].view(-1, self.kv_cache.shape[-1])  # [slots, C + R]
        return mla_ops.store_latents(mla.kv_a_proj_with_mqa(h), mla.kv_a_layernorm.weight, mla.kv_a_layernorm.eps,
                                     cos, sin, mla.interleave, cache, slots)

    def _layers(self, x: torch.Tensor, attention) -> torch.Tensor:
        """Residual stream `[N, D]` through every block; `attention(layer_id, mla, h) -> [N, D]`."""
        pending = None
        for layer in self.model.layers:
            ln1 = layer.input_layernorm
            if pending is None:
                h = mla_ops.rms_norm(x, ln1.weight, ln1.eps)[0]
            else:
                h, x = mla_ops.rms_norm(pending, ln1.weight, ln1.eps, residual=x)  # x + ffn of the last block
            a = attention(layer.layer_id, layer.self_attn, h)
            ln2 = layer.post_attention_layernorm
            h, x = mla_ops.rms_norm(a, ln2.weight, ln2.eps, residual=x)
            pending = layer.mlp(h)
        norm = self.model.norm
        return mla_ops.rms_norm(pending, norm.weight, norm.eps, residual=x)[0]

    # -- decode --
    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               block_tables: torch.Tensor, seq_lens: torch.Tensor, num_splits: int | None = None) -> torch.Tensor:
        """One new token per sequence -> logits `[B, vocab]` (model dtype).

        tokens/positions/slots `[B]` int64 (slot < 0: write nothing, for padding rows), block_tables
        `[B, max_blocks]` int32, seq_lens `[B]` int32 = position + 1 (0 for padding rows)."""
        cos, sin = self.model.rotary(positions)  # [B, R/2]
        bsz = tokens.shape[0]

        def attention(layer_id: int, mla: MLA, h: torch.Tensor) -> torch.Tensor:
            q = self._queries(mla, h, cos, sin)  # [B, H, nope + R]
            self._latents(layer_id, mla, h, cos, sin, slots)
            ab = self.absorbed[layer_id]
            q_lat = torch.bmm(q[..., : mla.nope_dim].transpose(0, 1), ab.w_uk)  # [H, B, C]
            o_lat = torch.empty_like(q_lat)  # [H, B, C], written through a [B, H, C] view
            mla_ops.mla_decode(q_lat.transpose(0, 1), q[..., mla.nope_dim:], self.kv_cache[layer_id], block_tables,
                               seq_lens, mla.softmax_scale, num_splits, out=o_lat.transpose(0, 1))
            o = torch.bmm(o_lat, ab.w_uv_t)  # [H, B, v]
            return mla.o_proj(o.transpose(0, 1).reshape(bsz, -1))

        h = self._layers(self.model.embed_tokens(tokens), attention)
        return self.model.lm_head(h)

    # -- prefill --
    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, start_pos: int, block_tables: torch.Tensor, last_only: bool = True,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """tokens `[B, T]` at positions `start_pos .. start_pos + T - 1` of each sequence (earlier positions
        already cached) -> logits `[B, vocab]` of each row's last token (or `[B, T, vocab]`); writes the latents.

        `lengths [B]` (optional, device tensor): row b has only `lengths[b]` real tokens, the rest is padding
        at the end (its latents are not written, its logits not returned), so prompts of different lengths
        share one call and fixed shapes (what `PrefillGraphs` captures). No host sync."""
        bsz, seqlen = tokens.shape
        dev = tokens.device
        bs = self.block_size
        total = start_pos + seqlen
        pos = torch.arange(start_pos, total, device=dev)
        positions = pos.expand(bsz, -1).reshape(-1)  # [N]
        slots = block_tables[:, pos // bs].long() * bs + pos % bs  # [B, T]
        if lengths is not None:
            slots = torch.where(torch.arange(seqlen, device=dev)[None, :] < lengths[:, None], slots, -1)
        slots = slots.reshape(-1)  # [N]
        ctx = torch.arange(total, device=dev)
        ctx_slots = block_tables[:, ctx // bs].long() * bs + ctx % bs  # [B, S]
        cos, sin = self.model.rotary(positions)
        mask = None
        if start_pos:
            mask = ctx[None, :] <= pos[:, None]  # [T, S]

        def attention(layer_id: int, mla: MLA, h: torch.Tensor) -> torch.Tensor:
            q = self._queries(mla, h, cos, sin).view(bsz, seqlen, mla.n_heads, -1)  # [B, T, H, nope + R]
            lat = self._latents(layer_id, mla, h, cos, sin, slots)  # [N, C + R]
            if start_pos:
                lat = self.kv_cache[layer_id].view(-1, lat.shape[-1])[ctx_slots]  # [B, S, C + R]
            lat = lat.view(bsz, total, -1)
            kv, k_pe = lat.split([mla.kv_lora_rank, mla.rope_dim], dim=-1)
            kvb = mla.kv_b_proj(kv).view(bsz, total, mla.n_heads, -1)  # [B, S, H, nope + v]
            k_nope, v = kvb.split([mla.nope_dim, mla.v_dim], dim=-1)
            k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, mla.n_heads, -1)], dim=-1)  # [B, S, H, nope + R]
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask, is_causal=mask is None, scale=mla.softmax_scale)
            return mla.o_proj(o.transpose(1, 2).reshape(bsz * seqlen, -1))  # [N, D]

        h = self._layers(self.model.embed_tokens(tokens).view(bsz * seqlen, -1), attention)
        h = h.view(bsz, seqlen, -1)
        if not last_only:
            return self.model.lm_head(h)
        last = h[:, -1] if lengths is None else h[torch.arange(bsz, device=dev), (lengths - 1).clamp(min=0)]
        return self.model.lm_head(last)  # [B, vocab]


def slots_for(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slot of each (sequence, position): block_tables `[B, max_blocks]`, positions `[B]` -> `[B]` int64."""
    rows = torch.arange(block_tables.shape[0], device=block_tables.device)
    return block_tables[rows, positions // block_size].long() * block_size + positions % block_size
