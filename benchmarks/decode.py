"""Benchmark: prefill and decode tokens/s of the dsv3 GPU fast path vs `transformers`, one run, one GPU.

Models (random weights): the `16B` preset in BF16 and the `671B` preset cut to 6 layers (3 dense + 3
MoE, full width) with FP8 weights (128x128 block scales, weight-only). The peer is `transformers`'
`DeepseekV3ForCausalLM` with the same shapes in BF16 (its FP8 path needs a quantized checkpoint), SDPA
attention and its default experts implementation, measured in the same process.

Cases: prefill `1x512` and `32x512` (last-token logits, latents written to the cache; `1x512` also
replayed from a CUDA graph, `PrefillGraphs`), decode at batch
1, 32, 128 with a 512-token context (dsv3: one CUDA graph per batch size over the paged cache, greedy
tokens fed back on the device; transformers: its cache filled by a 512-token prefill of one sequence,
repeated over the batch). One JSON line per measurement, then one per (model, case) with the ratio.
`hbm_frac` = bytes a step must read (weights: dense part + each expert that got tokens, counted on
the device; plus the latent cache) / 4.3 TB/s / step time; `mfu` = 2 x active params x tokens /
790 TFLOP/s / time for prefill.

    python benchmarks/decode.py                       # both models, with the peer
    python benchmarks/decode.py --models 16B --no-peer --profile prof.txt
    python benchmarks/decode.py --models tiny --device cpu   # smoke test of the script itself
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch

from dsv3.config import ModelArgs
from dsv3.model import Transformer
from dsv3.model.fast import FastDecoder, FusedMoE, decode_weight_bytes, prepare_fast, slots_for

HBM_BPS = 4.3e12
BF16_FLOPS = 790e12
PROMPT = 512
TARGETS = {("16B", "decode", 1): 300, ("16B", "decode", 32): 2500, ("16B", "prefill", 1): 20000}
MODELS = {
    "16B": dict(preset="16B", fp8=False, changes={}),
    "671B-6L": dict(preset="671B", fp8=True, changes=dict(n_layers=6, n_dense_layers=3, num_nextn_predict_layers=0)),
    "tiny": dict(preset="tiny", fp8=False, changes=dict(dtype="bfloat16")),
}


def emit(row: dict, log) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if log is not None:
        log.write(line + "\n")
        log.flush()


class Timer:
    """Wall time of a device region: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn, iters: int) -> float:
        """Median milliseconds of `iters` calls of `fn` (after the caller's warm-up)."""
        times = []
        for _ in range(iters):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]


def model_args(name: str, vocab: int | None = None) -> tuple[ModelArgs, bool]:
    spec = MODELS[name]
    args = ModelArgs.from_preset(spec["preset"]).replace(**spec["changes"])
    if args.dtype == "float32":
        args = args.replace(dtype="bfloat16")
    return args, spec["fp8"]


