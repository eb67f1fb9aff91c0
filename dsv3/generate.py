"""`dsv3 generate`, and the flags and checks it shares with `dsv3 chat`.

`generate` drives the engine's `LLM`: one prompt streams its text as the engine steps (Ctrl-C aborts
the request and keeps what was generated), a file of prompts runs through continuous batching and
prints one JSON line per prompt, in prompt order.

`add_parser` registers both verbs. `chat` (multi-turn, keeping the conversation's cache between
turns) lives in `chat.py` and uses this module's flag checks, model loading, `StopFlag` and
one-line errors.

Both sample with the engine's `SamplingParams` / `Sampler` (`--temperature 0` is greedy; `--seed`
seeds a per-request generator as the engine does) and stream with the tokenizer's
`IncrementalDecoder` (no broken characters). torch is imported only after the flags are checked, so
bad input fails fast: one line on stderr, a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TextIO

if TYPE_CHECKING:
    from dsv3.engine.sampling import SamplingParams
    from dsv3.tokenizer import Tokenizer

DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_TEMPERATURE = 0.3  # DeepSeek-V3's recommended model temperature
DTYPES = {"auto": None, "bf16": "bfloat16", "fp32": "float32"}  # auto: float32 on a CPU (faster there), else bf16


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


# ---- argument parsing ----------------------------------------------------------------------------
def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Make argparse report a bad flag as one line (no usage block), exit code 2."""
    def error(message: str) -> None:
        parser.exit(2, f"{parser.prog}: error: {message}\n")
    parser.error = error  # type: ignore[method-assign]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", default=None,
                   help="checkpoint folder (config.json, *.safetensors, tokenizer.json); "
                        "default: dsv3.default_model_path()")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                   help="most tokens to generate per answer (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, metavar="T",
                   help="sampling temperature, >= 0; 0 is greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling: keep the most likely tokens up to mass P, in (0, 1] (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="keep only the K most likely tokens; 0 keeps all (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="random seed for sampling (default: none, a fresh draw each run)")
    p.add_argument("--device", default="cpu", metavar="DEV",
                   help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--dtype", default="auto", metavar="DTYPE",
                   help="weights and activations: bf16, fp32, or auto = fp32 on a CPU (faster there), bf16 on a "
                        "GPU (default: %(default)s)")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="system prompt for chat-formatted prompts (default: none)")


def add_parser(subparsers: Any) -> None:
    """Register the `generate` and `chat` verbs on an argparse subparsers object."""
    from dsv3.chat import CHAT_HELP, DEFAULT_CHAT_CONTEXT, chat_main  # chat.py imports this module

    gen = subparsers.add_parser(
        "generate", help="generate text for one prompt or a file of prompts",
        description="Generate text with a DeepSeek-V3 checkpoint. A single prompt streams to stdout; "
                    "several prompts (from --input-file) print one JSON line each.")
    _one_line_errors(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT",
                     help="the prompt, streamed answer (default: none; --prompt or --input-file is required)")
    src.add_argument("--input-file", metavar="FILE",
                     help="prompts, one per line; a line that is a JSON object uses its \"prompt\" field (JSONL) "
                          "(default: none)")
    gen.add_argument("--chat", action="store_true",
                     help="wrap each prompt as a user turn with the chat template (default: raw text, BOS added)")
    gen.add_argument("--output", metavar="FILE", default=None,
                     help="write JSONL (prompt, text, prompt_tokens, completion_tokens, finish_reason) here "
                          "(default: none; one prompt streams plain text to stdout, several print JSONL there)")
    gen.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                     help="fused MoE/MLA kernels and CUDA graphs for decode steps, GPU only (default: on with a "
                          "CUDA device and BF16 weights, off otherwise; --no-fast forces the plain PyTorch path)")
    _add_common(gen)
    gen.set_defaults(func=generate_main)

    chat = subparsers.add_parser(
        "chat", help="interactive multi-turn chat in the terminal",
        description="Chat with a DeepSeek-V3 checkpoint. The conversation's cache is kept between turns. "
                    + CHAT_HELP + ".")
    _one_line_errors(chat)
    _add_common(chat)
    chat.add_argument("--context", type=int, default=None, metavar="N",
                      help=f"tokens the conversation cache holds (default: the model's context, "
                           f"at most {DEFAULT_CHAT_CONTEXT})")
    chat.add_argument("--stats", action="store_true",
                      help="after each answer also print how many tokens were prefilled and cached "
                           "(default: tokens/s only)")
    chat.set_defaults(func=chat_main)


