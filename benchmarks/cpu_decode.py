"""Benchmark: CPU greedy decoding, `dsv3.LLM.generate` vs `transformers`' `generate`, one run, one checkpoint.

A random DeepSeek-V3 checkpoint (small MoE shape, see `--dim` etc.) is written by `transformers`'
`save_pretrained`; both peers load that folder in the same process and dtype. For each batch size, each
repeat runs both peers (alternating, so machine load hits them alike) twice: with 1 new token (prefill +
first token) and with `--new-tokens`; the decode time is the difference, so decode tokens/s =
batch * (new_tokens - 1) / (t_full - t_first). The same difference in CPU time of the process
(`decode_cpu_ms_per_step`) is steadier on a shared machine (with one thread it leaves out time spent
waiting for a core). Greedy outputs of the two peers must be equal token for token (asserted, every
run). Prints one JSON line per (batch, implementation) with medians over `--repeats` and the ratios to
transformers (> 1: dsv3 faster).

`--dtype bfloat16` stops at that check on the default checkpoint: bfloat16 rounding alone changes its greedy
tokens (transformers in bfloat16 already differs from transformers in float32 at the first generated token for
3 of 4 prompts tried), so two bfloat16 implementations do not agree token for token there.

    python benchmarks/cpu_decode.py                       # batch 1 and 8, 1 thread
    python benchmarks/cpu_decode.py --threads 2 --batch 1 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both peers (default 1)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sequence (default 32)")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per sequence (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per case, median reported (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per case and peer (default 1)")
    p.add_argument("--dim", type=int, default=512, help="hidden size (default 512)")
    p.add_argument("--layers", type=int, default=6, help="decoder layers, the first one dense (default 6)")
    p.add_argument("--experts", type=int, default=16, help="routed experts (default 16)")
    p.add_argument("--topk", type=int, default=4, help="experts per token (default 4)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size (default 4096)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights (default float32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and prompts (default 0)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="folder to write the checkpoint to (default: a temporary folder)")
    args = p.parse_args(argv)
    checks = [("threads", args.threads >= 1, ">= 1"), ("prompt-len", args.prompt_len >= 1, ">= 1"),
              ("new-tokens", args.new_tokens >= 2, ">= 2"), ("repeats", args.repeats >= 1, ">= 1"),
              ("warmup", args.warmup >= 1, ">= 1"), ("dim", args.dim >= 64 and args.dim % 64 == 0,
                                                     "a multiple of 64"),
              ("layers", args.layers >= 2, ">= 2 (the first is dense)"),
              ("experts", args.experts >= 8 and args.experts % 4 == 0, "a multiple of 4, >= 8 (4 groups)"),
              ("topk", 1 <= args.topk <= args.experts // 2, f"in [1, experts / 2 = {args.experts // 2}]"),
              ("vocab", args.vocab >= 16, ">= 16"), ("batch", min(args.batch) >= 1, ">= 1")]
    for name, ok, allowed in checks:
        if not ok:
            p.error(f"--{name} must be {allowed}, got {getattr(args, name.replace('-', '_'))}")
    return args


def hf_config(args: argparse.Namespace):
    from transformers import DeepseekV3Config
    heads = max(1, args.dim // 64)
    return DeepseekV3Config(
        vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=2 * args.dim,
        moe_intermediate_size=args.dim // 2, num_hidden_layers=args.layers, first_k_dense_replace=1,
        num_attention_heads=heads, num_key_value_heads=heads, q_lora_rank=args.dim // 2,
        kv_lora_rank=args.dim // 4, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=args.experts, n_shared_experts=1, num_experts_per_tok=args.topk, n_group=4, topk_group=2,
        norm_topk_prob=True, routed_scaling_factor=2.5, max_position_embeddings=4096,
        num_nextn_predict_layers=0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 1024, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
    )


@torch.no_grad()
def write_checkpoint(args: argparse.Namespace, folder: Path) -> None:
    """A random checkpoint: projections N(0, 1/in_dim)-ish, norms near 1, non-zero correction biases."""
    from transformers import DeepseekV3ForCausalLM
    torch.manual_seed(args.seed)
    model = DeepseekV3ForCausalLM(hf_config(args)).float().eval()
    g = torch.Generator().manual_seed(args.seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * (1.5 / p.shape[-1] ** 0.5))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    model.save_pretrained(folder)


def timed(fn: Callable[[], list[list[int]]]) -> tuple[float, float, list[list[int]]]:
    """(wall seconds, CPU seconds of this process, result)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - start, time.process_time() - cpu, out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    import dsv3
    from dsv3.engine import SamplingParams

    hf_logging.set_verbosity_error()
    dtype = getattr(torch, args.dtype)
    tmp = None
    folder = args.checkpoint
    if folder is None:
        tmp = tempfile.TemporaryDirectory()
        folder = Path(tmp.name)
    write_checkpoint(args, folder)

    hf = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    max_len = args.prompt_len + args.new_tokens
    llm = dsv3.LLM(folder, device="cpu", dtype=dtype, num_blocks=max(args.batch) * ((max_len + 15) // 16) + 8)
    g = torch.Generator().manual_seed(args.seed + 1)
    env = dict(torch=torch.__version__, transformers=transformers.__version__, threads=args.threads,
               dtype=args.dtype, cpus=os.cpu_count(),
               hf_experts_impl=getattr(hf.config, "_experts_implementation", None),
               hf_attn_impl=getattr(hf.config, "_attn_implementation", None))

    for batch in args.batch:
        prompts = torch.randint(3, args.vocab, (batch, args.prompt_len), generator=g)

        def run_hf(n: int) -> list[list[int]]:
            with torch.inference_mode():
                out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                                  do_sample=False)  # no EOS: always n tokens
            return out[:, args.prompt_len:].tolist()

        def run_dsv3(n: int) -> list[list[int]]:
            params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
            return [o.token_ids for o in llm.generate(prompts.tolist(), params, use_tqdm=False)]

        peers = {"transformers": run_hf, "dsv3": run_dsv3}
        outputs = {}
        for name, fn in peers.items():
            for _ in range(args.warmup):
                outputs[name] = fn(args.new_tokens)
                fn(1)
        if outputs["dsv3"] != outputs["transformers"]:
            where = [next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
                     for ours, theirs in zip(outputs["dsv3"], outputs["transformers"])]
            print(json.dumps({"error": "greedy outputs differ", "batch": batch, "dtype": args.dtype,
                              "first_differing_token": where}), flush=True)
            return 1
        first: dict[str, list[float]] = {k: [] for k in peers}
        full: dict[str, list[float]] = {k: [] for k in peers}
        decode_cpu: dict[str, list[float]] = {k: [] for k in peers}
        for r in tqdm(range(args.repeats), desc=f"batch {batch}", unit="repeat", leave=False):
            order = list(peers.items()) if r % 2 == 0 else list(reversed(peers.items()))
            for name, fn in order:
                t1, c1, _ = timed(lambda: fn(1))
                t, c, out = timed(lambda: fn(args.new_tokens))
                first[name].append(t1)
                full[name].append(t)
                decode_cpu[name].append(c - c1)
                if out != outputs["transformers"]:
                    print(json.dumps({"error": "greedy outputs changed between runs", "impl": name}), flush=True)
                    return 1
        rows = {}
        for name in peers:
            decode = [b - a for a, b in zip(first[name], full[name])]
            rows[name] = dict(
                e2e_s=statistics.median(full[name]),
                prefill_s=statistics.median(first[name]),
                decode_ms_per_step=1e3 * statistics.median(decode) / (args.new_tokens - 1),
                decode_tok_s=batch * (args.new_tokens - 1) / statistics.median(decode),
                decode_cpu_ms_per_step=1e3 * statistics.median(decode_cpu[name]) / (args.new_tokens - 1),
                e2e_tok_s=batch * args.new_tokens / statistics.median(full[name]),
            )
        for name, row in rows.items():
            ref = rows["transformers"]
            print(json.dumps(dict(
                case="cpu_decode", impl=name, batch=batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                dim=args.dim, layers=args.layers, experts=args.experts, topk=args.topk, vocab=args.vocab,
                repeats=args.repeats, **{k: round(v, 4) for k, v in row.items()},
                decode_ratio_vs_transformers=round(row["decode_tok_s"] / ref["decode_tok_s"], 3),
                decode_cpu_ratio_vs_transformers=round(ref["decode_cpu_ms_per_step"] / row["decode_cpu_ms_per_step"], 3),
                e2e_ratio_vs_transformers=round(row["e2e_tok_s"] / ref["e2e_tok_s"], 3),
                outputs_equal=True, load_1min=round(os.getloadavg()[0], 2), **env)), flush=True)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
