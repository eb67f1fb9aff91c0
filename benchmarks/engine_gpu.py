"""Benchmark: the whole engine on one GPU, `LLM(fast=False)` (PyTorch path) vs `LLM(fast=True)` (fused kernels
and CUDA graphs for decode steps), one run, one random-weight model, greedy.

For each batch size B: B random prompts of `--prompt-len` tokens, generated twice per peer, with 1 new token
(prefill + first token) and with `--new-tokens`; decode tokens/s = B * (new_tokens - 1) / (t_full - t_first),
end-to-end tokens/s = B * new_tokens / t_full. Both peers run the same model object (the PyTorch path first:
`fast=True` rewrites the model's modules in place) and the same prompts; the fraction of generated tokens on
which the two agree is reported (BF16: the fused kernels sum in a different order, so a long greedy run may
drift at a near-tie; the fp32 tests check exact equality).

    python benchmarks/engine_gpu.py                          # 16B preset, batch 1 and 32
    python benchmarks/engine_gpu.py --model tiny --batch 1 4  # small smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from dsv3.config import ModelArgs
from dsv3.engine import LLM, SamplingParams
from dsv3.model import Transformer


def run_engine(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, [o.token_ids for o in outs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="16B", help="preset name (default 16B), run in bfloat16 with random weights")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes (default 1 32)")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per sequence (default 64)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats, best kept (default 2)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("engine_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    margs = ModelArgs.from_preset(args.model).replace(dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(margs).eval()
    gen = torch.Generator().manual_seed(1)
    max_b = max(args.batch)
    all_prompts = torch.randint(0, margs.vocab_size, (max_b, args.prompt_len), generator=gen).tolist()
    cache_tokens = max_b * (args.prompt_len + args.new_tokens + 32)
    results: dict = {}
    for fast in (False, True):
        llm = LLM(model, fast=fast, max_num_seqs=max_b, num_blocks=-(-cache_tokens // 16) + 8,
                  max_num_batched_tokens=max(2048, args.prompt_len))
        name = "fast" if fast else "pytorch"
        for b in args.batch:
            prompts = all_prompts[:b]
            run_engine(llm, prompts, 2)  # warm-up (autotune, allocator)
            t1 = min(run_engine(llm, prompts, 1)[0] for _ in range(args.repeats))
            runs = [run_engine(llm, prompts, args.new_tokens) for _ in range(args.repeats)]
            tn = min(t for t, _ in runs)
            row = {"model": args.model, "engine": name, "batch": b, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, "first_token_s": round(t1, 4), "total_s": round(tn, 4),
                   "decode_tok_s": round(b * (args.new_tokens - 1) / max(tn - t1, 1e-9), 1),
                   "e2e_tok_s": round(b * args.new_tokens / tn, 1)}
            if fast:
                row["fast_steps"] = llm.runner.fast_runner.num_steps
            results[(name, b)] = (row, runs[0][1])
            print(json.dumps(row), flush=True)
        del llm
        torch.cuda.empty_cache()
    for b in args.batch:
        (slow, slow_tok), (fast, fast_tok) = results[("pytorch", b)], results[("fast", b)]
        same = sum(x == y for s, f in zip(slow_tok, fast_tok) for x, y in zip(s, f))
        total = sum(len(s) for s in slow_tok)
        print(json.dumps({"model": args.model, "batch": b, "decode_speedup": round(
            fast["decode_tok_s"] / slow["decode_tok_s"], 2), "e2e_speedup": round(
            fast["e2e_tok_s"] / slow["e2e_tok_s"], 2), "greedy_token_agreement": round(same / max(1, total), 4)}),
            flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
