"""Flash queries on a real demo daemon: answers after pushes, change-only events, coalescing,
cached generates without device work, and clean errors for bad input."""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import pairwise

import requests

from tests.daemon_process import DaemonProcess
from tests.sse_client import SseStream

TIMEOUT = 60
WHAT = "What comes next?"
WHICH = "Which way?"


def post(daemon: DaemonProcess, path: str, body=None) -> requests.Response:
    return requests.post(f"{daemon.url}{path}", json=body, timeout=TIMEOUT)


def get(daemon: DaemonProcess, path: str) -> requests.Response:
    return requests.get(f"{daemon.url}{path}", timeout=TIMEOUT)


def open_session(daemon: DaemonProcess, **init) -> str:
    reply = post(daemon, "/v1/sessions/init", {"prompt": "Ticks.", "template": "raw", **init})
    assert reply.status_code == 200, reply.text
    return reply.json()["session_id"]


def push(daemon: DaemonProcess, sid: str, *entries: str) -> int:
    reply = post(daemon, f"/v1/sessions/{sid}/stream/push", {"data": list(entries)})
    assert reply.status_code == 200, reply.text
    return reply.json()["seq"]


def metric(daemon: DaemonProcess, name: str) -> float:
    for line in get(daemon, "/metrics").text.splitlines():
        if line.startswith(f"livelm_{name} "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} missing")


