"""`dsv3 <verb>`: thin argparse front ends over the library.

Each verb lives beside the code it drives and registers itself with `add_parser(subparsers)`; this file
only collects them, and turns user errors into one clear line (no traceback) and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# optional dependencies and the pip extra that brings each
EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "httpx": "serve", "pyarrow": "eval", "matplotlib": "eval",
          "tensorboard": "train"}

# modules that provide add_parser(subparsers); each registers one or more verbs
VERB_MODULES = (
    "dsv3.cli_info",
    "dsv3.generate",  # generate, chat
    "dsv3.serve.cli",  # serve
    "dsv3.checkpoint.convert",  # convert fp8-to-bf16, bf16-to-fp8
    "dsv3.train.data",  # data prepare, data tokenize
    "dsv3.train.bpe",  # tokenizer train
    "dsv3.eval.cli",  # eval
    "dsv3.train.cli",  # train
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv3",
        description="DeepSeek-V3: run, serve, train, convert and evaluate DeepSeek-V3-family models.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in VERB_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as err:
        if args.debug or os.environ.get("DSV3_DEBUG"):
            raise
        name = (err.name or "").split(".")[0]
        extra = EXTRAS.get(name)
        hint = f"pip install 'dsv3[{extra}]'" if extra else f"pip install {name}"
        print(f"dsv3 {args.verb}: error: needs the Python package {name!r}: {hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dsv3: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
            RuntimeError, OSError) as err:
        if args.debug or os.environ.get("DSV3_DEBUG"):
            raise
        print(f"dsv3 {args.verb}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
