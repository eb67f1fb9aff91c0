"""The CPU decode plan: packed float32 weights for decode steps, applied through `AttentionMeta.plan`.

A CPU decode step reads every weight once per token and runs a few hundred small ops, so two things decide
its speed: how fast one row times a cold weight streams, and how many ops run (each costs microseconds once a
weight has streamed through the caches). `CPUDecodePlan(model)` is built once by the engine's `ModelRunner`
from a loaded float32 CPU model and holds what the faster products need; the runner passes it in the
`AttentionMeta` of decode-only steps (every sequence brings one token), and the model's one forward hands two
sub-steps to it (`MLA.forward` -> `attention`, `Block.forward`'s FFN -> `ffn`). Every other step, and any use
of the model outside the engine, runs the plain modules.

Building the plan re-stores the weights (same Parameter objects, same shapes and values) in one buffer whose
pages are advised as transparent huge pages, so a weight read once per token streams without a TLB miss every
4 KiB:
- an MLA's `q_a_proj` (or `q_proj`) and `kv_a_proj_with_mqa` as the two parts of one column-major matrix:
  one product per token;
- each MLP's `gate_proj` and `up_proj` as the halves of one column-major `[2I, D]` matrix;
- a MoE's experts (and its shared expert when it has their shape) back to back: their fused gate/up matrices,
  then their down matrices, two tables that one token's chosen experts are read from by one embedding bag each
  (`experts_decode`: the routing weights and the sum over experts happen inside the second bag);
- other weights column-major (the transpose contiguous) where `out >= in` or `out <= BAG_MAX_OUT`, which MKL's
  GEMV reads faster and an embedding bag can read row by row; wider ones stay row-major; `kv_b_proj`
  row-major (each head's `W_uk` rows contiguous).

Two tensors are derived copies, the plan's own: each head's `W_uv^T` `[C, v]` (read by one embedding bag per
head) and, with a query LoRA, the absorbed query weight `[W_uk^T W_q_nope ; W_q_rope]` per head
(`[H * (C + R), q_lora]`: one product gives the latent and rope queries). They hold the values of the weights
when the plan was built: build a new plan (a new engine) after changing weights.

Single-row products with at most `BAG_MAX_OUT` outputs run as `torch.embedding_bag` over the transposed
weight (`y = sum_i x_i W^T[i, :]`, FBGEMM's kernel, faster than MKL's GEMV on cold `[<=512, 512]` weights on
the AMD CPU measured); several rows use `F.linear`. Values equal the plain forward's up to float32 rounding
(other summation orders), which `tests/test_cpu_decode.py` checks product by product.
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model import Transformer
from dsv3.model.attention import AttentionMeta
from dsv3.model.layers import MLP, RMSNorm
from dsv3.model.mla import MLA
from dsv3.model.moe import LocalExperts, MoE
from dsv3.model.transformer import Block

HUGE_PAGE = 2 << 20  # bytes; transparent huge pages on x86-64 Linux
ALIGN = 16  # elements (64 bytes) between the buffer's groups
BAG_MAX_OUT = 512  # widest single-row product run as an embedding bag (wider ones: MKL's column-major GEMV)
MADV_HUGEPAGE = 14


def huge_page_buffer(numel: int) -> torch.Tensor:
    """An uninitialised float32 CPU tensor of `numel` elements, aligned to a huge page and advised as
    transparent huge pages (Linux `madvise(MADV_HUGEPAGE)`, before first touch). Where the advice is
    unavailable it is an ordinary allocation."""
    pad = HUGE_PAGE // 4
    raw = torch.empty(numel + pad, dtype=torch.float32)
    start = (-raw.data_ptr() % HUGE_PAGE) // 4
    buf = raw[start:start + numel]
    if sys.platform.startswith("linux"):
        try:
            length = (numel * 4 + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
            ctypes.CDLL(None).madvise(ctypes.c_void_p(buf.data_ptr()), ctypes.c_size_t(length), MADV_HUGEPAGE)
        except (OSError, AttributeError):
            pass
    return buf


def plain_fp32(linear: nn.Module) -> bool:
    """A bias-free `nn.Linear` with a float32 CPU weight (not FP8, not a fused or parallel variant)."""
    return (type(linear) is nn.Linear and linear.bias is None and linear.weight.dtype == torch.float32
            and linear.weight.device.type == "cpu")


def column_major(out_features: int, in_features: int) -> bool:
    """Whether a lone `[out, in]` weight is stored column-major (see the module docstring)."""
    return out_features >= in_features or out_features <= BAG_MAX_OUT


class Product:
    """`y = x W^T` for x `[N, in]`, W `[out, in]` a weight of the buffer. One row with a column-major W of at
    most `BAG_MAX_OUT` outputs: one embedding bag over the rows of `W^T` weighted by x; else `F.linear`."""

    def __init__(self, weight: torch.Tensor, plan: CPUDecodePlan) -> None:
        self.weight = weight
        out_f, in_f = weight.shape
        bag = weight.stride() == (1, out_f) and out_f <= BAG_MAX_OUT
        self.table = weight.t() if bag else None  # [in, out] contiguous
        self.rows = plan.arange(in_f) if bag else None
        self.offsets = plan.offsets(1, in_f) if bag else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.table is not None and x.shape[0] == 1:
            return torch.embedding_bag(self.table, self.rows, self.offsets, False, 0, False, x.view(-1), False,
                                       None)[0]  # [1, out]
        return F.linear(x, self.weight)


@dataclass
class AttentionPack:
    """One MLA's products. `first`: `[q_a ; kv_a]` (or `[q ; kv_a]` without a query LoRA) in one product."""

    first: Product
    q_dim: int  # q_lora_rank, or H * qk_dim without a query LoRA
    q_b: Product | None  # q_b_proj (query LoRA)
    q_absorbed: torch.Tensor | None  # [H * (C + R), q_lora]: one token's latent and rope queries at once
    w_uk: torch.Tensor  # [H, nope, C] view of the row-major kv_b_proj
    uv_t: torch.Tensor  # [H * C, v]: each head's W_uv^T, rows c (a copy)
    uv_rows: torch.Tensor  # [H * C] arange
    uv_offsets: torch.Tensor  # [H] one bag per head
    o: Product


