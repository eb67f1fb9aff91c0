"""`dsv3 serve`: load a checkpoint into the engine and serve it over HTTP (OpenAI API + chat page).

`add_parser(subparsers)` registers the verb for `dsv3/cli.py`; `python -m dsv3.serve.cli ...` runs
it alone. SIGTERM (or Ctrl-C) drains: no new requests are taken (503), requests in flight may
finish for `--shutdown-grace` seconds, then the rest are aborted (their streams end cleanly with
finish reason "abort"), and the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    """Register `serve` on an argparse subparsers object."""
    p = subparsers.add_parser("serve", help="serve a model with an OpenAI-compatible HTTP API and a chat page",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint folder (HF DeepSeek-V3 layout); default: the built-in default model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (1-65535)")
    p.add_argument("--api-key", default=os.environ.get("DSV3_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $DSV3_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: the folder name)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most sequences decoded together in one step")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length (prompt + output) per sequence; default: the model's and cache's limit")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one engine step")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="most sequences waiting for admission before new requests get 503")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weight dtype; auto = bfloat16 on GPU, float32 on CPU")
    p.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks (default: sized from memory)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="fused MoE/MLA kernels and CUDA graphs for decode steps, GPU only; default (None): on with "
                        "a CUDA device and BF16 weights, off otherwise; --no-fast forces the plain PyTorch path")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest accepted request body (413 above)")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds in-flight requests may run after SIGTERM before they are aborted")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level")


def _check(args: argparse.Namespace) -> None:
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_waiting < 0:
        raise ValueError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    if args.num_blocks is not None and args.num_blocks < 1:
        raise ValueError(f"--num-blocks must be >= 1, got {args.num_blocks}")
    if args.shutdown_grace < 0:
        raise ValueError(f"--shutdown-grace must be >= 0, got {args.shutdown_grace}")
    if args.api_key is not None and not args.api_key:
        raise ValueError("--api-key must not be empty")


def resolve_model(model: str | None) -> Path:
    """The checkpoint folder to serve: `model`, or the built-in default one."""
    if model is None:
        import dsv3
        return dsv3.default_model_path()  # FileNotFoundError with a clear message when not installed
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"--model: checkpoint folder not found: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model: {path} has no config.json (not a checkpoint folder)")
    return path


def build(args: argparse.Namespace) -> tuple[Any, Path]:
    """The app for these arguments (loads the model)."""
    import torch

    from dsv3.engine.llm import LLM
    from dsv3.serve.app import create_app
    _check(args)
    path = resolve_model(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if str(device).startswith("cuda") else "float32")
    engine = LLM(path, device=device, dtype=dtype, num_blocks=args.num_blocks, block_size=args.block_size,
                 max_num_seqs=args.max_num_seqs, max_num_batched_tokens=max(args.max_num_batched_tokens,
                                                                            args.max_num_seqs),
                 max_model_len=args.max_model_len, fast=args.fast)
    name = args.served_model_name or path.resolve().name
    app = create_app(engine, served_model_name=name, api_key=args.api_key, max_waiting=args.max_waiting,
                     max_body_bytes=args.max_body_bytes, shutdown_grace=args.shutdown_grace, model_path=str(path))
    return app, path


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM / Ctrl-C."""
    import uvicorn

    app, path = build(args)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
                return
            self.should_exit = True  # not re-raised after shutdown: a drained server exits 0
            app.state.engine_loop.begin_drain(args.shutdown_grace)

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_grace + 5, access_log=args.log_level == "debug")
    print(f"dsv3 serve: {path} as {app.state.served_model_name!r} on http://{args.host}:{args.port}", flush=True)
    Server(config).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dsv3.serve.cli [flags]`: the verb on its own, with one-line errors."""
    parser = argparse.ArgumentParser(prog="dsv3 serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        print(f"dsv3 serve: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
