"""``GET /v1/ws``: the message protocol over WebSocket, on the HTTP port.

A binary frame holds one MessagePack message, a text frame the same message as JSON; each reply
goes back in the encoding of the request that caused it (events: that of their ``subscribe``).
A message larger than ``max_frame`` closes the socket with WebSocket's own code 1009 (Message
Too Big). The upgrade request may carry the API key as a header (``Authorization: Bearer KEY``
or ``x-api-key``); otherwise the first message must be a ``hello`` with ``api_key``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import WSCloseCode, WSMsgType, web

from livelm.daemon.logs import get_logger
from livelm.daemon.transports.auth import KeyCheck
from livelm.daemon.transports.connection import Connection
from livelm.protocol.wire import JSON, MSGPACK

if TYPE_CHECKING:
    from livelm.daemon.http.server import ServerState
    from livelm.daemon.metrics import WireCounters

log = get_logger(__name__)

WS_PATH = "/v1/ws"
SHUTDOWN_WAIT_S = 3.0  # at shutdown, how long the answers streaming now may take to go out


class WsLink:
    def __init__(self, ws: web.WebSocketResponse, counters: WireCounters) -> None:
        self._ws = ws
        self._counters = counters
        self.readable = asyncio.Event()
        self.readable.set()
        self._closing: asyncio.Task[bool] | None = None

    async def send(self, data: bytes, binary: bool) -> None:
        if self._ws.closed:
            return
        opcode = WSMsgType.BINARY if binary else WSMsgType.TEXT
        try:
            await self._ws.send_frame(data, opcode)  # waits while the peer reads slowly
        except ConnectionResetError:
            log.debug("websocket client went away while a reply was sent")
            return
        self._counters.bytes_out_total += len(data)

    def pause_reading(self) -> None:
        self.readable.clear()

    def resume_reading(self) -> None:
        self.readable.set()

    def close(self) -> None:
        if self._closing is None and not self._ws.closed:
            self._closing = asyncio.get_running_loop().create_task(self._ws.close())


class WebSocketRoute:
    """The route and the open sockets (closed with 1001 Going Away when the server shuts down)."""

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._keys = KeyCheck(state.config.api_keys)
        self._open: dict[web.WebSocketResponse, Connection] = {}

    def install(self, app: web.Application) -> None:
        app.router.add_get(WS_PATH, self.handle)
        app.on_shutdown.append(self._close_all)

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=self._state.config.max_frame)
        await ws.prepare(request)
        counters = self._state.wire.transports["ws"]
        link = WsLink(ws, counters)
        authenticated = self._keys.required and self._keys.headers_match(request.headers)
        connection = Connection(self._state, link, counters, authenticated=authenticated)
        self._open[ws] = connection
        try:
            await _read(ws, link, connection, counters)
        except Exception:
            # past the upgrade no HTTP reply can be written: close the socket with 1011
            log.exception("websocket connection failed; closing it")
            await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"internal error")
        finally:
            connection.lost()
            self._open.pop(ws, None)
        return ws

    async def _close_all(self, app: web.Application) -> None:
        """At shutdown (the engine has stopped): the last answers go out, then 1001 Going Away."""
        open_now = list(self._open.items())
        await asyncio.gather(*(c.answers_sent(SHUTDOWN_WAIT_S) for _, c in open_now))
        for ws, _ in open_now:
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


async def _read(
    ws: web.WebSocketResponse, link: WsLink, connection: Connection, counters: WireCounters
) -> None:
    while True:
        await link.readable.wait()
        msg = await ws.receive()
        if msg.type is WSMsgType.BINARY:
            counters.bytes_in_total += len(msg.data)
            connection.receive(msg.data, MSGPACK)
        elif msg.type is WSMsgType.TEXT:
            data = msg.data.encode()
            counters.bytes_in_total += len(data)
            connection.receive(data, JSON)
        elif msg.type is WSMsgType.ERROR:
            # aiohttp has closed the socket with the fitting code (1009 for too large)
            log.debug("websocket closed on a protocol error: %s", msg.data)
            return
        else:  # CLOSE, CLOSING, CLOSED
            return
