"""`dsv3 generate` and `dsv3 chat`: text generation from the command line.

`generate` drives the engine's `LLM`: one prompt streams its text as the engine steps (Ctrl-C aborts
the request and keeps what was generated), a file of prompts runs through continuous batching and
prints one JSON line per prompt, in prompt order.

`chat` keeps one conversation's cache between turns, which the engine's per-request cache does not
do: a `Session` decodes batch-1 over the model's own contiguous latent cache
(`Transformer.setup_cache` + `hidden(tokens, start_pos)`) and remembers which token ids are cached.
Each turn renders the whole conversation with the chat template, checks that the cached text is a
prefix of it, and feeds only the rest (the end of the last answer, the new user turn and the
assistant tag). When the prefix no longer matches (the system prompt changed, an answer was cut
mid-character) the session starts over. Ctrl-C sets a flag that stops the answer at the next token.

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
from typing import TYPE_CHECKING, Any, Callable, Iterator, TextIO

if TYPE_CHECKING:
    import torch

    from dsv3.engine.sampling import SamplingParams
    from dsv3.tokenizer import Tokenizer

DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_TEMPERATURE = 0.3  # DeepSeek-V3's recommended model temperature
DEFAULT_CHAT_CONTEXT = 8192  # chat cache size when the model allows more (the 671B model allows 163840)
PREFILL_CHUNK = 2048  # prompt tokens per forward; Ctrl-C is checked between chunks
DTYPES = {"auto": None, "bf16": "bfloat16", "fp32": "float32"}  # auto: float32 on a CPU (faster there), else bf16
CHAT_HELP = "commands: /reset (new conversation), /system TEXT (set the system prompt), /exit; " \
            "Ctrl-C stops an answer, Ctrl-D exits"


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


# ---- decoding over the model's cache -----------------------------------------------------------
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


class Session:
    """Batch-1 decoding over the model's contiguous cache. `tokens` are the ids whose latents are cached."""

    def __init__(self, model: Any, max_len: int) -> None:
        import torch
        from dsv3.engine.sampling import Sampler

        self.model = model
        self.max_len = max_len
        self.device = next(model.parameters()).device
        self.sampler = Sampler()
        self.tokens: list[int] = []
        self.prefill_tokens = 0  # tokens fed as prompts since the session began (a debug stat)
        model.setup_cache(1, max_len)
        self._torch = torch

    def reset(self) -> None:
        self.tokens = []  # stale latents beyond len(tokens) are never read

    @property
    def room(self) -> int:
        return self.max_len - len(self.tokens)

    def feed(self, ids: list[int]) -> "torch.Tensor":
        """Append `ids` to the cache; return the logits `[V]` (float32) of the token after them."""
        if not ids:
            raise ValueError("feed needs at least one token")
        if len(ids) > self.room:
            raise ValueError(f"the cache holds {self.max_len} tokens; {len(self.tokens)} used, {len(ids)} more asked")
        torch = self._torch
        with torch.inference_mode():
            x = torch.tensor([ids], dtype=torch.long, device=self.device)  # [1, T]
            h = self.model.hidden(x, len(self.tokens))[:, -1]  # [1, D]
            logits = self.model.lm_head(h)[0].float()  # [V]
        self.tokens += ids  # one in-place step: the cache and `tokens` stay in agreement
        return logits

    def generate(self, prompt_ids: list[int], params: "SamplingParams", stop_ids: set[int],
                 stop: StopFlag | None = None) -> Iterator[int]:
        """Feed `prompt_ids` (new tokens after the cached ones) and yield sampled ids. Sets
        `self.finish_reason` when done: EOS/stop ids are not yielded and not fed."""
        torch = self._torch
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self.finish_reason = "length"
        logits = None
        for i in range(0, len(prompt_ids), PREFILL_CHUNK):
            if stop is not None and stop.is_set:
                self.finish_reason = "interrupted"
                return
            chunk = prompt_ids[i:i + PREFILL_CHUNK]
            logits = self.feed(chunk)
            self.prefill_tokens += len(chunk)
        produced: list[int] = []
        while True:
            if stop is not None and stop.is_set:
                self.finish_reason = "interrupted"
                return
            out = self.sampler(logits[None], [params], [produced], [generator])
            token = int(out.token_ids[0])
            if token in stop_ids:
                self.finish_reason = "stop"
                return
            produced.append(token)
            yield token
            if len(produced) >= params.max_tokens or self.room < 1:
                return  # "length": the last token is not fed, as nothing follows it
            logits = self.feed([token])


