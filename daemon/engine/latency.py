"""The engine's latency histograms (Prometheus), observed on the event loop thread."""

from __future__ import annotations

from livelm.daemon.metrics import Histogram


class Latency:
    def __init__(self) -> None:
        self.first_token = Histogram(
            "first_token_seconds",
            "From a query's admission to its first token (a classification: its answer), "
            "waiting for the data it must see included; cached flash answers not counted",
        )
        self.answer = Histogram(
            "answer_seconds", "From a query's admission to its end (done, failed or cancelled)"
        )
        self.ingest = Histogram(
            "ingest_seconds",
            "From a push's acknowledgement until its last entry is in the KV cache, so that "
            "a query sees it without waiting",
        )

    def histograms(self) -> tuple[Histogram, ...]:
        return (self.first_token, self.answer, self.ingest)
