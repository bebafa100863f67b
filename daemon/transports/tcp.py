"""Raw TCP: frames of a 4-byte big-endian length and a MessagePack message, on the daemon's loop.

Each accepted socket is a ``TcpLink`` (an ``asyncio.Protocol``) feeding its ``Connection``.
Reading pauses while the connection has many messages waiting to be applied; writing waits
while the socket's send buffer is above ``WRITE_HIGH`` (a client that reads its tokens slowly
holds its own streams back instead of growing the daemon's memory). A client that half-closes
(shutdown SHUT_WR) gets every reply before the daemon closes its side.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, cast

from livelm.daemon.logs import get_logger
from livelm.daemon.transports.connection import Connection
from livelm.protocol.framing import BadFrame, FrameDecoder, FrameTooLarge, encode_frame
from livelm.protocol.wire import MSGPACK

if TYPE_CHECKING:
    from livelm.daemon.http.server import ServerState
    from livelm.daemon.metrics import WireCounters

log = get_logger(__name__)

WRITE_HIGH = 1 << 20  # bytes queued in the socket's send buffer before senders wait
WRITE_LOW = 256 << 10


class TcpLink(asyncio.Protocol):
    def __init__(self, state: ServerState, counters: WireCounters) -> None:
        self._state = state
        self._counters = counters
        self._decoder = FrameDecoder(state.config.max_frame)
        self._writable = asyncio.Event()
        self._writable.set()
        self._broken = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # ---- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # create_server: stream transports
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        self._connection = Connection(self._state, self, self._counters)
        log.debug("tcp connection opened", extra={"peer": transport.get_extra_info("peername")})

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        self._counters.bytes_in_total += len(data)
        try:
            frames = self._decoder.feed(data)
        except (BadFrame, FrameTooLarge) as exc:
            self._broken = True
            for payload in exc.frames:
                self._connection.receive(payload, MSGPACK)
            self._connection.fail(exc, MSGPACK)
            return
        for payload in frames:
            self._connection.receive(payload, MSGPACK)

    def eof_received(self) -> bool:
        if not self._broken:
            if self._decoder.buffered:
                self._broken = True
                message = f"the stream ended inside a frame ({self._decoder.buffered} bytes)"
                self._connection.fail(BadFrame(message), MSGPACK)
            else:
                self._connection.end()
        return True  # keep the write side open until the replies are out

    def connection_lost(self, exc: Exception | None) -> None:
        self._connection.lost()
        self._writable.set()  # senders waiting on a full buffer return (and send nothing more)
        if not self.closed.done():
            self.closed.set_result(None)
        log.debug("tcp connection closed", extra={"error": str(exc) if exc else None})

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # ---- Link (for the Connection) ------------------------------------------------------------
    async def send(self, data: bytes, binary: bool) -> None:
        if self._transport.is_closing():
            return
        frame = encode_frame(data)
        self._transport.write(frame)
        self._counters.bytes_out_total += len(frame)
        await self._writable.wait()

    def pause_reading(self) -> None:
        if not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if not self._transport.is_closing():
            self._transport.resume_reading()

    def close(self) -> None:
        self._transport.close()  # after the buffered replies are written

    async def answers_sent(self, timeout: float) -> None:
        await self._connection.answers_sent(timeout)


class TcpServer:
    """The listening socket and the connections it accepted."""

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._server: asyncio.AbstractServer | None = None
        self._links: set[TcpLink] = set()

    async def start(self, host: str, port: int) -> list[tuple[str, int]]:
        """Listens; returns the addresses bound. Raises ``OSError`` if the port is taken."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_link, host, port, reuse_address=True)
        return [sock.getsockname()[:2] for sock in self._server.sockets]

    def _new_link(self) -> TcpLink:
        link = TcpLink(self._state, self._state.wire.transports["tcp"])
        self._links.add(link)
        link.closed.add_done_callback(lambda _: self._links.discard(link))
        return link

    def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()

    async def close(self, timeout: float) -> None:
        """Stops listening; lets the answers streaming now finish, then closes every connection
        (each step waits up to ``timeout``)."""
        self.stop_listening()
        links = list(self._links)
        if not links:
            return
        await asyncio.gather(*(link.answers_sent(timeout) for link in links))
        for link in links:
            link.close()
        await asyncio.wait([link.closed for link in links], timeout=timeout)
