"""The streams of the message protocol (TCP, WebSocket), read straight from their route's queue.

A route's ``next()`` only awaits its queue, so a cancelled read (``asyncio.wait_for``) loses
nothing and the next read continues the stream. The request goes out on the first read, by a
task of its own, so that a read cancelled meanwhile does not send it twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from livelm.client.base import SUBSCRIBED, EventItem
from livelm.client.errors import ConnectionLost
from livelm.client.event_filter import EventFilter
from livelm.client.replies import EVENT_TYPES, decode_reply
from livelm.client.router import Route
from livelm.protocol.errors import LiveLMError

UNSUBSCRIBED = "unsubscribed"
SHUTDOWN = "shutdown"  # the reason of an ``unsubscribed`` sent while the daemon drains

Open = Callable[[], Awaitable[Route]]  # sends the request; its route


class _Subscribed(msgspec.Struct):
    last_event_id: int


class RouteStream:
    """What answer and event streams share: the request sent once, the route closed once."""

    def __init__(self, open_route: Open) -> None:
        self._open_route = open_route
        self._opening: asyncio.Future[Route] | None = None
        self.ended = False

    async def _route(self) -> Route:
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open_route())
        return await asyncio.shield(self._opening)

    async def _receive(self) -> dict[str, Any]:
        """The route's next message; an error reply or a lost connection ends the stream."""
        route = await self._route()
        try:
            return await route.next()
        except (LiveLMError, ConnectionLost):
            self._end()
            raise

    def _opened(self) -> Route | None:
        """The route, if the request went out (without waiting for it)."""
        opening = self._opening
        if opening is None or not opening.done() or opening.cancelled():
            return None
        return None if opening.exception() is not None else opening.result()

    def _end(self) -> None:
        self.ended = True
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()  # its sender closes the route it opened
        route = self._opened()
        if route is not None:
            route.close()


class AnswerReplies(RouteStream):
    """``token`` replies, then the final one (``done``)."""

    async def next(self) -> dict[str, Any]:
        if self.ended:
            raise StopAsyncIteration
        reply = await self._receive()
        if reply.get("type") != "token":
            self._end()
        return reply

    async def aclose(self) -> None:
        self._end()


class SubscriptionEvents(RouteStream):
    """A subscription's events; ``aclose()`` sends ``unsubscribe`` and waits for its
    ``unsubscribed``, so the daemon holds no subscription for a stream nobody reads."""

    def __init__(
        self,
        open_route: Open,
        unsubscribe: Callable[[Route], Awaitable[None]],
        topics: list[str] | None,
        where: str,
    ) -> None:
        super().__init__(open_route)
        self._unsubscribe = unsubscribe
        self._wanted = EventFilter(topics)
        self._where = where

    async def next(self) -> EventItem:
        while not self.ended:
            item = self._item(await self._receive())
            if item is not None:
                return item
        raise StopAsyncIteration

    def _item(self, message: dict[str, Any]) -> EventItem | None:
        kind = message.get("type")
        event_id = message.get("event_id")
        event_id = event_id if isinstance(event_id, int) else None
        if kind == SUBSCRIBED:
            cursor = decode_reply(message, _Subscribed).last_event_id
            self._wanted.started(cursor)
            return SUBSCRIBED, {}, cursor
        if kind == UNSUBSCRIBED:
            self._end()
            return self._ended_by_daemon(message)
        if kind not in EVENT_TYPES:
            self._end()  # a reply with our id that is no event ends the subscription
            return None
        return (kind, message, event_id) if self._wanted.wants(kind, event_id) else None

    def _ended_by_daemon(self, message: dict[str, Any]) -> None:
        """The session closed (the stream ends), or the daemon is shutting down (it is lost)."""
        if message.get("reason") == SHUTDOWN:
            raise ConnectionLost(
                f"{self._where} is shutting down: the event stream of session "
                f"{message.get('session_id')!r} ended (reconnect later or elsewhere)"
            )
        return None

    async def aclose(self) -> None:
        if self.ended:
            return
        route = self._opened()
        if route is None:  # never subscribed, or still sending: nothing to end yet
            self._end()
            return
        try:
            await self._unsubscribe(route)
            while (await route.next()).get("type") != UNSUBSCRIBED:
                pass  # events sent before the daemon saw the unsubscribe: nobody wants them
        except (LiveLMError, ConnectionLost):
            # refused: it had already ended (or was never made); or the connection is gone,
            # and the subscription with it. Either way nothing is left to end.
            return
        finally:
            self._end()