def _stop_ids(tok: "Tokenizer", model: Any) -> set[int]:
    """EOS of the tokenizer and of the model's config.json (an int or a list)."""
    ids = {tok.eos_id} if tok.eos_id is not None else set()
    eos = getattr(getattr(model, "args", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    return ids


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


def _engine(model: Any, tok: "Tokenizer", device: str, lengths: list[int]) -> Any:
    """The engine's LLM. On CPU its cache is sized to what the prompts need (all of them running at
    once) when that is below the engine's default; on GPU the engine takes its default share."""
    from dsv3.engine import LLM
    from dsv3.engine.model_runner import DEFAULT_CPU_CACHE_BYTES, cache_bytes_per_block

    block_size, max_num_seqs = 16, 64
    num_blocks = None
    if device == "cpu":
        longest = -(-max(lengths) // block_size) + 1  # blocks of the longest sequence, plus one spare
        need = longest * min(len(lengths), max_num_seqs)
        if need * cache_bytes_per_block(model, block_size) < DEFAULT_CPU_CACHE_BYTES:
            num_blocks = need
    return LLM(model, tokenizer=tok, num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs)


def _generate(args: argparse.Namespace) -> int:
    from dsv3.tokenizer import load_tokenizer

    _check_common(args)
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
    llm = _engine(model, tok, args.device, [min(len(ids) + args.max_new_tokens, context) for ids in encoded])

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


# ---- chat ----------------------------------------------------------------------------------------
def chat_main(args: argparse.Namespace) -> int:
    """`dsv3 chat`: returns the exit code; every error is one line on stderr."""
    try:
        return _chat(args, sys.stdin, sys.stdout, sys.stderr)
    except UsageError as e:
        return _fail("dsv3 chat", str(e), 2)
    except (OSError, ValueError, RuntimeError) as e:
        if _debug(args):
            raise
        return _fail("dsv3 chat", _first_line(e), 1)


class Conversation:
    """Messages of one chat plus the session whose cache holds their rendered prefix."""

    def __init__(self, tok: "Tokenizer", session: Session, system: str | None) -> None:
        self.tok = tok
        self.session = session
        self.system = system
        self.messages: list[dict[str, Any]] = []

    def reset(self) -> None:
        self.messages = []
        self.session.reset()

    def new_tokens(self, user_text: str) -> tuple[list[int], str]:
        """Ids to feed for the next user turn, and what happens to the cache: "kept" (feed only the
        new turn), "new" (empty cache) or "rebuilt" (the cached text is no longer a prefix)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        full = self.tok.apply_chat_template(head + self.messages + [{"role": "user", "content": user_text}],
                                            add_generation_prompt=True)
        cached = self.tok.decode(self.session.tokens)
        if self.session.tokens and full.startswith(cached):
            return self.tok.encode(full[len(cached):], add_special_tokens=False), "kept"
        return self.tok.encode(full, add_special_tokens=False), "rebuilt" if self.session.tokens else "new"


def _chat(args: argparse.Namespace, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    from dsv3.tokenizer import load_tokenizer

    _check_common(args)
    if args.context is not None and args.context < 2:
        raise UsageError(f"--context must be >= 2, got {args.context}")
    path = _resolve_model(args.model)
    tok = load_tokenizer(path)
    model_ctx = _model_context(path)
    if args.context is not None and args.context > model_ctx:
        raise UsageError(f"--context {args.context} exceeds the model's context ({model_ctx} tokens)")
    params = _sampling(args)
    _check_device(args.device)
    model = _load(path, args)
    session = Session(model, args.context or min(model_ctx, DEFAULT_CHAT_CONTEXT))
    conv = Conversation(tok, session, args.system)
    interactive = stdin is sys.stdin and stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    print(f"dsv3 chat: {path.name} ({session.max_len} tokens of context). {CHAT_HELP}", file=stderr)
    stop = StopFlag()
    while True:
        try:
            if interactive:
                text = input(">>> ")
            else:
                line = stdin.readline()
                if not line:
                    break
                text = line.rstrip("\n")
        except EOFError:  # Ctrl-D
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, not an exit
            _write(stdout, "\n")
            continue
        if not text.strip():
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command == "/exit":
                break
            if command == "/reset":
                conv.reset()
                print("[conversation reset]", file=stderr)
            elif command == "/system":
                conv.system = rest.strip() or None
                print(f"[system prompt {'set' if conv.system else 'cleared'}]", file=stderr)
            else:
                print(f"[unknown command {command}; {CHAT_HELP}]", file=stderr)
            continue
        _answer(conv, text, params, stop, stdout, stderr, args.stats)
    return 0


def _answer(conv: Conversation, user_text: str, params: "SamplingParams", stop: StopFlag,
            stdout: TextIO, stderr: TextIO, stats: bool) -> None:
    """One chat turn: feed only the new tokens, stream the answer, record it in the conversation."""
    session, tok = conv.session, conv.tok
    new_ids, cache = conv.new_tokens(user_text)
    if cache != "kept":
        session.reset()
    if len(new_ids) >= session.room:
        print(f"[the conversation needs {len(session.tokens) + len(new_ids)} tokens but the context holds "
              f"{session.max_len}; /reset to start over]", file=stderr)
        return
    conv.messages.append({"role": "user", "content": user_text})
    decoder = tok.stream_decoder()
    ids: list[int] = []
    prefill_before = session.prefill_tokens
    start = time.perf_counter()
    first = None
    with stop:
        for token in session.generate(new_ids, params, _stop_ids(tok, session.model), stop):
            if first is None:
                first = time.perf_counter()
            ids.append(token)
            piece = decoder.step(token)
            if piece:
                _write(stdout, piece)
    _write(stdout, decoder.flush() + "\n")
    end = time.perf_counter()
    conv.messages.append({"role": "assistant", "content": tok.decode(ids)})
    rate = (len(ids) - 1) / (end - first) if first is not None and len(ids) > 1 and end > first else 0.0
    note = " (interrupted)" if session.finish_reason == "interrupted" else ""
    line = f"[{len(ids)} tokens, {rate:.1f} tokens/s{note}"
    if stats:
        line += (f"; prefilled {session.prefill_tokens - prefill_before} tokens, cache "
                 f"{cache}, {len(session.tokens)} cached, {end - start:.2f} s]")
    print(line + ("]" if not stats else ""), file=stderr)


def main(argv: list[str] | None = None) -> int:
    """`python -m dsv3.generate generate|chat ...` (the same verbs as `dsv3 generate|chat`)."""
    parser = argparse.ArgumentParser(prog="dsv3")
    add_parser(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
