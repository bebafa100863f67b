"""The session routes of PROTOCOL.md: init, push, generate (JSON or SSE), status, close.

Handlers only decode, call the engine and encode; the engine validates and owns all state.
``engine_for()`` gives the running engine or raises ``Overloaded`` while it is loading or
draining. The server cancels a handler whose client disconnects: state changes (init, push,
close) are shielded so they complete or fail as a whole; a query is cancelled in the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from aiohttp import web

from livelm.daemon.http.sse import named_event, sse_event, stream_answer
from livelm.protocol.errors import InvalidRequest
from livelm.protocol.messages import GenerateRequest, InitRequest, PushRequest

if TYPE_CHECKING:
    from livelm.daemon.engine.engine import Engine
    from livelm.protocol.messages import DoneReply, TokenEvent

T = TypeVar("T")

NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl")

_any_json = msgspec.json.Decoder()


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=msgspec.json.encode(value), content_type="application/json"
    )


def decode_json(body: bytes, kind: type[T]) -> T:
    """Decode a body into ``kind``; errors name the field (``... at `$.max_tokens```)."""
    try:
        return msgspec.json.decode(body, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidRequest(f"invalid request body: {exc}") from exc
    except RecursionError as exc:
        raise InvalidRequest("invalid request body: values nested too deeply") from exc


def decode_lines(body: bytes, as_json: bool) -> list[Any]:
    """One entry per non-empty line: a JSON value (ndjson) or the line's text (text/plain).
    Lines end at "\n" (or "\r\n") only: U+2028 and the other separators ``str.splitlines``
    knows may sit inside a JSON string or a line of text."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"request body is not UTF-8: {exc}") from exc
    entries: list[Any] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")
        if not line.strip():
            continue
        if not as_json:
            entries.append(line)
            continue
        try:
            entries.append(_any_json.decode(line))
        except msgspec.DecodeError as exc:
            raise InvalidRequest(f"line {number} of the ndjson body: {exc}") from exc
        except RecursionError as exc:
            raise InvalidRequest(f"line {number} of the ndjson body: nested too deeply") from exc
    return entries


class SessionRoutes:
    def __init__(self, engine_for: Callable[[], Engine]) -> None:
        self.engine_for = engine_for

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/sessions/init", self.init),
            web.post("/v1/sessions/{id}/stream/push", self.push),
            web.post("/v1/sessions/{id}/generate", self.generate),
            web.get("/v1/sessions/{id}/stream/status", self.status),
            web.delete("/v1/sessions/{id}", self.close),
        ]

    async def init(self, request: web.Request) -> web.Response:
        engine = self.engine_for()
        body = await request.read()
        req = decode_json(body, InitRequest) if body.strip() else InitRequest()
        return json_response(await asyncio.shield(engine.init_session(req)))

    async def push(self, request: web.Request) -> web.Response:
        engine = self.engine_for()
        body = await request.read()
        if request.content_type in NDJSON_TYPES:
            data = decode_lines(body, as_json=True)
        elif request.content_type == "text/plain":
            data = decode_lines(body, as_json=False)
        else:
            data = decode_json(body, PushRequest).data
        return json_response(await asyncio.shield(engine.push(request.match_info["id"], data)))

    async def generate(self, request: web.Request) -> web.StreamResponse:
        engine = self.engine_for()
        req = decode_json(await request.read(), GenerateRequest)
        handle = await engine.ask(request.match_info["id"], req)
        if req.stream:
            return await stream_answer(request, handle, _AnswerEvents())
        try:
            done = await handle.result()
        except BaseException:
            # includes CancelledError when the client disconnects (handler_cancellation)
            handle.cancel()
            raise
        return json_response(done)

    async def status(self, request: web.Request) -> web.Response:
        engine = self.engine_for()
        return json_response(engine.status(request.match_info["id"]))

    async def close(self, request: web.Request) -> web.Response:
        engine = self.engine_for()
        session_id = request.match_info["id"]
        await asyncio.shield(engine.close_session(session_id))
        return json_response({"closed": True, "session_id": session_id})


class _AnswerEvents:
    """The answer as SSE: ``token`` events, then ``done`` (or ``error`` if the query fails)."""

    def start(self) -> list[bytes]:
        return []

    def token(self, event: TokenEvent) -> list[bytes]:
        return [named_event("token", event)]

    def end(self, done: DoneReply) -> list[bytes]:
        return [named_event("done", done)]

    def error(self, body: bytes) -> bytes:
        return sse_event("error", body)
