"""A sans-I/O parser of server-sent events (the WHATWG event-stream format).

``SseParser().feed(chunk)`` returns the events completed by ``chunk``: ``event:`` names it
(``message`` when absent), ``data:`` lines are joined by newlines, ``id:`` sets the id that a
reconnecting client sends back as ``Last-Event-ID``. Comment lines (``:``) are keep-alives.
As in a browser, an id takes effect when its block ends, and a block with an id but no data
sets it without an event; ``feed`` reports such a block as an ``id_only`` event, so that a
reader learns where a stream starts before its first event.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class SseEvent:
    name: str
    data: str
    id: str | None  # the last id seen on the stream so far (SSE carries it over)

    @property
    def id_only(self) -> bool:
        """A block that only set the id: no event to dispatch."""
        return not self.name


class SseParser:
    def __init__(self) -> None:
        self._pending = b""
        self._name = ""
        self._data: list[str] = []
        self._id: str | None = None  # an id line of the block being read
        self.last_id: str | None = None

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Bytes as they arrive (a newline byte never splits a UTF-8 sequence)."""
        self._pending += chunk
        events: list[SseEvent] = []
        start = 0
        for end in _LINE_END.finditer(self._pending):
            if end.group() == b"\r" and end.end() == len(self._pending):
                break  # may be the first half of "\r\n": wait for the next byte
            line = self._pending[start : end.start()].decode("utf-8", errors="replace")
            start = end.end()
            event = self._line(line)
            if event is not None:
                events.append(event)
        self._pending = self._pending[start:]
        return events

    def _line(self, line: str) -> SseEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            self._name = value
        elif field == "data":
            self._data.append(value)
        elif field == "id" and "\0" not in value:
            self._id = value
        return None  # "retry" and unknown fields do not concern this client

    def _dispatch(self) -> SseEvent | None:
        name, data, new_id = self._name or "message", self._data, self._id
        self._name, self._data, self._id = "", [], None
        if new_id is not None:
            self.last_id = new_id
        if not data:
            return None if new_id is None else SseEvent("", "", self.last_id)
        return SseEvent(name, "\n".join(data), self.last_id)
