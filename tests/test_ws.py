"""The message protocol over ``GET /v1/ws``, driven by the ``websockets`` library: binary frames
carry MessagePack, text frames JSON, and every reply comes back in its request's encoding."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.daemon_process import DaemonProcess, start_daemon
from tests.wire_client import TIMEOUT, WsClient

ENCODINGS = [True, False]
ENCODING_IDS = ["msgpack", "json"]
POLL_S = 0.2


@pytest.fixture(scope="module")
def keyed_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    cache = tmp_path_factory.mktemp("ws-keyed")
    env = {"LIVELM_API_KEYS": "ws-key", "LIVELM_MAX_FRAME": "2048"}
    args = ["--model", "demo", "--cache-dir", str(cache), "--log-format", "text"]
    with start_daemon(args, env=env, log_dir=cache) as process:
        yield process


def answer(client: WsClient, request_id: int) -> tuple[str, dict]:
    """The streamed text and the ``done`` of one generate."""
    text = ""
    while (msg := client.reply_to(request_id))["type"] == "token":
        text += msg["text"]
    return text, msg


@pytest.mark.parametrize("binary", ENCODINGS, ids=ENCODING_IDS)
def test_init_push_generate_status(demo_daemon: DaemonProcess, binary: bool) -> None:
    with WsClient(demo_daemon.ws_url, binary) as client:
        session = client.request({"type": "init", "prompt": "Quotes.", "format": "kv"})
        assert session["type"] == "session", session
        sid = session["session_id"]
        ack = client.request(
            {"type": "push", "session_id": sid, "data": [{"bid": 1.5}, {"ask": 2}]}
        )
        assert (ack["type"], ack["seq"]) == ("ack", 2)
        rid = client.next_id()
        client.send(
            {"type": "generate", "id": rid, "session_id": sid, "prompt": "Spread?", "max_tokens": 8}
        )
        text, done = answer(client, rid)
        assert done["type"] == "done" and done["text"] == text and done["data_seq"] == 2
        assert len(done["tokens"]) == done["usage"]["completion_tokens"] == 8
        status = client.request({"type": "status", "session_id": sid})
        assert (status["type"], status["data_seq"]) == ("status", 2)
        bad = client.request({"type": "generate", "session_id": sid, "prompt": 3})
        assert (bad["type"], bad["code"]) == ("error", "invalid_request")
        assert "$.prompt" in bad["message"]
        assert client.request({"type": "close", "session_id": sid})["type"] == "closed"
    assert client.kinds == {"binary" if binary else "text"}


def test_each_reply_uses_the_encoding_of_its_request(demo_daemon: DaemonProcess) -> None:
    with WsClient(demo_daemon.ws_url, binary=True) as client:
        for binary in (True, False, False, True):
            rid = client.next_id()
            client.send({"type": "ping", "id": rid}, binary=binary)
            reply, was_binary = client.recv_frame()
            assert (reply, was_binary) == ({"type": "pong", "id": rid}, binary)
        client.ws.send("{not json")
        reply, was_binary = client.recv_frame()
        assert (reply["code"], was_binary) == ("invalid_request", False)


def test_deeply_nested_values_get_an_error_and_the_socket_stays(demo_daemon: DaemonProcess) -> None:
    # 5000 nested lists: the decoder recurses past Python's limit (this used to answer the
    # upgraded socket with an HTTP 500, breaking it)
    with WsClient(demo_daemon.ws_url, binary=False) as client:
        sid = client.request({"type": "init", "prompt": "Feed.", "template": "raw"})["session_id"]
        deep = "[" * 5000 + '"x"' + "]" * 5000
        nested = f'{{"type": "push", "id": 7, "session_id": "{sid}", "data": {deep}}}'
        client.ws.send(nested)
        reply, _ = client.recv_frame()
        assert reply["code"] == "invalid_request" and "nested too deeply" in reply["message"]
        assert client.request({"type": "push", "session_id": sid, "data": ["ok"]})["seq"] == 1


class Dashboard:
    """What a subscriber saw: flash answers, data updates, and the frame kinds they came in."""

    def __init__(self, client: WsClient) -> None:
        self.client = client
        self.answers: list[dict] = []
        self.updates: list[dict] = []
        self.kinds: set[bool] = set()

    def read(self, timeout: float = TIMEOUT) -> None:
        msg, was_binary = self.client.recv_frame(timeout)
        if msg["type"] == "flash_answer":
            self.answers.append(msg)
        elif msg["type"] == "data_updated":
            self.updates.append(msg)
        else:
            assert msg["type"] == "ack", msg
            return
        self.kinds.add(was_binary)

    def read_until_ingested(self, seq: int) -> None:
        while not (self.updates and self.updates[-1]["data_seq"] == seq):
            self.read()

    def read_until_current(self, current: Callable[[], dict | None], seq: int) -> None:
        """Until the last answer seen is the session's current answer over ``seq`` entries
        (a new answer is only published when its text changes)."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            now = current()
            if now and now["data_seq"] == seq and self.answers:
                if self.answers[-1]["text"] == now["text"]:
                    return
            try:
                self.read(timeout=POLL_S)
            except TimeoutError:
                continue
        raise AssertionError(f"no current answer over {seq} entries; saw {self.answers}")


