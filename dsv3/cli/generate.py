"""`dsv3 generate`: one prompt streamed to stdout, or a file of prompts through continuous batching.

One prompt streams its text as the engine steps (Ctrl-C aborts it, keeps what was generated, exit 130);
a file of prompts runs as one batch and prints one JSON line per prompt (with its `index`), each written
and flushed as soon as it and every earlier prompt are done, so Ctrl-C keeps every finished answer
(exit 130) and `--resume` generates only the prompts the output file still lacks. `--output` writes the
JSON lines to a file instead of stdout. The helpers it drives live in `dsv3/generate.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any
from dsv3.cli import flags
from dsv3.cli.flags import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Generate text with a DeepSeek-V3 checkpoint. A single prompt streams to stdout; the "
                     "prompts of --input-file print one JSON line each, as each answer finishes (Ctrl-C keeps "
                     "them; --resume skips them on a rerun).")
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
                   help="write JSONL (index, prompt, text, prompt_tokens, completion_tokens, finish_reason) here, "
                        "one line per prompt as soon as its answer finishes (default: none; --prompt streams plain "
                        "text to stdout, --input-file prints JSONL there)")
    p.add_argument("--resume", action="store_true",
                   help="with --input-file and --output: keep the answers already in the output file and "
                        "generate only the prompts it lacks (default: off, the output file is overwritten)")
    flags.add_model(p, weights=True)
    flags.add_device(p)
    flags.add_dtype(p)
    flags.add_sampling(p)
    flags.add_engine(p)
    flags.add_threads(p)
    p.set_defaults(run=run)


def model_context(path: Path) -> int:
    """`max_position_embeddings` of a checkpoint's config.json."""
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    ctx = cfg.get("max_position_embeddings")
    if not isinstance(ctx, int) or ctx < 2:
        raise ValueError(f"{path / 'config.json'}: max_position_embeddings must be an integer >= 2, got {ctx!r}")
    return ctx


