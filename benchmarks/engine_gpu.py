"""Benchmark: the whole engine through `LLM.generate` on one GPU: the fast path (`LLM(fast=True)`: Triton
kernels for every step, CUDA graphs for decode steps), the PyTorch path (`LLM(fast=False)`) and `transformers`'
`generate`, one run, one random-weight model (default: the `16B` preset in BF16), greedy, `ignore_eos`.

Cases, for each batch size B (default 1 and 32):
- first token: B random prompts of `--prompt-len` tokens, 1 new token. At B = 32 (`--prefill-batch`) this is
  the prefill case: prompt tokens/s = B x prompt_len / time. The engine's token budget
  (`max_num_batched_tokens`, `--max-batched-tokens`) is 32 x prompt_len by default, so the whole batch is one
  prefill step (`LLM`'s own default, 2048, would make it 8 steps of 4 prompts);
- decode: the same with `--new-tokens`; decode tokens/s = B x (new - 1) / (t_new - t_first), end-to-end
  tokens/s = B x new / t_new.
Every timed call gets fresh prompts (the prefix cache never hits); the prompts of call k are the same for
every engine, so the greedy tokens are compared. Best of `--repeats`. The PyTorch path generates
`--slow-new-tokens` (it is ~17x slower), `transformers` `--peer-new-tokens`; agreement is counted over the
tokens both generated (BF16: the paths sum in different orders, so a long greedy run may drift at a near-tie
of random weights; the float32 GPU tests check exact equality).

The engines run one after the other on the same model object (PyTorch first: `fast=True` readies the model's
modules in place), then the model is freed and `transformers` builds its own (`DeepseekV3ForCausalLM`, BF16,
SDPA, same shapes, its own random weights). One JSON line per measurement, then one per case with the
ratios. Targets (issue 15, 16B BF16, fast): decode >= 310 tok/s at batch 1 and >= 3,000 at batch 32,
prefill of 32 x 512 >= 45,000 prompt tok/s.

It uses only `LLM`'s public interface, so it also measures older commits (`benchmarks/compare_commits.sh`).

    python benchmarks/engine_gpu.py                                  # 16B, batch 1 and 32, all three peers
    python benchmarks/engine_gpu.py --engines fast --no-hf           # the fast engine alone
    python benchmarks/engine_gpu.py --model tiny --device cpu --new-tokens 4   # smoke test (PyTorch path)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch

from dsv3.config import ModelArgs
from dsv3.engine import LLM, SamplingParams
from dsv3.model import Transformer
from dsv3.model.fp8_linear import convert_linears_to_fp8, set_fp8_policy

# (model, weights, case, batch) -> target (issue 15: 16B BF16; issue 16: FP8 weights)
TARGETS = {("16B", "bf16", "decode", 1): 310, ("16B", "bf16", "decode", 32): 3000,
           ("16B", "bf16", "prefill", 32): 45000,
           ("16B", "fp8", "decode", 1): 480, ("16B", "fp8", "decode", 32): 4000,
           ("671B-6L", "fp8", "decode", 1): 330, ("671B-6L", "fp8", "decode", 32): 2700}
HBM_BYTES_PER_S = 4.3e12  # measured copy rate of the H200 here (benchmarks/RESULTS.md)


def step_bytes(llm: LLM, batch: int, context: int) -> int | None:
    """Bytes one decode step must read: `decode.decode_weight_bytes`' dense weights, one stacked expert slice per
    expert that got tokens in each MoE's last call (`StackedExperts.active_experts`, fast path only), and the
    latent cache of `batch` sequences of `context` tokens. None off the fast path (no expert counts)."""
    from decode import decode_weight_bytes  # beside this script

    model = llm.model
    moes = [m.stacked for m in model.modules() if getattr(m, "stacked", None) is not None]
    if not moes or not hasattr(llm.runner.backend, "w_uk"):
        return None
    wb = decode_weight_bytes(model, llm.runner.backend)
    active = int(torch.stack([s.active_experts for s in moes]).sum())  # one sync, after the timed runs
    args = model.args
    elem = model.embed_tokens.weight.element_size()
    cache = batch * context * args.n_layers * (args.kv_lora_rank + args.qk_rope_head_dim) * elem
    return wb["dense"] + active * wb["per_expert"] + cache


def model_args(name: str) -> ModelArgs:
    """A preset, or a cut of one named in `decode.MODELS` (`671B-6L`)."""
    from decode import MODELS  # beside this script

    spec = MODELS.get(name)
    return ModelArgs.from_preset(name) if spec is None else ModelArgs.from_preset(spec["preset"]).replace(**spec["changes"])


def emit(row: dict, log) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if log is not None:
        log.write(line + "\n")
        log.flush()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cleanup() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def per_s(count: int, seconds: float) -> float | None:
    """`count / seconds`, rounded; None when the time difference is not positive (noise at tiny sizes)."""
    return round(count / seconds, 1) if seconds > 0 else None


def prompts_for(call: int, batch: int, length: int, vocab: int) -> list[list[int]]:
    """The prompts of timed call `call` (fresh for every call, equal for every engine)."""
    g = torch.Generator().manual_seed(1000 * call + batch)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


def graph_steps(llm: LLM) -> int | None:
    """Steps replayed from CUDA graphs (`runner.graph_steps`; `runner.fast_runner.num_steps` before issue 15)."""
    runner = llm.runner
    if hasattr(runner, "graph_steps"):
        return runner.graph_steps
    fast = getattr(runner, "fast_runner", None)
    return getattr(fast, "num_steps", None)


def timed_generate(llm: LLM, prompts: list[list[int]], new_tokens: int, device: torch.device
                   ) -> tuple[float, list[list[int]]]:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    sync(device)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync(device)
    return time.perf_counter() - t0, [list(o.token_ids) for o in outs]


def bench_engine(model: Transformer, name: str, opts, device: torch.device, log) -> dict:
    fast = name == "fast"
    max_b = max(opts.batch)
    new = opts.new_tokens if fast else opts.slow_new_tokens
    cache_tokens = max_b * (opts.prompt_len + max(opts.new_tokens, opts.slow_new_tokens) + 32)
    budget = opts.max_batched_tokens or max(opts.prefill_batch * opts.prompt_len, max_b, 2048)
    t0 = time.perf_counter()
    llm = LLM(model, fast=fast, max_num_seqs=max_b, num_blocks=-(-cache_tokens // 16) + 8,
              max_num_batched_tokens=budget)
    setup_s = time.perf_counter() - t0
    emit(dict(model=opts.model, engine=name, case="setup", s=round(setup_s, 2), max_num_batched_tokens=budget,
              graph_sizes=getattr(getattr(llm.runner, "graphs", None), "sizes", None)), log)
    vocab = model.args.vocab_size
    results: dict = {}
    for b in opts.batch:
        timed_generate(llm, prompts_for(0, b, opts.prompt_len, vocab), 2, device)  # warm-up: compile, allocator
        firsts = [timed_generate(llm, prompts_for(1 + r, b, opts.prompt_len, vocab), 1, device)
                  for r in range(opts.repeats)]
        steps_before = graph_steps(llm)
        runs = [timed_generate(llm, prompts_for(1 + opts.repeats + r, b, opts.prompt_len, vocab), new, device)
                for r in range(opts.repeats)]
        t1 = min(t for t, _ in firsts)
        tn = min(t for t, _ in runs)
        row = dict(model=opts.model, engine=name, case="decode", batch=b, prompt_len=opts.prompt_len,
                   new_tokens=new, first_token_s=round(t1, 4), total_s=round(tn, 4),
                   decode_tok_s=per_s(b * (new - 1), tn - t1), e2e_tok_s=per_s(b * new, tn))
        if steps_before is not None:
            row["graph_steps_per_run"] = (graph_steps(llm) - steps_before) / opts.repeats
        nbytes = step_bytes(llm, b, opts.prompt_len + new // 2) if fast else None
        if nbytes and row["decode_tok_s"]:
            row["step_gb"] = round(nbytes / 1e9, 3)
            row["hbm"] = round(nbytes * row["decode_tok_s"] / b / HBM_BYTES_PER_S, 3)
        target = TARGETS.get((opts.model, opts.weights, "decode", b))
        if fast and target:
            row.update(target=target, met=(row["decode_tok_s"] or 0) >= target)
        emit(row, log)
        results[("decode", b)] = (row["decode_tok_s"], runs[0][1])
        if b == opts.prefill_batch:
            tok_s = b * opts.prompt_len / t1
            row = dict(model=opts.model, engine=name, case="prefill", batch=b, prompt_len=opts.prompt_len,
                       new_tokens=1, s=round(t1, 4), prompt_tok_s=round(tok_s, 1))
            target = TARGETS.get((opts.model, opts.weights, "prefill", b))
            if fast and target:
                row.update(target=target, met=tok_s >= target)
            emit(row, log)
            results[("prefill", b)] = (tok_s, None)
    del llm
    cleanup()
    return results


# ---- transformers ------------------------------------------------------------------------------------
def bench_hf(args: ModelArgs, opts, device: torch.device, dtype: torch.dtype, log) -> dict:
    import transformers
    from hf_peer import build_hf  # beside this script

    t0 = time.perf_counter()
    hf = build_hf(args, device, dtype)
    sync(device)
    common = dict(model=opts.model, engine="transformers", version=transformers.__version__,
                  experts=getattr(hf.config, "_experts_implementation", None))
    emit(dict(common, case="setup", s=round(time.perf_counter() - t0, 2)), log)

    def generate(call: int, b: int, n: int) -> tuple[float, list[list[int]]]:
        ids = torch.tensor(prompts_for(call, b, opts.prompt_len, args.vocab_size), device=device)
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        sync(device)
        return time.perf_counter() - start, out[:, ids.shape[1]:].tolist()

    results: dict = {}
    n = opts.peer_new_tokens
    for b in opts.batch:
        generate(0, b, 2)
        t1 = min(generate(1 + r, b, 1)[0] for r in range(opts.repeats))
        runs = [generate(1 + opts.repeats + r, b, n) for r in range(opts.repeats)]
        tn = min(t for t, _ in runs)
        row = dict(common, case="decode", batch=b, prompt_len=opts.prompt_len, new_tokens=n,
                   first_token_s=round(t1, 4), total_s=round(tn, 4),
                   decode_tok_s=per_s(b * (n - 1), tn - t1), e2e_tok_s=per_s(b * n, tn))
        emit(row, log)
        results[("decode", b)] = (row["decode_tok_s"], runs[0][1])
        if b == opts.prefill_batch:
            tok_s = b * opts.prompt_len / t1
            emit(dict(common, case="prefill", batch=b, prompt_len=opts.prompt_len, new_tokens=1, s=round(t1, 4),
                      prompt_tok_s=round(tok_s, 1)), log)
            results[("prefill", b)] = (tok_s, None)
    del hf
    cleanup()
    return results


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of positions (over the tokens both generated) where two greedy runs chose the same token."""
    same = total = 0
    for x, y in zip(a, b):
        n = min(len(x), len(y))
        same += sum(p == q for p, q in zip(x[:n], y[:n]))
        total += n
    return round(same / max(1, total), 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="16B",
                   help="preset name, random weights; 671B-6L is the 671B preset cut to 6 layers (3 dense), no MTP "
                        "(default: 16B)")
    p.add_argument("--weights", default="bf16", choices=["bf16", "fp8"],
                   help="fp8: Linear weights quantized to 128x128-block FP8 (as the released checkpoint) for dsv3; "
                        "transformers runs BF16 (default: bf16)")
    p.add_argument("--fp8-policy", default="auto", choices=["auto", "w8a16", "w8a8"],
                   help="dsv3's FP8 activation policy (default: auto)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="weight dtype (default: bfloat16)")
    p.add_argument("--device", default="cuda", help="device (default: cuda; cpu only smoke-tests the script)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes (default: 1 32)")
    p.add_argument("--prefill-batch", type=int, default=32,
                   help="the batch whose first-token time is the prefill case (default: 32)")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (default: 512)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated by the fast path (default: 64)")
    p.add_argument("--slow-new-tokens", type=int, default=16,
                   help="tokens generated by the PyTorch path (default: 16)")
    p.add_argument("--peer-new-tokens", type=int, default=16,
                   help="tokens generated by transformers (default: 16)")
    p.add_argument("--max-batched-tokens", type=int, default=None,
                   help="the engine's token budget per step (default: prefill batch x prompt length, at least 2048)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats, best kept (default: 2)")
    p.add_argument("--engines", nargs="+", default=None, choices=["pytorch", "fast"],
                   help="engines to measure (default: pytorch fast on CUDA, pytorch on CPU)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers peer (default: measure it)")
    p.add_argument("--log", default=None, help="also append the JSON lines to this file (default: none)")
    opts = p.parse_args(argv)
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/engine_gpu.py: no CUDA device (use --device cpu for a smoke test)", file=sys.stderr)
        return 2
    if min(opts.new_tokens, opts.slow_new_tokens, opts.peer_new_tokens) < 2:
        p.error("--new-tokens, --slow-new-tokens and --peer-new-tokens must be >= 2")
    engines = opts.engines or (["pytorch", "fast"] if device.type == "cuda" else ["pytorch"])
    if "fast" in engines and device.type != "cuda":
        p.error("the fast engine needs --device cuda")
    engines = sorted(engines, key=["pytorch", "fast"].index)  # PyTorch first: fast=True changes the model
    log = open(opts.log, "a") if opts.log else None
    if device.type == "cuda":
        emit(dict(case="device", gpu=torch.cuda.get_device_name(device), torch=torch.__version__), log)
    dtype = getattr(torch, opts.dtype)
    margs = model_args(opts.model).replace(dtype=opts.dtype)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(margs).eval()
    if opts.weights == "fp8":
        convert_linears_to_fp8(model)
        set_fp8_policy(model, opts.fp8_policy)
    sync(device)
    emit(dict(model=opts.model, case="build", dtype=opts.dtype, weights=opts.weights, fp8_policy=opts.fp8_policy
              if opts.weights == "fp8" else None, s=round(time.perf_counter() - t0, 2)), log)
    results = {name: bench_engine(model, name, opts, device, log) for name in engines}
    del model
    cleanup()
    if not opts.no_hf:
        try:
            results["transformers"] = bench_hf(margs, opts, device, dtype, log)
        except Exception as e:  # report and go on to the ratios
            emit(dict(model=opts.model, engine="transformers", error=f"{type(e).__name__}: {e}"[:400]), log)
            cleanup()
    base = "fast" if "fast" in results else engines[0]
    for key, (value, tokens) in results[base].items():
        for peer, theirs in results.items():
            if peer == base or key not in theirs or value is None or not theirs[key][0]:
                continue
            row = dict(model=opts.model, case=key[0], batch=key[1], engine=base, peer=peer,
                       tok_s=round(value, 1), peer_tok_s=round(theirs[key][0], 1),
                       ratio=round(value / theirs[key][0], 2))
            if tokens is not None and theirs[key][1] is not None and peer != "transformers":  # same weights only
                row["greedy_token_agreement"] = agreement(tokens, theirs[key][1])
            emit(row, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
