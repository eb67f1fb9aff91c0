"""`dsv3 chat`: an interactive multi-turn chat in the terminal that keeps the conversation's cache.

The engine's cache is per request, so chat keeps one conversation's cache between turns itself: a
`Session` decodes batch-1 over the model's own contiguous latent cache (`Transformer.setup_cache` +
`hidden(tokens, start_pos)`) and remembers which token ids are cached. Each turn the `Conversation`
renders the whole conversation with the chat template, checks that the cached text is a prefix of
it, and feeds only the rest (the end of the last answer, the new user turn and the assistant tag).
When the prefix no longer matches (the system prompt changed, an answer was cut mid-character) the
session starts over. Ctrl-C sets a flag that stops the answer at the next token (at the prompt it
gives a fresh prompt); /reset, /system TEXT and /exit are read between turns.

Sampling uses the engine's `SamplingParams` / `Sampler` and streaming the tokenizer's
`IncrementalDecoder`, as `generate` does. Flags, their checks, model loading, `StopFlag` and the
one-line errors are shared with `dsv3 generate` and live in `generate.py`, which also registers this
verb (`add_parser`); `chat_main` is its entry point.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any, Iterator, TextIO

from dsv3.generate import (
    StopFlag, UsageError, _check_common, _check_device, _debug, _fail, _first_line, _load, _model_context,
    _resolve_model, _sampling, _write,
)

if TYPE_CHECKING:
    import torch

    from dsv3.engine.sampling import SamplingParams
    from dsv3.tokenizer import Tokenizer

DEFAULT_CHAT_CONTEXT = 8192  # chat cache size when the model allows more (the 671B model allows 163840)
PREFILL_CHUNK = 2048  # prompt tokens per forward; Ctrl-C is checked between chunks
CHAT_HELP = "commands: /reset (new conversation), /system TEXT (set the system prompt), /exit; " \
            "Ctrl-C stops an answer, Ctrl-D exits"


# ---- decoding over the model's cache -----------------------------------------------------------
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
