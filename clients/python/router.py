"""Request-id multiplexing on one connection: each request gets an id and a queue, and the
connection's single reader hands every incoming message to the queue it belongs to.

Replies carry their request's ``id``; session events (``flash_answer``, ``data_updated``,
``events_lost``) carry their subscribe's. An event without one (from a daemon that did not
send it) goes to every subscription of its ``session_id``.
When the connection ends, every open route fails with the reason.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

from livelm.client.errors import ConnectionLost, error_from_message
from livelm.client.replies import EVENT_TYPES

log = logging.getLogger("livelm.client")

Item = dict[str, Any] | BaseException


class Route:
    """The replies to one request, in order; ``next()`` raises a typed error for an ``error``."""

    def __init__(self, router: RequestRouter, request_id: int, session_id: str | None) -> None:
        self.id = request_id
        self.session_id = session_id  # set for subscriptions: events of this session come here
        self._router = router
        self._queue: asyncio.Queue[Item] = asyncio.Queue()

    def put(self, item: Item) -> None:
        self._queue.put_nowait(item)

    async def next(self) -> dict[str, Any]:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.put(item)  # a failed connection stays failed for later calls
            raise item
        if item.get("type") == "error":
            raise error_from_message(item)
        return item

    def close(self) -> None:
        self._router.forget(self)


class RequestRouter:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._routes: dict[int, Route] = {}
        self._failure: ConnectionLost | None = None
        self.last_error: dict[str, Any] | None = None  # an error for no request (before a close)

    @property
    def failure(self) -> ConnectionLost | None:
        return self._failure

    def open(self, subscribe_to: str | None = None) -> Route:
        """A route for a new request (raises the connection's failure once it has ended)."""
        if self._failure is not None:
            raise self._failure
        route = Route(self, next(self._ids), subscribe_to)
        self._routes[route.id] = route
        return route

    def forget(self, route: Route) -> None:
        self._routes.pop(route.id, None)

    def dispatch(self, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        route = self._routes.get(request_id) if isinstance(request_id, int) else None
        if route is not None:
            route.put(message)
            return
        kind = message.get("type")
        if kind in EVENT_TYPES and request_id is None:
            self._to_subscribers(message)
        elif request_id is None and kind == "error":
            self.last_error = message
            log.warning(
                "error from the daemon for no request: %s: %s",
                message.get("code"),
                message.get("message"),
            )
        else:  # a reply to a request given up on (its caller was cancelled)
            log.debug("dropping a %r reply for request %r, no longer awaited", kind, request_id)

    def fail_all(self, reason: ConnectionLost) -> None:
        if self._failure is None:
            self._failure = reason
        for route in list(self._routes.values()):
            route.put(self._failure)
        self._routes.clear()

    def _to_subscribers(self, message: dict[str, Any]) -> None:
        session_id = message.get("session_id")
        for route in self._routes.values():
            if route.session_id is not None and route.session_id == session_id:
                route.put(message)
