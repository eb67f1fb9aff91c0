"""`dsv3 <verb>`: the command line, one module per verb in this package, and its one error policy.

Each verb module has `add_arguments(parser)` and `run(args) -> exit code` (verbs with sub-verbs, such
as `dsv3 data prepare|tokenize`, set `run` per sub-verb); shared flag groups live in `flags.py`. Only
the verb named on the command line is imported and given its flags, so `dsv3 --help` loads no torch.

Errors, for every verb alike: one line `dsv3 <verb>: error: <message>` on stderr, no traceback, and
- exit 2 when the command line is wrong: argparse's own checks, and `flags.UsageError` (a flag value
  that cannot work here: a missing model folder, a CUDA device that is not present, ...);
- exit 1 when the command ran and failed: `ValueError`, `OSError`, `RuntimeError` from the library,
  and a missing optional package (the message names the pip extra that brings it);
- exit 130 on Ctrl-C (`dsv3 <verb>: interrupted`), from the first moment, while the verb is imported too;
- exit 141, silently, when stdout is a pipe closed early (`dsv3 ... | head -1`).
`dsv3 --debug <verb> ...` or `DSV3_DEBUG=1` lets errors raise with their traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterator, Sequence

from dsv3 import __version__
from dsv3.cli.flags import Parser, UsageError

# verb -> (module, one-line help); the module is imported only when the verb is used
VERBS = {
    "generate": ("dsv3.cli.generate", "generate text for one prompt or a file of prompts"),
    "chat": ("dsv3.cli.chat", "interactive multi-turn chat in the terminal"),
    "serve": ("dsv3.cli.serve", "serve a model with an OpenAI-compatible HTTP API and a chat page"),
    "convert": ("dsv3.cli.convert", "convert a checkpoint between FP8 and BF16"),
    "info": ("dsv3.cli.info", "print a model's shape and parameter counts"),
    "data": ("dsv3.cli.data", "build the corpus and its token shards"),
    "tokenizer": ("dsv3.cli.tokenizer", "tokenizer tools"),
    "train": ("dsv3.cli.train", "pre-train a DeepSeek-V3 model on token shards"),
    "plot": ("dsv3.cli.plot", "plot training runs: losses, learning rate, throughput, expert load"),
    "sft": ("dsv3.cli.sft", "instruction-tune a checkpoint on chat conversations"),
    "eval": ("dsv3.cli.eval", "evaluate a model: bits-per-byte, multiple choice, GSM8K, HumanEval, needle"),
}

# verbs that import torch: `main` imports it for them first, where Ctrl-C stops the process cleanly
TORCH_VERBS = {"generate", "chat", "serve", "convert", "info", "eval", "train", "sft"}

# optional dependencies and the pip extra that brings each (the hint has the README's form, `pip install -e ".[serve]"`)
EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "httpx": "serve", "pyarrow": "eval", "matplotlib": "eval",
          "tensorboard": "train", "lm_eval": "lm-eval"}


def _leaves(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parsers that run something: `parser` itself, or the leaves of its sub-verbs."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for sub in subs:
        for child in dict.fromkeys(sub.choices.values()):
            yield from _leaves(child)


def build_parser(verbs: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `dsv3` parser. Every verb is listed; only those in `verbs` (default: all) get their flags."""
    parser = Parser(prog="dsv3", description="DeepSeek-V3: run, serve, train, convert and evaluate "
                                             "DeepSeek-V3-family models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors (also DSV3_DEBUG=1)")
    parser.add_argument("--version", action="version", version=f"dsv3 {__version__}",
                        help="print the version and exit")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, (module, help_text) in VERBS.items():
        p = subparsers.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        if verbs is None or name in verbs:
            importlib.import_module(module).add_arguments(p)
            for leaf in _leaves(p):
                leaf.set_defaults(prog=leaf.prog)
    return parser


def _import_torch(prog: str) -> None:
    """Import torch with Ctrl-C ending the process at once (message, exit 130). A KeyboardInterrupt raised inside
    torch's import can be swallowed by it (the run then goes on), break numpy's import, or abort the process
    from a pybind11 callback; nothing is lost by stopping there."""
    import signal
    import threading

    if "torch" in sys.modules or threading.current_thread() is not threading.main_thread():
        import torch  # noqa: F401
        return

    def stop(signum: int, frame: object) -> None:
        sys.stderr.write(f"{prog}: interrupted\n")
        sys.stderr.flush()
        os._exit(130)

    previous = signal.signal(signal.SIGINT, stop)
    try:
        import torch  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, previous)


def _verb(argv: Sequence[str]) -> str | None:
    """The verb named in `argv`: its first word that is not a flag (the top level takes no values)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _message(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run `dsv3 <verb> ...`; returns the exit code (see the module docstring for the error policy).

    Ctrl-C is caught from the first moment here (importing the verb and building its parser included), and a
    closed stdout (`dsv3 ... | head -1`) ends the run quietly, as Python's documentation on SIGPIPE advises:
    stdout is pointed at devnull so that the interpreter's last flush does not fail again."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = _verb(argv)
    prog = f"dsv3 {verb}" if verb in VERBS else "dsv3"
    debug = "--debug" in argv[: argv.index(verb) if verb in argv else len(argv)] or bool(os.environ.get("DSV3_DEBUG"))
    try:
        code = _run(argv, verb)
        sys.stdout.flush()  # a closed pipe is reported here, not at the interpreter's exit
        return code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell tool stopped by a closed pipe returns


def _run(argv: list[str], verb: str | None) -> int:
    parser = build_parser([v for v in [verb] if v in VERBS])
    try:
        args, unknown = parser.parse_known_args(argv)
    except SystemExit as stop:  # --help (0) or a bad command line (2, already reported in one line)
        return int(stop.code or 0)
    prog = getattr(args, "prog", f"dsv3 {args.verb}")
    if unknown:  # reported by the verb that was given them
        print(f"{prog}: error: unrecognized arguments: {' '.join(unknown)}", file=sys.stderr)
        return 2
    debug = args.debug or bool(os.environ.get("DSV3_DEBUG"))
    if args.verb in TORCH_VERBS:
        _import_torch(prog)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise  # handled by `main`
    except UsageError as err:
        if debug:
            raise
        print(f"{prog}: error: {_message(err)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if debug:
            raise
        name = (err.name or "").split(".")[0]
        extra = EXTRAS.get(name)
        hint = f'pip install -e ".[{extra}]" (in the dsv3 checkout)' if extra else f"pip install {name}"
        print(f"{prog}: error: needs the Python package {name!r}: {hint}", file=sys.stderr)
        return 1
    except (ValueError, OSError, RuntimeError) as err:
        if debug:
            raise
        print(f"{prog}: error: {_message(err)}", file=sys.stderr)
        return 1
