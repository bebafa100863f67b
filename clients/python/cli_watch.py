"""``livelm watch``: a session's flash answers, printed as they change, until it closes."""

from __future__ import annotations

import argparse
import sys

import msgspec

from livelm.client.base import ClientBase
from livelm.client.cli_verbs import open_client
from livelm.client.http import HttpClient
from livelm.client.replies import DataUpdated, Event, EventsLost, FlashAnswer


async def watch(args: argparse.Namespace) -> int:
    async with await open_client(args) as client:
        for query in args.flash or []:
            await client.flash(args.session, query, args.max_tokens)
        events = await client.subscribe(args.session, ["flash", "data"] if args.data else ["flash"])
        print(f"livelm watch: watching session {args.session}", file=sys.stderr, flush=True)
        left = args.count
        for answer in (await _current_answers(client, args.session))[:left]:
            _show(answer, args.json)
            left = None if left is None else left - 1
        while left is None or left > 0:
            event = await anext(events, None)
            if event is None:  # the session closed
                break
            _show(event, args.json)
            if left is not None and isinstance(event, FlashAnswer):
                left -= 1
        await events.aclose()
    return 0


async def _current_answers(client: ClientBase, session_id: str) -> list[FlashAnswer]:
    """The answers already known (HTTP serves them; the message protocol has no such request)."""
    return await client.flash_answers(session_id) if isinstance(client, HttpClient) else []


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
