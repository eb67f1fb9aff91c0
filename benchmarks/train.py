"""Benchmark: `dsv3 train` throughput and MFU, bf16 vs `--fp8`, on the same data, seed and steps.

Prints one JSON line per run (tokens/s as the median over the second half of the steps, MFU, final training
CE and validation CE) and a summary line with the FP8/bf16 speed ratio and the relative loss gap (the issue's
targets: MFU >= 35% in bf16, FP8 >= 1.2x bf16 tokens/s, loss gap <= 0.25% after 1,000 steps).

    python benchmarks/train.py --data data/shards --device cuda                   # ~1B-parameter MoE
    python benchmarks/train.py --data data/shards --device cpu --model tiny --steps 4 --batch-size 2 --seq-len 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
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


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]  # MFU is None on a CPU (no peak to compare with)
    return statistics.median(values) if values else None


def run_one(args: argparse.Namespace, fp8: bool, out: Path) -> dict:
    from dsv3.train.trainer import TrainConfig, train
    model = MOE_1B if args.model == "moe_1b" else args.model
    cfg = TrainConfig(model=model, seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps,
                      warmup_steps=max(1, min(100, args.steps // 10)), lr=args.lr, final_lr=args.lr / 10,
                      fp8=fp8, compile=args.compile, seed=0, eval_every=0, eval_batches=args.eval_batches,
                      ckpt_every=0, log_every=max(1, args.steps // 10), device=args.device,
                      peak_tflops=args.peak_tflops)
    train(cfg, args.data, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_s" in r]
    tail = steps[len(steps) // 2:] or steps
    last = steps[-1]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    return {"mode": "fp8" if fp8 else "bf16", "steps": args.steps, "tokens_per_step": args.batch_size * args.seq_len,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in tail),
            "mfu": _median([r.get("mfu") for r in tail]), "final_ce": last["ce"],
            "val_loss": vals[-1] if vals else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="token shard folder from `dsv3 data tokenize`")
    p.add_argument("--model", default="moe_1b", help="moe_1b (built in), a preset name or a ModelArgs JSON path")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per run (default 1000)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches at the end (default 20)")
    p.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model parts (default off)")
    p.add_argument("--peak-tflops", type=float, default=790.0,
                   help="dense bf16 peak for MFU (default 790, measured on the H200 here)")
    p.add_argument("--modes", default="bf16,fp8", help="comma-separated: bf16, fp8 (default both)")
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            results[mode] = run_one(args, mode == "fp8", Path(tmp) / mode)
            print(json.dumps(results[mode]), flush=True)
    if "bf16" in results and "fp8" in results:
        b, f = results["bf16"], results["fp8"]
        gap = None if b["val_loss"] is None else (f["val_loss"] - b["val_loss"]) / b["val_loss"]
        print(json.dumps({"summary": True, "fp8_speedup": f["tokens_per_s"] / b["tokens_per_s"],
                          "bf16_mfu": b["mfu"], "relative_val_loss_gap": gap}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
