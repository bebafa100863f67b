"""``livelm watch``: a session's flash answers, printed as they change, until it closes."""

from __future__ import annotations

import argparse
import sys

import msgspec

from livelm.client.base import ClientBase, EventStream
from livelm.client.cli_verbs import open_client
from livelm.client.http import HttpClient
from livelm.client.replies import DataUpdated, Event, EventsLost, FlashAnswer


async def watch(args: argparse.Namespace) -> int:
    async with await open_client(args) as client:
        for query in args.flash or []:
            await client.flash(args.session, query, args.max_tokens)
        events = await client.subscribe(args.session, ["flash", "data"] if args.data else ["flash"])
        print(f"livelm watch: watching session {args.session}", file=sys.stderr, flush=True)
        try:
            await _print_answers(client, args, events)
        finally:  # also when stdout closes (BrokenPipeError): the subscription ends here
            await events.aclose()
    return 0


async def _print_answers(client: ClientBase, args: argparse.Namespace, events: EventStream) -> None:
    left = args.count
    cached = await _current_answers(client, args.session, events.last_event_id)
    for answer in cached[:left]:
        _show(answer, args.json)
        left = None if left is None else left - 1
    while left is None or left > 0:
        event = await anext(events, None)
        if event is None:  # the session closed
            break
        _show(event, args.json)
        if left is not None and isinstance(event, FlashAnswer):
            left -= 1


async def _current_answers(
    client: ClientBase, session_id: str, until: int | None
) -> list[FlashAnswer]:
    """The latest answer of each flash query, as of event ``until`` (where the live stream
    starts). HTTP serves them; over TCP/WebSocket they are replayed from the session's
    event buffer (those older than what it keeps are not known)."""
    if isinstance(client, HttpClient):
        return await client.flash_answers(session_id)
    if not until:
        return []
    history = await client.subscribe(session_id, last_event_id=0)
    latest: dict[int, FlashAnswer] = {}
    try:
        while history.last_event_id is None or history.last_event_id < until:
            event = await anext(history, None)
            if event is None:  # the session closed meanwhile
                break
            if isinstance(event, FlashAnswer) and (history.last_event_id or 0) <= until:
                latest[event.query_id] = event
    finally:
        await history.aclose()
    return [latest[query_id] for query_id in sorted(latest)]


def _show(event: Event, as_json: bool) -> None:
    if as_json:
        kind = type(event).__name__
        body = msgspec.structs.asdict(event)
        print(msgspec.json.encode({"event": _EVENT_NAMES[kind], **body}).decode(), flush=True)
    elif isinstance(event, FlashAnswer):
        print(
            f"[seq {event.data_seq}] #{event.query_id} {event.query}: {event.text.strip()}"
            f"  (confidence {event.confidence:.2f})",
            flush=True,
        )
    elif isinstance(event, DataUpdated):
        print(f"[seq {event.data_seq}] data: {event.tokens} tokens in context", flush=True)
    elif isinstance(event, EventsLost):
        print(
            f"livelm watch: fell behind; events {event.requested}.."
            f"{event.first_available - 1} are lost",
            file=sys.stderr,
            flush=True,
        )


_EVENT_NAMES = {
    "FlashAnswer": "flash_answer",
    "DataUpdated": "data_updated",
    "EventsLost": "events_lost",
}
