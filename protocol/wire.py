"""The messages of the TCP and WebSocket transports (PROTOCOL.md), in MessagePack or JSON.

Client messages form one tagged union on ``type``. Those that carry an engine request subclass
the request struct of ``messages.py`` (``InitMsg`` is an ``InitRequest``), so HTTP and the wire
accept the same fields and a decoded message goes to the engine as it is. Unknown keys are
ignored; a wrong type raises ``InvalidRequest`` whose message names the field.

Server messages carry ``type`` and echo the request's ``id``; those wrapping an engine reply
subclass the reply struct and are built with ``reply(Cls, id, engine_reply)``.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import msgspec

from livelm.protocol.errors import InvalidRequest, LiveLMError
from livelm.protocol.messages import (
    DataUpdated,
    DoneReply,
    EventsLost,
    FlashAnswer,
    FlashRegistered,
    FlashSpec,
    GenerateRequest,
    InitRequest,
    PushRequest,
    SessionReply,
    StatusReply,
)

PROTOCOL_VERSION = 1
Topic = Literal["flash", "data"]


def _tagged(name: str) -> dict[str, Any]:
    return {"tag_field": "type", "tag": name, "kw_only": True}


# ---- client -> server ------------------------------------------------------------------------


class HelloMsg(msgspec.Struct, **_tagged("hello")):
    version: int = PROTOCOL_VERSION
    api_key: str | None = None
    client: str | None = None
    id: int | None = None


class InitMsg(InitRequest, **_tagged("init")):
    id: int


class PushMsg(PushRequest, **_tagged("push")):
    session_id: str
    id: int | None = None


class GenerateMsg(GenerateRequest, **_tagged("generate")):
    id: int
    session_id: str
    stream: bool = True  # on the wire tokens stream unless asked not to


class FlashMsg(FlashSpec, **_tagged("flash")):
    id: int
    session_id: str


class SubscribeMsg(msgspec.Struct, **_tagged("subscribe")):
    id: int
    session_id: str
    events: list[Topic] = []  # empty: every topic
    last_event_id: int | None = None  # resume after this event (None: from now on)


class UnsubscribeMsg(msgspec.Struct, **_tagged("unsubscribe")):
    id: int  # the subscribe request's id


class StatusMsg(msgspec.Struct, **_tagged("status")):
    id: int
    session_id: str


class CloseMsg(msgspec.Struct, **_tagged("close")):
    id: int
    session_id: str


class PingMsg(msgspec.Struct, **_tagged("ping")):
    id: int


ClientMessage = (
    HelloMsg
    | InitMsg
    | PushMsg
    | GenerateMsg
    | FlashMsg
    | SubscribeMsg
    | UnsubscribeMsg
    | StatusMsg
    | CloseMsg
    | PingMsg
)

# ---- server -> client ------------------------------------------------------------------------


class WelcomeMsg(msgspec.Struct, **_tagged("welcome"), omit_defaults=True):
    version: int
    server: str
    model: str
    max_frame: int
    id: int | None = None


class SessionMsg(SessionReply, **_tagged("session")):
    id: int


class AckMsg(msgspec.Struct, **_tagged("ack"), omit_defaults=True):
    session_id: str
    seq: int  # the last seq assigned
    accepted: int  # entries of this push
    id: int | None = None


class TokenMsg(msgspec.Struct, **_tagged("token")):
    id: int
    text: str
    token: int | None


class DoneMsg(DoneReply, **_tagged("done")):
    id: int


class FlashRegisteredMsg(FlashRegistered, **_tagged("flash_registered")):
    id: int


class FlashAnswerMsg(FlashAnswer, **_tagged("flash_answer")):
    event_id: int  # the session's event id (resume with subscribe.last_event_id)
    id: int  # the subscribe request's id


class DataUpdatedMsg(DataUpdated, **_tagged("data_updated")):
    event_id: int
    id: int


class EventsLostMsg(EventsLost, **_tagged("events_lost")):
    event_id: int
    id: int


class UnsubscribedMsg(msgspec.Struct, **_tagged("unsubscribed")):
    """The last message of a subscription that ended on the daemon's side."""

    id: int
    session_id: str
    reason: str


