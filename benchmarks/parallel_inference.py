"""Benchmark: tensor- and expert-parallel inference under torchrun (issue 18), also at world size 1.

Every rank runs this script (`torchrun --nproc-per-node N benchmarks/parallel_inference.py ...`); the world is
split as `--tp x --ep` (`--tp` defaults to the world / `--ep`). Rank 0 prints one JSON line per measurement.

`equality`: a random V3-like model (`--model` preset cut to `--layers`, random weights from `--seed`, the same on
every rank) run whole on each rank's own device (the oracle: one GPU), then split over the world
(`dsv3.model.parallel.parallelize_for_inference`), in BF16 and in float32: the largest logit difference relative
to the largest logit (BF16: the tolerance of its rounding, `--bf16-tol`), and greedy tokens through `LLM` in
float32 (equal token for token).

`scaling`: `--model` (default the 671B preset) cut to `--layers`, `--weights fp8` (default) or bf16, random
weights built directly in each rank's shard (nothing is read from disk), through `LLM.generate` (greedy,
`ignore_eos`): decode tokens/s at each `--batch` (B prompts of `--prompt-len` tokens, `--new-tokens` new; decode
tok/s = B x (new - 1) / (t_new - t_first)) and prefill of `--prefill-batch` x `--prefill-len` prompt tokens. With
`--profile`, one more decode run per batch under torch.profiler gives the time per step spent in all-reduce,
all-gather, all-to-all and broadcast (NCCL kernels on GPUs, gloo ops on a CPU). Lines carry `world`, `tp`, `ep`,
`tok_s` and `tok_s_per_gpu`; scaling efficiency is tok_s(N GPUs) / (N x tok_s(1 GPU)) of runs with the same model,
and the issue's batch-1 latency target compares N GPUs with one GPU running `--layers` / N.

    python benchmarks/parallel_inference.py scaling --layers 4                          # one GPU, world 1
    torchrun --nproc-per-node 8 benchmarks/parallel_inference.py scaling --layers 24 --tp 8 --profile
    torchrun --nproc-per-node 8 benchmarks/parallel_inference.py scaling --layers 24 --ep 8 --exchange all-reduce
    torchrun --nproc-per-node 4 benchmarks/parallel_inference.py equality --model 16B --layers 4 --tp 2 --ep 2
    torchrun --nproc-per-node 2 benchmarks/parallel_inference.py equality --device cpu --model tiny --tp 2   # gloo
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

from dsv3.config import ModelArgs
from dsv3.engine import LLM, EngineConfig, SamplingParams
from dsv3.model import Transformer
from dsv3.model.layers import RMSNorm, skip_torch_init
from dsv3.model.parallel import parallelize_for_inference
from dsv3.parallel import ParallelContext

COMM = {"all-reduce": ("allreduce", "all_reduce", "AllReduce"), "all-gather": ("allgather", "all_gather", "AllGather"),
        "all-to-all": ("alltoall", "all_to_all", "SendRecv", "AllToAll"), "broadcast": ("broadcast", "Broadcast")}


def emit(ctx: ParallelContext, **record) -> None:
    if ctx.is_driver:
        print(json.dumps({"world": ctx.world, "tp": ctx.tp, "ep": ctx.ep, **record}), flush=True)


def model_args(name: str, layers: int | None) -> ModelArgs:
    args = ModelArgs.from_preset(name)
    if layers is not None:
        args = args.replace(n_layers=layers, n_dense_layers=min(args.n_dense_layers, max(layers - 1, 0)))
    return args.replace(num_nextn_predict_layers=0)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random weights in place, the same on every rank for the same shapes: normal(0, init_std) projections
    (FP8 ones quantized from such), ones for norms, small random correction biases."""
    from dsv3.kernels.fp8 import quantize_weight
    g = torch.Generator().manual_seed(seed)
    std = model.args.init_std
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if w is None or not isinstance(w, torch.Tensor):
            continue
        if isinstance(module, RMSNorm):
            w.fill_(1.0)
        elif getattr(module, "weight_scale_inv", None) is not None:
            q, s = quantize_weight((torch.randn(w.shape, generator=g) * std).to(w.device))
            w.copy_(q)
            module.weight_scale_inv.copy_(s)
        else:
            w.copy_(torch.randn(w.shape, generator=g) * std)
        bias = getattr(module, "e_score_correction_bias", None)
        if bias is not None:
            bias.copy_(torch.randn(bias.shape, generator=g) * 0.01)
    model.rotary.reset()


