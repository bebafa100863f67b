"""A minimal server-sent events reader over a plain socket, for end-to-end tests.

It speaks HTTP/1.0, so the daemon streams the body without chunked framing and closes the
connection when the stream ends; reads have a timeout, so a missing event fails the test.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

READ_TIMEOUT = 60.0


@dataclass(frozen=True)
class SseEvent:
    name: str
    id: int | None
    data: dict[str, Any]


class SseStream:
    def __init__(
        self,
        port: int,
        path: str,
        headers: dict[str, str] | None = None,
        *,
        rcvbuf: int | None = None,
        timeout: float = READ_TIMEOUT,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the TCP window stays small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        lines = [f"GET {path} HTTP/1.0", "Host: 127.0.0.1", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.file = self.sock.makefile("rb")
        self.status: int | None = None
        self.comments = 0

    def read_head(self) -> int:
        """Reads the status line and headers; returns the status."""
        if self.status is None:
            self.status = int(self.file.readline().split()[1])
            while self.file.readline() not in (b"\r\n", b"\n", b""):
                pass
        return self.status

    def body_json(self) -> dict[str, Any]:
        self.read_head()
        return json.loads(self.file.read())

    def next_event(self) -> SseEvent | None:
        """The next event, or None when the server ended the stream."""
        self.read_head()
        name, event_id, data = "message", None, []
        while True:
            line = self.file.readline()
            if not line:
                return None
            line = line.rstrip(b"\r\n").decode()
            if not line:
                if data:
                    return SseEvent(name, event_id, json.loads("\n".join(data)))
                continue
            if line.startswith(":"):
                self.comments += 1
                continue
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "event":
                name = value
            elif key == "id":
                event_id = int(value)
            elif key == "data":
                data.append(value)

    def events_until(self, done: Any) -> list[SseEvent]:
        """Events up to and including the first for which ``done(event)`` holds."""
        out = []
        while True:
            event = self.next_event()
            if event is None:
                raise AssertionError(f"stream ended before the awaited event; got {out}")
            out.append(event)
            if done(event):
                return out

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> SseStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
