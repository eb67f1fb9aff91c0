"""`dsv3.serve`: an OpenAI-compatible HTTP server and chat page over the `dsv3` engine.

`create_app(engine)` (in `app.py`) builds the FastAPI app and `server.run_server` runs it under uvicorn;
`dsv3 serve` (dsv3/cli/serve.py) wires them to the flags. Importing this package loads neither FastAPI
nor torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from dsv3.serve.app import create_app
        return create_app
    raise AttributeError(f"module 'dsv3.serve' has no attribute {name!r}")
