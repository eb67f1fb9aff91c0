"""Benchmark: MTP speculative decoding inside the engine (`LLM(speculative="mtp")`), one GPU, one run.

Part 1, the shipped default model (`dsv3.default_model_path()`, a trained MTP module), through `LLM.generate` on
realistic prompts: windows of `--prompt-len` tokens from the documents of the validation split (`--val`, the
`val.jsonl` that `dsv3 data prepare` writes), greedy, `ignore_eos`, `--new-tokens` each. For each batch size
(1, 8, 32) the engine without speculation (the peer, same settings, same run) and with `num_draft_tokens` k for
each `--drafts`: decode tokens/s = output tokens after each request's first / time from the moment every
request has its first token to the end (best of `--repeats`), the ratio to the peer, acceptance per draft
position, and how many requests' greedy tokens equal the peer's.

Part 2, the `16B` preset with random weights (no meaningful acceptance; MTP module added with
`num_nextn_predict_layers=1`): the cost of one captured verify step of `1 + k` rows per sequence against a
one-token decode step at batch 1, 8, 32 (CUDA graphs of the engine's runner, contexts of `--context` tokens,
CUDA-event timing, median of `--iters`), and of the MTP draft work of a step (catch-up over `1 + k` rows plus
`k - 1` chained one-row steps). From them, the speed-up the engine would give at the report's 85% and 90%
acceptance, COMPUTED, NOT OBSERVED: tokens per step `1 + a + a^2 + ... + a^k` (each position accepted with
probability a given the one before) over the step's cost relative to a one-token step.

One JSON line per measurement; `"summary"` lines with the ratios.

The validation file is git-ignored data: on a machine without network, bring it along (`dsv3 data prepare
--output data/corpus --sources python-docs austen` here, then carry `data/corpus`).

    python benchmarks/speculative.py --val data/corpus/val.jsonl                 # both parts, on CUDA
    python benchmarks/speculative.py --val data/corpus/val.jsonl --part shipped --device cpu --batches 1 --new-tokens 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import dsv3
from dsv3.config import ModelArgs
from dsv3.engine import LLM, SamplingParams
from dsv3.model import Transformer


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def val_prompts(path: Path, tokenizer, n: int, length: int) -> list[list[int]]:
    """`n` prompts of `length` tokens: consecutive windows of the validation documents (BOS first)."""
    prompts: list[list[int]] = []
    bos = tokenizer.bos_id if getattr(tokenizer, "bos_id", None) is not None else 0
    for line in path.read_text(encoding="utf-8").splitlines():
        ids = tokenizer.encode(json.loads(line)["text"])
        for i in range(0, len(ids) - length, 4 * length):  # windows spread over the document
            prompts.append([bos] + ids[i:i + length - 1])
            if len(prompts) == n:
                return prompts
    if len(prompts) < n:
        raise SystemExit(f"{path}: only {len(prompts)} windows of {length} tokens, need {n}")
    return prompts


def timed_generate(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float, int]:
    """Greedy outputs, decode seconds (from every request's first token to the end), decode tokens."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    ids = [llm.add_request(p, params) for p in prompts]
    outputs: dict[int, list[int]] = {}
    started = set()
    t_first = None
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    while llm.has_unfinished():
        for out in llm.step():
            if out.token_ids:
                started.add(out.request_id)
            if out.finished:
                outputs[out.request_id] = out.token_ids
        if t_first is None and len(started) == len(ids):
            sync()
            t_first = time.perf_counter()
    sync()
    seconds = time.perf_counter() - t_first
    tokens = [outputs[i] for i in ids]
    return tokens, seconds, sum(len(t) - 1 for t in tokens)


def shipped(args: argparse.Namespace) -> None:
    from dsv3.tokenizer import load_tokenizer
    path = dsv3.default_model_path()
    dtype = getattr(torch, args.dtype)
    tok = load_tokenizer(path)
    prompts = val_prompts(Path(args.val), tok, max(args.batches), args.prompt_len)
    engines = {0: None}
    engines.update({k: None for k in args.drafts})
    results: dict[tuple[int, int], dict] = {}
    for k in engines:
        model = dsv3.load_model(path, device=args.device, dtype=dtype, progress=False)
        spec = dict(speculative="mtp", num_draft_tokens=k) if k else {}
        llm = LLM(model, max_num_seqs=max(args.batches), max_num_batched_tokens=4096, **spec)
        timed_generate(llm, prompts[:2], 8)  # warm-up
        for batch in args.batches:
            best = None
            for _ in range(args.repeats):
                before = llm.speculative_stats
                tokens, seconds, n = timed_generate(llm, prompts[:batch], args.new_tokens)
                after = llm.speculative_stats
                if best is None or seconds < best[1]:
                    best = (tokens, seconds, n, before, after)
            tokens, seconds, n, before, after = best
            record = {"part": "shipped", "device": args.device, "dtype": args.dtype, "batch": batch,
                      "num_draft_tokens": k, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                      "decode_tok_s": n / seconds, "decode_s": seconds, "fast": llm.runner.backend.kernels,
                      "graph_steps": llm.runner.graph_steps}
            if k:
                drafted = [a - b for a, b in zip(after.drafted, before.drafted)]
                accepted = [a - b for a, b in zip(after.accepted, before.accepted)]
                record["acceptance_per_position"] = [a / d if d else 0.0 for a, d in zip(accepted, drafted)]
                record["drafts_kept_per_step"] = sum(accepted) / max(drafted[0], 1)
            results[(k, batch)] = {"tokens": tokens, **record}
            emit(**record)
        del llm, model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    for k in args.drafts:
        for batch in args.batches:
            plain, spec = results[(0, batch)], results[(k, batch)]
            equal = sum(a == b for a, b in zip(plain["tokens"], spec["tokens"]))
            emit(summary=True, part="shipped", batch=batch, num_draft_tokens=k,
                 speedup=spec["decode_tok_s"] / plain["decode_tok_s"], plain_tok_s=plain["decode_tok_s"],
                 spec_tok_s=spec["decode_tok_s"], acceptance_per_position=spec["acceptance_per_position"],
                 requests_equal_to_plain=f"{equal}/{batch}")


def _event_time(fn, iters: int) -> float:
    """Median milliseconds of `fn()` over `iters` runs, CUDA events."""
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def verify_cost(args: argparse.Namespace) -> None:
    from dsv3.engine.cuda_graphs import DecodeGraphs
    from dsv3.engine.model_runner import ModelRunner
    torch.manual_seed(0)
    margs = ModelArgs.from_preset(args.preset).replace(num_nextn_predict_layers=1)
    with torch.device("cuda"):
        model = Transformer(margs, dtype=torch.bfloat16).eval()
    kmax = max(args.drafts)
    block = 64
    per_seq = -(-(args.context + 2 * kmax + 1) // block)
    batches = args.batches
    runner = ModelRunner(model, block_size=block, num_blocks=max(batches) * per_seq + 1, fast=True,
                         max_num_seqs=max(batches), cuda_graphs=False, num_draft_tokens=kmax)
    rows = sorted({b * (1 + k) for b in batches for k in [0, *args.drafts]})
    main = DecodeGraphs(model, runner.backend, max_blocks=per_seq, batch_sizes=rows)
    mtp = DecodeGraphs(model, runner.backend, max_blocks=per_seq, batch_sizes=rows, mtp=0)
    main.capture()
    mtp.capture()
    dev = torch.device("cuda")
    hidden = torch.randn(max(rows), margs.dim, device=dev, dtype=torch.bfloat16)

    def inputs(batch: int, k: int) -> tuple[torch.Tensor, ...]:
        """`batch` sequences of `context` tokens, each bringing 1 + k rows at positions context .. context + k."""
        n = batch * (1 + k)
        seq = torch.arange(batch, device=dev).repeat_interleave(1 + k)
        pos = args.context + torch.arange(1 + k, device=dev).repeat(batch)
        tables = (seq[:, None] * per_seq + torch.arange(per_seq, device=dev)).to(torch.int32)  # [n, per_seq]
        slots = tables.gather(1, (pos // block)[:, None])[:, 0].long() * block + pos % block
        tokens = torch.randint(0, margs.vocab_size, (n,), device=dev)
        return tokens, pos, slots, tables, (pos + 1).to(torch.int32)

    for batch in batches:
        x0 = inputs(batch, 0)
        one = _event_time(lambda: main.run(*x0), args.iters)
        emit(part="16B", preset=args.preset, batch=batch, rows=batch, context=args.context, step="decode", ms=one)
        for k in args.drafts:
            x = inputs(batch, k)
            verify = _event_time(lambda: main.run(*x), args.iters)
            catch_up = _event_time(lambda: mtp.run(*x, h_prev=hidden[: batch * (1 + k)]), args.iters)
            chain = _event_time(lambda: mtp.run(*x0, h_prev=hidden[:batch]), args.iters) * (k - 1) if k > 1 else 0.0
            draft = catch_up + chain
            emit(part="16B", preset=args.preset, batch=batch, rows=batch * (1 + k), context=args.context,
                 step="verify", num_draft_tokens=k, ms=verify, mtp_draft_ms=draft)
            out = {"summary": True, "part": "16B", "batch": batch, "num_draft_tokens": k,
                   "verify_over_decode": verify / one, "verify_plus_draft_over_decode": (verify + draft) / one,
                   "note": "speed-ups computed from measured step costs, not observed"}
            for a in (0.85, 0.90):
                tokens = sum(a ** i for i in range(k + 1))
                out[f"computed_speedup_at_{int(a * 100)}"] = tokens / ((verify + draft) / one)
            emit(**out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["shipped", "16B", "both"], default="both")
    p.add_argument("--val", default="data/corpus/val.jsonl", help="validation split JSONL (dsv3 data prepare)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--drafts", type=int, nargs="+", default=[1, 2], help="num_draft_tokens values (default 1 2)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--preset", default="16B")
    p.add_argument("--context", type=int, default=512, help="16B part: tokens already in each sequence's cache")
    p.add_argument("--iters", type=int, default=30)
    args = p.parse_args()
    if args.part in ("shipped", "both"):
        shipped(args)
    if args.part in ("16B", "both"):
        verify_cost(args)


if __name__ == "__main__":
    main()
