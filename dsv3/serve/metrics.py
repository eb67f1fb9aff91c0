"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a dependency.

Three kinds, as Prometheus defines them: `Counter` (only goes up, name ends in `_total`), `Gauge`
(set to a value, or read from a callback at scrape time) and `Histogram` (cumulative `le` buckets,
`_sum`, `_count`). Every update takes one lock, so the engine thread and the HTTP handlers can
both record. `ServerMetrics` holds the set `dsv3 serve` exposes at `/metrics`.
"""

from __future__ import annotations

import math
import threading
from typing import Callable


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Metric:
    kind = ""

    def __init__(self, name: str, help_: str, labelnames: tuple[str, ...] = ()) -> None:
        self.name = name
        self.help = help_
        self.labelnames = labelnames
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_: str, labelnames: tuple[str, ...] = ()) -> None:
        super().__init__(name, help_, labelnames)
        self._values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name} can only go up, got {amount}")
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_fmt(v)}" for k, v in items]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help_: str, read: Callable[[], float] | None = None) -> None:
        super().__init__(name, help_)
        self._value = 0.0
        self._read = read

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def value(self) -> float:
        if self._read is not None:
            return float(self._read())
        with self._lock:
            return self._value

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_fmt(self.value())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]) -> None:
        super().__init__(name, help_)
        if list(buckets) != sorted(buckets) or not buckets:
            raise ValueError(f"histogram {name}: buckets must be increasing, got {buckets}")
        self.buckets = tuple(buckets) + (math.inf,)
        self._counts = [0] * len(self.buckets)  # per bucket, not cumulative
        self._sum = 0.0

    def observe(self, value: float) -> None:
        with self._lock:
            for i, upper in enumerate(self.buckets):
                if value <= upper:
                    self._counts[i] += 1
                    break
            self._sum += value

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts)

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines = self.header()
        running = 0
        for upper, c in zip(self.buckets, counts):
            running += c
            lines.append(f'{self.name}_bucket{{le="{_fmt(upper)}"}} {running}')
        lines.append(f"{self.name}_sum {_fmt(total)}")
        lines.append(f"{self.name}_count {running}")
        return lines


class PositionCounter(_Metric):
    """A counter per draft position, read from the stats keys `{key}.{position}` at scrape time (speculative
    decoding: drafts verified and accepted at each position of a step's drafts)."""

    kind = "counter"

    def __init__(self, name: str, help_: str, key: str, read: Callable[[], dict[str, float]]) -> None:
        super().__init__(name, help_, ("position",))
        self._key = key
        self._read = read

    def values(self) -> dict[int, float]:
        prefix = self._key + "."
        return {int(k[len(prefix):]): v for k, v in self._read().items() if k.startswith(prefix)}

    def render(self) -> list[str]:
        return self.header() + [f'{self.name}{{position="{i}"}} {_fmt(v)}' for i, v in sorted(self.values().items())]


def speculative_counts(engine: object) -> dict[str, float]:
    """The stats keys `PositionCounter` reads: `spec_drafted.{i}` and `spec_accepted.{i}` of an engine with
    speculative decoding (`LLM.speculative_stats`), none without it."""
    stats = getattr(engine, "speculative_stats", None)
    if stats is None:
        return {}
    out = {f"spec_drafted.{i}": float(n) for i, n in enumerate(stats.drafted)}
    out.update({f"spec_accepted.{i}": float(n) for i, n in enumerate(stats.accepted)})
    return out


_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    """What `/metrics` shows. Gauges of engine state are read from `stats()` at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, float]], prefix: str = "dsv3") -> None:
        self._stats = stats
        p = prefix

        def gauge(name: str, key: str, help_: str) -> Gauge:
            return Gauge(f"{p}_{name}", help_, read=lambda: self._stats().get(key, 0.0))

        self.num_running = gauge("num_requests_running", "running", "Sequences in the engine's running batch.")
        self.num_waiting = gauge("num_requests_waiting", "waiting",
                                 "Sequences waiting for admission (queued in the engine or about to be).")
        self.cache_usage = gauge("cache_usage_ratio", "cache_usage", "Fraction of KV cache blocks in use (0-1).")
        self.cache_blocks_used = gauge("cache_blocks_used", "blocks_used", "KV cache blocks in use.")
        self.cache_blocks_total = gauge("cache_blocks_total", "blocks_total", "KV cache blocks in all.")
        self.prompt_tokens = Counter(f"{p}_prompt_tokens_total", "Prompt tokens of admitted requests.")
        self.generation_tokens = Counter(f"{p}_generation_tokens_total", "Tokens generated.")
        self.engine_steps = Counter(f"{p}_engine_steps_total", "Engine steps (one forward pass each).")
        self.preemptions = gauge("num_preemptions", "preemptions", "Sequences preempted so far.")
        self.prefix_hits = gauge("prefix_cache_hit_tokens", "prefix_hits", "Prompt tokens served from the prefix cache.")
        self.requests = Counter(f"{p}_request_success_total", "Finished sequences by finish reason.",
                                ("finished_reason",))
        self.http_errors = Counter(f"{p}_http_errors_total", "Error responses by HTTP status.", ("status",))
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Time from arrival to the first token.",
                              _LATENCY_BUCKETS)
        self.tpot = Histogram(f"{p}_time_per_output_token_seconds",
                              "Mean time between output tokens of a finished sequence.", _LATENCY_BUCKETS)
        self.e2e = Histogram(f"{p}_e2e_request_latency_seconds", "Time from arrival to the last token.",
                             _LATENCY_BUCKETS)
        self.spec_drafts = PositionCounter(f"{p}_spec_decode_num_draft_tokens_total",
                                           "Speculative drafts verified, per draft position.", "spec_drafted", stats)
        self.spec_accepted = PositionCounter(f"{p}_spec_decode_num_accepted_tokens_total",
                                             "Speculative drafts accepted, per draft position.", "spec_accepted", stats)
        self._all = [self.num_running, self.num_waiting, self.cache_usage, self.cache_blocks_used,
                     self.cache_blocks_total, self.prompt_tokens, self.generation_tokens, self.engine_steps,
                     self.preemptions, self.prefix_hits, self.requests, self.http_errors, self.ttft, self.tpot, self.e2e,
                     self.spec_drafts, self.spec_accepted]

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._all:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


def parse_text(text: str) -> dict[str, float]:
    """Samples of a text exposition as {`name{labels}`: value} (for tests and the benchmark)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out
