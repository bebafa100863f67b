"""Prometheus text exposition (format 0.0.4) for ``GET /metrics``, with no client library.

HTTP requests are counted here by route, method and status; the engine's ``metrics()`` dict is
rendered with the ``livelm_`` prefix (names ending in ``_total`` as counters, the rest as gauges).
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping

from livelm.daemon.process_metrics import process_values

PREFIX = "livelm_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_BAD_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_:]")


class HttpMetrics:
    """Request counters; ``route`` is the route's pattern (``/v1/sessions/{id}/generate``)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._requests: Counter[tuple[str, str, str]] = Counter()
        self._seconds: Counter[tuple[str, str]] = Counter()

    def observe(self, route: str, method: str, status: int | str, seconds: float) -> None:
        self._requests[(route, method, str(status))] += 1
        self._seconds[(route, method)] += seconds

    def count(self, route: str, method: str, status: int | str) -> int:
        return self._requests[(route, method, str(status))]

    def uptime(self) -> float:
        return time.monotonic() - self.started

    def lines(self) -> list[str]:
        out = _header("http_requests_total", "counter", "HTTP requests by route, method, status")
        for (route, method, status), n in sorted(self._requests.items()):
            labels = {"route": route, "method": method, "status": status}
            out.append(_sample("http_requests_total", n, labels))
        out += _header("http_request_seconds_total", "counter", "Time spent serving requests")
        for (route, method), secs in sorted(self._seconds.items()):
            out.append(
                _sample("http_request_seconds_total", secs, {"route": route, "method": method})
            )
        return out


class WireCounters:
    """Connections, frames and bytes of one message transport (``tcp`` or ``ws``)."""

    def __init__(self) -> None:
        self.connections_open = 0
        self.connections_total = 0
        self.frames_in_total = 0
        self.frames_out_total = 0
        self.bytes_in_total = 0
        self.bytes_out_total = 0
        self.read_pauses_total = 0  # times a connection stopped reading: requests piled up

    def opened(self) -> None:
        self.connections_open += 1
        self.connections_total += 1

    def closed(self) -> None:
        self.connections_open -= 1


class WireMetrics:
    """The counters of the TCP and WebSocket transports, labelled by transport."""

    def __init__(self) -> None:
        self.transports = {"tcp": WireCounters(), "ws": WireCounters()}

    def lines(self) -> list[str]:
        out: list[str] = []
        for name in vars(WireCounters()):
            kind = "counter" if name.endswith("_total") else "gauge"
            metric = "wire_" + name
            out += _header(metric, kind, f"Message transports: {name.replace('_', ' ')}")
            for transport, counters in self.transports.items():
                out.append(_sample(metric, getattr(counters, name), {"transport": transport}))
        return out


# seconds: an H200 answers in a few milliseconds, a CPU in tenths of a second
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0
)


