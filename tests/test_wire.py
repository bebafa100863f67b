"""Wire messages: every client message decodes in both encodings into the engine's request
structs, errors name the field, and server messages carry ``type`` and the request's ``id``."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from livelm.protocol import wire
from livelm.protocol.errors import InvalidRequest
from livelm.protocol.messages import (
    DoneReply,
    FlashSpec,
    GenerateRequest,
    InitRequest,
    StatusReply,
    Usage,
)

CODECS = [wire.MSGPACK, wire.JSON]
ENCODE = {True: msgspec.msgpack.encode, False: msgspec.json.encode}
DECODE = {True: msgspec.msgpack.decode, False: msgspec.json.decode}

CLIENT_MESSAGES = [
    {"type": "hello", "version": 1, "api_key": "k", "client": "test"},
    {
        "type": "init",
        "id": 1,
        "prompt": "p",
        "format": "ohlcv",
        "window": 512,
        "flash": [{"query": "up?", "max_tokens": 3}],
    },
    {"type": "push", "session_id": "s", "data": ["a", {"t": 1, "c": 2.5}]},
    {
        "type": "generate",
        "id": 2,
        "session_id": "s",
        "prompt": "q",
        "max_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 5,
        "seed": 3,
        "stop": ["\n"],
        "stream": False,
    },
    {"type": "flash", "id": 3, "session_id": "s", "query": "up?", "max_tokens": 2},
    {"type": "subscribe", "id": 4, "session_id": "s", "events": ["flash"]},
    {"type": "status", "id": 5, "session_id": "s"},
    {"type": "close", "id": 6, "session_id": "s"},
    {"type": "ping", "id": 7},
]


@pytest.mark.parametrize("codec", CODECS, ids=["msgpack", "json"])
@pytest.mark.parametrize("message", CLIENT_MESSAGES, ids=lambda m: m["type"])
def test_every_client_message_decodes_with_its_fields(codec: wire.Codec, message: dict) -> None:
    decoded = codec.decode(ENCODE[codec.binary]({**message, "unknown_key": [1, 2]}))
    assert type(decoded).__struct_config__.tag == message["type"]
    for key, value in message.items():
        if key == "flash":
            assert decoded.flash == [FlashSpec(**v) for v in value]
        elif key != "type":
            assert getattr(decoded, key) == value


def test_wire_messages_are_the_engine_requests() -> None:
    init = wire.JSON.decode(b'{"type": "init", "id": 1, "prompt": "p", "template": "raw"}')
    assert isinstance(init, InitRequest)
    assert wire.as_request(init, InitRequest) == InitRequest(prompt="p", template="raw")
    gen = wire.JSON.decode(b'{"type": "generate", "id": 2, "session_id": "s", "prompt": "q"}')
    assert wire.as_request(gen, GenerateRequest) == GenerateRequest(prompt="q", stream=True)
    flash = wire.JSON.decode(b'{"type": "flash", "id": 3, "session_id": "s", "query": "x"}')
    assert type(wire.as_request(flash, FlashSpec)) is FlashSpec


@pytest.mark.parametrize("codec", CODECS, ids=["msgpack", "json"])
@pytest.mark.parametrize(
    ("message", "named"),
    [
        (
            {"type": "generate", "id": 1, "session_id": "s", "prompt": "q", "max_tokens": "9"},
            "$.max_tokens",
        ),
        ({"type": "push", "session_id": 5, "data": []}, "$.session_id"),
        ({"type": "init", "id": 1, "template": "fancy"}, "$.template"),
        (
            {"type": "subscribe", "id": 1, "session_id": "s", "events": ["everything"]},
            "$.events[0]",
        ),
        ({"type": "warp", "id": 1}, "$.type"),
        ({"type": "status", "id": 1}, "session_id"),
        ({"id": 1}, "type"),
    ],
)
def test_decode_errors_name_the_field(codec: wire.Codec, message: dict, named: str) -> None:
    payload = ENCODE[codec.binary](message)
    with pytest.raises(InvalidRequest) as info:
        codec.decode(payload)
    assert named in info.value.message
    assert codec.request_id(payload) == message.get("id")


@given(st.binary(max_size=64))
def test_garbage_is_an_invalid_request_never_a_crash(data: bytes) -> None:
    for codec in CODECS:
        try:
            codec.decode(data)
        except InvalidRequest:
            pass
        codec.request_id(data)  # never raises


def _done() -> DoneReply:
    usage = Usage(prompt_tokens=2, completion_tokens=1, context_tokens=9)
    return DoneReply(
        text="a", tokens=[4], finish_reason="stop", usage=usage, data_seq=3, cached=False
    )


def _status() -> StatusReply:
    return StatusReply(
        session_id="s",
        data_seq=3,
        ingested_seq=3,
        context_tokens=9,
        pending_tokens=0,
        window=100,
        prompt_tokens=4,
        entries=3,
        first_seq=1,
        dropped_entries=0,
        template="chat",
        format="text",
    )


SERVER_MESSAGES = [
    (wire.WelcomeMsg(version=1, server="livelm", model="demo", max_frame=64), None),
    (wire.AckMsg(session_id="s", seq=3, accepted=2, id=4), 4),
    (wire.TokenMsg(id=5, text="a", token=4), 5),
    (wire.reply(wire.DoneMsg, _done(), id=6), 6),
    (wire.reply(wire.StatusReplyMsg, _status(), id=7), 7),
    (wire.ClosedMsg(id=8, session_id="s"), 8),
    (wire.PongMsg(id=9), 9),
    (wire.ErrorMsg(code="unknown_session", message="no", id=10), 10),
    (wire.ErrorMsg(code="bad_frame", message="broken"), None),
]


@pytest.mark.parametrize("codec", CODECS, ids=["msgpack", "json"])
@pytest.mark.parametrize("pair", SERVER_MESSAGES, ids=lambda p: type(p[0]).__name__)
def test_server_messages_carry_type_and_id(codec: wire.Codec, pair: tuple) -> None:
    message, request_id = pair
    out = DECODE[codec.binary](codec.encode(message))
    assert out["type"] == type(message).__struct_config__.tag
    assert out.get("id") == request_id
    if isinstance(message, wire.DoneMsg):
        assert out["usage"]["context_tokens"] == 9 and out["data_seq"] == 3
