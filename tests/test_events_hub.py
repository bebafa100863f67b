"""The per-session event hub as a unit: ids, cursors, filters, lost events, closing."""

from __future__ import annotations

import asyncio

import pytest

from livelm.daemon.engine.events import (
    DATA_UPDATED,
    EVENTS_LOST,
    FLASH_ANSWER,
    EventHub,
    Subscription,
    event_names,
)
from livelm.protocol.errors import InvalidRequest
from livelm.protocol.messages import DataUpdated, EventsLost, FlashAnswer

ALL = event_names([])


def data(hub: EventHub, seq: int) -> None:
    hub.publish(DATA_UPDATED, DataUpdated(session_id=hub.session_id, data_seq=seq, tokens=seq))


def flash(hub: EventHub, text: str) -> None:
    body = FlashAnswer(
        session_id=hub.session_id, query_id=1, query="q", text=text, confidence=0.5, data_seq=0
    )
    hub.publish(FLASH_ANSWER, body)


async def ready(sub: Subscription) -> list[tuple[int, str]]:
    """Every event the subscription can hand out without waiting."""
    out = []
    while True:
        try:
            event = await asyncio.wait_for(anext(sub), 0.05)
        except asyncio.TimeoutError:
            return out
        except StopAsyncIteration:
            out.append((-1, "end"))
            return out
        out.append((event.id, event.name))


def run(coro):
    return asyncio.run(coro)


def test_ids_increase_from_one_and_a_subscriber_gets_only_new_events() -> None:
    async def scenario():
        hub = EventHub("s", 8)
        data(hub, 1)
        sub = hub.subscribe(ALL)  # from now on
        data(hub, 2)
        flash(hub, "a")
        return await ready(sub), hub.last_id

    events, last = run(scenario())
    assert events == [(2, DATA_UPDATED), (3, FLASH_ANSWER)] and last == 3


def test_subscribers_have_their_own_cursors_and_filters() -> None:
    async def scenario():
        hub = EventHub("s", 64)
        fast = hub.subscribe(event_names(["flash"]))
        slow = hub.subscribe(ALL)
        for i in range(10):
            data(hub, i + 1)
            flash(hub, str(i))
        got_fast = await ready(fast)
        got_slow = await ready(slow)
        return got_fast, got_slow

    got_fast, got_slow = run(scenario())
    assert [name for _, name in got_fast] == [FLASH_ANSWER] * 10
    assert [i for i, _ in got_fast] == list(range(2, 21, 2))
    assert [i for i, _ in got_slow] == list(range(1, 21))


def test_a_waiting_subscriber_wakes_on_publish() -> None:
    async def scenario():
        hub = EventHub("s", 4)
        sub = hub.subscribe(ALL)
        waiting = asyncio.ensure_future(anext(sub))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        data(hub, 1)
        return await asyncio.wait_for(waiting, 5)

    event = run(scenario())
    assert (event.id, event.name, event.body.data_seq) == (1, DATA_UPDATED, 1)


def test_falling_behind_the_buffer_reports_what_was_lost_then_continues() -> None:
    async def scenario():
        hub = EventHub("s", 4)
        sub = hub.subscribe(ALL)
        for i in range(10):  # ids 1..10; the buffer keeps 7..10
            data(hub, i + 1)
        first = await anext(sub)
        return first, await ready(sub)

    first, rest = run(scenario())
    assert first.name == EVENTS_LOST
    assert first.body == EventsLost(session_id="s", requested=1, first_available=7)
    assert first.id == 6  # resuming from it continues at 7
    assert [i for i, _ in rest] == [7, 8, 9, 10]


def test_resuming_from_a_last_event_id() -> None:
    async def scenario():
        hub = EventHub("s", 4)
        for i in range(10):
            data(hub, i + 1)
        in_buffer = await ready(hub.subscribe(ALL, last_event_id=8))
        too_old = await ready(hub.subscribe(ALL, last_event_id=2))
        from_start = await ready(hub.subscribe(ALL, last_event_id=0))
        current = await ready(hub.subscribe(ALL, last_event_id=10))
        return in_buffer, too_old, from_start, current

    in_buffer, too_old, from_start, current = run(scenario())
    assert in_buffer == [(9, DATA_UPDATED), (10, DATA_UPDATED)]
    assert too_old == [
        (6, EVENTS_LOST),
        (7, DATA_UPDATED),
        (8, DATA_UPDATED),
        (9, DATA_UPDATED),
        (10, DATA_UPDATED),
    ]
    assert from_start[0] == (6, EVENTS_LOST) and len(from_start) == 5
    assert current == []


def test_bad_resume_points_and_names_are_refused() -> None:
    async def scenario():
        hub = EventHub("s", 4)
        data(hub, 1)
        with pytest.raises(InvalidRequest, match="ahead"):
            hub.subscribe(ALL, last_event_id=5)
        with pytest.raises(InvalidRequest, match=">= 0"):
            hub.subscribe(ALL, last_event_id=-1)

    run(scenario())
    with pytest.raises(InvalidRequest, match="unknown event 'prices'"):
        event_names(["flash", "prices"])
    assert event_names(["data", "flash_answer"]) == {DATA_UPDATED, FLASH_ANSWER}


def test_closing_the_hub_ends_iteration_after_buffered_events() -> None:
    async def scenario():
        hub = EventHub("s", 8)
        sub = hub.subscribe(ALL)
        waiting = hub.subscribe(ALL)
        pending = asyncio.ensure_future(anext(waiting))
        await asyncio.sleep(0.01)
        data(hub, 1)
        hub.close()
        drained = [event.id async for event in sub]
        woken = await asyncio.wait_for(pending, 5)
        late = await ready(hub.subscribe(ALL, last_event_id=0))
        with pytest.raises(RuntimeError, match="closed"):
            data(hub, 2)
        return drained, woken.id, late, hub.subscribers

    drained, woken, late, subscribers = run(scenario())
    assert drained == [1] and woken == 1
    assert late == [(1, DATA_UPDATED), (-1, "end")]
    assert subscribers == 1  # `waiting` has not reached the end yet; the others have


def test_close_ends_one_subscription_and_unregisters_it() -> None:
    async def scenario():
        hub = EventHub("s", 8)
        sub = hub.subscribe(ALL)
        other = hub.subscribe(ALL)
        pending = asyncio.ensure_future(anext(sub))
        await asyncio.sleep(0.01)
        sub.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(pending, 5)
        data(hub, 1)
        return hub.subscribers, await ready(other)

    subscribers, other_events = run(scenario())
    assert subscribers == 1 and other_events == [(1, DATA_UPDATED)]


def test_a_publisher_never_waits_for_a_subscriber_that_never_reads() -> None:
    async def scenario():
        hub = EventHub("s", 16)
        stuck = hub.subscribe(ALL)
        for i in range(10_000):  # no await: publishing cannot block
            data(hub, i + 1)
        return await anext(stuck), hub.last_id

    first, last = run(scenario())
    assert last == 10_000
    assert first.body == EventsLost(session_id="s", requested=1, first_available=9985)
