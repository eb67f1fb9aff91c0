"""Small building blocks shared by attention, MoE and MTP: RMSNorm, the SwiGLU MLP, weight access, and the
CPU decode weight layout with its single-token products.

CPU decoding reads every weight once per token and runs a few hundred small ops, so two things decide its
speed: how fast a single row times a cold weight streams (MKL's GEMV on the AMD Zen 4 measured reaches 9-14 GB/s
on `[<=512, 512]` weights; FBGEMM's embedding-bag kernel, used as `y = sum_i x_i W^T[i, :]`, 15-20 GB/s), and
how many ops run (each one several microseconds once a weight has streamed through the caches).
`cpu_decode_layout` stores the weights for the first, `gemv_or_linear` / `experts_decode` / `RMSNorm.row`
use it with few ops; each keeps the plain path for everything else (several rows, gradients, other dtypes).

Module and parameter names equal the Hugging Face DeepSeek-V3 names (`gate_proj`, `up_proj`, `down_proj`,
`weight`), so a state-dict key is the HF key without its `model.` prefix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


_ZERO = torch.zeros(())  # float32, for `addcmul` with nothing to add


class RMSNorm(nn.Module):
    """`weight * x / rms(x)`, computed in float32 and cast back (as the reference does)."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same operations in one call (bitwise equal in float32; fewer small ops when decoding)
            return torch.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def row(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` for a single float32 row in inference (decoding one token): the norm read back as a
        Python float, then one `x * weight * (1 / rms)`. Three light ops instead of `rms_norm`'s composite of
        about eight kernels (each one costs several microseconds when the caches are cold from a weight that
        just streamed through); equal to `forward` up to float32 rounding."""
        weight = self.weight
        if (x.numel() != weight.shape[0] or x.dtype != torch.float32 or weight.dtype != torch.float32
                or x.is_cuda or torch.is_grad_enabled()):
            return self(x)
        norm = float(torch.linalg.vector_norm(x))
        return torch.addcmul(_ZERO, x, weight, value=1.0 / math.sqrt(norm * norm / weight.shape[0] + self.eps))


def linear(in_dim: int, out_dim: int, dtype: torch.dtype | None = None) -> nn.Linear:
    """A bias-free Linear (every projection in DeepSeek-V3 is bias-free)."""
    return nn.Linear(in_dim, out_dim, bias=False, dtype=dtype)


def dense_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight of a Linear as a dense `[out, in]` tensor of `dtype`, dequantizing FP8 weights."""
    weight = module.weight
    scale = getattr(module, "weight_scale_inv", None)
    if scale is not None:
        from dsv3.kernels.fp8 import dequantize_weight
        return dequantize_weight(weight, scale, dtype=dtype)
    return weight.to(dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`. Used for dense layers and every expert."""

    def __init__(self, dim: int, inter_dim: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gate_proj = linear(dim, inter_dim, dtype)
        self.up_proj = linear(dim, inter_dim, dtype)
        self.down_proj = linear(inter_dim, dim, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self._fused_gate_up()
        if gate_up is not None:  # one product for both halves (see `cpu_decode_layout`)
            gate, up = gemv_or_linear(x, gate_up).chunk(2, dim=-1)
            return decode_linear(F.silu(gate) * up, self.down_proj)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def _fused_gate_up(self) -> torch.Tensor | None:
        """The `[2 * inter, dim]` weight whose halves are `gate_proj.weight` and `up_proj.weight`, while both
        still live there and no gradient is wanted (the fused view is not tracked by autograd)."""
        fused = self.__dict__.get("_gate_up")
        if fused is None or torch.is_grad_enabled():
            return None
        weight, up_ptr = fused
        if self.gate_proj.weight.data_ptr() != weight.data_ptr() or self.up_proj.weight.data_ptr() != up_ptr:
            return None
        return weight


@contextmanager
def skip_torch_init() -> Iterator[None]:
    """Build modules without torch's default initialisation, for meta-device construction where a loader
    fills every tensor anyway (on meta, `normal_` pulls in torch's decompositions: seconds of imports)."""
    saved = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}
    try:
        for cls in saved:
            cls.reset_parameters = lambda self: None
        yield
    finally:
        for cls, fn in saved.items():
            cls.reset_parameters = fn


HUGE_PAGE = 2 << 20  # bytes; transparent huge pages on x86-64 Linux
_ALIGN = 16  # elements (64 bytes) between weights in the shared buffer
BAG_MAX_OUT = 512  # widest single-row product run as an embedding bag (wider ones: MKL's column-major GEMV)
_BAG_INDEX: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _bag_index(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(arange(n), [0])`: the row indices and offsets of one bag over the first `n` rows of a table."""
    index = _BAG_INDEX.get(n)
    if index is None:
        index = _BAG_INDEX[n] = (torch.arange(n), torch.zeros(1, dtype=torch.long))
    return index


def gemv_or_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)`; one float32 CPU row `x [..., in]` times a column-major `weight [out, in]`
    with out <= `BAG_MAX_OUT` runs as `y = sum_i x_i W^T[i, :]`, one `embedding_bag` over the rows of the
    contiguous `W^T` with `x` as per-row weights (FBGEMM's kernel: 1.2-1.7x faster than MKL's GEMV on a cold
    `[<=512, 512]` weight on the AMD Zen 4 measured; wider outputs are slower, so they stay with MKL). Values
    agree to float32 rounding (another summation order), not bitwise."""
    if (x.numel() == weight.shape[1] == x.shape[-1] and weight.shape[0] <= BAG_MAX_OUT
            and weight.dtype == torch.float32 and x.dtype == torch.float32
            and weight.stride(0) == 1 and weight.stride(1) == weight.shape[0]
            and not weight.is_cuda and not torch.is_grad_enabled()):
        index, offsets = _bag_index(weight.shape[1])
        y = torch.embedding_bag(weight.t(), index, offsets, False, 0, False, x.reshape(-1), False, None)[0]
        return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])  # [1, out]
    return F.linear(x, weight)


def decode_linear(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """`module(x)` for a Linear, through `gemv_or_linear` when it is a plain float32 `nn.Linear`."""
    if type(module) is nn.Linear and module.bias is None and module.weight.dtype == torch.float32:
        return gemv_or_linear(x, module.weight)
    return module(x)


def _huge_page_buffer(numel: int) -> torch.Tensor:
    """An uninitialised float32 CPU tensor of `numel` elements whose pages are advised as transparent huge
    pages (Linux `madvise(MADV_HUGEPAGE)`, before first touch). Weights read once per token then stream
    without a TLB miss and prefetcher restart every 4 KiB: single-token expert GEMVs measured ~20% faster.
    Where the advice is unavailable the buffer is an ordinary allocation."""
    pad = HUGE_PAGE // 4
    raw = torch.empty(numel + pad, dtype=torch.float32)
    start = (-raw.data_ptr() % HUGE_PAGE) // 4
    buf = raw[start:start + numel]
    try:
        import ctypes
        import sys
        if sys.platform.startswith("linux"):
            length = (numel * 4 + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
            ctypes.CDLL(None).madvise(ctypes.c_void_p(buf.data_ptr()), ctypes.c_size_t(length), 14)  # MADV_HUGEPAGE
    except (OSError, AttributeError):
        pass
    return buf


def _plain_cpu_fp32(m: nn.Module, shared: set[int]) -> bool:
    w = getattr(m, "weight", None)
    return (type(m) is nn.Linear and w is not None and id(w) not in shared and w.device.type == "cpu"
            and w.dtype == torch.float32 and w.is_contiguous() and m.__dict__.get("_decode_layout") != w.data_ptr())


def _stackable_experts(m: nn.Module, shared: set[int]) -> list[MLP] | None:
    """The MLPs of a MoE-like module (`experts`, plus `shared_experts` of the same shape) when all are plain
    float32 CPU weights of one shape, else None."""
    experts = getattr(m, "experts", None)
    if not isinstance(experts, nn.ModuleList) or not len(experts):
        return None
    members = list(experts)
    extra = getattr(m, "shared_experts", None)
    if isinstance(extra, MLP):
        members.append(extra)
    shape = None
    for e in members:
        if not isinstance(e, MLP):
            return None
        parts = (e.gate_proj, e.up_proj, e.down_proj)
        if not all(_plain_cpu_fp32(p, shared) for p in parts):
            return None
        key = tuple(p.weight.shape for p in parts)
        if shape not in (None, key) or e.gate_proj.weight.shape != e.up_proj.weight.shape:
            return None
        shape = key
    return members


def _set_columns(block: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
    """Copy the weights `[out_k, in]` of `linears` into `block [in, sum out_k]` (their transposes side by side)
    and make each weight the column-major view of its part. Returns the fused `[sum out_k, in]` view."""
    start = 0
    for m in linears:
        out_f = m.weight.shape[0]
        block[:, start:start + out_f].copy_(m.weight.t())
        m.weight.data = block[:, start:start + out_f].t()
        m.__dict__["_decode_layout"] = m.weight.data_ptr()
        start += out_f
    return block.t()


def _absorbable(m: nn.Module, shared: set[int]) -> bool:
    """An MLA whose `q_b_proj` can be folded with `kv_b_proj`'s W_uk (plain float32 weights, a q_lora rank)."""
    q_b = getattr(m, "q_b_proj", None)
    return (getattr(m, "q_lora_rank", 0) > 0 and q_b is not None and type(q_b) is nn.Linear
            and id(q_b.weight) not in shared and q_b.weight.dtype == torch.float32 and q_b.weight.device.type == "cpu")


def _absorb_key(m: nn.Module) -> tuple:
    """What the absorbed query weight was computed from: the two weights' storage and versions."""
    q_b, kv_b = m.q_b_proj.weight, m.kv_b_proj.weight
    return q_b.data_ptr(), q_b._version, kv_b.data_ptr(), kv_b._version


@torch.no_grad()
def _absorbed_query_weight(m: nn.Module) -> torch.Tensor:
    """`[H * (C + R), q_lora]`: per head, `W_uk^T W_q_nope` (`[C, q_lora]`, computed in float64) over the rope
    rows of `q_b_proj` (`[R, q_lora]`), so that one product of the normed `q_a` gives the latent and rope
    queries `[H, C + R]` of absorbed attention."""
    heads, nope, rope, c = m.n_heads, m.nope_dim, m.rope_dim, m.kv_lora_rank
    w_q = m.q_b_proj.weight.double().view(heads, nope + rope, -1)  # [H, nope + R, q_lora]
    w_uk = m.kv_b_proj.weight.double().view(heads, -1, c)[:, :nope]  # [H, nope, C]
    latent = torch.bmm(w_uk.transpose(1, 2), w_q[:, :nope])  # [H, C, q_lora]
    return torch.cat([latent, w_q[:, nope:]], dim=1).flatten(0, 1).float()


def cpu_decode_layout(module: nn.Module) -> int:
    """Re-store the float32 CPU `nn.Linear` weights of `module` for fast single-token products: same shapes,
    same values, the same Parameter objects, all moved into one buffer advised as huge pages (see
    `_huge_page_buffer`). Returns the number of weights moved; a second call leaves them where they are.

    - `out >= in` features, or `out <= BAG_MAX_OUT`: column-major (the transposed matrix contiguous). MKL's
      GEMV reads such a tall `[out, in]` weight 1.1-2.3x faster in that layout (measured on AVX-512 CPUs:
      `[768, 256]` 1.7x, `[4096, 512]` 2.3x), and `gemv_or_linear` multiplies a narrow one as an embedding
      bag over its rows; wide weights of more outputs stay row-major, which is faster for MKL.
    - an `MLP`'s `gate_proj` and `up_proj`: the two halves of one column-major `[2 * inter, dim]` matrix,
      which `MLP.forward` multiplies at once in inference (`[512, 512]` in 88 us vs 2 x 51 us).
    - an MLA's `q_a_proj` and `kv_a_proj_with_mqa`: one column-major `[q_lora + kv_lora + rope, dim]` matrix
      (`MLA.project` multiplies it once, `_qkv_a`).
    - an MLA's `kv_b_proj`: row-major (each head's W_uk rows contiguous, for `MLA.absorb_query`), followed by
      a copy of each head's W_uv^T (`MLA.latent_output`) and the absorbed query weight `[W_uk^T W_q_nope ;
      W_q_rope]` per head (`MLA.absorbed_queries`): extra float32 copies the size of about 1.5x `kv_b_proj`
      plus `q_b_proj` (the single-token paths check that the weights they came from are unchanged).
    - the experts of a MoE (and its shared expert when it has their shape): their fused gate/up matrices
      back to back, then their down matrices back to back, so that `expert_tables` gives two tables that
      `experts_decode` reads a token's chosen experts from with one embedding bag each.

    Weights shared with an embedding stay untouched. The engine calls this for CPU models; `state_dict`
    tensors then are views, some non-contiguous (the checkpoint writer makes them contiguous)."""
    shared = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    plan: list[tuple[str, nn.Module]] = []
    done: set[int] = set()
    experts: dict[int, list[MLP]] = {}
    for m in module.modules():
        members = _stackable_experts(m, shared)
        if members is not None:
            plan.append(("experts", m))
            experts[id(m)] = members
            for e in members:
                done.update((id(e), id(e.gate_proj), id(e.up_proj), id(e.down_proj)))
    for m in module.modules():
        if id(m) in done:
            continue
        if (isinstance(m, MLP) and _plain_cpu_fp32(m.gate_proj, shared) and _plain_cpu_fp32(m.up_proj, shared)
                and m.gate_proj.weight.shape == m.up_proj.weight.shape):
            plan.append(("gate_up", m))
            done.update((id(m.gate_proj), id(m.up_proj)))
        q_a, kv_a = getattr(m, "q_a_proj", None), getattr(m, "kv_a_proj_with_mqa", None)
        if (q_a is not None and kv_a is not None and _plain_cpu_fp32(q_a, shared) and _plain_cpu_fp32(kv_a, shared)
                and q_a.in_features == kv_a.in_features):
            plan.append(("qkv_a", m))
            done.update((id(q_a), id(kv_a)))
        kv_b = getattr(m, "kv_b_proj", None)
        if kv_b is not None and _plain_cpu_fp32(kv_b, shared) and hasattr(m, "v_dim"):
            plan.append(("kv_b", m))  # row-major (per-head W_uk rows contiguous) + a copy of W_uv^T per head
            done.add(id(kv_b))
    for m in module.modules():
        if id(m) not in done and _plain_cpu_fp32(m, shared):
            wide = m.out_features < m.in_features and m.out_features > BAG_MAX_OUT
            plan.append(("row" if wide else "col", m))
    if not plan:
        return 0

    def parts(kind: str, m: nn.Module) -> list[list[nn.Linear]]:
        """Groups of Linears that become one column-major block each, in buffer order."""
        if kind == "experts":
            members = experts[id(m)]
            return [[e.gate_proj, e.up_proj] for e in members] + [[e.down_proj] for e in members]
        if kind == "gate_up":
            return [[m.gate_proj, m.up_proj]]
        if kind == "qkv_a":
            return [[m.q_a_proj, m.kv_a_proj_with_mqa]]
        if kind == "kv_b":
            return [[m.kv_b_proj]]
        return [[m]]

    def size(kind: str, m: nn.Module) -> int:
        n = sum(p.weight.numel() for group in parts(kind, m) for p in group)
        if kind == "kv_b":  # + W_uv^T (+ the absorbed query weight)
            n += m.n_heads * m.v_dim * m.kv_b_proj.in_features
            if _absorbable(m, shared):
                n += m.n_heads * (m.kv_lora_rank + m.rope_dim) * m.q_lora_rank
        return (n + _ALIGN - 1) // _ALIGN * _ALIGN

    plans = [(kind, m, parts(kind, m)) for kind, m in plan]  # before any weight moves (the checks read them)
    buf = _huge_page_buffer(sum(size(kind, m) for kind, m in plan))
    offset = 0
    moved = 0
    absorbed: list[tuple[nn.Module, torch.Tensor]] = []
    with torch.no_grad():
        for kind, m, groups in plans:
            if kind in ("row", "kv_b"):
                linear = m.kv_b_proj if kind == "kv_b" else m
                out_f, in_f = linear.weight.shape
                w = buf[offset:offset + out_f * in_f].view(out_f, in_f)
                w.copy_(linear.weight)
                linear.weight.data = w
                linear.__dict__["_decode_layout"] = linear.weight.data_ptr()
                moved += 1
                if kind == "kv_b":  # [H * C, v]: head h's W_uv^T, rows c, for `MLA.latent_output`
                    heads, per_head = m.n_heads, out_f // m.n_heads
                    uv_t = buf[offset + out_f * in_f:offset + out_f * in_f + heads * in_f * m.v_dim]
                    uv_t = uv_t.view(heads, in_f, m.v_dim)
                    uv_t.copy_(w.view(heads, per_head, in_f)[:, per_head - m.v_dim:].transpose(1, 2))
                    m.__dict__["_uv_t"] = (uv_t.view(heads * in_f, m.v_dim), w.data_ptr(), linear.weight._version)
                    if _absorbable(m, shared):
                        start = offset + out_f * in_f + heads * in_f * m.v_dim
                        q_rows = heads * (m.kv_lora_rank + m.rope_dim)
                        block = buf[start:start + q_rows * m.q_lora_rank].view(m.q_lora_rank, q_rows)
                        block.copy_(_absorbed_query_weight(m).t())
                        absorbed.append((m, block.t()))
                offset += size(kind, m)
                continue
            start = offset
            fused = []
            for group in groups:  # back to back, no padding: expert tables are views of the whole run
                in_f = group[0].weight.shape[1]
                out_f = sum(p.weight.shape[0] for p in group)
                fused.append(_set_columns(buf[offset:offset + in_f * out_f].view(in_f, out_f), group))
                offset += in_f * out_f
                moved += len(group)
            offset = start + size(kind, m)
            if kind == "gate_up":
                m.__dict__["_gate_up"] = (fused[0], m.up_proj.weight.data_ptr())
            elif kind == "qkv_a":
                m.__dict__["_qkv_a"] = (fused[0], m.kv_a_proj_with_mqa.weight.data_ptr())
            elif kind == "experts":
                n = len(groups) // 2
                for e, gate_up in zip(experts[id(m)], fused[:n]):
                    e.__dict__["_gate_up"] = (gate_up, e.up_proj.weight.data_ptr())
                (dim, two_inter), (inter, _) = fused[0].t().shape, fused[n].t().shape
                gate_up_table = buf[start:start + n * dim * two_inter].view(n * dim, two_inter)
                down_start = start + n * dim * two_inter
                down_table = buf[down_start:down_start + n * inter * dim].view(n * inter, dim)
                m.__dict__["_expert_members"] = experts[id(m)]
                m.__dict__["_expert_tables"] = ExpertTables(
                    gate_up_table, down_table, torch.arange(n)[:, None] * dim + torch.arange(dim),
                    torch.arange(n)[:, None] * inter + torch.arange(inter), n)
    for m, weight in absorbed:  # keyed on the final storage of q_b_proj and kv_b_proj
        m.__dict__["_q_absorbed"] = (weight, _absorb_key(m))
    return moved


class ExpertTables(NamedTuple):
    """A MoE's n stacked experts as two embedding-bag tables (see `cpu_decode_layout`), with the table rows of
    each expert."""

    gate_up: torch.Tensor  # [n * D, 2I]: expert e's fused gate/up weight transposed at rows e * D ...
    down: torch.Tensor  # [n * I, D]: expert e's down weight transposed at rows e * I ...
    gate_up_rows: torch.Tensor  # [n, D] int64: e * D + arange(D)
    down_rows: torch.Tensor  # [n, I] int64
    n: int


def expert_tables(moe: nn.Module) -> ExpertTables | None:
    """The tables `cpu_decode_layout` made of a MoE's n stacked experts (the routed ones, then the shared one
    when it was stacked too: n > n_experts), while every expert's weights still live there and no gradient is
    wanted; else None."""
    tables = moe.__dict__.get("_expert_tables")
    if tables is None or torch.is_grad_enabled():
        return None
    members = moe.__dict__["_expert_members"]
    dim, inter = tables.down.shape[1], tables.down.shape[0] // tables.n
    for k in (0, tables.n - 1):  # the ends of both runs (a replaced weight anywhere is an edge case)
        e = members[k]
        if (e.gate_proj.weight.data_ptr() != tables.gate_up.data_ptr() + 4 * k * dim * 2 * inter
                or e.down_proj.weight.data_ptr() != tables.down.data_ptr() + 4 * k * inter * dim):
            return None
    return tables


def experts_decode(tables: ExpertTables, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                   shared: int | None) -> torch.Tensor:
    """Tokens through their chosen experts: row t gets `sum_k weights[t, k] * expert_{indices[t, k]}(x[t])`
    (+ expert `shared` with weight 1, when it is in the tables); x `[N, D]` float32, weights/indices `[N, K]`.
    -> `[N, D]` float32.

    Two embedding bags over the `expert_tables`: one reads each (token, expert) pair's fused gate/up matrix
    (`[D, 2I]`, rows weighted by the token) into `[N * K, 2I]`; the other sums, per token, the rows of its K
    down matrices (`[I, D]` each) weighted by `weight_k * silu(gate_k) * up_k`, so the weighting and the sum
    over experts happen in the same pass. Equal to the per-expert products up to float32 rounding."""
    n, dim = x.shape
    inter = tables.down_rows.shape[1]
    if shared is not None:
        indices, weights = F.pad(indices, (0, 1), value=shared), F.pad(weights, (0, 1), value=1.0)  # [N, K + 1]
    k = indices.shape[1]
    if n > 1:  # pairs sorted by expert: an expert's matrix is read again straight from the cache
        order = indices.flatten().argsort()  # [N * K]
        rows = tables.gate_up_rows[indices.flatten()[order]].view(-1)
        h = torch.embedding_bag(tables.gate_up, rows, bag_offsets(n * k, dim), False, 0, False,
                                x[order // k].view(-1), False, None)[0]
        h = h[order.argsort()]  # [N * K, 2I] back in (token, k) order
    else:
        h = torch.embedding_bag(tables.gate_up, tables.gate_up_rows[indices].view(-1), bag_offsets(k, dim), False,
                                0, False, x.expand(k, dim).reshape(-1), False, None)[0]  # [K, 2I]
    act = F.silu(h[:, :inter]).mul_(h[:, inter:]).mul_(weights.view(n * k, 1))  # [N * K, I]
    return torch.embedding_bag(tables.down, tables.down_rows[indices].view(-1), bag_offsets(n, k * inter), False,
                               0, False, act.view(-1), False, None)[0]  # [N, D]


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def bag_offsets(bags: int, length: int) -> torch.Tensor:
    """Offsets of `bags` consecutive bags of `length` indices each (cached)."""
    key = ("offsets", bags, length)
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = torch.arange(bags) * length
    return t