def engine(model: Transformer, args: argparse.Namespace, dtype: str) -> LLM:
    return LLM(model, config=EngineConfig(device=str(model.embed_tokens.weight.device), dtype=dtype,
                                          max_num_seqs=max(args.batch + [args.prefill_batch]),
                                          max_num_batched_tokens=max(args.prefill_batch * args.prefill_len, 2048),
                                          cache_memory=args.cache_memory, fast=args.fast))


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def equality(ctx: ParallelContext, args: argparse.Namespace) -> None:
    margs = model_args(args.model, args.layers)
    torch.manual_seed(args.seed)
    with torch.device("meta"), skip_torch_init():
        whole = Transformer(margs, torch.float32)
    whole.to_empty(device=ctx.device)
    randomize_(whole, args.seed)
    tokens = torch.tensor(prompts(2, 64, margs.vocab_size, args.seed), device=ctx.device)
    for dtype, tol in ((torch.bfloat16, args.bf16_tol), (torch.float32, 1e-4)):
        ref_model = copy.deepcopy(whole).to(dtype)
        with torch.no_grad():
            ref = ref_model(tokens).float()
        split = parallelize_for_inference(copy.deepcopy(whole).to(dtype), ctx, args.exchange)
        with torch.no_grad():
            got = split(tokens).float()
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
        emit(ctx, case="logits", dtype=str(dtype).removeprefix("torch."), max_rel_diff=rel, tolerance=tol,
             ok=rel <= tol)
        if dtype == torch.float32:
            greedy = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
            few = prompts(4, 16, margs.vocab_size, args.seed + 1)
            want = [o.token_ids for o in engine(ref_model, args, "float32").generate(few, greedy, use_tqdm=False)]
            llm = engine(split, args, "float32")
            out = llm.generate(few, greedy, use_tqdm=False)
            llm.close()
            if ctx.is_driver:
                same = sum(o.token_ids == w for o, w in zip(out, want))
                emit(ctx, case="greedy", dtype="float32", sequences=len(want), identical=same, ok=same == len(want))
        del ref_model, split


def comm_per_step(ctx: ParallelContext, run, steps: int) -> dict[str, float]:
    """Milliseconds per step in each kind of collective during `run()`, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        run()
    totals = dict.fromkeys(COMM, 0.0)
    for ev in prof.key_averages():
        us = ev.device_time_total if ctx.device.type == "cuda" else ev.cpu_time_total
        for kind, marks in COMM.items():
            if any(m in ev.key for m in marks):
                totals[kind] += us
                break
    return {f"{k}_ms_per_step": round(v / 1000 / steps, 3) for k, v in totals.items()}


def scaling(ctx: ParallelContext, args: argparse.Namespace) -> None:
    margs = model_args(args.model, args.layers)
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    with torch.device("meta"), skip_torch_init():
        model = Transformer(margs, dtype)
        if args.weights == "fp8":
            from dsv3.model.fp8_linear import convert_linears_to_fp8
            convert_linears_to_fp8(model)
    parallelize_for_inference(model, ctx, args.exchange)
    model.to_empty(device=ctx.device)
    randomize_(model, args.seed)
    model.eval()
    llm = engine(model, args, str(dtype).removeprefix("torch."))
    vocab = margs.vocab_size

    def timed(batch: int, length: int, new: int, seed: int) -> float:
        sp = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
        ps = prompts(batch, length, vocab, seed)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(ps, sp, use_tqdm=False)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(2, args.prompt_len, 2, 0)  # warm-up: kernels, graphs, allocator
    seed = 1
    t = min(timed(args.prefill_batch, args.prefill_len, 1, seed + r) for r in range(args.repeats))
    seed += args.repeats
    tok_s = args.prefill_batch * args.prefill_len / t
    emit(ctx, case="prefill", model=args.model, layers=margs.n_layers, weights=args.weights, batch=args.prefill_batch,
         prompt_len=args.prefill_len, seconds=round(t, 4), tok_s=round(tok_s, 1), tok_s_per_gpu=round(tok_s / ctx.world, 1))
    for b in args.batch:
        t1 = min(timed(b, args.prompt_len, 1, seed + r) for r in range(args.repeats))
        tn = min(timed(b, args.prompt_len, args.new_tokens, seed + r) for r in range(args.repeats))
        seed += args.repeats
        tok_s = b * (args.new_tokens - 1) / max(tn - t1, 1e-9)
        record = dict(case="decode", model=args.model, layers=margs.n_layers, weights=args.weights, batch=b,
                      step_ms=round((tn - t1) / (args.new_tokens - 1) * 1000, 3), tok_s=round(tok_s, 1),
                      tok_s_per_gpu=round(tok_s / ctx.world, 1), exchange=args.exchange)
        if args.profile:
            record.update(comm_per_step(ctx, lambda: timed(b, args.prompt_len, args.new_tokens, seed), args.new_tokens))
            seed += 1
        emit(ctx, **record)
    llm.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["equality", "scaling"])
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks (default: world / --ep)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (default: 1)")
    p.add_argument("--exchange", choices=["all-to-all", "all-reduce"], default="all-to-all")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="preset (default: 671B for scaling, 16B for equality)")
    p.add_argument("--layers", type=int, default=None, help="cut the preset to this many layers")
    p.add_argument("--weights", choices=["bf16", "fp8"], default="fp8", help="scaling: Linear weights (default fp8)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill-batch", type=int, default=32)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cache-memory", type=int, default=None, help="cache bytes per rank (default: the engine's)")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--profile", action="store_true", help="scaling: time in collectives per decode step")
    p.add_argument("--bf16-tol", type=float, default=2e-2, help="equality: BF16 relative tolerance")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.model = args.model or ("671B" if args.what == "scaling" else "16B")
    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
    ctx = ParallelContext.from_env(args.tp, args.ep, args.device)
    if ctx.world == 1:
        ctx = ParallelContext.single(args.device)
    (equality if args.what == "equality" else scaling)(ctx, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
