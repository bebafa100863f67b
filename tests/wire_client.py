"""A blocking test client of the framed TCP protocol (and the same over WebSocket).

Messages are plain dicts, written as PROTOCOL.md shows them. ``request`` sends one message and
returns the reply with its ``id``; messages for other ids that arrive meanwhile are kept in
``others`` for the test to look at.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, Self

import msgspec
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from livelm.protocol.framing import FrameDecoder, encode_frame

TIMEOUT = 60.0
ANY_SIZE = 1 << 31


class Closed(Exception):
    """The daemon closed the connection."""


class _Requester(ABC):
    """Request ids, replies matched to their request, and ``with`` closing: what both blocking
    clients share over their own ``send``/``recv``."""

    def __init__(self) -> None:
        self.others: list[dict[str, Any]] = []
        self._ids = itertools.count(1)

    @abstractmethod
    def send(self, msg: dict[str, Any]) -> None: ...

    @abstractmethod
    def recv(self) -> dict[str, Any]: ...

    @abstractmethod
    def close(self) -> None: ...

    def next_id(self) -> int:
        return next(self._ids)

    def reply_to(self, request_id: int) -> dict[str, Any]:
        """The next message with this id; others are kept in ``self.others``."""
        while True:
            msg = self.recv()
            if msg.get("id") == request_id:
                return msg
            self.others.append(msg)

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        msg = {"id": self.next_id(), **msg}
        self.send(msg)
        return self.reply_to(msg["id"])

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TcpClient(_Requester):
    def __init__(self, port: int, timeout: float = TIMEOUT) -> None:
        super().__init__()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._decoder = FrameDecoder(ANY_SIZE)
        self._inbox: deque[dict[str, Any]] = deque()

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(encode_frame(msgspec.msgpack.encode(msg)))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any]:
        while not self._inbox:
            data = self.sock.recv(1 << 16)
            if not data:
                raise Closed("the daemon closed the connection")
            for payload in self._decoder.feed(data):
                self._inbox.append(msgspec.msgpack.decode(payload))
        return self._inbox.popleft()

    def wait_closed(self) -> list[dict[str, Any]]:
        """Every message until the daemon closes the connection."""
        received = []
        while True:
            try:
                received.append(self.recv())
            except (Closed, ConnectionResetError):
                return received

    def close(self) -> None:
        self.sock.close()


class WsClient(_Requester):
    """The same over ``/v1/ws``: ``binary`` sends MessagePack frames, else JSON text frames."""

    def __init__(self, url: str, binary: bool, headers: dict[str, str] | None = None) -> None:
        super().__init__()
        self.binary = binary
        connection = ws_connect(
            url, additional_headers=headers, open_timeout=TIMEOUT, max_size=None
        )
        self.ws: ClientConnection = connection.__enter__()  # closed by close()
        self.kinds: set[str] = set()  # "binary" / "text": the frame kinds received

    def send(self, msg: dict[str, Any], binary: bool | None = None) -> None:
        """In the client's encoding, or the one given."""
        if self.binary if binary is None else binary:
            self.ws.send(msgspec.msgpack.encode(msg))
        else:
            self.ws.send(msgspec.json.encode(msg).decode())

    def recv_frame(self, timeout: float = TIMEOUT) -> tuple[dict[str, Any], bool]:
        """The next message and whether it came as a binary (MessagePack) frame."""
        frame = self.ws.recv(timeout=timeout)
        if isinstance(frame, bytes):
            self.kinds.add("binary")
            return msgspec.msgpack.decode(frame), True
        self.kinds.add("text")
        return msgspec.json.decode(frame), False

    def recv(self) -> dict[str, Any]:
        return self.recv_frame()[0]

    def close(self) -> None:
        self.ws.close()


class AsyncTcpClient:
    """The framed protocol on asyncio streams, for many concurrent producers in one test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._decoder = FrameDecoder(ANY_SIZE)
        self._inbox: deque[dict[str, Any]] = deque()

    @classmethod
    async def connect(cls, port: int) -> AsyncTcpClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, msg: dict[str, Any]) -> None:
        self.writer.write(encode_frame(msgspec.msgpack.encode(msg)))
        await self.writer.drain()

    async def recv(self) -> dict[str, Any]:
        while not self._inbox:
            data = await asyncio.wait_for(self.reader.read(1 << 16), TIMEOUT)
            if not data:
                raise Closed("the daemon closed the connection")
            for payload in self._decoder.feed(data):
                self._inbox.append(msgspec.msgpack.decode(payload))
        return self._inbox.popleft()

    async def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """For a connection with one request in flight: its reply."""
        await self.send(msg)
        reply = await self.recv()
        if reply.get("id") != msg.get("id"):
            raise AssertionError(f"expected the reply to {msg}, got {reply}")
        return reply

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()