def current_answer(daemon: DaemonProcess, sid: str) -> dict | None:
    reply = requests.get(f"{daemon.url}/v1/sessions/{sid}/flash", timeout=TIMEOUT)
    answers = reply.json()["answers"]
    return answers[0] if answers else None


@pytest.mark.parametrize("binary", ENCODINGS, ids=ENCODING_IDS)
def test_dashboard_gets_flash_answers_as_data_arrives(
    demo_daemon: DaemonProcess, binary: bool
) -> None:
    with WsClient(demo_daemon.ws_url, binary) as client:
        sid = client.request({"type": "init", "prompt": "Trades.", "format": "json"})["session_id"]
        flash = client.request(
            {"type": "flash", "session_id": sid, "query": "Trend?", "max_tokens": 4}
        )
        assert flash["type"] == "flash_registered", flash
        subscribed = client.request(
            {"type": "subscribe", "session_id": sid, "events": ["flash", "data"]}
        )
        assert subscribed["type"] == "subscribed", subscribed
        board = Dashboard(client)
        total = 0
        for batch in range(3):  # pushed in the other encoding: only acks come back in it
            data = [{"px": 100 + batch * 10 + i, "qty": i} for i in range(4)]
            client.send({"type": "push", "session_id": sid, "data": data}, binary=not binary)
            total += len(data)
            board.read_until_ingested(total)
        board.read_until_current(lambda: current_answer(demo_daemon, sid), total)
    assert board.kinds == {binary}  # events come in the encoding of the subscribe
    seen = [u["data_seq"] for u in board.updates]
    assert seen == sorted(set(seen)) and {4, 8, 12} <= set(seen)
    assert all(u["session_id"] == sid and u["tokens"] > 0 for u in board.updates)
    for a in board.answers:
        assert (a["query_id"], a["query"], a["session_id"]) == (flash["query_id"], "Trend?", sid)
        assert 0 <= a["data_seq"] <= total and 0.0 <= a["confidence"] <= 1.0
    seqs = [a["data_seq"] for a in board.answers]
    assert seqs == sorted(seqs)
    texts = [a["text"] for a in board.answers]
    assert all(x != y for x, y in zip(texts, texts[1:], strict=False))  # published on change


def test_session_close_ends_the_subscription_but_not_the_connection(
    demo_daemon: DaemonProcess,
) -> None:
    with WsClient(demo_daemon.ws_url, binary=True) as client:
        sid = client.request({"type": "init", "prompt": "p"})["session_id"]
        assert client.request({"type": "subscribe", "session_id": sid})["type"] == "subscribed"
        assert client.request({"type": "close", "session_id": sid})["type"] == "closed"
        assert client.request({"type": "ping"})["type"] == "pong"
        gone = client.request({"type": "subscribe", "session_id": sid})
        assert gone["code"] == "unknown_session"


