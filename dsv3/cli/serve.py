"""`dsv3 serve`: load a checkpoint into the engine and serve it over HTTP (OpenAI API + chat page).

The engine is configured by the shared engine flags (one `EngineConfig`); the app is
`dsv3.serve.app.create_app`, run by `dsv3.serve.server.run_server`. SIGTERM (or Ctrl-C) drains: no new
requests are answered 503 with Retry-After (the socket stays open), requests in flight may finish for
`--shutdown-grace` seconds, then the rest are aborted, and the process exits 0.

Exposure: without `--api-key` only `localhost` and IP-address Host headers are served (DNS rebinding);
`--allowed-hosts` names others, `--allowed-origins` enables CORS for browser apps on other origins.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from dsv3.cli import flags
from dsv3.cli.flags import UsageError, nonnegative_float, nonnegative_int, positive_int


LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def port_number(text: str) -> int:
    value = int(text) if text.isdigit() else -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in [1, 65535], got {text!r}")
    return value


def name_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("needs at least one name (comma-separated)")
    return names


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port to listen on (1-65535)")
    p.add_argument("--api-key", default=os.environ.get("DSV3_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $DSV3_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: the folder name)")
    p.add_argument("--max-waiting", type=nonnegative_int, default=256,
                   help="most sequences waiting for admission before new requests get 503 (a request that alone "
                        "brings more is a 400)")
    p.add_argument("--max-body-bytes", type=positive_int, default=4 << 20,
                   help="largest accepted request body (413 above)")
    p.add_argument("--shutdown-grace", type=nonnegative_float, default=30.0,
                   help="seconds in-flight requests may run after SIGTERM before they are aborted")
    p.add_argument("--allowed-hosts", type=name_list, default=None, metavar="H1,H2",
                   help="Host header names served ('*' for any); default: any with --api-key, else only "
                        "localhost and IP addresses (blocks DNS rebinding)")
    p.add_argument("--allowed-origins", type=name_list, default=None, metavar="URL1,URL2",
                   help="browser origins allowed to call the API (CORS), e.g. https://app.example.com; default: none")
    p.add_argument("--max-request-tokens", type=positive_int, default=None,
                   help="prompt tokens one request may bring over its prompts and n choices "
                        "(default: the larger of the context length and 16384)")
    p.add_argument("--header-timeout", type=positive_seconds, default=10.0,
                   help="seconds a client has to send a request's headers before the connection is closed")
    p.add_argument("--body-timeout", type=positive_seconds, default=30.0,
                   help="seconds a client has to send a request's body (408 after)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="server log level")
    flags.add_model(p)
    flags.add_device(p)
    flags.add_dtype(p)
    flags.add_engine(p)
    flags.add_threads(p)
    p.set_defaults(run=run)


def build(args: argparse.Namespace) -> tuple[Any, Path]:
    """The app for these flags (loads the model) and the checkpoint folder it serves. Under torchrun, ranks other
    than 0 run the engine's steps instead and return no app once rank 0 stops."""
    from dsv3.engine import LLM
    from dsv3.serve.app import create_app
    from dsv3.serve.server import run_server  # noqa: F401  (a missing uvicorn is reported before the model loads)

    if args.api_key is not None and not args.api_key:
        raise UsageError("--api-key must not be empty")
    from dsv3.cli.generate import start_line

    path = flags.resolve_model(args.model, chat=True)
    config = flags.engine_config(args, flags.resolve_device(args.device))
    engine = LLM(path, config=config)
    print(start_line("serve", path, engine.model, config, args.threads), file=sys.stderr, flush=True)
    if not engine.is_driver:  # under torchrun: rank 0 serves, the other ranks run its steps until it stops
        engine.run_worker()
        return None, path
    name = args.served_model_name or path.resolve().name
    app = create_app(engine, served_model_name=name, api_key=args.api_key, max_waiting=args.max_waiting,
                     max_body_bytes=args.max_body_bytes, shutdown_grace=args.shutdown_grace,
                     allowed_hosts=args.allowed_hosts, allowed_origins=args.allowed_origins,
                     max_request_tokens=args.max_request_tokens, body_timeout=args.body_timeout)
    return app, path


def run(args: argparse.Namespace) -> int:
    from dsv3.serve.server import run_server

    app, path = build(args)
    if app is None:  # a rank other than 0 under torchrun, after rank 0 stopped
        return 0
    print(f"dsv3 serve: {path} as {app.state.served_model_name!r} on http://{args.host}:{args.port}", flush=True)
    run_server(app, args.host, args.port, args.log_level, args.shutdown_grace, args.header_timeout)
    return 0