def wait_for(check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def answers(daemon: DaemonProcess, sid: str) -> dict[str, dict]:
    reply = get(daemon, f"/v1/sessions/{sid}/flash")
    assert reply.status_code == 200, reply.text
    return {a["query"]: a for a in reply.json()["answers"]}


def settle(daemon: DaemonProcess, sid: str, seq: int, count: int) -> dict[str, dict]:
    """The answers once all ``count`` cover ``seq`` and no round or query is running."""

    def done() -> bool:
        got = answers(daemon, sid)
        return len(got) == count and all(a["data_seq"] >= seq for a in got.values())

    wait_for(done, f"flash answers over seq {seq}")
    wait_for(lambda: metric(daemon, "flash_rounds_inflight") == 0, "rounds to finish")
    wait_for(lambda: metric(daemon, "queries_inflight") == 0, "queries to finish")
    return answers(daemon, sid)


def test_flash_answers_equal_plain_generates_over_the_same_data(demo_daemon) -> None:
    flash = [{"query": WHAT, "max_tokens": 8}, {"query": WHICH, "max_tokens": 5}]
    sid = open_session(demo_daemon, flash=flash)
    plain = open_session(demo_daemon)  # same data, no flash queries: nothing cached
    for round_ in range(3):
        rows = [f"t={round_}.{i} px={100 + 3 * round_ + i}" for i in range(2)]
        seq = push(demo_daemon, sid, *rows)
        assert push(demo_daemon, plain, *rows) == seq
        got = settle(demo_daemon, sid, seq, 2)
        for spec in flash:
            body = {"prompt": spec["query"], "max_tokens": spec["max_tokens"]}
            reference = post(demo_daemon, f"/v1/sessions/{plain}/generate", body).json()
            assert reference["cached"] is False and reference["data_seq"] == seq
            answer = got[spec["query"]]
            assert (answer["text"], answer["data_seq"]) == (reference["text"], seq)
            assert 0.0 <= answer["confidence"] <= 1.0
            cached = post(demo_daemon, f"/v1/sessions/{sid}/generate", body).json()
            assert cached["cached"] is True and cached["tokens"] == reference["tokens"]
    for s in (sid, plain):
        requests.delete(f"{demo_daemon.url}/v1/sessions/{s}", timeout=TIMEOUT)


def test_answers_are_published_only_when_they_change(demo_daemon) -> None:
    sid = open_session(demo_daemon, flash=[{"query": WHAT, "max_tokens": 1}])
    path = f"/v1/sessions/{sid}/events?events=flash&last_event_id=0"
    with SseStream(demo_daemon.port, path) as stream:
        kept = [settle(demo_daemon, sid, 0, 1)[WHAT]]  # the round at registration
        for i in range(6):
            seq = push(demo_daemon, sid, f"row {i} value {i * 7 % 5}")
            kept.append(settle(demo_daemon, sid, seq, 1)[WHAT])
        # a new query starts a round over unchanged data: an unchanged answer is not repeated
        assert post(demo_daemon, f"/v1/sessions/{sid}/flash", {"query": WHICH}).status_code == 200
        kept.append(settle(demo_daemon, sid, seq, 2)[WHAT])
        requests.delete(f"{demo_daemon.url}/v1/sessions/{sid}", timeout=TIMEOUT)
        events = []
        while (event := stream.next_event()) is not None:  # ends with the session
            events.append(event)
    assert {e.name for e in events} == {"flash_answer"}
    published = [(e.data["text"], e.data["data_seq"]) for e in events if e.data["query"] == WHAT]
    changed = [kept[0]] + [b for a, b in pairwise(kept) if b["text"] != a["text"]]
    assert published == [(a["text"], a["data_seq"]) for a in changed]
    assert [e.data["query"] for e in events].count(WHICH) == 1
    assert [e.id for e in events] == sorted(e.id for e in events)


def test_fast_pushes_coalesce_rounds_and_the_last_answer_covers_the_last_data(
    demo_daemon,
) -> None:
    flash = [{"query": f"{WHAT} #{i}", "max_tokens": 32} for i in range(4)]
    sid = open_session(demo_daemon, flash=flash)
    settle(demo_daemon, sid, 0, 4)
    rounds = metric(demo_daemon, "flash_rounds_total")
    coalesced = metric(demo_daemon, "flash_rounds_coalesced_total")
    pushes = 40
    for i in range(pushes):
        seq = push(demo_daemon, sid, f"tick {i}")
    got = settle(demo_daemon, sid, seq, 4)
    assert all(a["data_seq"] == seq for a in got.values())
    ran = metric(demo_daemon, "flash_rounds_total") - rounds
    assert 1 <= ran < pushes
    assert metric(demo_daemon, "flash_rounds_coalesced_total") > coalesced
    requests.delete(f"{demo_daemon.url}/v1/sessions/{sid}", timeout=TIMEOUT)


def test_cached_generate_does_no_device_work(demo_daemon) -> None:
    sid = open_session(demo_daemon, flash=[{"query": WHAT, "max_tokens": 6}])
    seq = push(demo_daemon, sid, "a=1", "b=2", "c=3")
    answer = settle(demo_daemon, sid, seq, 1)[WHAT]
    started = metric(demo_daemon, "queries_started_total")
    body = {"prompt": WHAT, "max_tokens": 6}
    cached = post(demo_daemon, f"/v1/sessions/{sid}/generate", body).json()
    streamed = post(demo_daemon, f"/v1/sessions/{sid}/generate", {**body, "stream": True})
    assert metric(demo_daemon, "queries_started_total") == started  # nothing was submitted
    assert cached["cached"] is True
    assert (cached["text"], cached["data_seq"]) == (answer["text"], answer["data_seq"])
    blocks = [b for b in streamed.text.split("\n\n") if b.startswith("event: token")]
    texts = [requests.compat.json.loads(b.split("data: ", 1)[1])["text"] for b in blocks]
    assert "".join(texts) == cached["text"]
    assert '"cached":true' in streamed.text.split("event: done", 1)[1]
    # settings a cached answer can't stand for run as ordinary queries
    for other in ({"temperature": 0.7, "seed": 1}, {"stop": "zz"}):
        reply = post(demo_daemon, f"/v1/sessions/{sid}/generate", {**body, **other}).json()
        assert reply["cached"] is False
    assert metric(demo_daemon, "queries_started_total") == started + 2
    requests.delete(f"{demo_daemon.url}/v1/sessions/{sid}", timeout=TIMEOUT)


def test_a_cached_answer_older_than_the_last_push_is_not_served(demo_daemon) -> None:
    """Right after a push is acknowledged its flash round has not finished: a generate must
    see the push, as it would with no flash query registered."""
    sid = open_session(demo_daemon, flash=[{"query": WHAT, "max_tokens": 6}])
    settle(demo_daemon, sid, push(demo_daemon, sid, "a=1"), 1)
    bulk = [f"tick {i} price {100 + i} volume {i * 7}" for i in range(300)]  # a slow ingest
    seq = push(demo_daemon, sid, *bulk)
    reply = post(demo_daemon, f"/v1/sessions/{sid}/generate", {"prompt": WHAT, "max_tokens": 6})
    assert reply.json()["data_seq"] == seq, reply.text
    requests.delete(f"{demo_daemon.url}/v1/sessions/{sid}", timeout=TIMEOUT)


def test_a_generate_with_no_cached_answer_yet_runs_normally(demo_daemon) -> None:
    sid = open_session(demo_daemon)
    push(demo_daemon, sid, "x=1")
    reply = post(demo_daemon, f"/v1/sessions/{sid}/generate", {"prompt": WHAT, "max_tokens": 4})
    assert reply.status_code == 200 and reply.json()["cached"] is False
    requests.delete(f"{demo_daemon.url}/v1/sessions/{sid}", timeout=TIMEOUT)


def test_bad_flash_requests_get_clean_errors(demo_daemon) -> None:
    sid = open_session(demo_daemon)
    cases = [
        (f"/v1/sessions/{sid}/flash", {"query": ""}, 400, "empty"),
        (f"/v1/sessions/{sid}/flash", {"query": "   "}, 400, "empty"),
        (f"/v1/sessions/{sid}/flash", {"query": "q", "max_tokens": 0}, 400, "max_tokens"),
        (f"/v1/sessions/{sid}/flash", {"query": "q", "max_tokens": "x"}, 400, "max_tokens"),
        (f"/v1/sessions/{sid}/flash", {"max_tokens": 3}, 400, "query"),
        ("/v1/sessions/nope/flash", {"query": "q"}, 404, "nope"),
        ("/v1/sessions/init", {"flash": [{"query": "q"}] * 17}, 400, "16 flash"),
        ("/v1/sessions/init", {"flash": [{"query": ""}]}, 400, "flash[0].query"),
    ]
    for path, body, status, words in cases:
        reply = post(demo_daemon, path, body)
        assert reply.status_code == status, (path, body, reply.text)
        assert words in reply.json()["error"]["message"], reply.text
    for i in range(16):
        assert post(demo_daemon, f"/v1/sessions/{sid}/flash", {"query": f"q{i}"}).status_code == 200
    again = post(demo_daemon, f"/v1/sessions/{sid}/flash", {"query": "q3"})  # idempotent
    assert again.status_code == 200 and again.json()["query_id"] == 4
    full = post(demo_daemon, f"/v1/sessions/{sid}/flash", {"query": "one more"})
    assert full.status_code == 400 and "at most 16" in full.json()["error"]["message"]
    assert get(demo_daemon, "/v1/sessions/nope/flash").status_code == 404
    # the session still works
    assert push(demo_daemon, sid, "still fine") == 1
    requests.delete(f"{demo_daemon.url}/v1/sessions/{sid}", timeout=TIMEOUT)
    assert get(demo_daemon, f"/v1/sessions/{sid}/flash").status_code == 404
