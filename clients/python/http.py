"""The HTTP client (aiohttp): the session routes of docs/API.md, SSE for streamed answers, and
the session event stream with automatic ``Last-Event-ID`` resume when the connection drops.

Streams are read through ``CancelSafe``: a cancelled ``next()`` (a timeout) loses nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import msgspec

from livelm.client.base import CURSOR, SUBSCRIBED, CancelSafe, ClientBase, EventItem
from livelm.client.errors import (
    ConnectionLost,
    DaemonUnreachable,
    InvalidReply,
    error_from,
    os_reason,
)
from livelm.client.replies import FlashAnswer, decode_reply
from livelm.client.sse import SseEvent, SseParser
from livelm.protocol.errors import LiveLMError, Overloaded, UnknownSession

DEFAULT_URL = "http://127.0.0.1:8080"
RECONNECT_ATTEMPTS = 5  # consecutive failed reconnects of an event stream before giving up
RECONNECT_DELAY = 0.5  # seconds, doubled after each failure up to RECONNECT_MAX_DELAY
RECONNECT_MAX_DELAY = 5.0
# seconds a request may wait for its reply before the daemon must show it still answers; the
# TCP and WebSocket clients give their handshake as long
DEFAULT_READ_TIMEOUT = 10.0

# op -> (method, path); {sid} is the session id
ROUTES: dict[str, tuple[str, str]] = {
    "init": ("POST", "/v1/sessions/init"),
    "push": ("POST", "/v1/sessions/{sid}/stream/push"),
    "generate": ("POST", "/v1/sessions/{sid}/generate"),
    "flash": ("POST", "/v1/sessions/{sid}/flash"),
    "status": ("GET", "/v1/sessions/{sid}/stream/status"),
    "close": ("DELETE", "/v1/sessions/{sid}"),
    "ping": ("GET", "/health"),
}
EVENTS_PATH = "/v1/sessions/{sid}/events"
FLASH_PATH = "/v1/sessions/{sid}/flash"

_json = msgspec.json.Decoder()
T = TypeVar("T")


class _Answers(msgspec.Struct):
    answers: list[FlashAnswer]


class HttpClient(ClientBase):
    """``async with HttpClient("http://127.0.0.1:8080", api_key=...) as client: ...``"""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float | None = DEFAULT_READ_TIMEOUT,
        reconnect_attempts: int = RECONNECT_ATTEMPTS,
    ) -> None:
        """``read_timeout``: when a reply has not begun after that many seconds, the daemon
        must answer ``GET /health`` within as long, else ``DaemonUnreachable``; a slow answer
        of a live daemon is waited for (None: wait forever, never ask)."""
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"not an http:// or https:// URL: {url!r}")
        self.url = url.rstrip("/")
        self.reconnect_attempts = reconnect_attempts
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key is not None else {}
        # no overall deadline: answers and event streams may take as long as they take
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout)
        self.read_timeout = read_timeout
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def aclose(self) -> None:
        """Closes the client; later calls raise ``ConnectionLost``."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def flash_answers(self, session_id: str) -> list[FlashAnswer]:
        """The latest answer of each flash query of the session (HTTP only)."""
        reply = await self._call("GET", FLASH_PATH.format(sid=_quote(session_id)), None)
        return decode_reply(reply, _Answers).answers

    # ---- transport primitives ------------------------------------------------------------------
    async def _request(
        self, op: str, session_id: str | None, fields: dict[str, Any]
    ) -> dict[str, Any]:
        method, path = _route(op, session_id)
        return await self._call(method, path, fields if method == "POST" else None)

    def _request_stream(
        self, op: str, session_id: str, fields: dict[str, Any]
    ) -> CancelSafe[dict[str, Any]]:
        return CancelSafe(self._answer_replies(op, session_id, fields))

    def _events(
        self, session_id: str, events: list[str] | None, last_event_id: int | None
    ) -> CancelSafe[EventItem]:
        return CancelSafe(self._event_items(session_id, events, last_event_id))

    async def _answer_replies(
        self, op: str, session_id: str, fields: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        method, path = _route(op, session_id)
        async with self._open(method, path, fields) as response:
            async for event in _sse_events(response, self.url, SseParser()):
                if not event.id_only:
                    yield _stream_reply(event)

    async def _event_items(
        self, session_id: str, events: list[str] | None, last_event_id: int | None
    ) -> AsyncIterator[EventItem]:
        path = EVENTS_PATH.format(sid=_quote(session_id))
        params = {"events": ",".join(events)} if events else None
        cursor, connected, failures = last_event_id, False, 0
        while True:
            headers = {"Last-Event-ID": str(cursor)} if cursor is not None else {}
            try:
                async with self._open("GET", path, None, params, headers) as response:
                    async for event in _sse_events(response, self.url, SseParser()):
                        if not connected:  # subscribed; the opening block says from where
                            connected = True
                            yield SUBSCRIBED, {}, _opening_id(event, cursor)
                        cursor = _event_id(event.id) if event.id is not None else cursor
                        if event.id_only:  # an opening block: where the stream starts
                            yield CURSOR, {}, cursor
                            continue
                        failures = 0
                        yield event.name, _json_map(event.data), cursor
                # a clean end: the session closed, or the daemon is stopping; asking again
                # tells which (404 ends the iteration), at once the first time
                failure: Exception | None = None
            except UnknownSession:
                if connected:
                    return
                raise
            except (ConnectionLost, DaemonUnreachable, Overloaded) as exc:
                if not connected:
                    raise  # the first connection: nothing to resume
                failure = exc
            failures += 1
            if failures > self.reconnect_attempts:
                reason = failure or "it kept ending without events"
                raise ConnectionLost(
                    f"event stream of {session_id!r} lost; {failures - 1} reconnects failed: "
                    f"{reason}"
                ) from failure
            if failure is not None or failures > 1:
                await asyncio.sleep(_backoff(failures, failure))

    # ---- HTTP plumbing ---------------------------------------------------------------------------
    async def _call(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        async with self._open(method, path, body) as response:
            try:
                data = await response.read()
            except aiohttp.ClientError as exc:
                raise ConnectionLost(f"{self.url} broke off the reply: {exc}") from exc
            return _json_map(data)

    @asynccontextmanager
    async def _open(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The response of a request; an error status raises the daemon's typed error."""
        session = self._client_session()
        data = None if body is None else msgspec.json.encode(body)
        send_headers = {**self._headers, **(headers or {})}
        if data is not None:
            send_headers["Content-Type"] = "application/json"
        try:
            request = session.request(
                method, self.url + path, data=data, params=params, headers=send_headers
            )
            async with await self._answered(asyncio.ensure_future(_awaited(request))) as response:
                if response.status >= 400:
                    raise await _error(response)
                yield response
        except aiohttp.ClientConnectorError as exc:
            reason = os_reason(exc.os_error)
            raise DaemonUnreachable(
                f"cannot connect to the daemon at {self.url}: {reason}"
            ) from exc
        except aiohttp.ClientResponseError as exc:  # no HTTP came back: another service
            raise DaemonUnreachable(
                f"cannot connect to the daemon at {self.url}: its reply is not HTTP "
                f"({exc.message.splitlines()[0] if exc.message else exc.status})"
            ) from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise ConnectionLost(f"the connection to {self.url} broke: {exc}") from exc

    async def _answered(
        self, request: asyncio.Future[aiohttp.ClientResponse]
    ) -> aiohttp.ClientResponse:
        """The response once its headers are in. While they take over ``read_timeout``, the
        daemon must show it is alive: a slow answer, or a push held back by backpressure,
        waits as long as it takes; a hung daemon (or a silent peer) is ``DaemonUnreachable``."""
        try:
            while True:
                done, _ = await asyncio.wait([request], timeout=self.read_timeout)
                if done:
                    return request.result()
                await self._probe()
        except BaseException:
            request.cancel()
            if request.done() and not request.cancelled() and request.exception() is None:
                request.result().close()  # answered just as we gave up: nobody will read it
            raise

    async def _probe(self) -> None:
        """Returns once the daemon answers ``GET /health`` (any status: it is alive)."""
        timeout = aiohttp.ClientTimeout(total=self.read_timeout)
        try:
            async with self._client_session().get(self.url + "/health", timeout=timeout):
                return
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            reason = "no reply" if isinstance(exc, asyncio.TimeoutError) else str(exc)
            raise DaemonUnreachable(
                f"cannot connect to the daemon at {self.url}: it does not answer "
                f"({reason} in {self.read_timeout}s)"
            ) from exc

    def _client_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise ConnectionLost(f"the client of {self.url} is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session


def _route(op: str, session_id: str | None) -> tuple[str, str]:
    method, path = ROUTES[op]
    if "{sid}" in path:
        if session_id is None:
            raise ValueError(f"{op!r} needs a session id")
        path = path.format(sid=_quote(session_id))
    return method, path


def _quote(session_id: str) -> str:
    return quote(session_id, safe="")


async def _error(response: aiohttp.ClientResponse) -> LiveLMError | InvalidReply:
    """The typed error of an error reply ``{"error": {"code", "message", ...}}``."""
    body = await response.read()
    retry_after = _retry_after(response.headers.get("Retry-After"))
    try:
        error = _json.decode(body)["error"]
        return error_from(error["code"], error["message"], retry_after)
    except (msgspec.DecodeError, KeyError, TypeError) as exc:
        text = body[:200].decode("utf-8", errors="replace")
        return InvalidReply(f"HTTP {response.status} without an error body ({exc}): {text!r}")


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: this client does not wait on those


async def _awaited(request: Awaitable[T]) -> T:
    return await request


async def _sse_events(
    response: aiohttp.ClientResponse, where: str, parser: SseParser
) -> AsyncIterator[SseEvent]:
    try:
        async for chunk in response.content.iter_any():
            for event in parser.feed(chunk):
                yield event
    except aiohttp.ClientPayloadError as exc:
        raise ConnectionLost(f"the event stream from {where} broke: {exc}") from exc


def _stream_reply(event: SseEvent) -> dict[str, Any]:
    """An SSE event of a streamed answer as a reply map of the message protocol."""
    body = _json_map(event.data)
    if event.name == "error":
        error = body.get("error")
        if not isinstance(error, dict):
            raise InvalidReply(f"error event without an error: {event.data[:200]!r}")
        raise error_from(error.get("code"), error.get("message", ""))
    return {**body, "type": event.name}


def _json_map(text: str | bytes) -> dict[str, Any]:
    try:
        value = _json.decode(text)
    except msgspec.DecodeError as exc:
        raise InvalidReply(f"the daemon sent invalid JSON: {exc}: {text[:200]!r}") from exc
    if not isinstance(value, dict):
        raise InvalidReply(f"expected a JSON object, got {text[:200]!r}")
    return value


def _event_id(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidReply(f"an SSE event id that is not an integer: {text[:40]!r}") from None


def _opening_id(event: SseEvent, cursor: int | None) -> int | None:
    """Where a stream starts: its opening id-only block, else (an older daemon) ``cursor``."""
    return _event_id(event.id) if event.id_only and event.id is not None else cursor


def _backoff(failures: int, exc: Exception | None) -> float:
    delay = min(RECONNECT_MAX_DELAY, RECONNECT_DELAY * 2 ** (failures - 1))
    if isinstance(exc, Overloaded) and exc.retry_after is not None:
        delay = min(RECONNECT_MAX_DELAY, max(delay, exc.retry_after))
    return delay
