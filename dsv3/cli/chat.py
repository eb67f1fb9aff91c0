"""`dsv3 chat`: an interactive multi-turn chat in the terminal, on the engine.

Reads one user turn per line (with line editing when stdin is a terminal), streams each answer, and
keeps the conversation in a `dsv3.chat.ChatSession`, whose token ids let the engine's prefix cache
serve the earlier turns. Between turns: /reset (new conversation), /system TEXT (set the system prompt,
empty clears it), /exit. Ctrl-C stops an answer (at the prompt it gives a fresh prompt), Ctrl-D exits.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, TextIO

from dsv3.cli import flags

if TYPE_CHECKING:
    from dsv3.chat import ChatSession
    from dsv3.engine.sampling import SamplingParams

COMMANDS = "commands: /reset (new conversation), /system TEXT (set the system prompt), /exit; " \
           "Ctrl-C stops an answer, Ctrl-D exits"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Chat with a DeepSeek-V3 checkpoint. The conversation is kept as token ids, so the engine's "
                     f"prefix cache reuses the earlier turns. {COMMANDS}.")
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt (default: none)")
    p.add_argument("--stats", action="store_true",
                   help="after each answer also print the prompt's length and how much of it the prefix cache "
                        "served (default: tokens/s only)")
    flags.add_model(p, weights=True)
    flags.add_device(p)
    flags.add_dtype(p)
    flags.add_sampling(p)
    flags.add_engine(p)
    flags.add_threads(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dsv3.chat import ChatSession
    from dsv3.engine import LLM
    from dsv3.tokenizer import load_tokenizer

    from dsv3.cli.generate import check_text, start_line

    check_text("--system", args.system)
    path = flags.resolve_model(args.model, chat=True)
    params = flags.sampling_params(args)
    config = flags.engine_config(args, flags.resolve_device(args.device))
    tok = load_tokenizer(path)
    model = flags.load_model(args, path, config)
    print(start_line("chat", path, model, config, args.threads), file=sys.stderr)
    context = min(model.args.max_seq_len, args.max_model_len or model.args.max_seq_len)
    llm = LLM(model, tokenizer=tok, config=flags.fit_cpu_cache(config, model, [context]))  # one conversation
    if not llm.is_driver:  # under torchrun: rank 0 talks to the user, the other ranks run its steps
        llm.run_worker()
        return 0
    session = ChatSession(llm, tok, args.system)
    print(f"dsv3 chat: {path.name} ({llm.max_model_len} tokens of context). {COMMANDS}", file=sys.stderr)
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach `repl` as surrogates, reported there
        sys.stdin.reconfigure(errors="surrogateescape")
    return repl(session, params, sys.stdin, sys.stdout, sys.stderr, args.stats)


def _write(stream: TextIO, text: str) -> None:
    stream.write(text)
    stream.flush()


def _read(stdin: TextIO, interactive: bool) -> str | None:
    """The next line (None at end of input); Ctrl-C at the prompt raises KeyboardInterrupt."""
    if interactive:
        try:
            return input(">>> ")
        except EOFError:  # Ctrl-D
            return None
    line = stdin.readline()
    return line.rstrip("\n") if line else None


def repl(session: "ChatSession", params: "SamplingParams", stdin: TextIO, stdout: TextIO, stderr: TextIO,
         stats: bool = False) -> int:
    """Read turns and commands until /exit or the end of input; answers go to stdout, notes to stderr."""
    from dsv3.chat import ContextFull
    from dsv3.generate import StopFlag

    interactive = stdin is sys.stdin and stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    stop = StopFlag()
    lineno = 0
    while True:
        try:
            text = _read(stdin, interactive)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, not an exit
            _write(stdout, "\n")
            continue
        if text is None:
            break
        lineno += 1
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            print(f"[input line {lineno} is not valid UTF-8 text; not sent]", file=stderr)
            continue
        if not text.strip():
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command == "/exit":
                break
            if command == "/reset":
                session.reset()
                print("[conversation reset]", file=stderr)
            elif command == "/system":
                session.system = rest.strip() or None
                print(f"[system prompt {'set' if session.system else 'cleared'}]", file=stderr)
            else:
                print(f"[unknown command {command}; {COMMANDS}]", file=stderr)
            continue
        start = time.perf_counter()
        try:
            turn = session.turn(text, params, lambda piece: _write(stdout, piece), stop)
        except ContextFull as e:
            print(f"[{e}]", file=stderr)
            continue
        _write(stdout, "\n")
        elapsed = time.perf_counter() - start
        answer = turn.answer
        n = len(answer.token_ids)
        note = " (interrupted)" if answer.finish_reason == "interrupted" else ""
        line = f"[{n} tokens, {n / max(elapsed, 1e-9):.1f} tokens/s{note}"
        if stats:
            line += (f"; prompt {len(turn.prompt_ids)} tokens, {answer.num_cached_tokens} from the prefix cache, "
                     f"conversation {turn.cache}")
        print(line + "]", file=stderr)
    return 0
