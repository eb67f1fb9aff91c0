"""Benchmark: one training linear in bf16 against FP8 (`FP8TrainingLinear`), forward + backward, at each
distinct (N, K) of a model, eagerly on one GPU: the measurements behind the per-layer FP8 rule of `--fp8`.

For every bias-free `nn.Linear` shape of the model (lm_head excluded, as `--fp8` excludes it) and `--tokens`
rows: `bf16` is `F.linear` under bf16 autocast over the float32 master weight (what training runs), `fp8` the FP8
linear with every quantization included (activation 1x128 tiles, weight 128x128 blocks, the wgrad's 128x1
tiles) and cuBLAS's block-scaled GEMMs. One JSON line per shape with both times, GPU kernel time (profiler: what
the linear costs in a training step, where the host runs ahead) and wall time of one eager call (which also
counts its launches), the ratios bf16 / fp8 (> 1: FP8 faster) and the modules of that shape. Eager kernels:
under `--compile` inductor fuses the activation quantization into its producer, so these overstate FP8's
cost a little.

    python benchmarks/fp8_train_linear.py --model v3_layer moe_1b --tokens 8192
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import MODELS  # noqa: E402  (benchmarks/train.py's built-in model shapes)


def linear_shapes(spec: dict, vocab: int = 8192) -> dict[tuple[int, int], list[str]]:
    """(N, K) -> module names (layer index folded to `*`) of the model's bias-free linears, built on meta."""
    from dsv3.config import ModelArgs
    from dsv3.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(ModelArgs(**{**spec, "vocab_size": vocab, "dtype": "float32"}))
    shapes: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and mod.bias is None and not name.endswith("lm_head"):
            parts = ["*" if p.isdigit() else p for p in name.split(".")]
            folded = ".".join(parts)
            if folded not in shapes[(mod.out_features, mod.in_features)]:
                shapes[(mod.out_features, mod.in_features)].append(folded)
    return dict(shapes)


def _ms(fn, rep_ms: int, grads) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms, grad_to_none=list(grads), return_mode="median"))


def _gpu_ms(fn, iters: int = 10) -> float:
    """GPU kernel time per call (profiler): what the call costs inside a training step, where the host runs
    ahead of the GPU; wall time of one eager call alone also counts its launches."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return sum(ev.device_time_total for ev in prof.events() if ev.device_type.name == "CUDA") / 1000 / iters


def bench_shape(m: int, n: int, k: int, rep_ms: int) -> dict:
    from dsv3.train.fp8_linear import fp8_linear
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(n, k, device="cuda") * k ** -0.5).requires_grad_()
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

    def bf16():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = F.linear(x, w)
        y.backward(dy)

    def fp8():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fp8_linear(x, w, emulate=False)
        y.backward(dy)

    t16, t8 = _ms(bf16, rep_ms, (x, w)), _ms(fp8, rep_ms, (x, w))
    g16, g8 = _gpu_ms(bf16), _gpu_ms(fp8)
    flop = 3 * 2 * m * n * k
    return {"N": n, "K": k, "M": m, "bf16_gpu_ms": round(g16, 4), "fp8_gpu_ms": round(g8, 4),
            "ratio_gpu": round(g16 / g8, 3), "bf16_wall_ms": round(t16, 4), "fp8_wall_ms": round(t8, 4),
            "ratio_wall": round(t16 / t8, 3), "bf16_tflops": round(flop / (g16 * 1e9), 1),
            "fp8_tflops": round(flop / (g8 * 1e9), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", default=["v3_layer", "moe_1b"], choices=tuple(MODELS),
                   help="built-in model shapes of benchmarks/train.py (default: v3_layer moe_1b)")
    p.add_argument("--tokens", type=int, default=8192, help="rows of each GEMM (default 8192: 2 x 4096)")
    p.add_argument("--rep-ms", type=int, default=100, help="timed milliseconds per measurement (default 100)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("fp8_train_linear benchmark needs a CUDA GPU", file=sys.stderr)
        return 1
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens}))
    for model in args.model:
        for (n, k), names in sorted(linear_shapes(MODELS[model]).items()):
            row = {"model": model, **bench_shape(args.tokens, n, k, args.rep_ms), "modules": names}
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