@dataclass
class ExpertTables:
    """A MoE's n stacked experts as two embedding-bag tables, with the table rows of each expert."""

    gate_up: torch.Tensor  # [n * D, 2I]: expert e's fused gate/up weight transposed at rows e * D ...
    down: torch.Tensor  # [n * I, D]: expert e's down weight transposed at rows e * I ...
    gate_up_rows: torch.Tensor  # [n, D] int64: e * D + arange(D)
    down_rows: torch.Tensor  # [n, I] int64
    shared: int | None  # the shared expert's index in the tables (n - 1), or None when it is not stacked


@dataclass
class MLPPack:
    """A dense MLP (or a MoE's unstacked shared experts): fused gate/up, then down."""

    gate_up: Product  # [2I, D]
    down: Product


class CPUDecodePlan:
    """Packed tensors of a float32 CPU `Transformer` for decode steps (see the module docstring). Holds, per
    main layer, an `AttentionPack` and the FFN's packs; `attention` and `ffn` are the forward's hooks."""

    def __init__(self, model: Transformer) -> None:
        if not self.supports(model):
            raise ValueError("the CPU decode plan needs a CPU model with plain float32 nn.Linear weights")
        self._arange: dict[int, torch.Tensor] = {}
        self._offsets: dict[tuple[int, int], torch.Tensor] = {}
        self._zero = torch.zeros(())
        layout = _Layout(model)
        self.buffer = layout.buffer  # every weight of the layers and the output head
        self.attn = [self._attention_pack(block.self_attn, layout) for block in model.layers]
        self.experts: list[ExpertTables | None] = []
        self.mlps: list[MLPPack | None] = []  # dense MLP, or the MoE's shared experts when not stacked
        for block in model.layers:
            mlp = block.mlp
            tables = layout.tables.get(id(mlp))
            self.experts.append(tables)
            dense = mlp if isinstance(mlp, MLP) else None
            if isinstance(mlp, MoE) and mlp.shared_experts is not None and (tables is None or tables.shared is None):
                dense = mlp.shared_experts
            self.mlps.append(None if dense is None else MLPPack(Product(layout.fused[id(dense)], self),
                                                                Product(dense.down_proj.weight, self)))

    @staticmethod
    def supports(model: Transformer) -> bool:
        """True for a model whose main layers and output head are plain float32 CPU `nn.Linear`s and whose
        MoEs run every routed expert here (`LocalExperts`, not fused for the GPU kernels), in one process (a model
        split over ranks sums partial outputs in module hooks that the plan's packed products would skip)."""
        linears = [m for block in model.layers for m in block.modules()
                   if isinstance(m, nn.Linear) or hasattr(m, "weight_scale_inv")]  # FP8Linear: not planned
        moes = [block.mlp for block in model.layers if isinstance(block.mlp, MoE)]
        split = getattr(model, "parallel", None) is not None and model.parallel.world > 1  # sums over ranks
        return (not split and all(plain_fp32(m) for m in [*linears, model.lm_head])
                and all(type(moe.experts_impl) is LocalExperts and moe.stacked is None for moe in moes))

    # ---- index tensors, built once per size ----------------------------------------------------
    def arange(self, n: int) -> torch.Tensor:
        t = self._arange.get(n)
        if t is None:
            t = self._arange[n] = torch.arange(n)
        return t

    def offsets(self, bags: int, length: int) -> torch.Tensor:
        """Offsets of `bags` consecutive bags of `length` indices each."""
        t = self._offsets.get((bags, length))
        if t is None:
            t = self._offsets[(bags, length)] = torch.arange(bags) * length
        return t

    def _attention_pack(self, mla: MLA, layout: _Layout) -> AttentionPack:
        heads, c = mla.n_heads, mla.kv_lora_rank
        q_dim = mla.q_lora_rank or heads * mla.qk_dim
        w_uk, _ = mla.kv_b_halves(torch.float32)
        return AttentionPack(
            first=Product(layout.fused[id(mla)], self), q_dim=q_dim,
            q_b=Product(mla.q_b_proj.weight, self) if mla.q_lora_rank else None,
            q_absorbed=layout.absorbed.get(id(mla)), w_uk=w_uk, uv_t=layout.uv_t[id(mla)],
            uv_rows=self.arange(heads * c), uv_offsets=self.offsets(heads, c), o=Product(mla.o_proj.weight, self))

    # ---- sub-steps -------------------------------------------------------------------------------
    def norm(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        """`norm(x)` for x `[N, d]`; one row in three light ops (its norm read back as a Python float, then
        `x * weight / rms`) instead of `rms_norm`'s composite of about eight kernels."""
        if x.shape[0] != 1:
            return norm(x)
        ss = float(torch.linalg.vector_norm(x)) ** 2
        return torch.addcmul(self._zero, x, norm.weight, value=1.0 / math.sqrt(ss / x.shape[1] + norm.eps))

    def queries(self, mla: MLA, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[N, D]` -> absorbed queries `[q_nope W_uk ; rope(q_pe)]` `[N, H, C + R]` and `kv_a_proj(x)`
        `[N, C + R]`."""
        pack = self.attn[mla.layer_id]
        n, heads = x.shape[0], mla.n_heads
        q, kv_a = pack.first(x).split([pack.q_dim, mla.kv_lora_rank + mla.rope_dim], dim=-1)
        if mla.q_lora_rank:
            q = self.norm(mla.q_a_layernorm, q)
        if n == 1 and pack.q_absorbed is not None:
            q_lat, q_pe = F.linear(q, pack.q_absorbed).view(n, heads, -1).split([mla.kv_lora_rank, mla.rope_dim], -1)
        else:
            q = (q if pack.q_b is None else pack.q_b(q)).view(n, heads, mla.qk_dim)
            q_nope, q_pe = q.split([mla.nope_dim, mla.rope_dim], dim=-1)
            q_lat = torch.bmm(q_nope.transpose(0, 1), pack.w_uk).transpose(0, 1)  # [N, H, C]
        return torch.cat([q_lat, mla.rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2))], dim=-1), kv_a

    def value_heads(self, mla: MLA, o_lat: torch.Tensor) -> torch.Tensor:
        """Latent attention output `[N, H, C]` -> per-head values `[N, H * v]` (`W_uv`); one token through one
        embedding bag per head over the `W_uv^T` copy."""
        pack = self.attn[mla.layer_id]
        if o_lat.shape[0] == 1:
            o = torch.embedding_bag(pack.uv_t, pack.uv_rows, pack.uv_offsets, False, 0, False, o_lat.reshape(-1),
                                    False, None)[0]  # [H, v]
            return o.view(1, -1)
        return mla.value_heads(o_lat).flatten(1)

    # ---- the forward's hooks ---------------------------------------------------------------------
    def attention(self, mla: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  meta: AttentionMeta) -> torch.Tensor:
        """`MLA.forward` of a decode step: x `[N, D]` -> `[N, D]`, through `meta.backend` (a paged backend
        with `attend_latents`)."""
        q, kv_a = self.queries(mla, x, cos, sin)
        meta.backend.write_latents(mla, kv_a, cos, sin, meta)
        o_lat = meta.backend.attend_latents(mla, q, meta)  # [N, H, C]
        return self.attn[mla.layer_id].o(self.value_heads(mla, o_lat))

    def ffn(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        """`block.mlp(x)` for x `[N, D]`: a MoE's chosen experts from its tables, a dense MLP's fused
        products."""
        layer = block.layer_id
        tables, dense = self.experts[layer], self.mlps[layer]
        if tables is None:
            return self.mlp(dense, x)
        weights, indices = block.mlp.gate(x)
        y = self.experts_decode(tables, x, weights, indices)
        return y if dense is None else y + self.mlp(dense, x)

    # ---- FFN products ----------------------------------------------------------------------------
    @staticmethod
    def mlp(pack: MLPPack, x: torch.Tensor) -> torch.Tensor:
        gate, up = pack.gate_up(x).chunk(2, dim=-1)
        return pack.down(F.silu(gate).mul_(up))

    def experts_decode(self, tables: ExpertTables, x: torch.Tensor, weights: torch.Tensor,
                       indices: torch.Tensor) -> torch.Tensor:
        """Tokens through their chosen experts: row t gets `sum_k weights[t, k] * expert_{indices[t, k]}(x[t])`
        (+ the shared expert with weight 1 when it is in the tables); x `[N, D]`, weights/indices `[N, K]` ->
        `[N, D]`.

        Two embedding bags: one reads each (token, expert) pair's fused gate/up matrix (`[D, 2I]`, rows
        weighted by the token) into `[N * K, 2I]`; the other sums, per token, the rows of its K down matrices
        (`[I, D]` each) weighted by `weight_k * silu(gate_k) * up_k`."""
        n, dim = x.shape
        inter = tables.down_rows.shape[1]
        if tables.shared is not None:
            indices = F.pad(indices, (0, 1), value=tables.shared)  # [N, K + 1]
            weights = F.pad(weights, (0, 1), value=1.0)
        k = indices.shape[1]
        if n > 1:  # pairs sorted by expert: an expert's matrix is read again straight from the cache
            order = indices.flatten().argsort()  # [N * K]
            rows = tables.gate_up_rows[indices.flatten()[order]].view(-1)
            h = torch.embedding_bag(tables.gate_up, rows, self.offsets(n * k, dim), False, 0, False,
                                    x[order // k].view(-1), False, None)[0]
            h = h[order.argsort()]  # [N * K, 2I] back in (token, k) order
        else:
            h = torch.embedding_bag(tables.gate_up, tables.gate_up_rows[indices].view(-1), self.offsets(k, dim),
                                    False, 0, False, x.expand(k, dim).reshape(-1), False, None)[0]  # [K, 2I]
        act = F.silu(h[:, :inter]).mul_(h[:, inter:]).mul_(weights.view(n * k, 1))  # [N * K, I]
        return torch.embedding_bag(tables.down, tables.down_rows[indices].view(-1), self.offsets(n, k * inter),
                                   False, 0, False, act.view(-1), False, None)[0]  # [N, D]


class _Layout:
    """Moves the weights of a model's main layers and output head into one huge-page buffer (see the module
    docstring) and keeps what the plan reads: fused views, expert tables and the two derived copies, keyed by
    the id of their module."""

    def __init__(self, model: Transformer) -> None:
        self.fused: dict[int, torch.Tensor] = {}  # MLA -> [q_a ; kv_a], MLP -> [gate ; up], both [sum out, in]
        self.tables: dict[int, ExpertTables] = {}  # MoE -> its stacked experts
        self.uv_t: dict[int, torch.Tensor] = {}  # MLA -> [H * C, v]
        self.absorbed: dict[int, torch.Tensor] = {}  # MLA -> [H * (C + R), q_lora]
        self._size = 0
        self._tasks: list[Callable[[], None]] = []
        seen = {id(p) for p in model.embed_tokens.parameters()}  # a tied output head stays where it is
        for block in model.layers:
            self._attention(block.self_attn)
            mlp = block.mlp
            if isinstance(mlp, MoE):
                self._experts(mlp)
            else:
                self._mlp(mlp)
        if id(model.lm_head.weight) not in seen:
            self._lone(model.lm_head)
        self.buffer = huge_page_buffer(max(self._size, 1))
        with torch.no_grad():
            for task in self._tasks:
                task()

    # ---- planning: each call reserves its space and queues the copy -----------------------------
    def _reserve(self, numel: int, align: bool = True) -> int:
        start = self._size
        self._size += (numel + ALIGN - 1) // ALIGN * ALIGN if align else numel
        return start

    def _columns(self, linears: list[nn.Linear], key: int | None = None, align: bool = True) -> None:
        """The weights `[out_k, in]` side by side as one column-major `[sum out_k, in]` block; each weight
        becomes its column-major part."""
        in_f = linears[0].weight.shape[1]
        out_f = sum(m.weight.shape[0] for m in linears)
        start = self._reserve(in_f * out_f, align)

        def task() -> None:
            block = self.buffer[start:start + in_f * out_f].view(in_f, out_f)  # [in, sum out]
            col = 0
            for m in linears:
                n = m.weight.shape[0]
                block[:, col:col + n].copy_(m.weight.t())
                m.weight.data = block[:, col:col + n].t()
                col += n
            if key is not None:
                self.fused[key] = block.t()

        self._tasks.append(task)

    def _rows(self, linear: nn.Linear) -> None:
        out_f, in_f = linear.weight.shape
        start = self._reserve(out_f * in_f)

        def task() -> None:
            w = self.buffer[start:start + out_f * in_f].view(out_f, in_f)
            w.copy_(linear.weight)
            linear.weight.data = w

        self._tasks.append(task)

    def _lone(self, linear: nn.Linear) -> None:
        if column_major(*linear.weight.shape):
            self._columns([linear])
        else:
            self._rows(linear)

    def _copy(self, shape: tuple[int, ...], values: Callable[[], torch.Tensor], store: dict[int, torch.Tensor],
              key: int, transposed: bool = False) -> None:
        """A derived tensor of `shape` in the buffer (`transposed`: stored column-major), computed at copy
        time."""
        numel = math.prod(shape)
        start = self._reserve(numel)

        def task() -> None:
            flat = self.buffer[start:start + numel]
            if transposed:
                t = flat.view(shape[::-1]).t()
            else:
                t = flat.view(shape)
            t.copy_(values())
            store[key] = t

        self._tasks.append(task)

    def _attention(self, mla: MLA) -> None:
        if mla.q_lora_rank:
            self._columns([mla.q_a_proj, mla.kv_a_proj_with_mqa], key=id(mla))
            self._lone(mla.q_b_proj)
        else:
            self._columns([mla.q_proj, mla.kv_a_proj_with_mqa], key=id(mla))
        self._rows(mla.kv_b_proj)  # per-head W_uk rows contiguous
        self._lone(mla.o_proj)
        heads, c, v = mla.n_heads, mla.kv_lora_rank, mla.v_dim
        self._copy((heads * c, v), lambda: mla.kv_b_halves(torch.float32)[1].reshape(heads * c, v), self.uv_t,
                   id(mla))
        if mla.q_lora_rank:
            self._copy((heads * (c + mla.rope_dim), mla.q_lora_rank), lambda: absorbed_query_weight(mla),
                       self.absorbed, id(mla), transposed=True)

    def _mlp(self, mlp: MLP) -> None:
        self._columns([mlp.gate_proj, mlp.up_proj], key=id(mlp))
        self._lone(mlp.down_proj)

    def _experts(self, moe: MoE) -> None:
        members = list(moe.experts)
        shape = [tuple(p.weight.shape) for p in (members[0].gate_proj, members[0].down_proj)]
        shared = moe.shared_experts
        if shared is not None and [tuple(p.weight.shape) for p in (shared.gate_proj, shared.down_proj)] == shape:
            members.append(shared)
        elif shared is not None:
            self._mlp(shared)
        n = len(members)
        inter, dim = shape[0]
        start = self._size
        for e in members:  # back to back, no padding: the tables are views of the whole run
            self._columns([e.gate_proj, e.up_proj], align=False)
        for e in members:
            self._columns([e.down_proj], align=False)

        def task() -> None:
            gate_up = self.buffer[start:start + n * dim * 2 * inter].view(n * dim, 2 * inter)
            down_start = start + n * dim * 2 * inter
            down = self.buffer[down_start:down_start + n * inter * dim].view(n * inter, dim)
            self.tables[id(moe)] = ExpertTables(
                gate_up, down, torch.arange(n)[:, None] * dim + torch.arange(dim),
                torch.arange(n)[:, None] * inter + torch.arange(inter), n - 1 if n > len(moe.experts) else None)

        self._tasks.append(task)
        self._size = (self._size + ALIGN - 1) // ALIGN * ALIGN


@torch.no_grad()
def absorbed_query_weight(mla: MLA) -> torch.Tensor:
    """`[H * (C + R), q_lora]`: per head, `W_uk^T W_q_nope` (`[C, q_lora]`, computed in float64) over the rope
    rows of `q_b_proj` (`[R, q_lora]`), so that one product of the normed `q_a` gives the latent and rope
    queries `[H, C + R]` of absorbed attention."""
    heads, nope = mla.n_heads, mla.nope_dim
    w_q = mla.q_b_proj.weight.double().reshape(heads, nope + mla.rope_dim, -1)  # [H, nope + R, q_lora]
    w_uk = mla.kv_b_halves(torch.float64)[0]  # [H, nope, C]
    latent = torch.bmm(w_uk.transpose(1, 2), w_q[:, :nope])  # [H, C, q_lora]
    return torch.cat([latent, w_q[:, nope:]], dim=1).flatten(0, 1).float()
