"""The operations every client offers, written once over three transport primitives.

A transport (TCP, WebSocket, HTTP) implements ``_request`` (one request, one reply map),
``_request_stream`` (a request whose replies are ``token`` maps then one ``done`` map) and
``_events`` (a session's events as ``(name, body, event_id)``, after a first ``SUBSCRIBED``).
Reply maps carry their ``type``.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Generic, Protocol, TypedDict, TypeVar, Unpack

from livelm.client.errors import InvalidReply
from livelm.client.replies import (
    DoneReply,
    Event,
    SessionInfo,
    Status,
    ack_seq,
    decode_event,
    decode_reply,
    flash_query_id,
)

log = logging.getLogger("livelm.client")

C = TypeVar("C", bound="ClientBase")
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

SUBSCRIBED = "subscribed"  # what a transport's event stream yields first, once it is set up
CURSOR = "cursor"  # an item that only moves the stream's last event id (SSE's id-only block)
EventItem = tuple[str, dict[str, Any], int | None]


class Replies(Protocol[T_co]):
    """A transport's stream: ``next()`` gives the next item, ``StopAsyncIteration`` at the end.
    A cancelled ``next()`` loses nothing: the next call continues the stream."""

    async def next(self) -> T_co: ...

    async def aclose(self) -> None: ...


class CancelSafe(Generic[T]):
    """``Replies`` over an async generator: each item is fetched by a task of its own, which a
    cancelled caller leaves running, so the next ``next()`` gets what it fetched."""

    def __init__(self, items: AsyncIterator[T]) -> None:
        self._items = items
        self._pending: asyncio.Future[tuple[bool, T | None]] | None = None

    async def next(self) -> T:
        if self._pending is None:
            self._pending = asyncio.ensure_future(_step(self._items))
        pending = self._pending
        try:
            more, item = await asyncio.shield(pending)
        except asyncio.CancelledError:
            if pending.cancelled():  # the fetch itself was cancelled (aclose): it is over
                self._pending = None
            raise
        except BaseException:
            self._pending = None
            raise
        self._pending = None
        if not more:
            raise StopAsyncIteration
        return item  # type: ignore[return-value]

    async def aclose(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
            await asyncio.wait([pending])
            if not pending.cancelled():
                pending.exception()  # retrieved: it ended the stream, which is being closed
        await self._items.aclose()  # type: ignore[attr-defined]


async def _step(items: AsyncIterator[T]) -> tuple[bool, T | None]:
    """The next item as ``(True, item)``, or ``(False, None)`` at the end (a task may not raise
    ``StopAsyncIteration``)."""
    try:
        return True, await anext(items)
    except StopAsyncIteration:
        return False, None


def compact(**fields: Any) -> dict[str, Any]:
    """The fields that are set: an absent option lets the daemon apply its default."""
    return {key: value for key, value in fields.items() if value is not None}


class AnswerOptions(TypedDict, total=False):
    """The options of ``generate`` and ``stream_generate`` (keyword arguments)."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: str | list[str] | None
    choices: list[str] | None


def answer_fields(prompt: str, stream: bool, options: AnswerOptions) -> dict[str, Any]:
    """A generate request's fields; an unknown option is a TypeError, as for a plain signature."""
    unknown = options.keys() - AnswerOptions.__annotations__.keys()
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    return {"prompt": prompt, **compact(**options), "stream": stream}


class TokenStream:
    """``async for text in stream`` gives each token's text; then ``stream.done`` holds the
    final reply (also ``await stream.result()``, which drains the rest of the stream)."""

    def __init__(self, replies: Replies[dict[str, Any]]) -> None:
        self._replies = replies
        self.done: DoneReply | None = None

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> str:
        while self.done is None:
            try:
                reply = await self._replies.next()  # cancel-safe: a timeout loses nothing
            except StopAsyncIteration:
                raise InvalidReply("the answer stream ended without a done reply") from None
            kind = reply.get("type")
            if kind == "done":
                self.done = decode_reply(reply, DoneReply)
            elif kind == "token":
                text = reply.get("text")
                if not isinstance(text, str):
                    raise InvalidReply(f"token reply without text: {reply!r}")
                if text:  # empty while the daemon holds text back; nothing to show
                    return text
            else:
                raise InvalidReply(f"unexpected reply {kind!r} in an answer stream")
        await self._replies.aclose()
        raise StopAsyncIteration

    async def result(self) -> DoneReply:
        async for _ in self:
            pass
        if self.done is None:  # pragma: no cover - __anext__ raises first
            raise InvalidReply("the answer stream ended without a done reply")
        return self.done

    async def aclose(self) -> None:
        """Stop reading (an unfinished answer is cancelled where the transport allows)."""
        await self._replies.aclose()


