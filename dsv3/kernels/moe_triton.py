"""Triton kernels of the fused MoE: routing, grouping tokens by expert, grouped SwiGLU GEMMs, combine.

`moe.py` holds the PyTorch references (the test oracle) and the wrappers that call in here. Nothing
here synchronises with the host: every size that a launch depends on is a static upper bound
(tokens `N`, experts `E'`), and the real counts live on the device.

Pipeline of one MoE layer over `N` tokens, `K` routed + `S` shared experts (`KS = K + S` pairs per
token; shared expert s is expert `E + s`, always chosen with weight 1):

1. `route`: one program per token: scores (sigmoid or softmax of fp32 router logits), correction bias,
   group limit (top-2 sum or max per group), top-k by repeated argmax, normalisation, scaling; writes
   `ids [N, KS]` int32 and `weights [N, KS]` fp32.
2. `align`: one program per expert: scans the `N*KS` ids and lists the pair indices `j = n*KS + k`
   routed to it in `slots [E', N]` with its count; experts with tokens append themselves to a compact
   `active` list through an atomic counter (so later grids cover only `min(E', N*KS)` experts).
3. `ffn1` (grid: active expert x I-tile x M-split): `act[j] = silu(x[n] Wg_e^T) * (x[n] Wu_e^T)` for the
   pairs of expert e, rows gathered through `slots`; gate and up share the A tile.
4. `ffn2`: `y[j] = weight_j * (act[j] W_down_e^T)`; the same kernel in dense mode is a plain linear.
5. `combine`: `out[n] = sum_k y[n*KS + k]` in fp32.

Weights are `[E', out, in]` (BF16/FP32) or `float8_e4m3fn` with a `[E', ceil(out/128), ceil(in/128)]`
block scale. FP8 weights run in one of two ways: weight-only (W8A16: the tile is widened to BF16 in
registers and each 128-deep partial product is scaled, so a decode step reads one byte per weight), or
`a8` (W8A8: the activations are quantized per 1x128 tile and each 128-deep slice is one FP8 x FP8
tensor-core dot scaled by both scales, for prefill). Intermediate roundings follow the
reference (`gate`, `silu`, `up` and the product are rounded to the activation dtype).
"""

from __future__ import annotations

import os

import torch

from dsv3.kernels.fp8 import quantize_act as act_quant  # Triton on CUDA; the reference, bit-exact, elsewhere

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: moe.py uses the references
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
GROUP_NONE, GROUP_TOP2_SUM, GROUP_MAX = 0, 1, 2


def available() -> bool:
    """True when the kernels can run: Triton importable and a CUDA device (or the interpreter)."""
    return triton is not None and (torch.cuda.is_available() or _INTERPRET)