# ---- checks that need no torch -----------------------------------------------------------------
def _resolve_model(model: str | None) -> Path:
    if model is None:
        import dsv3
        default = getattr(dsv3, "default_model_path", None)
        if default is None:
            raise UsageError("no --model given and no default model is configured; pass --model DIR")
        try:
            path = Path(default())
        except FileNotFoundError as e:
            raise UsageError(f"no --model given and {e}") from None
        if not path.is_dir():
            raise UsageError(f"no --model given and the default model folder {path} does not exist; "
                             "pass --model DIR")
        return path
    path = Path(model)
    if not path.is_dir():
        raise UsageError(f"--model: folder not found: {path}")
    if not (path / "config.json").is_file():
        raise UsageError(f"--model: {path} has no config.json (expected an HF-format DeepSeek-V3 folder)")
    return path


def _model_context(path: Path) -> int:
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    ctx = cfg.get("max_position_embeddings")
    if not isinstance(ctx, int) or ctx < 2:
        raise UsageError(f"{path / 'config.json'}: max_position_embeddings must be an integer >= 2, got {ctx!r}")
    return ctx


def _check_common(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:  # also rejects nan
        raise UsageError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 keeps all tokens), got {args.top_k}")
    dev = args.device
    if not (dev in ("cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {dev!r}")
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")


def _check_device(dev: str) -> None:
    import torch
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {dev}: CUDA is not available on this machine")
        index = int(dev[5:]) if ":" in dev else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {dev}: only {torch.cuda.device_count()} CUDA device(s) here")


def read_prompts(path: str) -> list[str]:
    """Prompts of an input file: one per non-empty line, or the "prompt" field of a JSON-object line."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--input-file: file not found: {file}")
    prompts = []
    for lineno, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"--input-file {file}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj.get("prompt"), str):
                raise UsageError(f"--input-file {file}:{lineno}: JSON line needs a string \"prompt\" field")
            prompts.append(obj["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise UsageError(f"--input-file {file}: no prompts in the file")
    return prompts


def _sampling(args: argparse.Namespace) -> "SamplingParams":
    from dsv3.engine.sampling import SamplingParams
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_new_tokens, seed=args.seed)


def _load(path: Path, args: argparse.Namespace) -> Any:
    import torch

    import dsv3
    name = DTYPES[args.dtype] or ("float32" if args.device == "cpu" else "bfloat16")
    return dsv3.load_model(path, device=args.device, dtype=getattr(torch, name))


# ---- streaming through the engine ----------------------------------------------------------------
class StopFlag:
    """Set by Ctrl-C while installed (`with flag:`), so generation stops at the next token."""

    def __init__(self) -> None:
        self.is_set = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.is_set = True

    def __enter__(self) -> "StopFlag":
        self.is_set = False
        self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGINT, self._previous)


@dataclass
class Completion:
    """One finished answer, as written to the JSONL output."""

    prompt: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS), "length" (max new tokens or context), "interrupted" (Ctrl-C)


def _encode_prompt(tok: "Tokenizer", prompt: str, chat: bool, system: str | None) -> list[int]:
    if not chat:
        return tok.encode(prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tok.encode_chat(messages, add_generation_prompt=True)


def _completion(prompt: str, prompt_ids: list[int], output: Any, tok: "Tokenizer", stop_ids: set[int],
                finish_reason: str | None = None) -> Completion:
    """A Completion from an engine `RequestOutput` (the EOS that ended it is not part of the answer)."""
    ids = list(output.token_ids) if output is not None else []
    if ids and ids[-1] in stop_ids and output.finish_reason == "stop":
        ids = ids[:-1]
    return Completion(prompt=prompt, text=tok.decode(ids), prompt_tokens=len(prompt_ids), completion_tokens=len(ids),
                      finish_reason=finish_reason or output.finish_reason)


def stream_one(llm: Any, tok: "Tokenizer", prompt: str, prompt_ids: list[int], params: "SamplingParams",
               on_text: Callable[[str], None], stop: StopFlag) -> Completion:
    """Run one request through the engine, streaming its text to `on_text`; Ctrl-C aborts it."""
    stop_ids = set(llm.eos_token_ids)
    request_id = llm.add_request(prompt_ids, params)
    decoder = tok.stream_decoder()
    last = None
    with stop:
        while llm.has_unfinished():
            if stop.is_set:
                llm.abort(request_id)
                break
            for out in llm.step():
                if out.request_id != request_id:
                    continue
                last = out
                new = out.new_token_ids
                if out.finished and new and new[-1] in stop_ids and out.finish_reason == "stop":
                    new = new[:-1]
                piece = decoder.extend(new) + (decoder.flush() if out.finished else "")
                if piece:
                    on_text(piece)
    if last is None or not last.finished:
        tail = decoder.flush()
        if tail:
            on_text(tail)
        return _completion(prompt, prompt_ids, last, tok, stop_ids, finish_reason="interrupted")
    return _completion(prompt, prompt_ids, last, tok, stop_ids)


# ---- generate ------------------------------------------------------------------------------------
def _debug(args: argparse.Namespace) -> bool:
    """`dsv3 --debug` or DSV3_DEBUG=1: let errors raise with their traceback."""
    import os
    return bool(getattr(args, "debug", False) or os.environ.get("DSV3_DEBUG"))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _fail(prog: str, message: str, code: int) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def _write(stream: TextIO, text: str) -> None:
    stream.write(text)
    stream.flush()


def generate_main(args: argparse.Namespace) -> int:
    """`dsv3 generate`: returns the exit code; every error is one line on stderr."""
    try:
        return _generate(args)
    except UsageError as e:
        return _fail("dsv3 generate", str(e), 2)
    except (OSError, ValueError, RuntimeError) as e:
        if _debug(args):
            raise
        return _fail("dsv3 generate", _first_line(e), 1)
    except KeyboardInterrupt:
        return _fail("dsv3 generate", "interrupted", 130)


def _engine(model: Any, tok: "Tokenizer", device: str, lengths: list[int], fast: bool | None = None) -> Any:
    """The engine's LLM. On CPU its cache is sized to what the prompts need (all of them running at
    once) when that is below the engine's default; on GPU the engine takes its default share. `fast`: the
    GPU decode path (fused kernels, CUDA graphs); None lets the engine choose (on for BF16 on CUDA)."""
    from dsv3.engine import LLM
    from dsv3.engine.model_runner import DEFAULT_CPU_CACHE_BYTES, cache_bytes_per_block

    block_size, max_num_seqs = 16, 64
    num_blocks = None
    if device == "cpu":
        longest = -(-max(lengths) // block_size) + 1  # blocks of the longest sequence, plus one spare
        need = longest * min(len(lengths), max_num_seqs)
        if need * cache_bytes_per_block(model, block_size) < DEFAULT_CPU_CACHE_BYTES:
            num_blocks = need
    return LLM(model, tokenizer=tok, num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
               fast=fast)


def _generate(args: argparse.Namespace) -> int:
    from dsv3.tokenizer import load_tokenizer

    _check_common(args)
    if args.fast is True and not args.device.startswith("cuda"):
        raise UsageError(f"--fast needs a CUDA device (--device cuda), got --device {args.device}")
    path = _resolve_model(args.model)
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.input_file)
    tok = load_tokenizer(path)
    context = _model_context(path)
    encoded = [_encode_prompt(tok, p, args.chat, args.system) for p in prompts]
    for i, ids in enumerate(encoded):
        if len(ids) >= context:
            which = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
            raise UsageError(f"{which} has {len(ids)} tokens but the model's context is {context} tokens")
    params = _sampling(args)
    _check_device(args.device)
    model = _load(path, args)
    llm = _engine(model, tok, args.device, [min(len(ids) + args.max_new_tokens, context) for ids in encoded],
                  fast=args.fast)

    out_file = open(args.output, "w", encoding="utf-8") if args.output else None
    try:
        if len(prompts) == 1:
            start = time.perf_counter()
            result = stream_one(llm, tok, prompts[0], encoded[0], params, lambda s: _write(sys.stdout, s), StopFlag())
            _write(sys.stdout, "\n")
            elapsed = time.perf_counter() - start
            print(f"[{result.completion_tokens} tokens, {result.completion_tokens / max(elapsed, 1e-9):.1f} "
                  f"tokens/s, finish: {result.finish_reason}]", file=sys.stderr)
            results = [result]
        else:  # continuous batching over all prompts
            outputs = llm.generate(encoded, params, use_tqdm=out_file is not None)
            stop_ids = set(llm.eos_token_ids)
            results = [_completion(p, ids, o, tok, stop_ids) for p, ids, o in zip(prompts, encoded, outputs)]
        sink = out_file if out_file else (sys.stdout if len(prompts) > 1 else None)
        if sink:
            for result in results:
                sink.write(json.dumps(asdict(result), ensure_ascii=False) + "\n")
        return 130 if results[0].finish_reason == "interrupted" else 0
    finally:
        if out_file:
            out_file.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m dsv3.generate generate|chat ...` (the same verbs as `dsv3 generate|chat`)."""
    parser = argparse.ArgumentParser(prog="dsv3")
    add_parser(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
