"""A message channel: one connection carrying whole messages (plain dicts) both ways.

The TCP and WebSocket clients differ only in their channel; the request multiplexing above it
is shared (``message_client.py``).
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from livelm.client.errors import InvalidReply
from livelm.protocol.errors import InvalidRequest, TooLarge

DEFAULT_MAX_FRAME = 16 * 1024 * 1024  # PROTOCOL.md's default, until the welcome says otherwise


class Channel(Protocol):
    description: str  # where it goes, for error messages ("tcp://127.0.0.1:8081")

    def set_max_frame(self, max_frame: int) -> None:
        """The daemon's limit from ``welcome``: larger messages are refused before sending."""

    async def send(self, message: dict[str, Any]) -> None: ...

    async def receive(self) -> dict[str, Any]:
        """The next message; ``ConnectionLost`` once the connection has ended."""
        ...

    async def close(self) -> None: ...


class MessageCodec:
    """Client messages to bytes and back, in MessagePack (binary) or JSON."""

    def __init__(self, binary: bool = True) -> None:
        self.binary = binary
        self.max_frame = DEFAULT_MAX_FRAME  # the daemon's, once its welcome has said
        module = msgspec.msgpack if binary else msgspec.json
        self._encoder = module.Encoder()
        self._decoder = module.Decoder()

    def encode(self, message: dict[str, Any]) -> bytes:
        """``TooLarge`` for a message over ``max_frame``, ``InvalidRequest`` for a value the
        encoding cannot hold (an int of 2**64 or more in MessagePack, a lone surrogate):
        refused before it is sent, the connection stays usable."""
        try:
            payload = self._encoder.encode(message)
        except (OverflowError, ValueError, msgspec.EncodeError) as exc:
            encoding = "MessagePack" if self.binary else "JSON"
            raise InvalidRequest(
                f"a {message.get('type')!r} message cannot be encoded as {encoding}: {exc}"
            ) from exc
        if len(payload) > self.max_frame:
            raise TooLarge(
                f"a {message.get('type')!r} message of {len(payload)} bytes exceeds the "
                f"daemon's max_frame ({self.max_frame} bytes)"
            )
        return payload

    def decode(self, payload: bytes | str) -> dict[str, Any]:
        try:
            value = self._decoder.decode(payload)
        except msgspec.DecodeError as exc:
            raise InvalidReply(f"the daemon sent an undecodable message: {exc}") from exc
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            raise InvalidReply(f"the daemon sent a message without a type: {value!r:.200}")
        return value
