"""Turns a query's growing token list into text deltas, and finds stop strings in it."""

from __future__ import annotations

from livelm.daemon.model.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"  # what a decoder shows for a UTF-8 sequence cut mid-way


class TextTracker:
    """Decodes incrementally: each update decodes only the tokens since the last complete
    piece of text, together with that piece (so merges across the boundary show), so the
    cost per token stays flat however long the answer grows."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._emitted = 0
        self._tokens: list[int] = []
        self._prefix = 0  # tokens[prefix:read] decode to the end of the text so far
        self._read = 0
        self.text = ""
        self.stopped = False

    def update(self, tokens: list[int]) -> str:
        """Takes the answer so far; returns the new text that is safe to show."""
        self._tokens = tokens
        self._decode_new(final=False)
        if self._stop:
            hit = self._first_stop(self.text)
            if hit is not None:
                self.text, self.stopped = self.text[:hit], True
                return self._take(len(self.text))
        safe = len(self.text) - self._hold
        return self._take(max(safe, self._emitted))

    def finish(self) -> str:
        """The rest of the text once the answer is complete."""
        if not self.stopped:
            self._decode_new(final=True)  # a cut UTF-8 sequence shows as U+FFFD, as in decode()
        return self._take(len(self.text))

    def _decode_new(self, final: bool) -> None:
        if self._read == len(self._tokens):
            return
        known = self._tokenizer.decode(self._tokens[self._prefix : self._read])
        now = self._tokenizer.decode(self._tokens[self._prefix :])
        if len(now) > len(known) and (final or not now.endswith(_INCOMPLETE)):
            self.text += now[len(known) :]
            self._prefix, self._read = self._read, len(self._tokens)

    def _first_stop(self, text: str) -> int | None:
        start = max(0, self._emitted - self._hold)
        hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _take(self, end: int) -> str:
        delta = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta
