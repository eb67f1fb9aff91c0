"""The loop that feeds the engine: one background thread owns the `LLM`, HTTP handlers talk to it.

The engine is not thread-safe and its `step()` is a blocking forward pass, so exactly one thread
touches it. Handlers (on the asyncio event loop) `submit` a request's sequences — one per choice
and prompt — and get a `RequestHandle`; the engine thread applies queued adds and aborts between
steps, runs `step()` while anything is unfinished (so every live request shares each decode step:
continuous batching), and hands a step's `RequestOutput`s to their handles' asyncio queues with one
`call_soon_threadsafe` per step (one wake-up of the event loop, however many streams). PyTorch
releases the GIL inside its kernels, so the event loop stays responsive while the engine computes.

Back-pressure: `submit` raises `QueueFull` when the sequences waiting for admission (in the
engine's queue or about to enter it) would pass `max_waiting`; the app turns that into a 503.
Shutdown: `begin_drain(grace)` refuses new work and, after `grace` seconds, aborts what is left
(each aborted sequence is reported to its handle with finish reason "abort"); `idle` says when
nothing is left in flight; `shutdown()` aborts everything and joins the thread.

Any engine with the `LLM` interface works: `add_request(prompt, params) -> id`, `step()`,
`abort(id)`, `has_unfinished()`; state for metrics is read duck-typed (`scheduler.waiting`,
`scheduler.running`, `block_manager.num_used_blocks` / `num_blocks`), defaulting to zero.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator

from dsv3.serve.metrics import ServerMetrics, speculative_counts


class QueueFull(Exception):
    """Too many sequences are waiting; try again later (HTTP 503)."""


class ShuttingDown(Exception):
    """The server is draining for shutdown (HTTP 503)."""


class EngineError(Exception):
    """The engine failed while running this request."""


@dataclass
class Aborted:
    """Sequence `index` of a handle was aborted by the server (shutdown); carries its last output."""

    index: int


class RequestHandle:
    """The engine sequences of one HTTP request; their outputs arrive, in order, on one queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, num: int) -> None:
        self.num = num
        self.arrival = time.monotonic()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.accepted: asyncio.Future = loop.create_future()  # None once every sequence is in the engine
        self.engine_ids: list[int | None] = [None] * num
        self.finished = [False] * num  # set by the engine thread
        self._remaining = num  # sequences whose last output the consumer has not yet taken
        self.aborted = False  # the client went away: drop everything
        self._owner: EngineLoop | None = None

    def _push(self, item: Any) -> None:  # runs on the event loop
        self.queue.put_nowait(item)

    def _accept(self, error: BaseException | None) -> None:  # runs on the event loop
        if self.accepted.done():
            return
        if error is None:
            self.accepted.set_result(None)
        else:
            self.accepted.set_exception(error)

    async def __aiter__(self) -> AsyncIterator[tuple[int, Any]]:
        """Yields `(index, RequestOutput)`, or `(index, Aborted)`, until every sequence is done;
        raises `EngineError` (or the engine's ValueError) on failure."""
        while self._remaining > 0:  # counted from what arrived: `finished` runs ahead of the queue
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            index, out = item
            if isinstance(out, Aborted) or out.finished:
                self._remaining -= 1
            yield index, out

    def abort(self) -> None:
        """Stop generating for this request (client disconnected). Safe to call more than once."""
        if not self.aborted and self._owner is not None and not all(self.finished):
            self.aborted = True
            self._owner._request_abort(self)


def _deliver(deliveries: list[tuple[RequestHandle, tuple[int, Any]]]) -> None:  # runs on the event loop
    for handle, item in deliveries:
        handle._push(item)


class EngineLoop:
    """Owns the engine thread. Create, `start()` inside the event loop, `submit` from handlers."""

    def __init__(self, engine: Any, metrics: ServerMetrics | None = None, max_waiting: int | None = None) -> None:
        if max_waiting is not None and max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0 or None, got {max_waiting}")
        self.engine = engine
        self.metrics = metrics
        self.max_waiting = max_waiting
        self._cv = threading.Condition()
        self._adds: deque[tuple[RequestHandle, list[tuple[list[int], Any]]]] = deque()
        self._aborts: list[RequestHandle] = []
        self._pending = 0  # sequences submitted but not yet added to the engine
        self._stop = False
        self._abort_all = False
        self.draining = False
        self._live: dict[int, list[Any]] = {}  # engine id -> [handle, index, first token time, tokens]
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: threading.Timer | None = None
        self.num_steps = 0
        self._stats: dict[str, float] = {"running": 0, "waiting": 0, "cache_usage": 0.0, "blocks_used": 0,
                                         "blocks_total": 0, "preemptions": 0, "prefix_hits": 0}
        self._snapshot()

    # ---- lifecycle (event loop side) --------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
        self._thread.start()

    def begin_drain(self, grace: float) -> None:
        """Refuse new requests; abort the ones still running after `grace` seconds."""
        with self._cv:
            if self.draining:
                return
            self.draining = True
        self._timer = threading.Timer(grace, self._trigger_abort_all)
        self._timer.daemon = True
        self._timer.start()

    def _trigger_abort_all(self) -> None:
        with self._cv:
            self._abort_all = True
            self._cv.notify()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort whatever is left and stop the engine thread."""
        if self._timer is not None:
            self._timer.cancel()
        with self._cv:
            self.draining = True
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def idle(self) -> bool:
        """Nothing submitted is still waiting or running (the drain may end)."""
        with self._cv:
            return not self._adds and self._pending == 0 and not self._live

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, float]:
        """Latest engine state (running, waiting, cache use, ...), for /metrics and /health."""
        with self._cv:
            out = dict(self._stats)
            out["waiting"] += self._pending
            return out

    # ---- requests (event loop side) ---------------------------------------------------------
    def submit(self, sequences: list[tuple[list[int], Any]]) -> RequestHandle:
        """Queue sequences `(prompt token ids, SamplingParams)`; outputs arrive on the handle."""
        if not sequences:
            raise ValueError("submit needs at least one sequence")
        handle = RequestHandle(asyncio.get_running_loop(), len(sequences))
        handle._owner = self
        with self._cv:
            if self.draining or self._stop:
                raise ShuttingDown("the server is shutting down")
            if not self.is_alive:
                raise EngineError("the engine thread is not running")
            if self.max_waiting is not None and self._stats["waiting"] + self._pending + len(sequences) > self.max_waiting:
                raise QueueFull(f"the waiting queue is full ({self.max_waiting} sequences)")
            self._pending += len(sequences)
            self._adds.append((handle, sequences))
            self._cv.notify()
        return handle

    def _request_abort(self, handle: RequestHandle) -> None:
        with self._cv:
            self._aborts.append(handle)
            self._cv.notify()

    # ---- engine thread ----------------------------------------------------------------------
    def _post(self, fn: Any, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                while not (self._adds or self._aborts or self._stop or self._abort_all or engine.has_unfinished()):
                    self._cv.wait()
                adds, self._adds = self._adds, deque()
                aborts, self._aborts = self._aborts, []
                stop, abort_all = self._stop, self._abort_all
                self._abort_all = False
            for handle in aborts:
                self._abort_handle(handle)
            for handle, sequences in adds:
                self._add(handle, sequences)
            if stop or abort_all:
                for rid in list(self._live):
                    handle, index = self._live[rid][:2]
                    engine.abort(rid)
                    self._retire(rid, "abort")
                    handle.finished[index] = True
                    self._post(handle._push, (index, Aborted(index)))
            if stop:
                self._snapshot()
                return
            if engine.has_unfinished():
                self._step()
            self._snapshot()

    def _add(self, handle: RequestHandle, sequences: list[tuple[list[int], Any]]) -> None:
        added: list[int] = []
        error: BaseException | None = None
        if not handle.aborted:
            try:
                for index, (prompt, params) in enumerate(sequences):
                    rid = self.engine.add_request(prompt, params)
                    added.append(rid)
                    handle.engine_ids[index] = rid
                    self._live[rid] = [handle, index, None, 0]
                    if self.metrics is not None:
                        self.metrics.prompt_tokens.inc(len(prompt))
            except Exception as err:  # noqa: BLE001 - reported to the request, never kills the loop
                error = err if isinstance(err, ValueError) else EngineError(f"{type(err).__name__}: {err}")
                for rid in added:
                    self.engine.abort(rid)
                    self._live.pop(rid, None)
        with self._cv:
            self._pending -= len(sequences)
        self._post(handle._accept, error)

    def _abort_handle(self, handle: RequestHandle) -> None:
        for index, rid in enumerate(handle.engine_ids):
            if rid is not None and rid in self._live and not handle.finished[index]:
                self.engine.abort(rid)
                self._retire(rid, "abort")
                handle.finished[index] = True

    def _retire(self, rid: int, reason: str | None) -> None:
        info = self._live.pop(rid, None)
        if info is None or self.metrics is None:
            return
        handle, _, first, ntok = info
        end = time.monotonic()
        self.metrics.requests.inc(1, reason or "unknown")
        if reason != "abort":
            self.metrics.e2e.observe(end - handle.arrival)
            if first is not None and ntok > 1:
                self.metrics.tpot.observe((end - first) / (ntok - 1))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as err:  # noqa: BLE001 - fail the requests in flight, keep serving
            failure = EngineError(f"engine step failed: {type(err).__name__}: {err}")
            for rid in list(self._live):
                handle, index = self._live[rid][:2]
                self.engine.abort(rid)
                self._retire(rid, "error")
                handle.finished[index] = True
                self._post(handle._push, failure)
            return
        self.num_steps += 1
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.engine_steps.inc()
        deliveries: list[tuple[RequestHandle, tuple[int, Any]]] = []
        for out in outputs:
            info = self._live.get(out.request_id)
            if info is None:
                continue  # aborted meanwhile
            handle, index = info[0], info[1]
            n_new = len(out.new_token_ids)
            if n_new and info[2] is None:
                info[2] = now
                if self.metrics is not None:
                    self.metrics.ttft.observe(now - handle.arrival)
            info[3] += n_new
            if self.metrics is not None and n_new:
                self.metrics.generation_tokens.inc(n_new)
            if out.finished:
                self._retire(out.request_id, out.finish_reason)
                handle.finished[index] = True
            if not handle.aborted:
                deliveries.append((handle, (index, out)))
        if deliveries:
            self._post(_deliver, deliveries)

    def _snapshot(self) -> None:
        """Copy the engine's state for other threads (only the engine thread reads the engine)."""
        engine = self.engine
        sched = getattr(engine, "scheduler", None)
        bm = getattr(engine, "block_manager", None)
        stats = {
            "running": float(len(getattr(sched, "running", ()))),
            "waiting": float(len(getattr(sched, "waiting", ()))),
            "blocks_used": float(getattr(bm, "num_used_blocks", 0)),
            "blocks_total": float(getattr(bm, "num_blocks", 0)),
            "preemptions": float(getattr(engine, "num_preemptions", 0) or 0),
            "prefix_hits": float(getattr(engine, "prefix_cache_hit_tokens", 0) or 0),
            "steps": float(self.num_steps),
            **speculative_counts(engine),
        }
        stats["cache_usage"] = stats["blocks_used"] / stats["blocks_total"] if stats["blocks_total"] else 0.0
        with self._cv:
            self._stats = stats