class EventStream:
    """``async for event in stream``; ``stream.last_event_id`` is the id of the last event
    received (pass it to ``subscribe(..., last_event_id=...)`` to resume elsewhere)."""

    def __init__(self, events: Replies[EventItem], start: int | None) -> None:
        self._events = events
        self.last_event_id = start

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        while True:
            name, body, event_id = await self._events.next()  # cancel-safe
            self.last_event_id = event_id if event_id is not None else self.last_event_id
            if name == CURSOR:
                continue
            event = decode_event(name, body)
            if event is not None:
                return event
            log.debug("ignoring unknown event %r", name)

    async def aclose(self) -> None:
        """Stops the stream; over TCP/WebSocket the daemon ends the subscription too."""
        await self._events.aclose()


class ClientBase(ABC):
    """init, push, generate, stream_generate, flash, subscribe, status, close_session, ping."""

    async def init(
        self,
        prompt: str = "",
        *,
        session_id: str | None = None,
        template: str | None = None,
        format: str | None = None,
        window: int | None = None,
        flash: Sequence[dict[str, Any]] | None = None,
        special_tokens: str | None = None,
    ) -> SessionInfo:
        """``special_tokens="text"``: pushed data spelling a special token stays text."""
        fields = compact(
            prompt=prompt,
            session_id=session_id,
            template=template,
            format=format,
            window=window,
            flash=None if flash is None else list(flash),
            special_tokens=special_tokens,
        )
        return decode_reply(await self._request("init", None, fields), SessionInfo)

    async def push(self, session_id: str, data: Sequence[Any]) -> int:
        """Pushes entries; returns the last seq assigned once the daemon has queued them."""
        return ack_seq(await self._request("push", session_id, {"data": list(data)}))

    async def generate(
        self, session_id: str, prompt: str, **options: Unpack[AnswerOptions]
    ) -> DoneReply:
        """The answer; options left out take the daemon's defaults (docs/API.md)."""
        fields = answer_fields(prompt, False, options)
        return decode_reply(await self._request("generate", session_id, fields), DoneReply)

    def stream_generate(
        self, session_id: str, prompt: str, **options: Unpack[AnswerOptions]
    ) -> TokenStream:
        """The answer token by token (the same options as ``generate``)."""
        fields = answer_fields(prompt, True, options)
        return TokenStream(self._request_stream("generate", session_id, fields))

    async def flash(self, session_id: str, query: str, max_tokens: int | None = None) -> int:
        """Registers a flash query; returns its query_id."""
        fields = compact(query=query, max_tokens=max_tokens)
        return flash_query_id(await self._request("flash", session_id, fields))

    async def subscribe(
        self,
        session_id: str,
        events: Sequence[str] | None = None,
        *,
        last_event_id: int | None = None,
    ) -> EventStream:
        """Subscribes, and once the daemon confirmed it, returns the stream of the session's
        events (``flash_answer``, ``data_updated``; ``events_lost`` when this subscriber fell
        behind) until the session closes. ``events``: ``flash``, ``data`` (default both);
        ``last_event_id``: resume after that event (default: events from now on)."""
        topics = None if events is None else list(events)
        stream = self._events(session_id, topics, last_event_id)
        try:
            name, _, cursor = await stream.next()
        except BaseException:
            await stream.aclose()
            raise
        if name != SUBSCRIBED:
            await stream.aclose()
            raise InvalidReply(f"an event stream must start with {SUBSCRIBED!r}, not {name!r}")
        return EventStream(stream, cursor)

    async def status(self, session_id: str) -> Status:
        return decode_reply(await self._request("status", session_id, {}), Status)

    async def close_session(self, session_id: str) -> None:
        await self._request("close", session_id, {})

    async def ping(self) -> None:
        await self._request("ping", None, {})

    # ---- connection lifecycle ----------------------------------------------------------------
    @abstractmethod
    async def aclose(self) -> None:
        """Closes the connection; pending requests fail with ``ConnectionLost``."""

    async def __aenter__(self: C) -> C:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ---- what a transport provides ------------------------------------------------------------
    @abstractmethod
    async def _request(
        self, op: str, session_id: str | None, fields: dict[str, Any]
    ) -> dict[str, Any]: ...

    @abstractmethod
    def _request_stream(
        self, op: str, session_id: str, fields: dict[str, Any]
    ) -> Replies[dict[str, Any]]:
        """The request is sent on the first ``next()``."""

    @abstractmethod
    def _events(
        self, session_id: str, events: list[str] | None, last_event_id: int | None
    ) -> Replies[EventItem]:
        """``(SUBSCRIBED, {}, cursor)`` once the subscription stands (cursor: the event after
        which events follow, when known), then ``(name, body, event_id)`` for each event (or
        ``(CURSOR, {}, event_id)``: no event, the stream's position moved)."""