if triton is not None:

    @triton.jit(do_not_specialize=["E"])
    def _route_kernel(
        logits_ptr, bias_ptr, ids_ptr, w_ptr, E, stride_l, route_scale,
        K: tl.constexpr, S: tl.constexpr, BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
        GROUP_MODE: tl.constexpr, N_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr,
        NORM: tl.constexpr,
    ):
        n = tl.program_id(0)
        offs = tl.arange(0, BLOCK_E)
        valid = offs < E
        logit = tl.load(logits_ptr + n * stride_l + offs, mask=valid, other=float("-inf")).to(tl.float32)
        if SIGMOID:
            scores = tl.sigmoid(logit)
        else:
            m = tl.max(logit, 0)
            ex = tl.exp(logit - m)
            scores = ex / tl.sum(ex, 0)
        scores = tl.where(valid, scores, 0.0)
        choice = scores
        if HAS_BIAS:
            choice = choice + tl.load(bias_ptr + offs, mask=valid, other=0.0)
        choice = tl.where(valid, choice, float("-inf"))
        if GROUP_MODE != 0:
            group_size = E // N_GROUPS
            gid = offs // group_size
            goffs = tl.arange(0, BLOCK_G)
            gscore = tl.full((BLOCK_G,), float("-inf"), tl.float32)
            for g in tl.static_range(N_GROUPS):
                member = (gid == g) & valid
                v = tl.where(member, choice, float("-inf"))
                best = tl.max(v, 0)
                if GROUP_MODE == 1:  # sum of the group's top-2
                    first = tl.argmax(v, 0)
                    second = tl.max(tl.where(offs == first, float("-inf"), v), 0)
                    best = best + second
                gscore = tl.where(goffs == g, best, gscore)
            allowed = offs < 0
            for t in tl.static_range(TOPK_GROUPS):
                pick = tl.argmax(gscore, 0)
                allowed = allowed | (gid == pick)
                gscore = tl.where(goffs == pick, float("-inf"), gscore)
            fill = float("-inf") if GROUP_MODE == 1 else 0.0
            choice = tl.where(allowed & valid, choice, tl.where(valid, fill, float("-inf")))
        total = 0.0
        for k in tl.static_range(K):
            idx = tl.argmax(choice, 0)
            wk = tl.sum(tl.where(offs == idx, scores, 0.0), 0)
            tl.store(ids_ptr + n * (K + S) + k, idx.to(tl.int32))
            tl.store(w_ptr + n * (K + S) + k, wk)
            total += wk
            choice = tl.where(offs == idx, float("-inf"), choice)
        if NORM:
            inv = route_scale / (total + 1e-20)
        else:
            inv = route_scale
        for k in tl.static_range(K):
            wk = tl.load(w_ptr + n * (K + S) + k)
            tl.store(w_ptr + n * (K + S) + k, wk * inv)
        for s in tl.static_range(S):
            tl.store(ids_ptr + n * (K + S) + K + s, (E + s).to(tl.int32))
            tl.store(w_ptr + n * (K + S) + K + s, 1.0)

    @triton.jit(do_not_specialize=["NK", "N"])
    def _align_kernel(ids_ptr, slots_ptr, counts_ptr, active_ptr, n_active_ptr, NK, N, BLOCK: tl.constexpr):
        e = tl.program_id(0)
        running = tl.full((), 0, tl.int32)
        for start in range(0, NK, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            ids = tl.load(ids_ptr + offs, mask=offs < NK, other=-1)
            hit = (ids == e).to(tl.int32)
            pos = running + tl.cumsum(hit, 0) - 1
            tl.store(slots_ptr + e * N + pos, offs.to(tl.int32), mask=hit > 0)
            running += tl.sum(hit, 0)
        tl.store(counts_ptr + e, running)
        if running > 0:
            at = tl.atomic_add(n_active_ptr, 1)
            tl.store(active_ptr + at, e)

    @triton.jit
    def _weight_tile(w_ptr, s_ptr, offs_k, offs_n, k0, K, NOUT, stride_wn, stride_sn,
                     FP8: tl.constexpr, EVEN_K: tl.constexpr):
        """`[BK, BN]` tile of `W^T` (W is `[NOUT, K]`), and for FP8 the `[BN]` scales of this 128-deep slice."""
        ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None]
        if EVEN_K:
            w = tl.load(ptrs, mask=offs_n[None, :] < NOUT, other=0.0)
        else:
            w = tl.load(ptrs, mask=(offs_n[None, :] < NOUT) & (offs_k[:, None] < K), other=0.0)
        if FP8:
            s = tl.load(s_ptr + (offs_n // 128) * stride_sn + k0 // 128, mask=offs_n < NOUT, other=0.0)
        else:
            s = tl.zeros_like(offs_n).to(tl.float32)
        return w, s

    @triton.jit
    def _rows(slots_ptr, e, c, count, N, KS, BM: tl.constexpr, ROUTED: tl.constexpr):
        r = c * BM + tl.arange(0, BM)
        r_mask = r < count
        if ROUTED:
            pair = tl.load(slots_ptr + e * N + r, mask=r_mask, other=0)
            tok = pair // KS
        else:
            pair = r
            tok = r
        return pair, tok, r_mask

    @triton.jit(do_not_specialize=["N", "KS"])
    def _ffn1_kernel(
        x_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, act_ptr, slots_ptr, counts_ptr, active_ptr, n_active_ptr, xs_ptr,
        N, D, I, KS,
        stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_am, stride_xsm, stride_xsk,
        ROUTED: tl.constexpr, FP8: tl.constexpr, A8: tl.constexpr, PREC: tl.constexpr, EVEN_K: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, M_SPLIT: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n_tiles = tl.cdiv(I, BN)
        slot = pid // n_tiles
        nt = pid % n_tiles
        if ROUTED:
            if slot >= tl.load(n_active_ptr):
                return
            e = tl.load(active_ptr + slot)
            count = tl.load(counts_ptr + e)
        else:
            e = pid * 0
            count = N
        offs_n = nt * BN + tl.arange(0, BN)
        n_mask = offs_n < I
        wg_base = wg_ptr + e.to(tl.int64) * stride_we
        wu_base = wu_ptr + e.to(tl.int64) * stride_we
        sg_base = sg_ptr + e * stride_se
        su_base = su_ptr + e * stride_se
        for c in range(tl.program_id(1), tl.cdiv(count, BM), M_SPLIT):
            pair, tok, r_mask = _rows(slots_ptr, e, c, count, N, KS, BM, ROUTED)
            acc_g = tl.zeros((BM, BN), dtype=tl.float32)
            acc_u = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, D, BK):
                offs_k = k0 + tl.arange(0, BK)
                a = tl.load(x_ptr + tok[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                            mask=r_mask[:, None] & (offs_k[None, :] < D), other=0.0)
                wg, s_g = _weight_tile(wg_base, sg_base, offs_k, offs_n, k0, D, I, stride_wn, stride_sn, FP8, EVEN_K)
                wu, s_u = _weight_tile(wu_base, su_base, offs_k, offs_n, k0, D, I, stride_wn, stride_sn, FP8, EVEN_K)
                if A8:  # FP8 x FP8 MMA, both 1x128 / 128x128 scales applied per 128-deep slice
                    a_s = tl.load(xs_ptr + tok.to(tl.int64) * stride_xsm + (k0 // 128) * stride_xsk,
                                  mask=r_mask, other=0.0)
                    acc_g += tl.dot(a, wg) * (a_s[:, None] * s_g[None, :])
                    acc_u += tl.dot(a, wu) * (a_s[:, None] * s_u[None, :])
                elif FP8:
                    acc_g += tl.dot(a, wg.to(a.dtype), input_precision=PREC) * s_g[None, :]
                    acc_u += tl.dot(a, wu.to(a.dtype), input_precision=PREC) * s_u[None, :]
                else:
                    acc_g = tl.dot(a, wg, acc_g, input_precision=PREC)
                    acc_u = tl.dot(a, wu, acc_u, input_precision=PREC)
            dt = act_ptr.dtype.element_ty
            g = acc_g.to(dt).to(tl.float32)
            u = acc_u.to(dt).to(tl.float32)
            h = (g * tl.sigmoid(g)).to(dt).to(tl.float32) * u
            tl.store(act_ptr + pair[:, None].to(tl.int64) * stride_am + offs_n[None, :], h.to(dt),
                     mask=r_mask[:, None] & n_mask[None, :])

    @triton.jit(do_not_specialize=["N", "KS"])
    def _ffn2_kernel(
        a_ptr, w_ptr, s_ptr, out_ptr, rw_ptr, slots_ptr, counts_ptr, active_ptr, n_active_ptr, as_ptr,
        N, K, NOUT, KS,
        stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_om, stride_asm, stride_ask,
        ROUTED: tl.constexpr, FP8: tl.constexpr, A8: tl.constexpr, PREC: tl.constexpr, EVEN_K: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, M_SPLIT: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n_tiles = tl.cdiv(NOUT, BN)
        slot = pid // n_tiles
        nt = pid % n_tiles
        if ROUTED:
            if slot >= tl.load(n_active_ptr):
                return
            e = tl.load(active_ptr + slot)
            count = tl.load(counts_ptr + e)
        else:
            e = pid * 0
            count = N
        offs_n = nt * BN + tl.arange(0, BN)
        n_mask = offs_n < NOUT
        w_base = w_ptr + e.to(tl.int64) * stride_we
        s_base = s_ptr + e * stride_se
        for c in range(tl.program_id(1), tl.cdiv(count, BM), M_SPLIT):
            pair, tok, r_mask = _rows(slots_ptr, e, c, count, N, KS, BM, ROUTED)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, K, BK):
                offs_k = k0 + tl.arange(0, BK)
                a = tl.load(a_ptr + pair[:, None].to(tl.int64) * stride_am + offs_k[None, :],
                            mask=r_mask[:, None] & (offs_k[None, :] < K), other=0.0)
                w, s = _weight_tile(w_base, s_base, offs_k, offs_n, k0, K, NOUT, stride_wn, stride_sn, FP8, EVEN_K)
                if A8:
                    a_s = tl.load(as_ptr + pair.to(tl.int64) * stride_asm + (k0 // 128) * stride_ask,
                                  mask=r_mask, other=0.0)
                    acc += tl.dot(a, w) * (a_s[:, None] * s[None, :])
                elif FP8:
                    acc += tl.dot(a, w.to(a.dtype), input_precision=PREC) * s[None, :]
                else:
                    acc = tl.dot(a, w, acc, input_precision=PREC)
            dt = out_ptr.dtype.element_ty
            if ROUTED:
                rw = tl.load(rw_ptr + pair, mask=r_mask, other=0.0)
                y = acc.to(dt).to(tl.float32) * rw[:, None]
            else:
                y = acc
            tl.store(out_ptr + pair[:, None].to(tl.int64) * stride_om + offs_n[None, :], y.to(dt),
                     mask=r_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _combine_kernel(y_ptr, out_ptr, D, KS: tl.constexpr, BD: tl.constexpr):
        n = tl.program_id(0)
        offs = tl.program_id(1) * BD + tl.arange(0, BD)
        mask = offs < D
        acc = tl.zeros((BD,), dtype=tl.float32)
        for k in tl.static_range(KS):
            acc += tl.load(y_ptr + (n * KS + k).to(tl.int64) * D + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + n.to(tl.int64) * D + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---- launch configuration ---------------------------------------------------------------------
def _config(rows_per_expert: float, n_rows: int, routed: bool = True, a8: bool = False) -> dict:
    """Tile sizes from the expected rows per expert, and how many programs share one expert's row chunks
    (`M_SPLIT`, sized for the busiest expert: `n_rows`). Static for a given token count: graph-safe.
    `a8`: FP8 x FP8 tiles (128-deep K steps, wide M for the tensor cores)."""
    if _INTERPRET:
        return dict(BM=16, BN=16, BK=32, M_SPLIT=2, num_warps=4, num_stages=1)
    if a8 and rows_per_expert > 24:
        cfg = dict(BM=64 if rows_per_expert <= 128 else 128, BN=128, BK=128, num_warps=8, num_stages=3)
        cfg["M_SPLIT"] = max(1, min(8, triton.cdiv(n_rows, cfg["BM"]) // (4 if routed else 1)))
        return cfg
    # one row chunk should cover a typical expert: every extra chunk streams the expert's weights again
    if rows_per_expert <= 6:
        cfg = dict(BM=16, BN=32, BK=128, num_warps=4, num_stages=4)
    elif rows_per_expert <= 24:
        cfg = dict(BM=32, BN=32, BK=128, num_warps=4, num_stages=4)
    elif rows_per_expert <= 128:
        cfg = dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=4)
    else:
        cfg = dict(BM=64, BN=128, BK=64, num_warps=8, num_stages=3)
    chunks = triton.cdiv(n_rows, cfg["BM"])
    cfg["M_SPLIT"] = max(1, min(8, chunks // 4 if routed else chunks))
    return cfg


def _prec(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _bk(cfg: dict, k: int, fp8: bool) -> int:
    bk = cfg["BK"]
    bk = min(bk, max(16, triton.next_power_of_2(k)))
    if fp8:
        bk = min(bk, 128)
    return bk


def _scale_args(scale: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    if scale is None:
        return like, 0, 0
    if scale.dim() == 2:
        return scale, 0, scale.stride(0)
    return scale, scale.stride(0), scale.stride(1)


def route(logits: torch.Tensor, bias: torch.Tensor | None, topk: int, n_shared: int, score_func: str,
          group_mode: int, n_groups: int, topk_groups: int, norm: bool, route_scale: float
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits `[N, E]` fp32 -> ids `[N, K+S]` int32, weights `[N, K+S]` fp32 (shape checks in moe.py)."""
    n, e = logits.shape
    ks = topk + n_shared
    ids = torch.empty(n, ks, dtype=torch.int32, device=logits.device)
    weights = torch.empty(n, ks, dtype=torch.float32, device=logits.device)
    if n:
        _route_kernel[(n,)](
            logits, bias if bias is not None else logits, ids, weights, e, logits.stride(0), float(route_scale),
            K=topk, S=n_shared, BLOCK_E=max(16, triton.next_power_of_2(e)), SIGMOID=score_func == "sigmoid",
            HAS_BIAS=bias is not None, GROUP_MODE=group_mode, N_GROUPS=n_groups, TOPK_GROUPS=topk_groups,
            BLOCK_G=max(2, triton.next_power_of_2(n_groups)), NORM=norm, num_warps=4 if e >= 128 else 1,
        )
    return ids, weights


def fused_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor,
              w_up: torch.Tensor, w_down: torch.Tensor, s_gate: torch.Tensor | None, s_up: torch.Tensor | None,
              s_down: torch.Tensor | None, stats: torch.Tensor | None = None, a8: bool = False) -> torch.Tensor:
    """x `[N, D]`, ids/weights `[N, KS]` -> `[N, D]`. `stats` (int32 `[1]`), if given, receives the number
    of experts that got tokens (the device-side counter itself, no sync). `a8` (FP8 weights only): the
    activations are quantized per 1x128 tile (x before ffn1, the SwiGLU output before ffn2) and both GEMMs
    run FP8 x FP8 MMA."""
    n, d = x.shape
    ks = ids.shape[1]
    n_exp, inter = w_gate.shape[0], w_gate.shape[1]
    out = torch.empty(n, d, dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    dev = x.device
    fp8 = s_gate is not None
    ids = ids.contiguous()
    weights = weights.contiguous()
    slots = torch.empty(n_exp, n, dtype=torch.int32, device=dev)
    counts = torch.empty(n_exp, dtype=torch.int32, device=dev)
    active = torch.empty(n_exp, dtype=torch.int32, device=dev)
    n_active = stats if stats is not None else torch.empty(1, dtype=torch.int32, device=dev)
    n_active.zero_()
    nk = n * ks
    _align_kernel[(n_exp,)](ids, slots, counts, active, n_active, nk, n,
                            BLOCK=min(4096, max(16, triton.next_power_of_2(nk))), num_warps=4)
    max_active = min(n_exp, nk)
    a8 = a8 and fp8
    cfg = _config(nk / n_exp, n, a8=a8)
    x = x if x.stride(-1) == 1 else x.contiguous()
    act = torch.empty(nk, inter, dtype=x.dtype, device=dev)
    y = torch.empty(nk, d, dtype=x.dtype, device=dev)
    xs, xs_m, xs_k = weights, 0, 0
    if a8:
        x, xs = act_quant(x)  # [N, D] e4m3, [N, D/128] fp32
        xs_m, xs_k = xs.stride()
    meta = dict(BM=cfg["BM"], BN=cfg["BN"], M_SPLIT=cfg["M_SPLIT"], num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])
    sg, se, ssn = _scale_args(s_gate, weights)
    su, _, _ = _scale_args(s_up, weights)
    bk1 = _bk(cfg, d, fp8)
    grid1 = (max_active * triton.cdiv(inter, cfg["BN"]), cfg["M_SPLIT"])
    _ffn1_kernel[grid1](
        x, w_gate, w_up, sg, su, act, slots, counts, active, n_active, xs, n, d, inter, ks,
        x.stride(0), w_gate.stride(0), w_gate.stride(1), se, ssn, act.stride(0), xs_m, xs_k,
        ROUTED=True, FP8=fp8, A8=a8, PREC=_prec(act), EVEN_K=d % bk1 == 0, BK=bk1, **meta,
    )
    acts, as_m, as_k = weights, 0, 0
    if a8:
        act, acts = act_quant(act)  # [N*KS, I] e4m3, [N*KS, I/128]
        as_m, as_k = acts.stride()
    sd, sde, sdn = _scale_args(s_down, weights)
    bk2 = _bk(cfg, inter, fp8)
    grid2 = (max_active * triton.cdiv(d, cfg["BN"]), cfg["M_SPLIT"])
    _ffn2_kernel[grid2](
        act, w_down, sd, y, weights, slots, counts, active, n_active, acts, n, inter, d, ks,
        act.stride(0), w_down.stride(0), w_down.stride(1), sde, sdn, y.stride(0), as_m, as_k,
        ROUTED=True, FP8=fp8, A8=a8, PREC=_prec(y), EVEN_K=inter % bk2 == 0, BK=bk2, **meta,
    )
    bd = min(1024, triton.next_power_of_2(d))
    _combine_kernel[(n, triton.cdiv(d, bd))](y, out, d, KS=ks, BD=bd, num_warps=4)
    return out


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, s_gate: torch.Tensor | None,
           s_up: torch.Tensor | None) -> torch.Tensor:
    """Dense `silu(x Wg^T) * (x Wu^T)`: x `[M, D]`, weights `[I, D]` -> `[M, I]`."""
    m, d = x.shape
    inter = w_gate.shape[0]
    act = torch.empty(m, inter, dtype=x.dtype, device=x.device)
    if m == 0:
        return act
    fp8 = s_gate is not None
    cfg = _config(m, m, routed=False)
    x = x if x.stride(-1) == 1 else x.contiguous()
    sg, _, ssn = _scale_args(s_gate, x)
    su, _, _ = _scale_args(s_up, x)
    bk = _bk(cfg, d, fp8)
    dummy = act  # unused pointers in dense mode
    grid = (triton.cdiv(inter, cfg["BN"]), cfg["M_SPLIT"])
    _ffn1_kernel[grid](
        x, w_gate, w_up, sg, su, act, dummy, dummy, dummy, dummy, dummy, m, d, inter, 1,
        x.stride(0), 0, w_gate.stride(0), 0, ssn, act.stride(0), 0, 0,
        ROUTED=False, FP8=fp8, A8=False, PREC=_prec(x), EVEN_K=d % bk == 0, BK=bk,
        BM=cfg["BM"], BN=cfg["BN"], M_SPLIT=cfg["M_SPLIT"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return act


def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Dense `x W^T` with a BF16/FP32 or weight-only FP8 `W [NOUT, K]`: x `[M, K]` -> `[M, NOUT]`."""
    m, k = x.shape
    nout = w.shape[0]
    out = torch.empty(m, nout, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    fp8 = scale is not None
    cfg = _config(m, m, routed=False)
    x = x if x.stride(-1) == 1 else x.contiguous()
    s, _, ssn = _scale_args(scale, x)
    bk = _bk(cfg, k, fp8)
    dummy = out
    grid = (triton.cdiv(nout, cfg["BN"]), cfg["M_SPLIT"])
    _ffn2_kernel[grid](
        x, w, s, out, dummy, dummy, dummy, dummy, dummy, dummy, m, k, nout, 1,
        x.stride(0), 0, w.stride(0), 0, ssn, out.stride(0), 0, 0,
        ROUTED=False, FP8=fp8, A8=False, PREC=_prec(x), EVEN_K=k % bk == 0, BK=bk,
        BM=cfg["BM"], BN=cfg["BN"], M_SPLIT=cfg["M_SPLIT"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