class Histogram:
    """A Prometheus histogram: cumulative counts at fixed upper bounds, their sum and count."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help_text, self.buckets = name, help_text, buckets
        self._counts = [0] * len(buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self._counts[i] += 1
                return

    def lines(self) -> list[str]:
        out = _header(self.name, "histogram", self.help_text)
        running = 0
        for bound, n in zip(self.buckets, self._counts, strict=True):
            running += n
            out.append(_sample(f"{self.name}_bucket", running, {"le": _number(bound)}))
        out.append(_sample(f"{self.name}_bucket", self.count, {"le": "+Inf"}))
        out.append(_sample(f"{self.name}_sum", self.sum))
        out.append(_sample(f"{self.name}_count", self.count))
        return out


def render(
    http: HttpMetrics,
    engine: Mapping[str, float],
    *,
    ready: bool,
    wire: WireMetrics | None = None,
    histograms: Iterable[Histogram] = (),
) -> str:
    """The whole exposition: process gauges, HTTP and wire counters, then the engine's values
    and latency histograms."""
    lines = _header("up_seconds", "gauge", "Seconds since the daemon started")
    lines.append(_sample("up_seconds", http.uptime()))
    lines += _header("ready", "gauge", "1 when the model is loaded and the engine runs")
    lines.append(_sample("ready", 1 if ready else 0))
    lines += process_lines()
    lines += http.lines()
    if wire is not None:
        lines += wire.lines()
    lines += engine_lines(engine.items())
    for histogram in histograms:
        lines += histogram.lines()
    return "\n".join(lines) + "\n"


ENGINE_HELP = {
    "sessions": "Open sessions",
    "queries_inflight": "Queries admitted and not yet finished",
    "kv_blocks": "KV cache blocks in the pool",
    "kv_blocks_reserved": "KV cache blocks reserved by sessions, queries and kept conversations",
    "ring_words_used": "Words queued in the ring to the GPU worker",
    "worker_alive": "1 while the GPU worker thread runs",
    "worker_turn_seconds": "Seconds since the worker last made progress (grows when stuck)",
    "worker_steps_total": "Model steps the worker ran",
    "worker_graph_steps_total": "Model steps replayed from a CUDA graph",
    "worker_eager_steps_total": "Model steps run eagerly",
    "event_subscribers": "Event stream subscribers, over all sessions",
    "flash_rounds_inflight": "Sessions whose flash queries are being answered",
    "token_cache_hits_total": "Token piece cache hits",
    "token_cache_misses_total": "Token piece cache misses",
    "prefix_cache_conversations": "Conversations whose KV is kept for the next turn",
    "prefix_cache_blocks_reserved": "KV cache blocks held by kept conversations",
    "prefix_cache_hits_total": "Turns that reused a kept conversation's KV",
    "prefix_cache_misses_total": "Turns that found no reusable KV",
    "prefix_cache_reused_tokens_total": "Prompt tokens served from kept KV instead of computed",
    "prefix_cache_evictions_total": "Kept conversations dropped to make room",
    "journal_sessions_restored_total": "Sessions restored from journal_dir at start",
    "journal_errors_total": "Journal writes that failed (those sessions are no longer journaled)",
    "entries_accepted_total": "Data entries accepted by pushes",
    "queries_started_total": "Queries handed to the worker (cached answers excluded)",
    "tokens_generated_total": "Answer tokens generated",
    "ring_full_waits_total": "Times a producer waited for room in the ring (backpressure)",
    "flash_rounds_total": "Flash query rounds asked",
    "flash_rounds_retried_total": "Flash rounds asked again after finding no KV room",
    "flash_rounds_coalesced_total": "Data that joined a flash round already asked for",
    "flash_answers_published_total": "Flash answers published to subscribers",
}


def engine_lines(items: Iterable[tuple[str, float]]) -> list[str]:
    lines: list[str] = []
    for raw_name, value in sorted(items):
        name = metric_name(raw_name)
        kind = "counter" if raw_name.endswith("_total") else "gauge"
        lines += _header(name, kind, ENGINE_HELP.get(raw_name, f"Engine metric {raw_name}"))
        lines.append(_sample(name, value))
    return lines


def process_lines() -> list[str]:
    """The standard process_* families, unprefixed, as client libraries name them."""
    lines: list[str] = []
    for name, (kind, help_text, value) in process_values().items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {_number(value)}"]
    return lines


def metric_name(name: str) -> str:
    """A valid Prometheus name (without the prefix): bad characters become ``_``."""
    clean = _BAD_NAME_CHARS.sub("_", name)
    return f"_{clean}" if clean[:1].isdigit() else clean


def _header(name: str, kind: str, help_text: str) -> list[str]:
    escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    return [f"# HELP {PREFIX}{name} {escaped}", f"# TYPE {PREFIX}{name} {kind}"]


def _sample(name: str, value: float, labels: Mapping[str, str] | None = None) -> str:
    label_text = ""
    if labels:
        label_text = "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"
    return f"{PREFIX}{name}{label_text} {_number(value)}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
