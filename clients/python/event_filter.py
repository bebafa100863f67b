"""Which events on a connection belong to one subscription.

Event messages name their session but not the ``subscribe`` request they answer, so every
subscription to a session on one connection receives every copy the daemon sends for any of
them. A subscription keeps the events of its own topics, after the event it started from,
each once (event ids increase by one per session).
"""

from __future__ import annotations

TOPIC_EVENTS = {"flash": "flash_answer", "data": "data_updated"}
EVENTS_LOST = "events_lost"


class EventFilter:
    def __init__(self, topics: list[str] | None) -> None:
        names = [TOPIC_EVENTS.get(topic, topic) for topic in topics or TOPIC_EVENTS]
        self.names = frozenset(names)
        self.cursor: int | None = None  # last event id handed out; None before ``subscribed``

    def started(self, last_event_id: int) -> None:
        """The daemon confirmed the subscription: events after ``last_event_id`` follow."""
        self.cursor = last_event_id

    def wants(self, kind: str, event_id: int | None) -> bool:
        if self.cursor is None:  # a copy for another subscription, sent before ours began
            return False
        if kind != EVENTS_LOST and kind not in self.names:
            return False
        if event_id is not None:
            if event_id <= self.cursor:
                return False
            self.cursor = event_id
        return True
