"""Turns a query's growing token list into text deltas, and finds stop strings in it."""

from __future__ import annotations

from livelm.daemon.model.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"  # what a decoder shows for a UTF-8 sequence cut mid-way


class TextTracker:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._emitted = 0
        self.text = ""
        self.stopped = False

    def update(self, tokens: list[int]) -> str:
        """Re-decodes the answer so far; returns the new text that is safe to show."""
        text = self._tokenizer.decode(tokens)
        if self._stop:
            hit = self._first_stop(text)
            if hit is not None:
                self.text, self.stopped = text[:hit], True
                return self._take(len(self.text))
        self.text = text
        safe = len(text.rstrip(_INCOMPLETE)) - self._hold
        return self._take(max(safe, self._emitted))

    def finish(self) -> str:
        """The rest of the text once the answer is complete."""
        return self._take(len(self.text))

    def _first_stop(self, text: str) -> int | None:
        start = max(0, self._emitted - self._hold)
        hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _take(self, end: int) -> str:
        delta = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta
