"""The WebSocket channel: ``GET /v1/ws``; one binary frame is one MessagePack message (or, with
``binary=False``, one text frame is one JSON message)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from livelm.client.channel import MessageCodec
from livelm.client.errors import (
    ConnectionLost,
    DaemonUnreachable,
    InvalidReply,
    error_from,
    os_reason,
)
from livelm.client.message_client import MessageClient
from livelm.protocol.errors import LiveLMError

WS_PATH = "/v1/ws"


class WsChannel:
    def __init__(self, ws: ClientConnection, where: str, binary: bool) -> None:
        self.description = where
        self._ws = ws
        self._codec = MessageCodec(binary=binary)

    def set_max_frame(self, max_frame: int) -> None:
        self._codec.max_frame = max_frame

    async def send(self, message: dict[str, Any]) -> None:
        payload = self._codec.encode(message)
        try:
            await self._ws.send(payload if self._codec.binary else payload.decode())
        except ConnectionClosed as exc:
            raise ConnectionLost(f"the connection to {self.description} closed: {exc}") from exc

    async def receive(self) -> dict[str, Any]:
        try:
            data = await self._ws.recv()
        except ConnectionClosed as exc:
            raise ConnectionLost(f"the connection to {self.description} closed: {exc}") from exc
        return self._codec.decode(data)

    async def close(self) -> None:
        await self._ws.close()


async def connect_ws(
    url: str = "http://127.0.0.1:8080",
    *,
    api_key: str | None = None,
    binary: bool = True,
    connect_timeout: float = 10.0,
) -> MessageClient:
    """A connected client on the daemon at ``url`` (http://, https://, ws:// or wss://)."""
    where = _ws_url(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key is not None else {}
    try:
        ws = await connect(
            where,
            additional_headers=headers,
            open_timeout=connect_timeout,
            max_size=None,  # the channel's frame limit is the daemon's max_frame
        )
    except InvalidStatus as exc:
        raise _refused(exc, where) from exc
    except (OSError, asyncio.TimeoutError, InvalidHandshake) as exc:
        reason = os_reason(exc) if isinstance(exc, OSError) else str(exc) or "timed out"
        raise DaemonUnreachable(f"cannot connect to the daemon at {where}: {reason}") from exc
    channel = WsChannel(ws, where, binary)
    return await MessageClient.start(channel, api_key=api_key, timeout=connect_timeout)


def _ws_url(url: str) -> str:
    base = url.rstrip("/")
    for http, ws in (("https://", "wss://"), ("http://", "ws://")):
        if base.startswith(http):
            base = ws + base[len(http) :]
    if not base.startswith(("ws://", "wss://")):
        raise ValueError(f"not an http(s):// or ws(s):// URL: {url!r}")
    return base if base.endswith(WS_PATH) else base + WS_PATH


def _refused(exc: InvalidStatus, where: str) -> LiveLMError | InvalidReply:
    """The daemon's error for a refused upgrade (a JSON error body, as on every HTTP route)."""
    status = exc.response.status_code
    try:
        body = msgspec.json.decode(exc.response.body or b"")
        error = body["error"]
        return error_from(error["code"], error["message"])
    except (msgspec.DecodeError, KeyError, TypeError) as decode_exc:
        return InvalidReply(f"{where} refused the upgrade with HTTP {status} ({decode_exc})")
