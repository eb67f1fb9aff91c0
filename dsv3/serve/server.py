"""Run a built app under uvicorn until SIGTERM or Ctrl-C, draining the engine first.

On SIGTERM (or the first Ctrl-C) the server stops taking requests (503), lets those in flight run for
`shutdown_grace` seconds, then aborts the rest (their streams end cleanly with finish reason "abort")
and returns; a second Ctrl-C exits at once. `dsv3 serve` (dsv3/cli/serve.py) builds the app and calls
`run_server`.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import uvicorn

def run_server(app: Any, host: str, port: int, log_level: str = "info", shutdown_grace: float = 30.0) -> None:
    """Serve `app` (from `dsv3.serve.app.create_app`) on host:port until drained."""

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
                return
            self.should_exit = True  # not re-raised after shutdown: a drained server exits 0
            app.state.engine_loop.begin_drain(shutdown_grace)

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_grace + 5, access_log=log_level == "debug")
    Server(config).run()
