"""What the client's operations return, decoded from reply maps of any transport.

Fields that PROTOCOL.md guarantees are required; the ones only some transports send (HTTP
replies carry more than the TCP ``session`` message) are optional. Unknown keys are ignored,
as the contract asks.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from livelm.client.errors import InvalidReply
from livelm.protocol.messages import DataUpdated, DoneReply, EventsLost, FlashAnswer

__all__ = [
    "DataUpdated",
    "DoneReply",
    "Event",
    "EventsLost",
    "FlashAnswer",
    "SessionInfo",
    "Status",
    "Welcome",
    "decode_reply",
]

T = TypeVar("T")

Event = FlashAnswer | DataUpdated | EventsLost
EVENT_TYPES: dict[str, type[msgspec.Struct]] = {
    "flash_answer": FlashAnswer,
    "data_updated": DataUpdated,
    "events_lost": EventsLost,
}


class Welcome(msgspec.Struct, kw_only=True):
    version: int
    server: str = ""
    model: str = ""
    max_frame: int


class SessionInfo(msgspec.Struct, kw_only=True):
    session_id: str
    prompt_tokens: int | None = None
    template: str | None = None
    format: str | None = None
    window: int | None = None
    special_tokens: str | None = None


class Status(msgspec.Struct, kw_only=True):
    session_id: str
    data_seq: int  # last entry accepted
    ingested_seq: int  # last entry whose tokens are all in the KV cache
    context_tokens: int
    pending_tokens: int
    window: int
    prompt_tokens: int | None = None
    entries: int | None = None
    first_seq: int | None = None
    dropped_entries: int | None = None
    template: str | None = None
    format: str | None = None
    error: str | None = None  # why the session stopped advancing; its queries then fail


class _Ack(msgspec.Struct):
    seq: int


class _FlashRegistered(msgspec.Struct):
    query_id: int


def decode_reply(message: Any, kind: type[T]) -> T:
    """``message`` (a decoded map) as ``kind``; a reply that does not fit is ``InvalidReply``."""
    try:
        return msgspec.convert(message, type=kind)
    except msgspec.ValidationError as exc:
        raise InvalidReply(f"reply does not fit {kind.__name__}: {exc}") from exc


def ack_seq(message: Any) -> int:
    return decode_reply(message, _Ack).seq


def flash_query_id(message: Any) -> int:
    return decode_reply(message, _FlashRegistered).query_id


def decode_event(name: str, body: Any) -> Event | None:
    """An event by its name, or None for an event this client does not know."""
    kind = EVENT_TYPES.get(name)
    return None if kind is None else decode_reply(body, kind)  # type: ignore[return-value]
