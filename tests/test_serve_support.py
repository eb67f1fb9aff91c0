"""Shared pieces of the `dsv3 serve` tests (no tests here): a tiny random DeepSeek-V3 checkpoint with
the real tokenizer, free ports, and running servers (a `dsv3 serve` subprocess, or uvicorn in a thread).

The checkpoint is written once by `transformers` (`DeepseekV3ForCausalLM(...).save_pretrained`) with
the real vocabulary size (129280, as the DeepSeek-V3 tokenizer needs) and tiny other dimensions, and
cached in the temp folder under a name derived from its config, so every serve test file (and every
server subprocess) reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "data" / "deepseek-v3-tokenizer"
FETCH = ROOT / ".ci" / "fetch_tokenizer.sh"
TINY = dict(vocab_size=129280, num_hidden_layers=2, first_k_dense_replace=1, max_position_embeddings=512)


def ensure_tokenizer_dir() -> Path:
    """The real DeepSeek-V3 tokenizer folder, fetched with .ci/fetch_tokenizer.sh if absent (fails, never skips)."""
    if not (TOKENIZER_DIR / "tokenizer.json").is_file() or not (TOKENIZER_DIR / "tokenizer_config.json").is_file():
        proc = subprocess.run(["bash", str(FETCH), str(TOKENIZER_DIR)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"DeepSeek-V3 tokenizer missing in {TOKENIZER_DIR} and fetching it failed: {proc.stderr[-500:]}")
    return TOKENIZER_DIR


def tiny_checkpoint() -> Path:
    """A tiny random DeepSeek-V3 checkpoint (HF format) with the real tokenizer files, cached on disk."""
    tok_dir = ensure_tokenizer_dir()
    from hf_models import V3_TINY, make_v3
    key = hashlib.sha256(json.dumps({**V3_TINY, **TINY}, sort_keys=True, default=str).encode()
                         + (tok_dir / "tokenizer_config.json").read_bytes()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"dsv3-serve-tiny-{key}"
    if (folder / "done").is_file():
        return folder
    part = Path(tempfile.mkdtemp(prefix="dsv3-serve-tiny-part-"))
    make_v3(part, seed=0, **TINY)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, part / name)
    (part / "done").write_text("ok")
    try:
        part.rename(folder)
    except OSError:  # another process finished first
        shutil.rmtree(part, ignore_errors=True)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server at {url} not healthy after {timeout} s")


class ServerProcess:
    """`python -m dsv3.cli serve --model CKPT --port P ...` in a subprocess, output in a log file."""

    def __init__(self, model: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="dsv3-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "dsv3.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(self.port), "--dtype", "float32", "--device", "cpu", "--log-level", "warning", *flags]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": "1"}  # two servers and the test process share a small machine
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def wait(self) -> "ServerProcess":
        try:
            wait_healthy(self.url, proc=self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"server failed to start:\n{self.output()[-3000:]}") from None
        return self

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class ThreadServer:
    """uvicorn serving `app` from a thread of this process (for fakes and in-process inspection)."""

    def __init__(self, app, **config) -> None:
        import uvicorn
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("in-process server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def metric(url: str, name: str) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    from dsv3.serve.metrics import parse_text
    return parse_text(httpx.get(f"{url}/metrics", timeout=5).text).get(name, 0.0)


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a streamed response, in order."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data:"):
            out.append(line[5:].strip())
    return out