def test_a_subscription_id_cannot_be_used_twice(demo_daemon: DaemonProcess) -> None:
    with WsClient(demo_daemon.ws_url, binary=True) as client:
        sid = client.request({"type": "init", "prompt": "p"})["session_id"]
        first = client.request({"type": "subscribe", "id": 500, "session_id": sid})
        assert first["type"] == "subscribed"
        again = client.request({"type": "subscribe", "id": 500, "session_id": sid})
        assert again["code"] == "invalid_request" and "already used" in again["message"]
        assert client.request({"type": "subscribe", "session_id": sid})["type"] == "subscribed"


def test_unsubscribe_ends_a_subscription_and_frees_its_id(demo_daemon: DaemonProcess) -> None:
    with WsClient(demo_daemon.ws_url, binary=True) as client:
        sid = client.request({"type": "init", "prompt": "p", "template": "raw"})["session_id"]
        assert client.request({"type": "subscribe", "id": 600, "session_id": sid})["type"] == (
            "subscribed"
        )
        ended = client.request({"type": "unsubscribe", "id": 600})
        assert ended == {"type": "unsubscribed", "id": 600, "session_id": sid,
                         "reason": "unsubscribed"}
        # data now: its data_updated would carry id 600 had the subscription lived on
        client.request({"type": "push", "session_id": sid, "data": ["x=1"]})
        answer = client.request({"type": "generate", "session_id": sid, "prompt": "q", "stream": False,
                                 "max_tokens": 1})  # answered after the push is ingested
        assert answer["type"] == "done"
        assert client.request({"type": "ping"})["type"] == "pong"
        assert all(m.get("id") != 600 for m in client.others), client.others
        again = client.request({"type": "unsubscribe", "id": 600})
        assert again["code"] == "invalid_request" and "no live subscription" in again["message"]
        assert client.request({"type": "subscribe", "id": 600, "session_id": sid})["type"] == (
            "subscribed"
        )


def test_api_key_by_header_or_hello(keyed_daemon: DaemonProcess) -> None:
    with WsClient(keyed_daemon.ws_url, binary=False) as client:
        assert client.request({"type": "ping"})["code"] == "unauthorized"
        assert client.request({"type": "hello", "api_key": "nope"})["code"] == "unauthorized"
        welcome = client.request({"type": "hello", "api_key": "ws-key"})
        assert (welcome["type"], welcome["max_frame"]) == ("welcome", 2048)
        assert client.request({"type": "ping"})["type"] == "pong"
    headers = {"Authorization": "Bearer ws-key"}
    with WsClient(keyed_daemon.ws_url, binary=True, headers=headers) as client:
        assert client.request({"type": "init", "prompt": "p"})["type"] == "session"


def test_message_over_max_frame_closes_with_1009(keyed_daemon: DaemonProcess) -> None:
    headers = {"x-api-key": "ws-key"}
    with WsClient(keyed_daemon.ws_url, binary=True, headers=headers) as client:
        big: dict[str, Any] = {"type": "push", "id": 1, "session_id": "s", "data": ["x" * 3000]}
        client.send(big)
        with pytest.raises(ConnectionClosed) as info:
            client.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    with WsClient(keyed_daemon.ws_url, binary=True, headers=headers) as other:
        assert other.request({"type": "ping"})["type"] == "pong"


def test_plain_http_on_the_ws_path_is_refused(keyed_daemon: DaemonProcess) -> None:
    reply = requests.get(keyed_daemon.ws_url.replace("ws://", "http://"), timeout=30)
    assert reply.status_code >= 400
    with pytest.raises(InvalidStatus):
        WsClient(keyed_daemon.ws_url.replace("/v1/ws", "/v1/nope"), binary=True)
