"""Session events over SSE on a real demo daemon with a small event buffer: filters,
keep-alives, the end of the stream, resuming with Last-Event-ID, lost events, a stalled
reader, and bad requests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.daemon_process import DaemonProcess, start_daemon
from tests.sse_client import SseEvent, SseStream

TIMEOUT = 60
BUFFER = 8  # events a session keeps


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    folder: Path = tmp_path_factory.mktemp("sse")
    args = ["--model", "demo", "--cache-dir", str(folder / "cache"), "--log-format", "text"]
    env = {"LIVELM_EVENT_BUFFER": str(BUFFER), "LIVELM_SSE_KEEPALIVE_S": "0.2"}
    with start_daemon(args, env=env, log_dir=folder) as process:
        yield process


def open_session(daemon: DaemonProcess, **init) -> str:
    body = {"prompt": "Feed.", "template": "raw", **init}
    reply = requests.post(f"{daemon.url}/v1/sessions/init", json=body, timeout=TIMEOUT)
    assert reply.status_code == 200, reply.text
    return reply.json()["session_id"]


def push(daemon: DaemonProcess, sid: str, entry: str) -> int:
    reply = requests.post(
        f"{daemon.url}/v1/sessions/{sid}/stream/push", json={"data": [entry]}, timeout=TIMEOUT
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["seq"]


def close(daemon: DaemonProcess, sid: str) -> None:
    assert requests.delete(f"{daemon.url}/v1/sessions/{sid}", timeout=TIMEOUT).status_code == 200


def events_path(sid: str, query: str = "") -> str:
    return f"/v1/sessions/{sid}/events" + (f"?{query}" if query else "")


def data_upto(seq: int):
    return lambda e: e.name == "data_updated" and e.data["data_seq"] >= seq


def push_and_see(daemon: DaemonProcess, sid: str, stream: SseStream, n: int) -> list[SseEvent]:
    """``n`` pushes, each awaited on ``stream``; returns the events seen."""
    seen = []
    for i in range(n):
        seq = push(daemon, sid, f"row {i}")
        seen += stream.events_until(data_upto(seq))
    return seen


def ingested(daemon: DaemonProcess, sid: str, seq: int) -> bool:
    url = f"{daemon.url}/v1/sessions/{sid}/stream/status"
    return requests.get(url, timeout=TIMEOUT).json()["ingested_seq"] >= seq


def push_unseen(daemon: DaemonProcess, sid: str, n: int) -> int:
    """``n`` pushes while nobody listens, each waited until ingested (one event each)."""
    for i in range(n):
        seq = push(daemon, sid, f"quiet {i}")
        with SseStream(daemon.port, events_path(sid, "events=data")) as probe:
            if not ingested(daemon, sid, seq):
                probe.events_until(data_upto(seq))
    return seq


def context_tokens(daemon: DaemonProcess, sid: str) -> int:
    url = f"{daemon.url}/v1/sessions/{sid}/stream/status"
    return requests.get(url, timeout=TIMEOUT).json()["context_tokens"]


def test_stream_has_keepalives_filters_and_ends_with_the_session(daemon) -> None:
    sid = open_session(daemon, flash=[{"query": "Next?", "max_tokens": 3}])
    flash_path = events_path(sid, "events=flash&last_event_id=0")
    with (
        SseStream(daemon.port, events_path(sid, "events=data")) as data_only,
        SseStream(daemon.port, flash_path) as flash_only,
    ):
        seq = push(daemon, sid, "a=1")
        updated = data_only.events_until(data_upto(seq))[-1]
        assert updated.data == {
            "session_id": sid,
            "data_seq": seq,
            "tokens": context_tokens(daemon, sid),
        }
        first = flash_only.next_event()
        assert first is not None and first.name == "flash_answer" and first.id >= 1
        # nothing more for the data-only stream: it idles with keep-alive comments
        assert data_only.file.readline() == b": keep-alive\n"
        close(daemon, sid)
        assert data_only.next_event() is None  # the stream ends with the session
        rest = list(iter(flash_only.next_event, None))
        assert all(e.name == "flash_answer" for e in rest)


def test_reconnecting_with_last_event_id_misses_nothing_still_buffered(daemon) -> None:
    sid = open_session(daemon)
    with SseStream(daemon.port, events_path(sid)) as live:
        seen = push_and_see(daemon, sid, live, 3)
    assert [e.id for e in seen] == [1, 2, 3]
    last = seen[-1].id
    seq = push_unseen(daemon, sid, 3)  # fewer than the buffer holds
    with SseStream(daemon.port, events_path(sid), {"Last-Event-ID": str(last)}) as again:
        resumed = again.events_until(data_upto(seq))
    assert [e.id for e in resumed] == [last + 1, last + 2, last + 3]
    assert [e.data["data_seq"] for e in resumed] == [4, 5, 6]
    # the query parameter works too; the header wins when both are given
    with SseStream(daemon.port, events_path(sid, f"last_event_id={last + 1}")) as by_query:
        assert by_query.events_until(data_upto(seq))[0].id == last + 2
    headers = {"Last-Event-ID": str(last + 2)}
    with SseStream(daemon.port, events_path(sid, "last_event_id=0"), headers) as both:
        assert both.events_until(data_upto(seq))[0].id == last + 3
    close(daemon, sid)


def test_a_stream_opens_with_the_id_it_starts_after(daemon) -> None:
    # a reader that loses the stream before its first event still knows where to resume
    sid = open_session(daemon)
    with SseStream(daemon.port, events_path(sid)) as live:
        live.read_head()
        assert live.file.readline() == b"id: 0\n"
        seen = push_and_see(daemon, sid, live, 2)
    with SseStream(daemon.port, events_path(sid)) as later:
        later.read_head()
        assert later.file.readline() == f"id: {seen[-1].id}\n".encode()
    close(daemon, sid)


def test_asking_for_events_older_than_the_buffer_reports_them_lost(daemon) -> None:
    sid = open_session(daemon)
    with SseStream(daemon.port, events_path(sid)) as live:
        seen = push_and_see(daemon, sid, live, 2)
    last = seen[-1].id
    seq = push_unseen(daemon, sid, BUFFER + 4)
    newest = last + BUFFER + 4
    with SseStream(daemon.port, events_path(sid), {"Last-Event-ID": str(last)}) as again:
        resumed = again.events_until(data_upto(seq))
    lost = resumed[0]
    first_available = newest - BUFFER + 1
    assert lost.name == "events_lost"
    assert lost.data == {
        "session_id": sid,
        "requested": last + 1,
        "first_available": first_available,
    }
    assert lost.id == first_available - 1
    assert [e.id for e in resumed[1:]] == list(range(first_available, newest + 1))
    # resuming from the events_lost id continues where it said, with nothing lost
    with SseStream(daemon.port, events_path(sid), {"Last-Event-ID": str(lost.id)}) as after:
        assert after.next_event().id == first_available
    close(daemon, sid)


def test_a_stalled_reader_slows_neither_producer_nor_other_readers(daemon) -> None:
    """A reader that stops reading holds back only its own handler: the producer's pushes
    and another reader's events all get through meanwhile. (Loopback buffers may absorb
    everything this test writes; that a publisher never waits on a reader, however far
    behind, is shown on the hub itself in test_events_hub.)"""
    sid = open_session(daemon, session_id="s" * 128)  # a long id makes every event bigger
    stalled = SseStream(daemon.port, events_path(sid), rcvbuf=2048)
    stalled.read_head()  # connected; from here it reads nothing until the end
    pushes = 150
    with SseStream(daemon.port, events_path(sid)) as reader:
        for i in range(pushes):
            push(daemon, sid, f"tick {i} " + "x" * 40)
        got = reader.events_until(data_upto(pushes))
    newest = got[-1].id
    assert [e.id for e in got] == list(range(1, newest + 1))  # every event, in order
    assert all(e.name == "data_updated" for e in got)
    # the stalled reader then gets a consistent stream: in order, and told of any gap
    late = stalled.events_until(lambda e: e.id == newest)
    expected = 1
    for event in late:
        if event.name == "events_lost":
            assert event.data["requested"] == expected
            expected = event.data["first_available"]
        else:
            assert event.id == expected
            expected += 1
    stalled.close()
    close(daemon, sid)


BAD = [
    ("/v1/sessions/nope/events", {}, 404, "nope"),
    ("/v1/sessions/{sid}/events?events=prices", {}, 400, "unknown event"),
    ("/v1/sessions/{sid}/events?last_event_id=abc", {}, 400, "last_event_id"),
    ("/v1/sessions/{sid}/events", {"Last-Event-ID": "-3"}, 400, "Last-Event-ID"),
    ("/v1/sessions/{sid}/events", {"Last-Event-ID": "99"}, 400, "ahead"),
]


@pytest.mark.parametrize(("path", "headers", "status", "words"), BAD)
def test_bad_event_requests_get_clean_errors(daemon, path, headers, status, words) -> None:
    sid = open_session(daemon)
    with SseStream(daemon.port, path.format(sid=sid), headers) as stream:
        assert stream.read_head() == status
        assert words in stream.body_json()["error"]["message"]
    assert push(daemon, sid, "still fine") == 1
    close(daemon, sid)
