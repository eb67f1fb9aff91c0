"""Benchmark: greedy decoding with and without the MTP draft (`dsv3.engine.speculative`), batch 1.

Both peers run in the same process on the same model and prompts with the model's contiguous cache; the
outputs must be equal. Prints one JSON line per prompt and a summary (tokens/s, acceptance, speed-up).

    python benchmarks/speculative.py                       # the default model on the CPU, float32
    python benchmarks/speculative.py --model DIR --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import time

import torch

PROMPTS = ["The Linux kernel documentation", "It is a truth universally acknowledged", "def main():\n    ",
           "Python's standard library", "Elizabeth looked at Mr. Darcy and"]


@torch.no_grad()
def plain_greedy(model, prompt: list[int], n: int) -> tuple[list[int], float]:
    from dsv3.engine.speculative import SequenceCache
    start = time.perf_counter()
    seq = SequenceCache(model, len(prompt) + n + 2)  # the same cache and forward as the speculative loop
    h = seq.hidden(prompt, 0)
    out, pos = [], len(prompt)
    for _ in range(n):
        tok = int(model.lm_head(h[-1]).argmax())
        out.append(tok)
        h = seq.hidden([tok], pos)
        pos += 1
    return out, time.perf_counter() - start


def main() -> None:
    import dsv3
    from dsv3.engine.speculative import speculative_greedy
    from dsv3.tokenizer import load_tokenizer
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder (default: the built-in model)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (default float32)")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per prompt (default 128)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or dsv3.default_model_path()
    model = dsv3.load_model(path, device=args.device, dtype=getattr(torch, args.dtype), progress=False)
    tok = load_tokenizer(path)
    plain_greedy(model, tok.encode(PROMPTS[0]), 8)  # warm-up
    totals = {"plain_s": 0.0, "spec_s": 0.0, "tokens": 0, "drafts": 0, "accepted": 0}
    for text in PROMPTS:
        ids = tok.encode(text)
        ref, t_plain = plain_greedy(model, ids, args.tokens)
        spec = speculative_greedy(model, ids, args.tokens)
        same = spec.token_ids == ref
        print(json.dumps({"prompt": text, "tokens": len(ref), "equal_outputs": same,
                          "plain_tok_s": len(ref) / t_plain, "spec_tok_s": len(spec.token_ids) / spec.seconds,
                          "acceptance": spec.acceptance}), flush=True)
        totals["plain_s"] += t_plain
        totals["spec_s"] += spec.seconds
        totals["tokens"] += len(ref)
        totals["drafts"] += spec.drafts
        totals["accepted"] += spec.accepted
    print(json.dumps({"summary": True, "device": args.device, "dtype": args.dtype, "threads": args.threads,
                      "plain_tok_s": totals["tokens"] / totals["plain_s"],
                      "spec_tok_s": totals["tokens"] / totals["spec_s"],
                      "speedup": totals["plain_s"] / totals["spec_s"],
                      "acceptance": totals["accepted"] / max(totals["drafts"], 1)}), flush=True)


if __name__ == "__main__":
    main()
