"""Flash queries and session events over HTTP: register/list flash queries, and the SSE stream.

``GET /v1/sessions/{id}/events`` writes ``event: NAME``, ``id: N``, ``data: JSON`` blocks,
resuming after the ``Last-Event-ID`` header (or the ``last_event_id`` query parameter),
filtered by ``?events=flash,data``, with ``: keep-alive`` comments while idle; it opens with
an ``id:`` line alone (the id it starts after) and ends when the session closes. Each stream writes from its own handler task and reads the session's event
buffer at its own cursor, so a client that stops reading holds back nobody but itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web

from livelm.daemon.engine.events import SessionEvent, Subscription
from livelm.daemon.http.sessions import decode_json, json_response
from livelm.daemon.http.sse import SSE_HEADERS
from livelm.daemon.logs import get_logger
from livelm.protocol.errors import InvalidRequest
from livelm.protocol.messages import FlashSpec

if TYPE_CHECKING:
    from livelm.daemon.engine.engine import Engine

log = get_logger(__name__)

KEEP_ALIVE = b": keep-alive\n\n"


class EventRoutes:
    def __init__(self, engine_for: Callable[[], Engine], keepalive_s: float) -> None:
        self.engine_for = engine_for
        self.keepalive_s = keepalive_s

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/sessions/{id}/flash", self.register_flash),
            web.get("/v1/sessions/{id}/flash", self.flash_answers),
            web.get("/v1/sessions/{id}/events", self.events),
        ]

    async def register_flash(self, request: web.Request) -> web.Response:
        engine = self.engine_for()
        spec = decode_json(await request.read(), FlashSpec)
        return json_response(await engine.register_flash(request.match_info["id"], spec))

    async def flash_answers(self, request: web.Request) -> web.Response:
        engine = self.engine_for()
        return json_response({"answers": engine.flash_answers(request.match_info["id"])})

    async def events(self, request: web.Request) -> web.StreamResponse:
        engine = self.engine_for()
        names = _event_filter(request)
        subscription = engine.subscribe(request.match_info["id"], names, _last_event_id(request))
        try:
            return await self._stream(request, subscription)
        finally:
            subscription.close()

    async def _stream(self, request: web.Request, subscription: Subscription) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        try:
            # an id with no data: the reader's last event id, dispatching no event, so a stream
            # that drops before its first event still resumes where it began
            await response.write(f"id: {subscription.cursor}\n\n".encode())
            while True:
                try:
                    event = await asyncio.wait_for(anext(subscription), self.keepalive_s)
                except asyncio.TimeoutError:  # a distinct class before 3.11
                    await response.write(KEEP_ALIVE)
                    continue
                except StopAsyncIteration:  # the session closed
                    break
                await response.write(sse_block(event))
            await response.write_eof()
        except ConnectionResetError:
            log.debug("event stream client went away", extra={"path": request.path})
        return response


def sse_block(event: SessionEvent) -> bytes:
    data = msgspec.json.encode(event.body)
    return b"event: %s\nid: %d\ndata: %s\n\n" % (event.name.encode(), event.id, data)


def _event_filter(request: web.Request) -> frozenset[str]:
    raw = ",".join(request.query.getall("events", []))
    return frozenset(part.strip() for part in raw.split(",") if part.strip())


def _last_event_id(request: web.Request) -> int | None:
    """The header wins: a browser's EventSource sends it on reconnect, with the old URL."""
    header = request.headers.get("Last-Event-ID")
    if header is not None and header.strip():
        return _event_id(header, "the Last-Event-ID header")
    query = request.query.get("last_event_id")
    if query is not None:
        return _event_id(query, "last_event_id")
    return None


def _event_id(text: str, where: str) -> int:
    value = text.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise InvalidRequest(f"{where} must be a non-negative integer, got {text[:40]!r}")
    return int(value)
