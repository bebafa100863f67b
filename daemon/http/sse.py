"""Server-sent events: the headers, event bytes, and streaming one answer in a shape.

A shape (the session routes' own, OpenAI's chunks, Anthropic's events) turns the answer's
start, tokens and end into SSE bytes; ``stream_answer`` drives it, turns a failure after the
headers into the shape's error event, and cancels the query when the client goes away.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import msgspec
from aiohttp import web

from livelm.daemon.http.errors import classify, error_body
from livelm.daemon.logs import get_logger
from livelm.protocol.errors import LiveLMError

if TYPE_CHECKING:
    from livelm.daemon.engine.query import QueryHandle
    from livelm.protocol.messages import DoneReply, TokenEvent

log = get_logger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # keep reverse proxies from buffering the stream
}


class StreamShape(Protocol):
    def start(self) -> list[bytes]: ...
    def token(self, event: TokenEvent) -> list[bytes]: ...
    def end(self, done: DoneReply) -> list[bytes]: ...
    def error(self, body: bytes) -> bytes: ...


def sse_event(name: str, data: bytes) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


def data_line(value: Any) -> bytes:
    """``data: JSON`` (OpenAI's chunks carry no event name)."""
    return b"data: " + msgspec.json.encode(value) + b"\n\n"


def named_event(name: str, value: Any) -> bytes:
    """``event: NAME`` and ``data: JSON`` (Anthropic's events, the session routes' own)."""
    return sse_event(name, msgspec.json.encode(value))


async def stream_answer(
    request: web.Request, handle: QueryHandle, shape: StreamShape
) -> web.StreamResponse:
    finished = False
    response = web.StreamResponse(headers=SSE_HEADERS)
    try:
        await response.prepare(request)
        await _write(response, shape.start())
        async for event in handle:
            await _write(response, shape.token(event))
        done = await handle.result()
        finished = True
        await _write(response, shape.end(done))
        await response.write_eof()
    except ConnectionResetError:
        log.debug("stream client went away", extra={"path": request.path})
    except Exception as exc:
        if not response.prepared:
            raise
        await _write_error(request, response, shape, exc)
    finally:
        if not finished:
            handle.cancel()
    return response


async def _write(response: web.StreamResponse, pieces: list[bytes]) -> None:
    for piece in pieces:
        await response.write(piece)


async def _write_error(
    request: web.Request, response: web.StreamResponse, shape: StreamShape, exc: Exception
) -> None:
    """Headers are sent: the error travels in the stream, where the clients raise it."""
    if not isinstance(exc, LiveLMError):
        log.exception("answer stream failed", extra={"path": request.path})
    body = error_body(classify(exc, request), request.path)
    try:
        await response.write(shape.error(body))
        await response.write_eof()
    except ConnectionResetError:
        log.debug("stream client went away", extra={"path": request.path})