class StatusReplyMsg(StatusReply, **_tagged("status")):
    id: int


class ClosedMsg(msgspec.Struct, **_tagged("closed")):
    id: int
    session_id: str


class SubscribedMsg(msgspec.Struct, **_tagged("subscribed")):
    id: int
    session_id: str
    events: list[Topic]  # the topics subscribed to
    last_event_id: int  # events after this one will follow


class PongMsg(msgspec.Struct, **_tagged("pong")):
    id: int


class ErrorMsg(msgspec.Struct, **_tagged("error"), omit_defaults=True):
    code: str
    message: str
    id: int | None = None


ServerMessage = (
    WelcomeMsg
    | SessionMsg
    | AckMsg
    | TokenMsg
    | DoneMsg
    | FlashRegisteredMsg
    | FlashAnswerMsg
    | DataUpdatedMsg
    | EventsLostMsg
    | StatusReplyMsg
    | ClosedMsg
    | SubscribedMsg
    | UnsubscribedMsg
    | PongMsg
    | ErrorMsg
)

# the event message for each event name of a session's event hub
EVENT_MESSAGES: dict[str, type[FlashAnswerMsg | DataUpdatedMsg | EventsLostMsg]] = {
    "flash_answer": FlashAnswerMsg,
    "data_updated": DataUpdatedMsg,
    "events_lost": EventsLostMsg,
}

S = TypeVar("S", bound=msgspec.Struct)


def reply(kind: type[S], body: msgspec.Struct, **extra: Any) -> S:
    """``kind`` built from an engine reply's fields plus ``extra`` (``id=...``)."""
    return kind(**msgspec.structs.asdict(body), **extra)


def as_request(message: msgspec.Struct, kind: type[S]) -> S:
    """The engine request ``kind`` holding a message's fields (``as_request(m, InitRequest)``)."""
    return kind(**{name: getattr(message, name) for name in kind.__struct_fields__})


def error_msg(exc: LiveLMError, request_id: int | None = None) -> ErrorMsg:
    return ErrorMsg(code=exc.code.value, message=exc.message, id=request_id)


# ---- encoding ----------------------------------------------------------------------------------


class Codec:
    """Decodes client messages and encodes server messages in one encoding."""

    def __init__(self, binary: bool) -> None:
        self.binary = binary
        module = msgspec.msgpack if binary else msgspec.json
        self._decoder = module.Decoder(ClientMessage)
        self._any = module.Decoder()
        self._encoder = module.Encoder()

    def decode(self, payload: bytes) -> ClientMessage:
        """A client message; ``InvalidRequest`` names the field that is wrong."""
        try:
            return self._decoder.decode(payload)
        except msgspec.ValidationError as exc:
            raise InvalidRequest(f"invalid message: {exc}") from exc
        except msgspec.DecodeError as exc:
            kind = "MessagePack" if self.binary else "JSON"
            raise InvalidRequest(f"invalid message: not a {kind} map: {exc}") from exc
        except RecursionError as exc:
            raise InvalidRequest("invalid message: its values are nested too deeply") from exc

    def request_id(self, payload: bytes) -> int | None:
        """The ``id`` of a message that failed to decode, if it has a usable one."""
        try:
            value = self._any.decode(payload)
        except (msgspec.DecodeError, RecursionError):
            return None
        if not isinstance(value, dict):
            return None
        request_id = value.get("id")
        if isinstance(request_id, int) and not isinstance(request_id, bool):
            return request_id
        return None

    def encode(self, message: ServerMessage) -> bytes:
        return self._encoder.encode(message)


MSGPACK = Codec(binary=True)
JSON = Codec(binary=False)
