"""A session's event stream: a bounded buffer that publishers append to without waiting, read
by any number of subscribers, each at its own cursor.

No subscriber has a queue of its own: a slow one only falls behind in the shared buffer, and
once the events it still wanted are gone it is told so with an ``events_lost`` event, then
continues from the oldest event still held. Everything here runs on the event loop thread.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from livelm.protocol.errors import InvalidRequest
from livelm.protocol.messages import EventsLost

FLASH_ANSWER = "flash_answer"
DATA_UPDATED = "data_updated"
EVENTS_LOST = "events_lost"
# why a subscription ended (``unsubscribed``'s reason)
SESSION_CLOSED = "session closed"
SHUTDOWN = "shutdown"
UNSUBSCRIBED = "unsubscribed"
EVENT_NAMES = frozenset({FLASH_ANSWER, DATA_UPDATED})
# the short topic names of PROTOCOL.md's ``subscribe`` (``events: ["flash", "data"]``)
TOPICS = {"flash": FLASH_ANSWER, "data": DATA_UPDATED}


@dataclass(frozen=True)
class SessionEvent:
    id: int  # per session, from 1, increasing by one per published event
    name: str
    body: msgspec.Struct


def event_names(requested: Iterable[str]) -> frozenset[str]:
    """Event names from topics (``flash``, ``data``) or full names; empty means every event."""
    names = set()
    for item in requested:
        name = TOPICS.get(item, item)
        if name not in EVENT_NAMES:
            known = ", ".join(sorted({*TOPICS, *EVENT_NAMES}))
            raise InvalidRequest(f"unknown event {item!r}; known: {known}")
        names.add(name)
    return frozenset(names or EVENT_NAMES)


class EventHub:
    """The events of one session; ``capacity`` bounds what is kept for late readers."""

    def __init__(self, session_id: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("an event hub holds at least one event")
        self.session_id = session_id
        self._events: deque[SessionEvent] = deque(maxlen=capacity)
        self._last_id = 0
        self._subscribers: set[Subscription] = set()
        self.closed = False
        self.close_reason = ""  # why its subscriptions end: the session closed, or a shutdown
        # restored from the journal after a restart: its ids began again at 1, so a reader
        # resuming from an id of the daemon before is told what it lost, not refused
        self.restored = False

    @property
    def last_id(self) -> int:
        return self._last_id

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, name: str, body: msgspec.Struct) -> SessionEvent:
        """Appends an event (dropping the oldest past capacity) and wakes readers; never waits."""
        if self.closed:
            raise RuntimeError(f"the event hub of session {self.session_id!r} is closed")
        self._last_id += 1
        event = SessionEvent(self._last_id, name, body)
        self._events.append(event)
        self._wake_all()
        return event

    def subscribe(self, names: frozenset[str], last_event_id: int | None = None) -> Subscription:
        """Events after ``last_event_id`` (``None``: only events published from now on)."""
        if last_event_id is None:
            last_event_id = self._last_id
        if last_event_id < 0:
            raise InvalidRequest("last_event_id must be >= 0")
        lost = None
        if last_event_id > self._last_id:
            if not self.restored:
                raise InvalidRequest(
                    f"last_event_id {last_event_id} is ahead of this session's newest event "
                    f"({self._last_id}); was the session re-created?"
                )
            lost = EventsLost(session_id=self.session_id, requested=last_event_id + 1,
                              first_available=self._last_id + 1)
            last_event_id = self._last_id
        subscription = Subscription(self, names, last_event_id, lost)
        if not self.closed:
            self._subscribers.add(subscription)
        return subscription

    def close(self, reason: str = SESSION_CLOSED) -> None:
        """Readers get what is still buffered, then their iteration ends."""
        self.closed = True
        self.close_reason = reason
        self._wake_all()

    # ---- for Subscription ----------------------------------------------------------------
    def next_after(self, cursor: int) -> SessionEvent | None:
        """The event after ``cursor``, an ``events_lost`` event if it is gone, or None."""
        if cursor >= self._last_id:
            return None
        first = self._events[0].id
        if cursor + 1 < first:
            # its id stands for everything lost, so resuming from it continues at ``first``
            lost = EventsLost(
                session_id=self.session_id, requested=cursor + 1, first_available=first
            )
            return SessionEvent(first - 1, EVENTS_LOST, lost)
        return self._events[cursor + 1 - first]

    def forget(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    def _wake_all(self) -> None:
        for subscription in self._subscribers:
            subscription.wake()


class Subscription:
    """An async iterator of a session's events (those named in ``names``, and ``events_lost``).

    Iteration ends when the session closes (after the events still buffered) or on ``close()``.
    Cancelling a pending ``__anext__`` loses nothing: the cursor moves only when an event is
    returned.
    """

    def __init__(
        self, hub: EventHub, names: frozenset[str], cursor: int, lost: EventsLost | None = None
    ) -> None:
        self._hub = hub
        self.names = names
        self.cursor = cursor  # id of the last event handed out (or skipped by the filter)
        self._lost = lost  # told first: the events before a restart the reader asked for
        self._wakeup = asyncio.Event()
        self._closed = False

    def wake(self) -> None:
        self._wakeup.set()

    def close(self) -> None:
        self._closed = True
        self._hub.forget(self)
        self._wakeup.set()

    @property
    def end_reason(self) -> str:
        """Why the iteration ended on the daemon's side (the hub's close reason)."""
        return self._hub.close_reason

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> SessionEvent:
        while not self._closed:
            self._wakeup.clear()
            event = self._next_matching()
            if event is not None:
                return event
            if self._hub.closed:
                self.close()
                break
            await self._wakeup.wait()
        raise StopAsyncIteration

    def _next_matching(self) -> SessionEvent | None:
        if self._lost is not None:
            lost, self._lost = self._lost, None
            return SessionEvent(self.cursor, EVENTS_LOST, lost)
        while True:
            event = self._hub.next_after(self.cursor)
            if event is None:
                return None
            self.cursor = event.id
            if event.name == EVENTS_LOST or event.name in self.names:
                return event