def cleanup() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- dsv3 ------------------------------------------------------------------------------------------
def bench_dsv3(name: str, device: torch.device, batches: list[int], steps: int, prefill_batches: list[int],
               profile: str | None, log) -> dict:
    args, fp8 = model_args(name)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(args).eval()
    prepare_fast(model, fp8=fp8)
    cleanup()
    build_s = time.perf_counter() - t0
    wb = decode_weight_bytes(model)
    elem = model.embed_tokens.weight.element_size()
    latent = args.kv_lora_rank + args.qk_rope_head_dim
    block = 16
    max_ctx = PROMPT + steps + 8
    blocks_per_seq = -(-max_ctx // block)
    max_b = max(batches + prefill_batches)
    cache = torch.randn(args.n_layers, max_b * blocks_per_seq + 1, block, latent, device=device,
                        dtype=model.embed_tokens.weight.dtype)
    perm = torch.randperm(max_b * blocks_per_seq, device=device).int()
    tables = perm.view(max_b, blocks_per_seq)  # [max_b, blocks_per_seq]
    dec = FastDecoder(model, cache)
    timer = Timer(device)
    results: dict = {}
    common = dict(model=name, impl="dsv3", weights="fp8" if fp8 else "bf16", build_s=round(build_s, 1))
    n_moe = sum(isinstance(layer.mlp, FusedMoE) for layer in model.layers)
    active_params = (wb["dense"] + wb["per_expert"] * n_moe * (args.n_activated_experts + args.n_shared_experts)) / (
        1.0 if fp8 else elem)
    all_weight_bytes = wb["dense"] + wb["per_expert"] * n_moe * (args.n_routed_experts + args.n_shared_experts)

    # prefill
    for b in prefill_batches:
        tokens = torch.randint(0, args.vocab_size, (b, PROMPT), device=device)
        fn = lambda: dec.prefill(tokens, 0, tables[:b])  # noqa: E731
        fn()
        ms = timer(fn, 3 if b == 1 else 2)
        tok_s = b * PROMPT / ms * 1e3
        row = dict(common, case="prefill", batch=b, seq=PROMPT, ms=round(ms, 3), tokens_per_s=round(tok_s, 1),
                   graphs=False, hbm_frac=round(all_weight_bytes / HBM_BPS / (ms / 1e3), 3),
                   mfu=round(2 * active_params * b * PROMPT / BF16_FLOPS / (ms / 1e3), 3))
        target = TARGETS.get((name, "prefill", b))
        if target:
            row.update(target=target, met=tok_s >= target)
        emit(row, log)
        results[("prefill", b)] = tok_s
        if b == 1 and device.type == "cuda":  # the same prefill replayed from a CUDA graph
            from dsv3.engine.cuda_graphs import PrefillGraphs
            pg = PrefillGraphs(dec, max_blocks=blocks_per_seq, lengths=[PROMPT])
            pg.capture()
            fn = lambda: pg.run(tokens[0], tables[0])  # noqa: E731
            fn()
            ms = timer(fn, 5)
            tok_s = PROMPT / ms * 1e3
            row = dict(row, ms=round(ms, 3), tokens_per_s=round(tok_s, 1), graphs=True,
                       hbm_frac=round(all_weight_bytes / HBM_BPS / (ms / 1e3), 3),
                       mfu=round(2 * active_params * PROMPT / BF16_FLOPS / (ms / 1e3), 3))
            if target:
                row.update(met=tok_s >= target)
            emit(row, log)
            results[("prefill_graph", b)] = tok_s
            del pg, fn
            cleanup()

    # decode: graphs per batch size
    use_graphs = device.type == "cuda"
    runner = None
    if use_graphs:
        from dsv3.engine.cuda_graphs import DecodeGraphs
        runner = DecodeGraphs(dec, max_blocks=blocks_per_seq, batch_sizes=batches)
        t0 = time.perf_counter()
        runner.capture()
        emit(dict(common, case="graph_capture", batches=batches, s=round(time.perf_counter() - t0, 2)), log)
    moes = [m for m in model.modules() if isinstance(m, FusedMoE)]
    for b in batches:
        bt = tables[:b]
        tok = torch.randint(0, args.vocab_size, (b,), device=device)
        state = {"tok": tok, "i": 0}

        def step(graphs: bool = True) -> None:
            pos = torch.full((b,), PROMPT + state["i"] % steps, device=device, dtype=torch.long)
            slots = slots_for(bt, pos, block)
            lens = (pos + 1).int()
            if graphs and runner is not None:
                _, nxt = runner.run(state["tok"], pos, slots, bt, lens)
            else:
                nxt = dec.decode(state["tok"], pos, slots, bt, lens).argmax(-1)
            state["tok"] = nxt
            state["i"] += 1

        for _ in range(3):
            step()
        ms_total = timer(lambda: [step() for _ in range(steps)], 3)
        ms = ms_total / steps
        active = sum(int(m.active_experts.item()) for m in moes)
        ctx = PROMPT + steps // 2
        nbytes = wb["dense"] + active * wb["per_expert"] + b * ctx * args.n_layers * latent * elem
        tok_s = b / ms * 1e3
        row = dict(common, case="decode", batch=b, context=PROMPT, ms_per_step=round(ms, 3),
                   tokens_per_s=round(tok_s, 1), graphs=use_graphs, active_experts_per_moe_layer=round(
                       active / max(1, len(moes)), 1), bytes_per_step=nbytes,
                   hbm_frac=round(nbytes / HBM_BPS / (ms / 1e3), 3))
        target = TARGETS.get((name, "decode", b))
        if target:
            row.update(target=target, met=tok_s >= target)
        emit(row, log)
        results[("decode", b)] = tok_s
        if b == batches[0] and use_graphs:  # eager step for comparison: what the graphs save
            step(False)
            ms_e = timer(lambda: step(False), 5)
            emit(dict(common, case="decode_eager", batch=b, ms_per_step=round(ms_e, 3)), log)

    if profile and device.type == "cuda" and name == "16B":  # where the time goes for the targeted model
        write_profile(name, dec, runner, tables, args, block, [b for b in batches if b <= 32], profile, log)
    del runner, dec, cache, model
    cleanup()
    return results


def write_profile(name, dec, runner, tables, args, block, batches, path, log) -> None:
    """Per-kernel CUDA time of graph replays (and of eager steps), top kernels per step -> file + JSON."""
    from torch.profiler import ProfilerActivity, profile

    device = tables.device
    with open(path, "a") as f:
        tokens = torch.randint(0, args.vocab_size, (1, PROMPT), device=device)
        dec.prefill(tokens, 0, tables[:1])
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            dec.prefill(tokens, 0, tables[:1])
            torch.cuda.synchronize()
        events = sorted((e for e in prof.key_averages() if e.device_time_total > 0),
                        key=lambda e: e.device_time_total, reverse=True)
        f.write(f"== {name} prefill 1x{PROMPT} ==\n" + prof.key_averages().table(sort_by="device_time_total", row_limit=25) + "\n")
        emit(dict(model=name, case="profile", mode="prefill", batch=1, kernel_us=round(sum(e.device_time_total for e in events), 1),
                  top_kernels_us_calls=[(e.key[:80], round(e.device_time_total, 1), e.count) for e in events[:12]]), log)
        for b in batches:
            bt = tables[:b]
            tok = torch.randint(0, args.vocab_size, (b,), device=device)
            pos = torch.full((b,), PROMPT, device=device, dtype=torch.long)
            slots = slots_for(bt, pos, block)
            lens = (pos + 1).int()
            for mode in ("graph", "eager"):
                n = 5
                fn = ((lambda: runner.run(tok, pos, slots, bt, lens)) if mode == "graph" and runner is not None
                      else (lambda: dec.decode(tok, pos, slots, bt, lens)))
                fn()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(n):
                        fn()
                    torch.cuda.synchronize()
                events = [e for e in prof.key_averages() if e.device_time_total > 0]
                events.sort(key=lambda e: e.device_time_total, reverse=True)
                total = sum(e.device_time_total for e in events) / n
                f.write(f"== {name} decode batch {b} ({mode}): {total:.1f} us kernel time per step ==\n")
                f.write(prof.key_averages().table(sort_by="device_time_total", row_limit=25) + "\n")
                top = [(e.key[:80], round(e.device_time_total / n, 1), e.count // n) for e in events[:12]]
                emit(dict(model=name, case="profile", mode=mode, batch=b, kernel_us_per_step=round(total, 1),
                          top_kernels_us_calls=top), log)


# ---- transformers ------------------------------------------------------------------------------------
def hf_config(args: ModelArgs):
    from transformers import DeepseekV3Config

    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.yarn:
        rope = {"rope_type": "yarn", "rope_theta": args.rope_theta, "factor": args.rope_factor,
                "original_max_position_embeddings": args.original_seq_len, "beta_fast": args.beta_fast,
                "beta_slow": args.beta_slow, "mscale": args.mscale, "mscale_all_dim": args.mscale_all_dim}
    return DeepseekV3Config(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.inter_dim,
        moe_intermediate_size=args.moe_inter_dim, num_hidden_layers=args.n_layers,
        first_k_dense_replace=args.n_dense_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_heads,
        q_lora_rank=args.q_lora_rank or None, kv_lora_rank=args.kv_lora_rank, qk_nope_head_dim=args.qk_nope_head_dim,
        qk_rope_head_dim=args.qk_rope_head_dim, v_head_dim=args.v_head_dim, n_routed_experts=args.n_routed_experts,
        n_shared_experts=args.n_shared_experts, num_experts_per_tok=args.n_activated_experts,
        n_group=args.n_expert_groups, topk_group=args.n_limited_groups, norm_topk_prob=args.norm_topk_prob,
        routed_scaling_factor=args.route_scale, max_position_embeddings=args.max_seq_len,
        num_nextn_predict_layers=0, rms_norm_eps=args.rms_norm_eps, rope_parameters=rope,
        rope_interleave=args.rope_interleave, tie_word_embeddings=False, attn_implementation="sdpa",
    )


def _hf_cache_for_batch(hf, prompt: torch.Tensor, b: int):
    """Prefill one sequence, then repeat its cache entries over the batch (same context per row); if this
    `transformers` keeps its cache otherwise, prefill the whole batch."""
    cache = hf(input_ids=prompt, use_cache=True, logits_to_keep=1).past_key_values
    try:
        for layer in cache.layers:
            layer.keys = layer.keys.repeat(b, *([1] * (layer.keys.dim() - 1)))
            layer.values = layer.values.repeat(b, *([1] * (layer.values.dim() - 1)))
        return cache
    except AttributeError:
        return hf(input_ids=prompt.expand(b, -1), use_cache=True, logits_to_keep=1).past_key_values


def bench_hf(name: str, device: torch.device, batches: list[int], steps: int, prefill_batches: list[int],
             log) -> dict:
    import transformers
    from transformers import DeepseekV3ForCausalLM

    args, fp8 = model_args(name)
    cfg = hf_config(args)
    t0 = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            hf = DeepseekV3ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    build_s = time.perf_counter() - t0
    timer = Timer(device)
    common = dict(model=name, impl="transformers", version=transformers.__version__, weights="bf16",
                  experts=getattr(hf.config, "_experts_implementation", None), build_s=round(build_s, 1))
    results: dict = {}
    with torch.no_grad():
        for b in prefill_batches:
            tokens = torch.randint(0, args.vocab_size, (b, PROMPT), device=device)
            fn = lambda: hf(input_ids=tokens, use_cache=True, logits_to_keep=1)  # noqa: E731
            hf(input_ids=tokens[:1, :16], use_cache=True, logits_to_keep=1)
            fn()
            ms = timer(fn, 2 if b == 1 else 1)
            tok_s = b * PROMPT / ms * 1e3
            emit(dict(common, case="prefill", batch=b, seq=PROMPT, ms=round(ms, 3), tokens_per_s=round(tok_s, 1)), log)
            results[("prefill", b)] = tok_s
            del fn
            cleanup()
        prompt = torch.randint(0, args.vocab_size, (1, PROMPT), device=device)
        for b in batches:
            cache = _hf_cache_for_batch(hf, prompt, b)
            tok = torch.randint(0, args.vocab_size, (b, 1), device=device)
            state = {"tok": tok, "pos": PROMPT}

            def step() -> None:
                pos = torch.full((b, 1), state["pos"], device=device, dtype=torch.long)
                out = hf(input_ids=state["tok"], past_key_values=cache, position_ids=pos, use_cache=True,
                         logits_to_keep=1)
                state["tok"] = out.logits[:, -1].argmax(-1, keepdim=True)
                state["pos"] += 1

            step()
            n = max(2, steps // 4)
            ms = timer(lambda: [step() for _ in range(n)], 1) / n
            tok_s = b / ms * 1e3
            emit(dict(common, case="decode", batch=b, context=PROMPT, ms_per_step=round(ms, 3),
                      tokens_per_s=round(tok_s, 1)), log)
            results[("decode", b)] = tok_s
            del cache
            cleanup()
    del hf
    cleanup()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["16B", "671B-6L"], choices=list(MODELS),
                        help="models to measure (default: 16B 671B-6L)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128], help="decode batch sizes (default: 1 32 128)")
    parser.add_argument("--prefill-batches", type=int, nargs="+", default=[1, 32],
                        help="prefill batch sizes of 512-token prompts (default: 1 32)")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per repeat (default: 16)")
    parser.add_argument("--no-peer", action="store_true", help="skip the transformers peer (default: measure it)")
    parser.add_argument("--profile", default=None, help="append per-kernel decode profiles to this file (default: none)")
    parser.add_argument("--log", default=None, help="also append the JSON lines to this file (default: none)")
    parser.add_argument("--device", default="cuda", help="device (default: cuda; cpu only smoke-tests the script)")
    opts = parser.parse_args(argv)
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/decode.py: no CUDA device (use --device cpu for a smoke test)", file=sys.stderr)
        return 1
    log = open(opts.log, "a") if opts.log else None
    peer_ok = not opts.no_peer
    if peer_ok:
        try:
            import transformers  # noqa: F401
        except ImportError:
            emit(dict(case="peer", error="transformers not importable: peer skipped"), log)
            peer_ok = False
    if device.type == "cuda":
        emit(dict(case="device", gpu=torch.cuda.get_device_name(), torch=torch.__version__), log)
    for name in opts.models:
        ours = bench_dsv3(name, device, opts.batches, opts.steps, opts.prefill_batches, opts.profile, log)
        if not peer_ok:
            continue
        try:
            peer = bench_hf(name, device, opts.batches, opts.steps, opts.prefill_batches, log)
        except Exception as e:  # report and continue with the next model
            emit(dict(model=name, impl="transformers", error=f"{type(e).__name__}: {e}"[:400]), log)
            cleanup()
            continue
        for key, value in ours.items():
            peer_key = ("prefill", key[1]) if key[0] == "prefill_graph" else key
            if peer_key in peer:
                emit(dict(model=name, case=key[0], batch=key[1], dsv3_tokens_per_s=round(value, 1),
                          transformers_tokens_per_s=round(peer[peer_key], 1),
                          ratio=round(value / peer[peer_key], 2)), log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