def check_text(flag: str, text: str | None) -> None:
    """A command-line text that is not valid UTF-8 (Python keeps such bytes as lone surrogates) is a UsageError."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"{flag}: not valid UTF-8 (byte 0x{ord(text[e.start]) & 0xFF:02x} at character "
                         f"{e.start + 1})") from None


def start_line(verb: str, path: Path, model: Any, config: Any, threads: int | None) -> str:
    """Sets the torch threads (`--threads` or the default policy) and says what was loaded: the model folder,
    its parameter count, the weight format of its checkpoint and in memory, the device, dtype and threads."""
    from dsv3.generate import memory_format, weight_format

    num_params = sum(p.numel() for p in model.parameters())
    used = flags.set_threads(threads, config.device, num_params)
    return (f"[dsv3 {verb}: model {path} ({num_params / 1e6:,.1f}M parameters; {weight_format(path)} checkpoint, "
            f"{memory_format(model)} in memory), device {config.device}, "
            f"dtype {str(config.torch_dtype).removeprefix('torch.')}, {used} thread(s)]")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def answered(output: Path, prompts: list[str]) -> tuple[dict[int, str], int]:
    """For `--resume`: the finished answers already in `output` (index -> its JSON line), and how many of its
    lines were dropped (cut short by an interrupt, or from an interrupted answer)."""
    kept: dict[int, str] = {}
    dropped = 0
    if not output.is_file():
        return kept, dropped
    for lineno, line in enumerate(output.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        try:
            rec = json.loads(line)
            i = rec["index"]
            ok = isinstance(i, int) and 0 <= i < len(prompts) and rec["finish_reason"] != "interrupted"
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            dropped += 1
            continue
        if rec.get("prompt") != prompts[i]:
            raise UsageError(f"--resume: {output}:{lineno} answers prompt {i + 1} with a different prompt than "
                             f"the input file has; use another --output or leave out --resume")
        kept[i] = line
    return kept, dropped


def run(args: argparse.Namespace) -> int:
    from dsv3.engine import LLM
    from dsv3.generate import Completion, StopFlag, encode_prompt, read_prompts, run_batch
    from dsv3.tokenizer import load_tokenizer

    check_text("--prompt", args.prompt)
    check_text("--system", args.system)
    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat (it is the system turn of the chat template)")
    if args.resume and (args.input_file is None or args.output is None):
        raise UsageError("--resume needs --input-file and --output (it skips the prompts already answered there)")
    path = flags.resolve_model(args.model, chat=args.chat)
    if args.input_file is not None and not Path(args.input_file).is_file():
        raise UsageError(f"--input-file: file not found: {args.input_file}")
    params = flags.sampling_params(args)
    config = flags.engine_config(args, flags.resolve_device(args.device))
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.input_file)
    done: dict[int, str] = {}
    if args.resume:
        done, dropped = answered(Path(args.output), prompts)
        print(f"[--resume: {len(done)} of {len(prompts)} prompts already answered in {args.output}"
              + (f"; {dropped} unfinished line(s) dropped" if dropped else "") + "]", file=sys.stderr)
    todo = [i for i in range(len(prompts)) if i not in done]
    tok = load_tokenizer(path)
    context = min(model_context(path), args.max_model_len or sys.maxsize)
    encoded = {i: encode_prompt(tok, prompts[i], args.chat, args.system) for i in todo}
    for i, ids in encoded.items():
        if len(ids) >= context:
            which = "the prompt" if args.prompt is not None else f"prompt {i + 1}"
            raise UsageError(f"{which} has {len(ids)} tokens but the model's context is {context} tokens")
    out_file = None
    if args.output:  # opened (and, with --resume, cleaned of unfinished lines) before the model loads
        out_file = open(args.output, "w", encoding="utf-8")
        out_file.writelines(line + "\n" for line in done.values())
        out_file.flush()
    try:
        if not todo:
            return 0
        model = flags.load_model(args, path, config)
        print(start_line("generate", path, model, config, args.threads), file=sys.stderr)
        lengths = [min(len(ids) + args.max_new_tokens, context) for ids in encoded.values()]
        llm = LLM(model, tokenizer=tok, config=flags.fit_cpu_cache(config, model, lengths))
        if not llm.is_driver:  # under torchrun: rank 0 answers, the other ranks run its steps
            llm.run_worker()
            return 0
        if args.prompt is not None:
            return _one(llm, tok, args.prompt, encoded[0], params, out_file)
        sink = out_file if out_file else sys.stdout
        finished: dict[int, str] = {}
        waiting = iter(todo)  # prompts in order; each line is written once it and all before it are done
        next_i = next(waiting)

        def on_done(i: int, answer) -> None:
            nonlocal next_i
            finished[i] = json.dumps(asdict(Completion.of(i, prompts[i], encoded[i], answer)), ensure_ascii=False)
            while next_i in finished:
                sink.write(finished.pop(next_i) + "\n")
                sink.flush()
                next_i = next(waiting, None)

        stats = run_batch(llm, tok, encoded, params, on_done, StopFlag(), progress=out_file is not None)
        for i in sorted(finished):  # after Ctrl-C: the answers that finished after an unfinished one
            sink.write(finished[i] + "\n")
        sink.flush()
        print(stats.line(), file=sys.stderr)
        if stats.interrupted:
            written = len(done) + stats.requests
            where = f" to {args.output}; rerun with --resume to finish" if args.output else ""
            print(f"[interrupted: {written} of {len(prompts)} answers written{where}]", file=sys.stderr)
            return 130
        return 0
    finally:
        if out_file:
            out_file.close()


def _one(llm, tok, prompt: str, ids: list[int], params, out_file) -> int:
    """One prompt, its answer streamed to stdout (and its record written to `out_file`)."""
    from dsv3.generate import Completion, StopFlag, stream_answer

    start = time.perf_counter()
    answer = stream_answer(llm, tok, ids, params, _write, StopFlag())
    _write("\n")
    elapsed = time.perf_counter() - start
    n = len(answer.token_ids)
    spec = f", {llm.speculative_stats.summary()}" if llm.speculative_stats is not None else ""
    print(f"[{n} tokens, {n / max(elapsed, 1e-9):.1f} tokens/s, finish: {answer.finish_reason}{spec}]", file=sys.stderr)
    if out_file:
        out_file.write(json.dumps(asdict(Completion.of(0, prompt, ids, answer)), ensure_ascii=False) + "\n")
    return 130 if answer.finish_reason == "interrupted" else 0
