"""Benchmark: the FP8 grouped GEMM of the routed experts (`dsv3.train.fp8_grouped`) against bf16
`torch._grouped_mm`, forward + backward, one run on one GPU.

Presets (`--preset`): `v3`, the released width on one GPU of EP-32 (8 local experts of 7168 x 2048, every one of
8192 tokens to all 8: 65,536 rows, 8,192 per expert); `moe_1b`, the ~1B benchmark model (32768 tokens x 4 routed
slots = 131,072 rows over 32 experts, random, roughly balanced routing). Cases: `w13` (N = 2 x inter, K = dim),
`w2` (N = dim, K = inter), then the whole expert MLP (w13, SiLU * up, w2). One JSON line per case:

- `bf16`: `torch._grouped_mm(x, w.transpose(1, 2), offs)` with bf16 weights, forward + backward (the peer);
  `bf16_cast`: the same with the float32 masters cast to bf16 inside the timed call (what the model does);
- `fp8`: `fp8_grouped_mm(x, w_fp32, offs)` forward + backward on the backend it picks (`fp8_impl`: cuBLAS per
  expert on Hopper where N and K are multiples of 512), every quantization included; `fp8_triton`: the same
  forced onto the Triton grouped kernels;
- `ratio` = bf16 time / fp8 time (> 1: FP8 faster), `ratio_vs_cast`, TFLOP/s over the 3 GEMMs (2MNK each),
  fraction of the H200 bf16 dense peak measured here (790 TFLOP/s), the relative error of the FP8 output
  against bf16;
- `breakdown` (ms): each kernel of the FP8 op alone (quantization passes; forward, dgrad, wgrad GEMMs of both
  backends).

`--candidates` times the library GEMMs on the same shapes (GEMM alone, pre-quantized operands; see
`candidates`); `--sweep` each Triton kernel config alone.

    python benchmarks/fp8_grouped.py --preset v3 [--candidates] [--sweep]
    DSV3_AUTOTUNE=full python benchmarks/fp8_grouped.py [--tokens 32768 --topk 4 --experts 32 --dim 1024 --inter 512]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from dsv3.kernels import fp8_grouped_cublas as C
from dsv3.kernels import fp8_grouped_triton as K
from dsv3.train import fp8_grouped as G
from dsv3.train.fp8_grouped import fp8_grouped_mm

BF16_PEAK_TFLOPS = 790.0


def _bench_ms(fn, rep_ms: int, grads=()) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, grad_to_none=list(grads), return_mode="median"))


def _routing(m: int, experts: int, device: str) -> torch.Tensor:
    """Random, roughly balanced expert of each row -> int32 end offsets [E]."""
    expert = torch.randint(experts, (m,), device=device)
    return torch.bincount(expert, minlength=experts).cumsum(0).to(torch.int32)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def bench_gemm(name: str, m: int, n: int, k: int, offsets: torch.Tensor, rep_ms: int) -> dict:
    dev = offsets.device
    experts = offsets.shape[0]
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    w32 = (torch.randn(experts, n, k, device=dev) * k ** -0.5).requires_grad_()
    w16 = w32.detach().to(torch.bfloat16).requires_grad_()

    def bf16():
        torch._grouped_mm(x, w16.transpose(1, 2), offs=offsets).backward(dy)

    def bf16_cast():
        torch._grouped_mm(x, w32.to(torch.bfloat16).transpose(1, 2), offs=offsets).backward(dy)

    def fp8():
        fp8_grouped_mm(x, w32, offsets).backward(dy)

    def fp8_triton():
        fp8_grouped_mm(x, w32, offsets, impl="triton").backward(dy)

    with torch.no_grad():
        y8 = fp8_grouped_mm(x, w32, offsets)
        y16 = torch._grouped_mm(x, w16.transpose(1, 2), offs=offsets)
    impl = G.backend(x, w32)
    t = {f: _bench_ms(fn, rep_ms, (x, w16, w32)) for f, fn in
         (("bf16", bf16), ("bf16_cast", bf16_cast), ("fp8", fp8), ("fp8_triton", fp8_triton))}
    with torch.no_grad():
        t_fwd16 = _bench_ms(lambda: torch._grouped_mm(x, w16.transpose(1, 2), offs=offsets), rep_ms)
        t_fwd8 = _bench_ms(lambda: fp8_grouped_mm(x, w32, offsets), rep_ms)
        xd = x.detach()
        q, s, qt, st = K.quant_act(xd, offsets)
        dq, ds, dqt, dst = K.quant_act(dy, offsets)
        wq, wqt, ws = K.quant_weight(w32.detach())
        parts = {
            "quant_x_rows_cols": lambda: K.quant_act(xd, offsets),
            "quant_w": lambda: K.quant_weight(w32.detach()),
            "quant_dy_rows_cols": lambda: K.quant_act(dy, offsets),
            "triton_fwd_gemm": lambda: K.grouped_gemm(q, s, wq, ws, offsets, torch.bfloat16),
            "triton_dgrad_gemm": lambda: K.grouped_gemm(dq, ds, wqt, ws, offsets, torch.bfloat16,
                                                        transpose_b_scales=True),
            "triton_wgrad_gemm": lambda: K.grouped_wgrad(dqt, dst, qt, st, offsets, m),
        }
        if impl == "cublas":
            plan = C.layout(offsets)
            bq, bs, bqt, bst = K.quant_act(xd, offsets, blocked=True, align=C.ALIGN)
            dbq, dbs, dbqt, dbst = K.quant_act(dy, offsets, blocked=True, align=C.ALIGN)
            parts.update({
                "quant_x_blocked": lambda: K.quant_act(xd, offsets, blocked=True, align=C.ALIGN),
                "quant_dy_blocked": lambda: K.quant_act(dy, offsets, blocked=True, align=C.ALIGN),
                "cublas_fwd_gemm": lambda: C.gemm(bq, bs, wq, ws, plan, m, torch.bfloat16),
                "cublas_dgrad_gemm": lambda: C.gemm(dbq, dbs, wqt, ws, plan, m, torch.bfloat16,
                                                    transpose_b_scales=True),
                "cublas_wgrad_gemm": lambda: C.wgrad(dbqt, dbst, bqt, bst, plan, n, k),
            })
        breakdown = {p: round(_bench_ms(fn, rep_ms), 4) for p, fn in parts.items()}
    # host time of one fp8 forward + backward (launch overhead; the GPU runs behind it)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        fp8()
        x.grad = w32.grad = None
    host_ms = (time.perf_counter() - start) * 100
    torch.cuda.synchronize()
    flop = 2 * m * n * k
    tflops = {p: round(flop / (breakdown[p] * 1e9), 1) for p in breakdown if "gemm" in p}
    return {
        "case": name, "M": m, "N": n, "K": k, "E": experts, "fp8_impl": impl,
        "bf16_ms": round(t["bf16"], 4), "bf16_cast_ms": round(t["bf16_cast"], 4), "fp8_ms": round(t["fp8"], 4),
        "fp8_triton_ms": round(t["fp8_triton"], 4), "fp8_host_ms": round(host_ms, 4),
        "ratio": round(t["bf16"] / t["fp8"], 3), "ratio_vs_cast": round(t["bf16_cast"] / t["fp8"], 3),
        "ratio_triton": round(t["bf16"] / t["fp8_triton"], 3),
        "bf16_tflops": round(3 * flop / (t["bf16"] * 1e9), 1), "fp8_tflops": round(3 * flop / (t["fp8"] * 1e9), 1),
        "bf16_peak_frac": round(3 * flop / (t["bf16"] * 1e9) / BF16_PEAK_TFLOPS, 3),
        "fwd_bf16_ms": round(t_fwd16, 4), "fwd_fp8_ms": round(t_fwd8, 4),
        "rel_err_vs_bf16": round(_rel(y8, y16), 5), "breakdown_ms": breakdown, "gemm_tflops": tflops,
    }


def bench_mlp(m: int, dim: int, inter: int, offsets: torch.Tensor, rep_ms: int) -> dict:
    """The routed expert MLP as `MoE.routed_grouped` runs it: w13, SiLU * up, w2; forward + backward."""
    dev = offsets.device
    experts = offsets.shape[0]
    x = torch.randn(m, dim, device=dev, dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(m, dim, device=dev, dtype=torch.bfloat16)
    w13 = (torch.randn(experts, 2 * inter, dim, device=dev) * dim ** -0.5).requires_grad_()
    w2 = (torch.randn(experts, dim, inter, device=dev) * inter ** -0.5).requires_grad_()

    def run(mm, cast):
        def step():
            a, b = (w13.to(torch.bfloat16), w2.to(torch.bfloat16)) if cast else (w13, w2)
            gate, up = mm(x, a).chunk(2, dim=-1)
            mm(torch.nn.functional.silu(gate) * up, b).backward(dy)
        return step

    bf16 = run(lambda a, w: torch._grouped_mm(a, w.transpose(1, 2), offs=offsets), True)
    fp8 = run(lambda a, w: fp8_grouped_mm(a, w, offsets), False)
    t16, t8 = _bench_ms(bf16, rep_ms, (x, w13, w2)), _bench_ms(fp8, rep_ms, (x, w13, w2))
    return {"case": "expert_mlp", "M": m, "dim": dim, "inter": inter, "E": experts,
            "bf16_cast_ms": round(t16, 4), "fp8_ms": round(t8, 4), "ratio": round(t16 / t8, 3)}


PRESETS = {
    "moe_1b": {"tokens": 32768, "topk": 4, "experts": 32, "dim": 1024, "inter": 512, "routing": "random"},
    "v3": {"tokens": 8192, "topk": 8, "experts": 8, "dim": 7168, "inter": 2048, "routing": "equal"},
}

GEMM_SWEEP = [  # (kind, BLOCK_M, BLOCK_N, warps, stages)
    ("tma", 128, 128, 8, 3), ("tma", 128, 128, 8, 4), ("tma", 64, 256, 8, 3), ("tma", 64, 128, 4, 3),
    ("tma", 64, 128, 4, 4), ("ptr", 64, 128, 4, 3), ("ptr", 128, 128, 8, 3),
]
WGRAD_SWEEP = [(128, 128, 8, 3), (128, 128, 8, 4), (64, 256, 8, 3), (64, 128, 4, 3), (64, 128, 4, 4)]


def sweep(m: int, n: int, k: int, offsets: torch.Tensor, rep_ms: int, wgrad: bool = True):
    """Each GEMM kernel config alone on one shape (forward-type `[M, K] x [N, K]ᵀ`, and the wgrad of that
    shape): time, TFLOP/s, registers and spills (tuning aid)."""
    dev = offsets.device
    experts = offsets.shape[0]
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    w = torch.randn(experts, n, k, device=dev) * k ** -0.5
    q, s, qt, st = K.quant_act(x, offsets)
    _, _, dqt, dst = K.quant_act(dy, offsets)
    wq, _, ws = K.quant_weight(w)
    ref = K.grouped_gemm(q, s, wq, ws, offsets, torch.float32, variant="ptr")
    wref = K.grouped_wgrad(dqt, dst, qt, st, offsets, m, variant="ptr") if wgrad else None
    flop = 2 * m * n * k
    runs = [("gemm", c) for c in GEMM_SWEEP] + ([("wgrad", c) for c in WGRAD_SWEEP] if wgrad else [])
    for op, c in runs:
        if op == "gemm":
            kind, bm, bn, warps, stages = c
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
            fn = lambda: K.grouped_gemm(q, s, wq, ws, offsets, torch.float32, variant=kind, config=cfg)  # noqa: E731
            want = ref
        else:
            bn, bk, warps, stages = c
            kind = "tma"
            cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}
            fn = lambda: K.grouped_wgrad(dqt, dst, qt, st, offsets, m, variant="tma", config=cfg)  # noqa: E731
            want = wref
        row = {"sweep": op, "M": m, "N": n, "K": k, "kind": kind, **cfg}
        try:
            err = _rel(fn(), want)
            ms = _bench_ms(fn, rep_ms)
            kern = K.LAST_KERNEL
            row.update(ms=round(ms, 4), tflops=round(flop / (ms * 1e9), 1), rel_err_vs_ptr=round(err, 6),
                       regs=getattr(kern, "n_regs", None), spills=getattr(kern, "n_spills", None))
        except Exception as exc:  # a config that does not compile or run: say so, go on
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        print(json.dumps(row), flush=True)


def candidates(m: int, n: int, k: int, offsets: torch.Tensor, rep_ms: int) -> dict:
    """The same grouped GEMM through library kernels, GEMM alone on pre-quantized operands (TFLOP/s):
    - `bf16_grouped_mm`: `torch._grouped_mm` (CUTLASS), the bf16 peer;
    - `scaled_grouped_mm_rowwise`: `torch._scaled_grouped_mm`, FP8 with one scale per row of x and per
      column of w (the only FP8 recipe of torch's grouped GEMM on sm90: not the report's tiles);
    - `cublas_blockwise_loop`: cuBLAS's block-scaled GEMM (the report's 1x128 x 128x128 tiles,
      `fp8_cublas.scaled_mm`) once per expert, forward and wgrad; needs the row counts on the host (a sync)
      and rows a multiple of 16;
    - `dsv3_triton`: ours (autotuned forward; wgrad).
    torchao 0.18's blockwise-FP8 grouped GEMM runs DeepGEMM (not pip-installable) or an emulation: not timed."""
    from dsv3.kernels import fp8_cublas
    dev = offsets.device
    e = offsets.shape[0]
    flop = 2 * m * n * k
    out = {"case": "candidates", "M": m, "N": n, "K": k, "E": e}
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(e, n, k, device=dev) * k ** -0.5
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    w16 = w.to(torch.bfloat16)

    def rate(name, fn, flops=flop):
        try:
            ms = _bench_ms(fn, rep_ms)
            out[name] = {"ms": round(ms, 4), "tflops": round(flops / (ms * 1e9), 1)}
        except Exception as exc:  # a candidate this torch or GPU lacks: say why
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}

    rate("bf16_grouped_mm", lambda: torch._grouped_mm(x, w16.transpose(1, 2), offs=offsets))
    rate("bf16_grouped_mm_wgrad", lambda: torch._grouped_mm(dy.t(), x, offs=offsets))
    q, s, qt, st = K.quant_act(x, offsets)
    dq, ds, dqt, dst = K.quant_act(dy, offsets)
    wq, wqt, ws = K.quant_weight(w)
    rate("dsv3_triton_fwd", lambda: K.grouped_gemm(q, s, wq, ws, offsets, torch.bfloat16))
    rate("dsv3_triton_dgrad", lambda: K.grouped_gemm(dq, ds, wqt, ws, offsets, torch.bfloat16,
                                                     transpose_b_scales=True))
    rate("dsv3_triton_wgrad", lambda: K.grouped_wgrad(dqt, dst, qt, st, offsets, m))
    # rowwise: x per row over all of K, w per output column
    xr = x.float()
    sx = xr.abs().amax(1).clamp_min(1e-12) / 448
    xq = (xr / sx[:, None]).to(torch.float8_e4m3fn)
    sw = w.abs().amax(2).clamp_min(1e-12) / 448  # [E, N]
    wq_r = (w / sw[:, :, None]).to(torch.float8_e4m3fn)  # [E, N, K]
    rate("scaled_grouped_mm_rowwise", lambda: torch._scaled_grouped_mm(
        xq, wq_r.transpose(1, 2), sx, sw, offs=offsets, out_dtype=torch.bfloat16))
    # cuBLAS block-scaled, one call per expert on host-known row ranges
    ends = offsets.tolist()
    bounds = list(zip([0] + ends[:-1], ends))
    if all((b - a) % 16 == 0 for a, b in bounds):
        a_st = [s[:, a:b].contiguous() for a, b in bounds]

        def loop_fwd():
            for i, (a, b) in enumerate(bounds):
                fp8_cublas.scaled_mm(q[a:b], wq[i], a_st[i], ws[i], True, torch.bfloat16)
        rate("cublas_blockwise_loop_fwd", loop_fwd)
        if all((b - a) % 512 == 0 for a, b in bounds):  # wgrad's contraction is the expert's tokens
            dyt = [dqt[:, a:b].contiguous() for a, b in bounds]  # whole tiles: expert i's slots are a..b
            xt = [qt[:, a:b].contiguous() for a, b in bounds]
            dys = [dst[a // 128: b // 128].contiguous() for a, b in bounds]  # [T_e/128, N]
            xs = [st[a // 128: b // 128].contiguous() for a, b in bounds]

            def loop_wgrad():
                for i in range(e):
                    fp8_cublas.scaled_mm(dyt[i], xt[i], dys[i], xs[i], False, torch.bfloat16)
            rate("cublas_blockwise_loop_wgrad", loop_wgrad)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=tuple(PRESETS), default="moe_1b",
                   help="shapes: moe_1b (32 experts of 1024x512, top-4, 32768 tokens, random routing) or v3 (the "
                        "released width on one GPU of EP-32: 8 local experts of 7168x2048, every token to all 8, "
                        "8192 tokens); the flags below override it")
    p.add_argument("--tokens", type=int, help="tokens per step")
    p.add_argument("--topk", type=int, help="routed experts per token")
    p.add_argument("--experts", type=int, help="routed experts")
    p.add_argument("--dim", type=int, help="model width D")
    p.add_argument("--inter", type=int, help="expert intermediate width I")
    p.add_argument("--routing", choices=("random", "equal"), help="random (roughly balanced) or equal counts")
    p.add_argument("--rep-ms", type=int, default=200, help="timed milliseconds per measurement (default 200)")
    p.add_argument("--sweep", action="store_true", help="also time every GEMM kernel config alone (default off)")
    p.add_argument("--candidates", action="store_true",
                   help="also time the library GEMMs (torch grouped bf16 / rowwise FP8, cuBLAS block-scaled loop)")
    p.add_argument("--skip-main", action="store_true", help="only the sweep / candidates")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not (torch.cuda.is_available() and K.available()):
        print("fp8_grouped benchmark needs a CUDA GPU with Triton", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    m = args.tokens * args.topk
    if args.routing == "equal":
        offsets = torch.full((args.experts,), m // args.experts, dtype=torch.int32, device="cuda").cumsum(0)
        offsets = offsets.to(torch.int32)
        m = int(offsets[-1])
    else:
        offsets = _routing(m, args.experts, "cuda")
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": K.triton.__version__, "preset": args.preset, "rows": m, "experts": args.experts,
                      "dim": args.dim, "inter": args.inter,
                      "rows_per_expert_min_max": [int(counts.min()), int(counts.max())]}), flush=True)
    if args.sweep:  # forward shapes of w13 and w2 (with their wgrad), then their dgrad shapes
        sweep(m, 2 * args.inter, args.dim, offsets, args.rep_ms)
        sweep(m, args.dim, args.inter, offsets, args.rep_ms)
        sweep(m, args.dim, 2 * args.inter, offsets, args.rep_ms, wgrad=False)
        sweep(m, args.inter, args.dim, offsets, args.rep_ms, wgrad=False)
    if args.candidates:
        for n, k in ((2 * args.inter, args.dim), (args.dim, args.inter)):
            print(json.dumps(candidates(m, n, k, offsets, args.rep_ms)), flush=True)
    if args.skip_main:
        return 0
    rows = [bench_gemm("w13", m, 2 * args.inter, args.dim, offsets, args.rep_ms),
            bench_gemm("w2", m, args.dim, args.inter, offsets, args.rep_ms)]
    for row in rows:
        print(json.dumps(row), flush=True)
    print(json.dumps(bench_mlp(m, args.dim, args.inter, offsets, args.rep_ms)), flush=True)
    total16 = sum(r["bf16_ms"] for r in rows)
    total8 = sum(r["fp8_ms"] for r in rows)
    print(json.dumps({"case": "w13+w2", "bf16_ms": round(total16, 4), "fp8_ms": round(total8, 4),
                      "ratio": round(total16 / total8, 3),
                      "configs": {name: {str(key): str(cfg) for key, cfg in getattr(K, name).cache.items()}
                                  for name in ("_gemm_tuned", "_gemm_tma_tuned", "_wgrad_tuned", "_wgrad_tma_tuned")}}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
