"""Benchmark: prefill and decode tokens/s of the dsv3 GPU kernels on the model's one forward vs `transformers`,
one run, one GPU.

Models (random weights): the `16B` preset in BF16 and the `671B` preset cut to 6 layers (3 dense + 3
MoE, full width) with FP8 weights (128x128 block scales, weight-only). dsv3: `fuse_for_inference` (stacked
experts in the fused MoE, fused norms and SwiGLU) and `Transformer.hidden` over the paged latent cache
(`TritonPagedAttention`, block 16), the engine's own step without its scheduler. The peer is `transformers`'
`DeepseekV3ForCausalLM` with the same shapes in BF16 (its FP8 path needs a quantized checkpoint), SDPA
attention and its default experts implementation, measured in the same process (`hf_peer.py`).

Cases: prefill `1x512` and `32x512` (one step: `backend.prepare` of the chunks, the forward, logits of the
last tokens; latents written to the cache), decode at batch 1, 32, 128 with a 512-token context (dsv3: one
CUDA graph per batch size, `DecodeGraphs`, greedy tokens fed back on the device; one eager step for
comparison; transformers: its cache filled by a 512-token prefill of one sequence, repeated over the batch).
One JSON line per measurement, then one per (model, case) with the ratio. `hbm_frac` = bytes a step must read
(weights: dense part + each expert that got tokens, counted on the device; plus the latent cache) / 4.3 TB/s /
step time; `mfu` = 2 x active params x tokens / 790 TFLOP/s / time for prefill.

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
from dsv3.engine.attention import Chunk, PagedStep, TritonPagedAttention
from dsv3.engine.cuda_graphs import DecodeGraphs
from dsv3.model import Transformer
from dsv3.model.attention import AttentionMeta
from dsv3.model.fp8_linear import convert_linears_to_fp8
from dsv3.model.fused import StackedExperts, fuse_for_inference

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


# ---- benchmark-only helpers ------------------------------------------------------------------------
def slots_for(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slot of each (sequence, position), on the device: block_tables `[B, max_blocks]`, positions `[B]`
    -> `[B]` int64 (the engine computes these on the host from its block tables)."""
    rows = torch.arange(block_tables.shape[0], device=block_tables.device)
    return block_tables[rows, positions // block_size].long() * block_size + positions % block_size


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _module_bytes(module: torch.nn.Module | None) -> int:
    return 0 if module is None else _nbytes(*module.parameters(), *module.buffers())


def decode_weight_bytes(model: Transformer, backend: TritonPagedAttention) -> dict[str, int]:
    """Weight bytes one decode step of a fused model reads: `dense` (all but the experts' stacks: attention with
    the backend's absorbed `kv_b_proj` halves, norms, routers, dense MLPs, final norm, output head) and
    `per_expert` (one stacked expert slice of one MoE layer; a step reads it once per expert that got tokens,
    shared slices included). Embedding rows are not counted (one row per token)."""
    dense = _module_bytes(model.norm) + _module_bytes(model.lm_head)
    per_expert = 0
    for layer in model.layers:
        mla = layer.self_attn
        for name in ("q_a_proj", "q_a_layernorm", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
                     "o_proj"):
            dense += _module_bytes(getattr(mla, name, None))
        dense += _nbytes(backend.w_uk[mla.layer_id], backend.w_uv_t[mla.layer_id])
        dense += _module_bytes(layer.input_layernorm) + _module_bytes(layer.post_attention_layernorm)
        stacked = getattr(layer.mlp, "stacked", None)
        if isinstance(stacked, StackedExperts):
            dense += _nbytes(stacked.router_weight, layer.mlp.gate.e_score_correction_bias)
            per_expert = _nbytes(stacked.w_gate[0], stacked.w_up[0], stacked.w_down[0], *(
                None if s is None else s[0] for s in (stacked.s_gate, stacked.s_up, stacked.s_down)))
        else:
            dense += _module_bytes(layer.mlp)
    return {"dense": dense, "per_expert": per_expert}


@torch.inference_mode()
def prefill_step(model: Transformer, backend: TritonPagedAttention, tokens: torch.Tensor,
                 tables: list[list[int]]) -> torch.Tensor:
    """One engine prefill step of `b` fresh prompts tokens `[b, T]` (sequence i in blocks `tables[i]`): the
    step's tensors, the forward, the logits `[b, vocab]` of each prompt's last token."""
    b, t = tokens.shape
    step = backend.prepare([Chunk(tables[i], 0, t) for i in range(b)])
    positions = torch.arange(t, device=tokens.device).repeat(b)
    h = model.hidden(tokens.flatten(), positions, AttentionMeta(backend, step=step))  # [b * T, D]
    return model.lm_head(h.view(b, t, -1)[:, -1])


@torch.inference_mode()
def eager_decode(model: Transformer, backend: TritonPagedAttention, tokens: torch.Tensor, positions: torch.Tensor,
                 slots: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """The decode step `DecodeGraphs` captures, run eagerly (same inputs, kernel launches from Python)."""
    step = PagedStep(slots=slots, block_tables=block_tables, seq_lens=seq_lens, num_decodes=tokens.shape[0])
    return model.lm_head(model.hidden(tokens, positions, AttentionMeta(backend, step=step))).argmax(-1)


# ---- dsv3 ------------------------------------------------------------------------------------------
def bench_dsv3(name: str, device: torch.device, batches: list[int], steps: int, prefill_batches: list[int],
               profile: str | None, log) -> dict:
    args, fp8 = model_args(name)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(args).eval()
    if fp8:
        convert_linears_to_fp8(model)
    fuse_for_inference(model)
    cleanup()
    build_s = time.perf_counter() - t0
    elem = model.embed_tokens.weight.element_size()
    latent = args.kv_lora_rank + args.qk_rope_head_dim
    block = 16
    max_ctx = PROMPT + steps + 8
    blocks_per_seq = -(-max_ctx // block)
    max_b = max(batches + prefill_batches)
    cache = torch.randn(args.n_layers, max_b * blocks_per_seq + 1, block, latent, device=device,
                        dtype=model.embed_tokens.weight.dtype)
    backend = TritonPagedAttention(cache.view(args.n_layers, -1, latent), block, args.max_seq_len,
                                   [layer.self_attn for layer in model.layers])
    wb = decode_weight_bytes(model, backend)
    perm = torch.randperm(max_b * blocks_per_seq, device=device).int()
    tables = perm.view(max_b, blocks_per_seq)  # [max_b, blocks_per_seq]
    table_lists = tables.tolist()
    timer = Timer(device)
    results: dict = {}
    common = dict(model=name, impl="dsv3", weights="fp8" if fp8 else "bf16", build_s=round(build_s, 1))
    moes = [m for m in model.modules() if isinstance(m, StackedExperts)]
    n_moe = len(moes)
    active_params = (wb["dense"] + wb["per_expert"] * n_moe * (args.n_activated_experts + args.n_shared_experts)) / (
        1.0 if fp8 else elem)
    all_weight_bytes = wb["dense"] + wb["per_expert"] * n_moe * (args.n_routed_experts + args.n_shared_experts)

    # prefill: one engine step (host preparation included)
    for b in prefill_batches:
        tokens = torch.randint(0, args.vocab_size, (b, PROMPT), device=device)
        fn = lambda: prefill_step(model, backend, tokens, table_lists[:b])  # noqa: E731
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
        del fn
        cleanup()

    # decode: one graph per batch size
    graphs = None
    if device.type == "cuda":
        graphs = DecodeGraphs(model, backend, max_blocks=blocks_per_seq, batch_sizes=batches)
        t0 = time.perf_counter()
        graphs.capture()
        emit(dict(common, case="graph_capture", batches=batches, s=round(time.perf_counter() - t0, 2)), log)
    for b in batches:
        bt = tables[:b]
        tok = torch.randint(0, args.vocab_size, (b,), device=device)
        state = {"tok": tok, "i": 0}

        def step(replay: bool = True) -> None:
            pos = torch.full((b,), PROMPT + state["i"] % steps, device=device, dtype=torch.long)
            slots = slots_for(bt, pos, block)
            lens = (pos + 1).int()
            if replay and graphs is not None:
                _, nxt = graphs.run(state["tok"], pos, slots, bt, lens)
            else:
                nxt = eager_decode(model, backend, state["tok"], pos, slots, bt, lens)
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
                   tokens_per_s=round(tok_s, 1), graphs=graphs is not None, active_experts_per_moe_layer=round(
                       active / max(1, len(moes)), 1), bytes_per_step=nbytes,
                   hbm_frac=round(nbytes / HBM_BPS / (ms / 1e3), 3))
        target = TARGETS.get((name, "decode", b))
        if target:
            row.update(target=target, met=tok_s >= target)
        emit(row, log)
        results[("decode", b)] = tok_s
        if b == batches[0] and graphs is not None:  # eager step for comparison: what the graphs save
            step(False)
            ms_e = timer(lambda: step(False), 5)
            emit(dict(common, case="decode_eager", batch=b, ms_per_step=round(ms_e, 3)), log)

    if profile and device.type == "cuda" and name == "16B":  # where the time goes for the targeted model
        write_profile(name, model, backend, graphs, tables, args, block, [b for b in batches if b <= 32], profile,
                      log)
    del graphs, backend, cache, model
    cleanup()
    return results


def write_profile(name, model, backend, graphs, tables, args, block, batches, path, log) -> None:
    """Per-kernel CUDA time of a prefill step and of decode graph replays (and of eager steps), top kernels per
    step -> file + JSON."""
    from torch.profiler import ProfilerActivity, profile

    device = tables.device
    table_lists = tables.tolist()
    with open(path, "a") as f:
        tokens = torch.randint(0, args.vocab_size, (1, PROMPT), device=device)
        prefill_step(model, backend, tokens, table_lists[:1])
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            prefill_step(model, backend, tokens, table_lists[:1])
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
                fn = ((lambda: graphs.run(tok, pos, slots, bt, lens)) if mode == "graph" and graphs is not None
                      else (lambda: eager_decode(model, backend, tok, pos, slots, bt, lens)))
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
    from hf_peer import build_hf  # beside this script

    args, fp8 = model_args(name)
    t0 = time.perf_counter()
    hf = build_hf(args, device, torch.bfloat16)
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
            if key in peer:
                emit(dict(model=name, case=key[0], batch=key[1], dsv3_tokens_per_s=round(value, 1),
                          transformers_tokens_per_s=round(peer[key], 1), ratio=round(value / peer[key], 2)), log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
