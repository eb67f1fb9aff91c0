"""Benchmark: `dsv3 train` throughput and MFU, bf16 vs `--fp8`, on the same data, seed and steps.

Each mode builds the trainer of `dsv3 train` (same model, data order, schedule, losses, balancing) and runs
its `train_step` for `--steps` steps, then the validation pass; no checkpoint or export is written (they
would time the disk). Prints one JSON line per run (tokens/s as the median over the second half of the
steps, MFU, the last training CE, the validation CE, and the training CE at every `--log-every` step) and a
summary line: the FP8/bf16 speed ratio (tokens/s, and GPU time per step with `--profile`), the relative
validation-loss gap and the training-CE curve's gap at each logged step after warm-up. `--profile N` adds,
after the timed steps, a torch.profiler pass over N steps and prints the GPU time split by kernel family.
A mode that fails prints its error and the others run. `--save DIR` keeps each mode's row; `--summarize`
compares two saved rows (runs made in separate calls).

Models: `moe_1b` (a ~1B-parameter MoE, dim 1024) and `v3_layer` (the released width on one GPU of EP-32:
dim 7168, MLA with 128 heads, 1 shared + 8 routed experts of width 2048 with every token to all 8, 3 MoE
layers and MTP depth 1; use `--seq-len 4096 --batch-size 2`).

    python benchmarks/train.py --data data/shards --device cuda --compile       # ~1B-parameter MoE
    python benchmarks/train.py --data data/shards --model v3_layer --seq-len 4096 --batch-size 2 --compile \
        --steps 300 --log-every 25 --profile 2
    python benchmarks/train.py --data data/shards --device cpu --model default --steps 4 --batch-size 2 --seq-len 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

# a ~1B-total-parameter DeepSeek-V3-style MoE: 0.86B main + 0.06B MTP with vocab 8192 (0.20B activated)
MOE_1B = {
    "dim": 1024, "inter_dim": 4096, "moe_inter_dim": 512, "n_layers": 16, "n_dense_layers": 1, "n_heads": 16,
    "q_lora_rank": 512, "kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64,
    "n_routed_experts": 32, "n_shared_experts": 1, "n_activated_experts": 4, "n_expert_groups": 4,
    "n_limited_groups": 2, "score_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "route_scale": 2.5, "correction_bias": True, "num_nextn_predict_layers": 1, "rope_factor": 1.0,
    "max_seq_len": 4096, "init_std": 0.006,
}

# the released DeepSeek-V3's width on one GPU, in the shape each GPU sees under expert parallelism (issue 21):
# dim 7168, MLA with 128 heads (q_lora 1536, kv_lora 512), 1 shared + 8 routed experts of width 2048 per MoE
# layer with top-8 routing over those 8 local experts (a stand-in for EP-32's local share: every token reaches
# each local expert), 3 MoE layers and MTP depth 1, sequences of 4096 tokens; vocabulary from the data
V3_LAYER = {
    "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 3, "n_dense_layers": 0, "n_heads": 128,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "n_routed_experts": 8, "n_shared_experts": 1, "n_activated_experts": 8, "n_expert_groups": 1,
    "n_limited_groups": 1, "score_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "route_scale": 2.5, "correction_bias": True, "num_nextn_predict_layers": 1, "rope_factor": 1.0,
    "max_seq_len": 4096, "init_std": 0.006,
}
MODELS = {"moe_1b": MOE_1B, "v3_layer": V3_LAYER}

# kernel-name fragments -> family, first match wins (names of cuBLAS, flash attention, Triton, inductor;
# cuBLAS' FP8 kernels are `nvjet_sm90_qq...`)
FAMILIES = (("fp8_scaled_mm", "fp8 quantize (fused)"),  # inductor kernels named after the op they feed
            ("sm90_qq", "fp8 gemm"), ("scaled_mm", "fp8 gemm"), ("sm90_xmma_gemm_e4m3", "fp8 gemm"), ("e4m3", "fp8 gemm"),
            ("grouped", "grouped gemm"), ("groupproblemshape", "grouped gemm"),  # CUTLASS's grouped GEMM
            ("flash", "attention"), ("fmha", "attention"), ("attention", "attention"),
            ("gemm", "gemm"), ("nvjet", "gemm"), ("cutlass", "gemm"), ("act_quant", "fp8 quantize"),
            ("quant", "fp8 quantize"), ("triton", "fused (triton)"), ("elementwise", "elementwise"),
            ("reduce", "reduce"), ("index", "gather/scatter"), ("scatter", "gather/scatter"),
            ("gather", "gather/scatter"), ("sort", "sort"), ("copy", "copy"), ("memcpy", "copy"),
            ("memset", "memset"), ("adam", "optimizer"), ("foreach", "optimizer"))


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]  # MFU is None on a CPU (no peak to compare with)
    return statistics.median(values) if values else None


def _family(name: str) -> str:
    low = name.lower()
    for key, family in FAMILIES:
        if key in low:
            return family
    return "other"


def profile_steps(trainer, steps: int) -> dict:
    """GPU time per kernel family (ms per step) over `steps` training steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            trainer.train_step()
        torch.cuda.synchronize()
    split: dict[str, float] = defaultdict(float)
    top: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        split[_family(ev.name)] += us / 1000 / steps
        top[ev.name[:90]] += us / 1000 / steps
    total = sum(split.values())
    return {"gpu_ms_per_step": round(total, 2),
            "split_ms": {k: round(v, 2) for k, v in sorted(split.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": {k: round(v, 2) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:25]}}


def run_one(args: argparse.Namespace, fp8: bool, out: Path) -> dict:
    from dsv3.train.recipe import TrainConfig
    from dsv3.train.trainer import Trainer
    model = MODELS.get(args.model, args.model)
    if args.model == "default":  # the shipped default model's architecture (27.6M parameters, vocab 8192)
        import dsv3.train
        recipe = Path(dsv3.train.__file__).parent / "recipes" / "default_model.json"
        model = json.loads(recipe.read_text())["model"]
    cfg = TrainConfig(model=model, seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps,
                      warmup_steps=max(1, min(100, args.steps // 10)), lr=args.lr, final_lr=args.lr / 10,
                      fp8=fp8, fp8_layers=args.fp8_layers, fp8_experts=args.fp8_experts, compile=args.compile,
                      seed=args.seed, eval_every=0,
                      precision="bf16",  # the peer of fp8 is bf16 autocast on every device
                      eval_batches=args.eval_batches, ckpt_every=0, log_every=max(1, args.steps // 10),
                      device=args.device, peak_tflops=args.peak_tflops)
    start = time.perf_counter()
    trainer = Trainer(cfg, args.data, out)
    rows = []
    for step in range(cfg.steps):
        rows.append(trainer.train_step())
        if step == 0:
            first = time.perf_counter() - start
            while any(Path(p).exists() for p in args.wait_for):  # let other GPU jobs finish before timing
                time.sleep(0.5)
        if args.log_every and (step + 1) % args.log_every == 0:
            r = rows[-1]
            print(f"  {'fp8' if fp8 else 'bf16'} step {r['step']}: ce {r['ce']:.4f} mtp {r['mtp']:.4f} "
                  f"{r['tokens_per_s']:,.0f} tok/s", flush=True)
    tail = rows[len(rows) // 2:] or rows
    result = {"mode": "fp8" if fp8 else "bf16", "compile": args.compile, "steps": cfg.steps, "seed": cfg.seed,
              "fp8_layers": cfg.fp8_layers if fp8 else None, "fp8_experts": cfg.fp8_experts if fp8 else None,
              "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "tokens_per_step": trainer.tokens_per_step,
              "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in tail)),
              "mfu": _median([r.get("mfu") for r in tail]), "final_ce": rows[-1]["ce"],
              "final_mtp": rows[-1]["mtp"], "load_max": rows[-1].get("load_max"),
              "first_step_s": round(first, 1), "val_loss": trainer.evaluate(),
              "warmup_steps": cfg.warmup_steps,
              "curve": [[r["step"], round(r["ce"], 5), round(r["mtp"], 5)] for i, r in enumerate(rows)
                        if args.log_every and (i + 1) % args.log_every == 0]}
    if args.profile and args.device != "cpu":
        result["profile"] = profile_steps(trainer, args.profile)
    if args.device != "cpu":
        import torch
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return result


def summary(b: dict, f: dict) -> dict:
    """FP8 against bf16 from two runs' result rows: speed ratio, MFU, loss gaps, and the training-CE curve's
    largest relative gap at the logged steps after warm-up (the same batches in both runs: same seed)."""
    gap = None if b["val_loss"] is None else (f["val_loss"] - b["val_loss"]) / b["val_loss"]
    out = {"summary": True, "fp8_speedup": f["tokens_per_s"] / b["tokens_per_s"], "bf16_mfu": b["mfu"],
           "fp8_mfu": f["mfu"], "relative_val_loss_gap": gap,
           "train_ce_gap": (f["final_ce"] - b["final_ce"]) / b["final_ce"]}
    if "profile" in b and "profile" in f:
        out["gpu_ms_per_step"] = {"bf16": b["profile"]["gpu_ms_per_step"], "fp8": f["profile"]["gpu_ms_per_step"],
                                  "ratio": b["profile"]["gpu_ms_per_step"] / f["profile"]["gpu_ms_per_step"]}
    fc = {step: ce for step, ce, _ in f.get("curve", [])}
    gaps = [(step, (fc[step] - ce) / ce) for step, ce, _ in b.get("curve", [])
            if step in fc and step > b.get("warmup_steps", 0)]
    if gaps:
        worst = max(gaps, key=lambda g: abs(g[1]))
        out["curve_gaps_after_warmup"] = [[s, round(g, 5)] for s, g in gaps]
        out["curve_max_abs_gap"] = {"step": worst[0], "gap": round(worst[1], 5)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="token shard folder from `dsv3 data tokenize` (required unless --summarize)")
    p.add_argument("--model", default="moe_1b", help="moe_1b or v3_layer (built in: the ~1B MoE, or the released "
                   "width on one GPU of EP-32, see V3_LAYER), default (the default model's architecture), a preset "
                   "name or a ModelArgs JSON path (default moe_1b)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per run (default 1000)")
    p.add_argument("--batch-size", type=int, default=48,
                   help="sequences per step (default 48: 98k tokens, ~111 GiB peak for the preset with --compile)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0,
                   help="initialisation and data-order seed, the same for every mode (default 0)")
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches at the end (default 20)")
    p.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks (default off)")
    p.add_argument("--peak-tflops", type=float, default=790.0,
                   help="dense bf16 peak for MFU (default 790, measured on the H200 here)")
    p.add_argument("--modes", default="bf16,fp8", help="comma-separated: bf16, fp8 (default both)")
    p.add_argument("--fp8-layers", default="auto", choices=("auto", "all"),
                   help="GEMMs in FP8 in the fp8 mode (dsv3 train --fp8-layers; default auto: where the shape gains)")
    p.add_argument("--save", metavar="DIR", help="write each mode's result row to DIR/<mode>.json")
    p.add_argument("--summarize", nargs=2, metavar=("BF16_JSON", "FP8_JSON"),
                   help="print the FP8-vs-bf16 summary of two saved rows (no training; --data is ignored)")
    p.add_argument("--fp8-experts", default="auto", choices=("auto", "loop", "grouped", "bf16"),
                   help="routed experts in the fp8 mode (dsv3 train --fp8-experts; default auto: bf16 on a GPU)")
    p.add_argument("--profile", type=int, default=0, help="profile this many extra steps per mode (default 0)")
    p.add_argument("--log-every", type=int, default=0, help="print a progress line every N steps (default 0: off)")
    p.add_argument("--wait-for", nargs="*", default=[],
                   help="after the first (compiling) step, wait while these files exist (default: none)")
    p.add_argument("--detect-anomaly", action="store_true",
                   help="run under torch.autograd.detect_anomaly: name the op that first makes a NaN (slow)")
    args = p.parse_args(argv)
    if args.summarize:
        rows = [json.loads(Path(f).read_text()) for f in args.summarize]
        print(json.dumps(summary(*rows)))
        return 0
    if not args.data:
        p.error("--data is required")
    import torch

    from dsv3.kernels import fp8_cublas
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            try:
                with torch.autograd.detect_anomaly(check_nan=True) if args.detect_anomaly else nullcontext():
                    results[mode] = run_one(args, mode == "fp8", Path(tmp) / mode)
            except Exception as exc:  # keep measuring the other mode; report this one's failure
                traceback.print_exc()
                print(json.dumps({"mode": mode, "error": f"{type(exc).__name__}: {exc}"[:1500],
                                  "fp8_probe_errors": fp8_cublas.probe_errors}), flush=True)
                continue
            if fp8_cublas.probe_errors:
                results[mode]["fp8_probe_errors"] = fp8_cublas.probe_errors
            print(json.dumps(results[mode]), flush=True)
            if args.device != "cpu":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)
        for mode, row in results.items():
            (Path(args.save) / f"{mode}.json").write_text(json.dumps(row))
    if "bf16" in results and "fp8" in results:
        print(json.dumps(summary(results["bf16"], results["fp8"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
