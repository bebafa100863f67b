"""The raw TCP channel: 4-byte big-endian length, then a MessagePack map (protocol/framing.py)."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from livelm.client.channel import DEFAULT_MAX_FRAME, MessageCodec
from livelm.client.errors import ConnectionLost, DaemonUnreachable, InvalidReply, os_reason
from livelm.client.message_client import MessageClient
from livelm.protocol.errors import LiveLMError
from livelm.protocol.framing import FrameDecoder, encode_frame

READ_CHUNK = 64 * 1024
DEFAULT_PORT = 8081


class TcpChannel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str):
        self.description = where
        self._reader = reader
        self._writer = writer
        self._codec = MessageCodec(binary=True)
        self._decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        self._frames: deque[bytes] = deque()

    def set_max_frame(self, max_frame: int) -> None:
        self._codec.max_frame = max_frame
        self._decoder.max_frame = max_frame

    async def send(self, message: dict[str, Any]) -> None:
        payload = self._codec.encode(message)
        if self._writer.is_closing():
            raise ConnectionLost(f"the connection to {self.description} is closed")
        self._writer.write(encode_frame(payload))
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            raise ConnectionLost(f"the connection to {self.description} broke: {exc}") from exc

    async def receive(self) -> dict[str, Any]:
        while not self._frames:
            try:
                data = await self._reader.read(READ_CHUNK)
            except ConnectionError as exc:
                raise ConnectionLost(f"the connection to {self.description} broke: {exc}") from exc
            if not data:
                raise ConnectionLost(f"{self.description} closed the connection")
            try:
                self._frames.extend(self._decoder.feed(data))
            except LiveLMError as exc:  # FrameTooLarge, BadFrame: the stream is unusable
                raise InvalidReply(f"bad frame from {self.description}: {exc.message}") from exc
        return self._codec.decode(self._frames.popleft())

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except ConnectionError:
            pass  # already reset by the peer: it is closed either way


async def connect_tcp(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    api_key: str | None = None,
    connect_timeout: float = 10.0,
) -> MessageClient:
    """A connected client: ``hello`` sent, ``welcome`` read (``client.welcome``)."""
    where = f"tcp://{host}:{port}"
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), connect_timeout
        )
    except (OSError, asyncio.TimeoutError) as exc:
        reason = os_reason(exc) if isinstance(exc, OSError) else "timed out"
        raise DaemonUnreachable(f"cannot connect to the daemon at {where}: {reason}") from exc
    channel = TcpChannel(reader, writer, where)
    return await MessageClient.start(channel, api_key=api_key, timeout=connect_timeout)
