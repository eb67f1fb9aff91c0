"""Benchmark: our block-scaled FP8 GEMM (Triton) vs torch bf16 matmul vs torch._scaled_mm, one run.

Prints one JSON line per (M, N, K, implementation): time (eager, and inside a CUDA graph, which is how
the engine runs decode), TFLOP/s and bandwidth at the better of the two, ratio to bf16 in the same run,
fraction of the H200 physical limit (bf16 dense ≈ 790 TFLOP/s measured; FP8 peak taken as 2× that;
HBM ≈ 4.3 TB/s for the memory-bound small-M cases), and the relative error against the fp32 product
of the dequantized operands. Shapes are DeepSeek-V3 671B projections.

    python benchmarks/fp8_gemm.py                  # full sweep
    python benchmarks/fp8_gemm.py --m 1 4096 --nk 7168x7168

Implementations:
- `bf16`: `torch.matmul(a_bf16, w_bf16.T)` (cuBLAS), the peer.
- `dsv3_fp8`: `dsv3.kernels.fp8.fp8_gemm` on pre-quantized operands, what the model calls (cuBLAS block-scaled
  `_scaled_mm` for M > 64 where the build supports it, else our Triton kernel, automatic variant);
  `dsv3_fp8_ptr` / `dsv3_fp8_tma`: the two kernel variants forced (pointer loads vs TMA loads).
- `dsv3_fp8+act_quant`: the same plus quantizing the bf16 activations, i.e. what an FP8 Linear costs.
- `scaled_mm_block`: `torch._scaled_mm` with 1×128 / 128×128 block scales where this PyTorch + CUDA
  support it (same math as ours); `scaled_mm_rowwise`: per-row/per-column scales (not the DeepSeek
  recipe, shown as the hardware's FP8 speed with cuBLAS).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from dsv3.kernels import fp8, fp8_triton

BF16_PEAK_TFLOPS = 790.0
FP8_PEAK_TFLOPS = 2 * BF16_PEAK_TFLOPS
HBM_TBPS = 4.3
DEFAULT_NK = ["7168x7168", "18432x7168", "7168x18432", "4096x7168"]
DEFAULT_M = [1, 16, 128, 4096]


def _bench_ms(fn, rep_ms: int) -> float:
    """Eager timing: includes the host launch cost of every kernel the call makes."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def _bench_graph_ms(fn, rep_ms: int) -> float:
    """CUDA-graph timing: device time only, as the engine's captured decode step sees it."""
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def _scaled_mm_block(aq, asc, wq, wsc, out_dtype):
    # cuBLAS wants activation scales outer-dim-major ([M, Kb] with stride (1, M)) and scale_b as [Kb, Nb]
    return torch._scaled_mm(aq, wq.t(), asc.t().contiguous().t(), wsc.t(), out_dtype=out_dtype)


def _scaled_mm_rowwise(a, w):
    amax_a = a.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12)
    amax_w = w.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12)
    sa, sw = amax_a / 448, amax_w / 448
    aq = (a.float() / sa).to(torch.float8_e4m3fn)
    wq = (w.float() / sw).to(torch.float8_e4m3fn)
    return aq, sa, wq, sw.t()


def run_case(m: int, n: int, k: int, rep_ms: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * k**-0.5
    aq, asc = fp8.quantize_act(a)
    wq, wsc = fp8.quantize_weight(w)
    ref = fp8.fp8_gemm_ref(aq, asc, wq, wsc, out_dtype=torch.float32)
    flops = 2.0 * m * n * k
    rows = []

    def record(name, fn, bytes_moved, check=None):
        try:
            out = fn()  # also runs the autotuner, before any graph capture
            torch.cuda.synchronize()
            ms = _bench_ms(fn, rep_ms)
        except Exception as e:  # a peer unsupported on this build: report, keep going
            rows.append({"M": m, "N": n, "K": k, "impl": name, "error": f"{type(e).__name__}: {e}"[:300]})
            return
        try:
            ms_graph = _bench_graph_ms(fn, rep_ms)
        except Exception:  # not capturable: report the eager time only
            ms_graph = None
        best = min(ms, ms_graph) if ms_graph is not None else ms
        tflops = flops / best / 1e9
        peak = BF16_PEAK_TFLOPS if name == "bf16" else FP8_PEAK_TFLOPS
        rows.append({
            "M": m, "N": n, "K": k, "impl": name, "ms": round(ms, 5),
            "ms_graph": round(ms_graph, 5) if ms_graph is not None else None,
            "tflops": round(tflops, 1), "frac_compute_peak": round(tflops / peak, 3),
            "tb_per_s": round(bytes_moved / best / 1e9, 3),
            "frac_hbm": round(bytes_moved / best / 1e9 / HBM_TBPS, 3),
            "rel_err": round(_rel_err(out, check if check is not None else ref), 5),
        })

    bf16_bytes = 2 * (m * k + n * k + m * n)
    fp8_bytes = m * k + n * k + 2 * m * n + 4 * (wsc.numel() + asc.numel())
    record("bf16", lambda: torch.matmul(a, w.T), bf16_bytes, check=a.float() @ w.float().T)
    record("dsv3_fp8", lambda: fp8.fp8_gemm(aq, asc, wq, wsc), fp8_bytes)
    for variant in ("ptr", "tma"):
        record(f"dsv3_fp8_{variant}", lambda v=variant: fp8_triton.fp8_gemm(aq, asc, wq, wsc, variant=v), fp8_bytes)
    record("dsv3_fp8+act_quant", lambda: fp8.fp8_gemm(*fp8.quantize_act(a), wq, wsc), fp8_bytes + 2 * m * k)
    record("scaled_mm_block", lambda: _scaled_mm_block(aq, asc, wq, wsc, torch.bfloat16), fp8_bytes)
    raq, rsa, rwq, rsw = _scaled_mm_rowwise(a, w)
    record(
        "scaled_mm_rowwise",
        lambda: torch._scaled_mm(raq, rwq.t(), rsa, rsw, out_dtype=torch.bfloat16),
        fp8_bytes,
        check=a.float() @ w.float().T,
    )
    base = next((r for r in rows if r["impl"] == "bf16" and "ms" in r), None)
    for r in rows:
        if base is not None and "ms" in r:
            r["speedup_vs_bf16"] = round(base["ms"] / r["ms"], 3)
            if base["ms_graph"] and r["ms_graph"]:
                r["speedup_vs_bf16_graph"] = round(base["ms_graph"] / r["ms_graph"], 3)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, nargs="+", default=DEFAULT_M, help=f"token counts M (default {DEFAULT_M})")
    p.add_argument("--nk", nargs="+", default=DEFAULT_NK, help=f"weight shapes NxK (default {DEFAULT_NK})")
    p.add_argument("--rep-ms", type=int, default=200, help="timing budget per case in ms (default 200)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("fp8_gemm benchmark needs a CUDA GPU", file=sys.stderr)
        return 1
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": __import__("triton").__version__}), flush=True)
    for nk in args.nk:
        n, k = (int(v) for v in nk.lower().split("x"))
        for m in args.m:
            print(json.dumps({"M": m, "N": n, "K": k, "fp8_gemm_backend":  # what `fp8_gemm` dispatches to
                              fp8.gemm_backend(m, n, k, torch.device("cuda"))}), flush=True)
            for row in run_case(m, n, k, args.rep_ms):
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
