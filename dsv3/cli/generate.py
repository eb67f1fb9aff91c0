"""`dsv3 generate`: one prompt streamed to stdout, or a file of prompts through continuous batching.

One prompt streams its text as the engine steps (Ctrl-C aborts it, keeps what was generated, exit 130);
a file of prompts runs as one batch and prints one JSON line per prompt, in prompt order. `--output`
writes the JSON lines to a file instead. The helpers it drives live in `dsv3/generate.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from dsv3.cli import flags
from dsv3.cli.flags import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Generate text with a DeepSeek-V3 checkpoint. A single prompt streams to stdout; several "
                     "prompts (from --input-file) print one JSON line each.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT",
                     help="the prompt, answer streamed (default: none; --prompt or --input-file is required)")
    src.add_argument("--input-file", metavar="FILE",
                     help="prompts, one per line; a line that is a JSON object uses its \"prompt\" field (JSONL) "
                          "(default: none)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user turn with the chat template (default: raw text, BOS added)")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="system prompt for --chat prompts (default: none)")
    p.add_argument("--output", metavar="FILE", default=None,
                   help="write JSONL (prompt, text, prompt_tokens, completion_tokens, finish_reason) here "
                        "(default: none; one prompt streams plain text to stdout, several print JSONL there)")
    flags.add_model(p)
    flags.add_device(p)
    flags.add_dtype(p)
    flags.add_sampling(p)
    flags.add_engine(p)
    p.set_defaults(run=run)


def model_context(path: Path) -> int:
    """`max_position_embeddings` of a checkpoint's config.json."""
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    ctx = cfg.get("max_position_embeddings")
    if not isinstance(ctx, int) or ctx < 2:
        raise ValueError(f"{path / 'config.json'}: max_position_embeddings must be an integer >= 2, got {ctx!r}")
    return ctx


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    import dsv3
    from dsv3.engine import LLM
    from dsv3.generate import Completion, StopFlag, answer_of, encode_prompt, read_prompts, stream_answer
    from dsv3.tokenizer import load_tokenizer

    path = flags.resolve_model(args.model)
    if args.input_file is not None and not Path(args.input_file).is_file():
        raise UsageError(f"--input-file: file not found: {args.input_file}")
    params = flags.sampling_params(args)
    config = flags.engine_config(args, flags.resolve_device(args.device))
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.input_file)
    tok = load_tokenizer(path)
    context = min(model_context(path), args.max_model_len or sys.maxsize)
    encoded = [encode_prompt(tok, p, args.chat, args.system) for p in prompts]
    for i, ids in enumerate(encoded):
        if len(ids) >= context:
            which = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
            raise UsageError(f"{which} has {len(ids)} tokens but the model's context is {context} tokens")
    model = dsv3.load_model(path, device=config.device, dtype=config.torch_dtype)
    lengths = [min(len(ids) + args.max_new_tokens, context) for ids in encoded]
    llm = LLM(model, tokenizer=tok, config=flags.fit_cpu_cache(config, model, lengths))
    out_file = open(args.output, "w", encoding="utf-8") if args.output else None  # fails before generating
    try:
        if len(prompts) == 1:
            start = time.perf_counter()
            answer = stream_answer(llm, tok, encoded[0], params, _write, StopFlag())
            _write("\n")
            elapsed = time.perf_counter() - start
            n = len(answer.token_ids)
            print(f"[{n} tokens, {n / max(elapsed, 1e-9):.1f} tokens/s, finish: {answer.finish_reason}]",
                  file=sys.stderr)
            answers = [answer]
        else:  # continuous batching over all prompts
            outputs = llm.generate(encoded, params, use_tqdm=out_file is not None)
            stop_ids = set(llm.eos_token_ids)
            answers = [answer_of(o, tok, stop_ids) for o in outputs]
        sink = out_file if out_file else (sys.stdout if len(prompts) > 1 else None)
        if sink:
            for p, ids, a in zip(prompts, encoded, answers):
                sink.write(json.dumps(asdict(Completion.of(p, ids, a)), ensure_ascii=False) + "\n")
    finally:
        if out_file:
            out_file.close()
    return 130 if answers[0].finish_reason == "interrupted" else 0
