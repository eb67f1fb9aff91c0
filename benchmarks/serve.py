"""Benchmark: `dsv3 serve` under load vs offline `LLM.generate`, one process serving, one loading.

The server process builds a random-weight model of a preset (vocabulary widened to DeepSeek-V3's
129280 so the real tokenizer fits), measures offline `LLM.generate` throughput at each batch size,
then serves the same engine on 127.0.0.1 (uvicorn in a thread, exactly the app `dsv3 serve`
builds) and starts one load-generator subprocess per concurrency level. Each client keeps C streamed
`/v1/completions` requests in flight (random token-id prompts, greedy, `ignore_eos`, a fixed number
of output tokens), bounded by a request count and a time limit, on loopback only.

Reported per level (one JSON line each): requests/s, output tokens/s, time to first token (first
streamed text) and time per output token ((last - first) / (tokens - 1), tokens from the final
`usage`), mean and p90, the p99 of the gaps between a stream's text chunks (inter-token latency), and
`ratio` = served output tokens/s / offline tokens/s at the same batch. With `--big-prompt-mb M`, the
highest level runs again while one more client keeps posting M-MB text prompts (the server refuses
each with a 400 without tokenizing the whole text, or tokenizes it in a worker thread); its line reports
how many it sent, their statuses, and the other streams' inter-token p99.

Before serving, the grammar overhead: mean decode-step time at batch `--grammar-batch` with every row
constrained by a grammar (llguidance, an always-open regex so every step computes a full mask) against
the same step without one (`case: grammar`).

    python benchmarks/serve.py --preset 16B --device cuda
    python benchmarks/serve.py --preset tiny --device cpu --levels 1,4 --max-tokens 8   # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
V3_VOCAB = 129280


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---- load generator (subprocess) ------------------------------------------------------------------
async def _client(url: str, concurrency: int, total: int, time_limit: float, prompt_len: int, max_tokens: int,
                  vocab: int, seed: int) -> dict:
    import httpx
    rng = random.Random(seed)
    prompts = [[rng.randrange(1000, min(vocab, 100000)) for _ in range(prompt_len)] for _ in range(total)]
    queue = list(range(total))
    ttft, tpot, tokens, gaps, errors = [], [], [], [], 0
    deadline = time.monotonic() + time_limit
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while queue and time.monotonic() < deadline:
            i = queue.pop()
            body = {"prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            t0 = time.monotonic()
            first = last = None
            n = 0
            try:
                async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        errors += 1
                        await r.aread()
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data:") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[5:])
                        now = time.monotonic()
                        if event.get("choices") and event["choices"][0].get("text"):
                            if last is not None:
                                gaps.append(now - last)
                            first = first or now
                            last = now
                        if event.get("usage"):
                            n = event["usage"]["completion_tokens"]
            except httpx.HTTPError:
                errors += 1
                continue
            if first is not None:
                ttft.append(first - t0)
                if n > 1 and last > first:
                    tpot.append((last - first) / (n - 1))
            tokens.append(n)

    start = time.monotonic()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    wall = time.monotonic() - start
    done = len(tokens)
    return dict(concurrency=concurrency, requests=done, errors=errors, wall_s=round(wall, 2),
                requests_per_s=round(done / wall, 3), output_tokens_per_s=round(sum(tokens) / wall, 1),
                ttft_mean_ms=round(1e3 * sum(ttft) / max(1, len(ttft)), 1), ttft_p90_ms=round(1e3 * _pct(ttft, 0.9), 1),
                tpot_mean_ms=round(1e3 * sum(tpot) / max(1, len(tpot)), 2), tpot_p90_ms=round(1e3 * _pct(tpot, 0.9), 2),
                itl_p99_ms=round(1e3 * _pct(gaps, 0.99), 2))


def _big_prompts(url: str, megabytes: float, stop: "threading.Event", stats: dict) -> None:
    """Post `megabytes`-MB text prompts one after another until `stop` (a thread of the server process)."""
    import httpx
    text = ("All work and no play makes Jack a dull boy. " * (int(megabytes * 2 ** 20) // 44 + 1))
    body = json.dumps({"prompt": text[: int(megabytes * 2 ** 20) - 64], "max_tokens": 4}).encode()
    with httpx.Client(timeout=120) as http:
        while not stop.is_set():
            t0 = time.monotonic()
            r = http.post(f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
            stats.setdefault("latency_s", []).append(time.monotonic() - t0)
            stats[str(r.status_code)] = stats.get(str(r.status_code), 0) + 1


# ---- server side ------------------------------------------------------------------------------------
def _build(args: argparse.Namespace):
    import torch

    from dsv3.config import ModelArgs
    from dsv3.engine.llm import LLM
    from dsv3.model import Transformer
    margs = ModelArgs.from_preset(args.preset).replace(vocab_size=V3_VOCAB, eos_token_id=1, bos_token_id=0)
    if args.device == "cpu":
        margs = margs.replace(dtype="float32")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(args.device):
        model = Transformer(margs).eval()
    build_s = time.perf_counter() - t0
    tok_dir = Path(args.tokenizer)
    if not (tok_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{tok_dir}/tokenizer.json not found (run .ci/fetch_tokenizer.sh)")
    max_c = max(args.levels)
    llm = LLM(model, tokenizer=tok_dir, cache_memory=int(args.cache_gib * (1 << 30)), max_num_seqs=max_c,
              max_num_batched_tokens=max(2048, max_c * 8), max_model_len=args.prompt_len + args.max_tokens + 8)
    return llm, margs, build_s


def _grammar_overhead(llm, batch: int, prompt_len: int, steps: int, vocab: int) -> dict:
    """Mean decode-step time at `batch` with and without a grammar on every row (same prompts)."""
    from dsv3.engine.grammar import GrammarCompiler
    from dsv3.engine.sampling import SamplingParams
    grammar = GrammarCompiler(llm.tokenizer, vocab).lark('start: /[a-zA-Z0-9 ,.]*/')
    rng = random.Random(batch)
    prompts = [[rng.randrange(1000, min(vocab, 100000)) for _ in range(prompt_len)] for _ in range(batch)]
    out = {}
    for name, g in (("plain", None), ("grammar", grammar), ("plain_again", None), ("grammar_again", grammar)):
        ids = [llm.add_request(p, SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True, grammar=g))
               for p in prompts]
        while any(not llm._requests[i].seq.output_token_ids for i in ids):  # prefill
            llm.step()
        _sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            llm.step()
        _sync()
        out[name] = (time.perf_counter() - t0) / steps
        for i in ids:
            llm.abort(i)
    plain, constrained = min(out["plain"], out["plain_again"]), min(out["grammar"], out["grammar_again"])
    return dict(case="grammar", batch=batch, steps=steps, plain_step_ms=round(1e3 * plain, 3),
                grammar_step_ms=round(1e3 * constrained, 3), overhead=round(constrained / plain - 1, 4))


def _sync() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _offline(llm, batch: int, prompt_len: int, max_tokens: int, vocab: int) -> float:
    from dsv3.engine.sampling import SamplingParams
    rng = random.Random(batch)
    prompts = [[rng.randrange(1000, min(vocab, 100000)) for _ in range(prompt_len)] for _ in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    best = 0.0
    for _ in range(2):  # the first run pays one-time costs (new shapes, graph capture): keep the best
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        best = max(best, sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0))
    return best


def main_server(args: argparse.Namespace) -> int:
    import socket
    import threading

    import uvicorn

    from dsv3.serve.app import create_app
    from dsv3.serve.guards import guarded_protocol
    llm, margs, build_s = _build(args)
    emit(dict(case="setup", preset=args.preset, device=args.device, build_s=round(build_s, 1),
              cache_blocks=llm.block_manager.num_blocks, prompt_len=args.prompt_len, max_tokens=args.max_tokens))
    _offline(llm, 2, args.prompt_len, 4, V3_VOCAB)  # warm-up
    offline = {}
    for c in args.levels:
        offline[c] = _offline(llm, c, args.prompt_len, args.max_tokens, V3_VOCAB)
        emit(dict(case="offline", batch=c, output_tokens_per_s=round(offline[c], 1)))
    if args.grammar_batch:
        emit(_grammar_overhead(llm, args.grammar_batch, args.prompt_len, args.grammar_steps, V3_VOCAB))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(llm, served_model_name=args.preset), host="127.0.0.1",
                                           port=port, log_level="warning", http=guarded_protocol(10.0)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    runs = [(c, 0.0) for c in args.levels] + ([(max(args.levels), args.big_prompt_mb)] if args.big_prompt_mb else [])
    try:
        for c, big_mb in runs:
            stop, stats, big = threading.Event(), {}, None
            if big_mb:
                big = threading.Thread(target=_big_prompts, args=(url, big_mb, stop, stats), daemon=True)
                big.start()
            total = max(args.min_requests, args.rounds * c)
            cmd = [sys.executable, __file__, "--role", "client", "--url", url, "--concurrency", str(c),
                   "--requests", str(total), "--time-limit", str(args.time_limit), "--prompt-len",
                   str(args.prompt_len), "--max-tokens", str(args.max_tokens)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.time_limit + 120)
            if big is not None:
                stop.set()
                big.join(120)
            if proc.returncode != 0:
                raise RuntimeError(f"load generator failed: {proc.stderr[-2000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            if big is not None:
                lat = stats.pop("latency_s", [])
                row.update(big_prompt_mb=big_mb, big_prompt_requests=len(lat), big_prompt_statuses=stats,
                           big_prompt_latency_mean_s=round(sum(lat) / max(1, len(lat)), 3))
            row.update(case="serve", preset=args.preset,
                       offline_tokens_per_s=round(offline[c], 1),
                       ratio=round(row["output_tokens_per_s"] / offline[c], 3) if offline[c] else None)
            emit(row)
    finally:
        server.should_exit = True
        thread.join(60)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--role", choices=["server", "client"], default="server", help="internal: which side to run")
    p.add_argument("--preset", default="16B", help="model preset (random weights)")
    p.add_argument("--device", default="cuda", help="torch device of the model")
    p.add_argument("--levels", default="1,8,64", help="comma-separated concurrency levels")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    p.add_argument("--rounds", type=int, default=3, help="requests per level = max(min-requests, rounds x C)")
    p.add_argument("--min-requests", type=int, default=8, help="fewest requests per level")
    p.add_argument("--time-limit", type=float, default=90.0, help="seconds per level, at most")
    p.add_argument("--cache-gib", type=float, default=16.0, help="KV cache memory in GiB")
    p.add_argument("--big-prompt-mb", type=float, default=4.0,
                   help="rerun the highest level beside a client posting prompts of this many MB (0: skip)")
    p.add_argument("--grammar-batch", type=int, default=32, help="batch of the grammar-overhead case (0: skip)")
    p.add_argument("--grammar-steps", type=int, default=48, help="decode steps timed per grammar case")
    p.add_argument("--tokenizer", default=str(ROOT / "data" / "deepseek-v3-tokenizer"), help="tokenizer folder")
    p.add_argument("--url", help="internal (client): server URL (loopback)")
    p.add_argument("--concurrency", type=int, default=1, help="internal (client): requests in flight")
    p.add_argument("--requests", type=int, default=8, help="internal (client): requests to send")
    args = p.parse_args(argv)
    args.levels = [int(x) for x in str(args.levels).split(",") if x]
    return args


if __name__ == "__main__":
    a = parse_args()
    if a.role == "client":
        if not a.url or not a.url.startswith("http://127.0.0.1:"):
            sys.exit("the load generator only targets http://127.0.0.1:PORT")
        emit(asyncio.run(_client(a.url, a.concurrency, a.requests, a.time_limit, a.prompt_len, a.max_tokens,
                                 V3_VOCAB, seed=a.concurrency)))
        sys.exit(0)
    sys.exit(main_server(a))
