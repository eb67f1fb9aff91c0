"""Run a built app under uvicorn until SIGTERM or Ctrl-C, draining the engine first.

On SIGTERM (or the first Ctrl-C) the server keeps listening but takes no new requests: they get 503
with `Retry-After` (and `/health` says "draining"), while the requests in flight run on for up to
`shutdown_grace` seconds; then the rest are aborted (their streams end cleanly with finish reason
"abort"), uvicorn closes the socket and `run_server` returns. A second Ctrl-C exits at once.
Connections use `dsv3.serve.guards`' h11 protocol, which closes those whose request headers take longer
than `header_timeout` seconds. `dsv3 serve` (dsv3/cli/serve.py) builds the app and calls `run_server`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

import uvicorn

from dsv3.serve.guards import guarded_protocol


def run_server(app: Any, host: str, port: int, log_level: str = "info", shutdown_grace: float = 30.0,
               header_timeout: float = 10.0) -> None:
    """Serve `app` (from `dsv3.serve.app.create_app`) on host:port until drained."""
    engine_loop = app.state.engine_loop

    class Server(uvicorn.Server):
        draining = False

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.draining:
                if sig == signal.SIGINT:
                    self.force_exit = True
                    self.should_exit = True
                return
            self.draining = True  # not re-raised after shutdown: a drained server exits 0
            engine_loop.begin_drain(shutdown_grace)
            threading.Thread(target=self._exit_when_idle, name="dsv3-drain", daemon=True).start()

        def _exit_when_idle(self) -> None:
            deadline = time.monotonic() + shutdown_grace + 5  # the grace aborts what is left; this is a backstop
            while not engine_loop.idle and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)  # let the last chunks reach their clients
            self.should_exit = True

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=guarded_protocol(header_timeout),
                            timeout_graceful_shutdown=shutdown_grace + 5, access_log=log_level == "debug")
    Server(config).run()
