"""Benchmark: the FP8 grouped GEMM of the routed experts (`dsv3.train.fp8_grouped`) against bf16
`torch._grouped_mm`, forward + backward, on the MOE_1B training shapes, one run on one GPU.

Rows: 32768 tokens x 4 routed slots = 131072 rows sorted over 32 experts (random, roughly balanced routing);
`w13` [32, 1024, 1024] (N = 2 x 512, K = 1024) and `w2` [32, 1024, 512] (N = 1024, K = 512), then the whole
expert MLP (w13, SiLU * up, w2). One JSON line per case:

- `bf16`: `torch._grouped_mm(x, w.transpose(1, 2), offs)` with bf16 weights, forward + backward (the peer);
  `bf16_cast`: the same with the float32 masters cast to bf16 inside the timed call (what the model does);
- `fp8`: `fp8_grouped_mm(x, w_fp32, offs)` forward + backward, every quantization included;
- `ratio` = bf16 time / fp8 time (> 1: FP8 faster), TFLOP/s over the 3 GEMMs (2MNK each), fraction of the
  H200 bf16 dense peak measured here (790 TFLOP/s), the relative error of the FP8 output against bf16;
- `breakdown` (ms): each kernel of the FP8 op alone (quantization passes, forward, dgrad, wgrad GEMMs).

    DSV3_AUTOTUNE=full python benchmarks/fp8_grouped.py [--tokens 32768 --topk 4 --experts 32 --dim 1024 --inter 512]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from dsv3.kernels import fp8_grouped_triton as K
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

    with torch.no_grad():
        y8 = fp8_grouped_mm(x, w32, offsets)
        y16 = torch._grouped_mm(x, w16.transpose(1, 2), offs=offsets)
    t = {f: _bench_ms(fn, rep_ms, (x, w16, w32)) for f, fn in
         (("bf16", bf16), ("bf16_cast", bf16_cast), ("fp8", fp8))}
    with torch.no_grad():
        t_fwd16 = _bench_ms(lambda: torch._grouped_mm(x, w16.transpose(1, 2), offs=offsets), rep_ms)
        t_fwd8 = _bench_ms(lambda: fp8_grouped_mm(x, w32, offsets), rep_ms)
        xd = x.detach()
        q, s, qt, st = K.quant_act(xd, offsets)
        dq, ds, dqt, dst = K.quant_act(dy, offsets)
        wq, wqt, ws = K.quant_weight(w32.detach())
        parts = {
            "quant_x_rows_cols": lambda: K.quant_act(xd, offsets),
            "quant_x_rows": lambda: K.quant_act(xd, offsets, cols=False),
            "quant_w": lambda: K.quant_weight(w32.detach()),
            "quant_dy_rows_cols": lambda: K.quant_act(dy, offsets),
        }
        parts["quant_x_rows_cols_4warps"] = lambda: K.quant_act(xd, offsets, num_warps=4)
        parts["quant_x_rows_cols_pack3d"] = lambda: K.quant_act(xd, offsets, pack3d=True)
        parts["quant_x_cols_pack3d"] = lambda: K.quant_act(xd, offsets, rows=False, pack3d=True)
        parts["quant_x_cols"] = lambda: K.quant_act(xd, offsets, rows=False)
        for v in ("ptr", "tma"):
            parts[f"fwd_gemm_{v}"] = lambda v=v: K.grouped_gemm(q, s, wq, ws, offsets, torch.bfloat16, variant=v)
            parts[f"dgrad_gemm_{v}"] = lambda v=v: K.grouped_gemm(dq, ds, wqt, ws, offsets, torch.bfloat16,
                                                                  transpose_b_scales=True, variant=v)
            parts[f"wgrad_gemm_{v}"] = lambda v=v: K.grouped_wgrad(dqt, dst, qt, st, offsets, m, variant=v)
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
        "case": name, "M": m, "N": n, "K": k, "E": experts,
        "bf16_ms": round(t["bf16"], 4), "bf16_cast_ms": round(t["bf16_cast"], 4), "fp8_ms": round(t["fp8"], 4),
        "fp8_host_ms": round(host_ms, 4), "fp8_auto": K.AUTO,
        "ratio": round(t["bf16"] / t["fp8"], 3), "ratio_vs_cast": round(t["bf16_cast"] / t["fp8"], 3),
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


GEMM_SWEEP = [  # (kind, BLOCK_M, BLOCK_N, warps, stages)
    ("tma", 128, 128, 8, 3), ("tma", 128, 256, 8, 3), ("tma", 64, 256, 8, 3), ("tma", 128, 128, 4, 3),
    ("tma", 64, 128, 4, 3), ("tma", 64, 128, 4, 2), ("tma", 64, 64, 4, 3), ("ptr", 64, 128, 4, 3),
]
WGRAD_SWEEP = [(128, 128, 8, 3), (64, 256, 8, 3), (64, 128, 4, 3), (64, 128, 4, 2), (64, 64, 4, 3)]


def sweep(m: int, n: int, k: int, offsets: torch.Tensor, rep_ms: int):
    """Each GEMM kernel config alone on one shape: time, TFLOP/s, registers and spills (tuning aid)."""
    dev = offsets.device
    experts = offsets.shape[0]
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    w = torch.randn(experts, n, k, device=dev) * k ** -0.5
    q, s, qt, st = K.quant_act(x, offsets)
    _, _, dqt, dst = K.quant_act(dy, offsets)
    wq, _, ws = K.quant_weight(w)
    ref = K.grouped_gemm(q, s, wq, ws, offsets, torch.float32, variant="ptr")
    wref = K.grouped_wgrad(dqt, dst, qt, st, offsets, m, variant="ptr")
    flop = 2 * m * n * k
    runs = [("gemm", c) for c in GEMM_SWEEP] + [("wgrad", c) for c in WGRAD_SWEEP]
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32768, help="tokens per step (default 32768)")
    p.add_argument("--topk", type=int, default=4, help="routed experts per token (default 4)")
    p.add_argument("--experts", type=int, default=32, help="routed experts (default 32)")
    p.add_argument("--dim", type=int, default=1024, help="model width D (default 1024)")
    p.add_argument("--inter", type=int, default=512, help="expert intermediate width I (default 512)")
    p.add_argument("--rep-ms", type=int, default=200, help="timed milliseconds per measurement (default 200)")
    p.add_argument("--sweep", action="store_true", help="also time every GEMM kernel config alone (default off)")
    args = p.parse_args(argv)
    if not (torch.cuda.is_available() and K.available()):
        print("fp8_grouped benchmark needs a CUDA GPU with Triton", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    m = args.tokens * args.topk
    offsets = _routing(m, args.experts, "cuda")
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": K.triton.__version__, "rows": m, "experts": args.experts,
                      "rows_per_expert_min_max": [int(counts.min()), int(counts.max())]}), flush=True)
    if args.sweep:
        sweep(m, 2 * args.inter, args.dim, offsets, args.rep_ms)
        sweep(m, args.dim, args.inter, offsets, args.rep_ms)
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
