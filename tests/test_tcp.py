"""The framed MessagePack protocol over raw TCP, against a real daemon on loopback."""

from __future__ import annotations

import asyncio
import re
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livelm.protocol.framing import HEADER_BYTES, encode_frame
from tests.daemon_process import DaemonProcess, start_daemon
from tests.wire_client import AsyncTcpClient, Closed, TcpClient

PRODUCERS = 8
RECORDS_EACH = 12_500  # 100,000 in all
PUSH_SIZES = (100, 250, 500)
LOAD_WINDOW = 256  # tokens: keeps the demo model's work per record small


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    cache = tmp_path_factory.mktemp("tcp")
    args = ["--model", "demo", "--cache-dir", str(cache), "--log-format", "text"]
    with start_daemon(args, log_dir=cache) as process:
        yield process


def metric(daemon: DaemonProcess, name: str) -> float:
    with urllib.request.urlopen(daemon.url + "/metrics", timeout=30) as reply:
        text = reply.read().decode()
    found = re.search(rf"^livelm_{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"no metric {name} in\n{text}"
    return float(found.group(1))


def new_session(client: TcpClient, **init: Any) -> str:
    reply = client.request({"type": "init", "prompt": "Market data.", **init})
    assert reply["type"] == "session", reply
    return reply["session_id"]


def collect_answer(client: TcpClient, request_id: int) -> tuple[list[dict], dict]:
    """The token messages and the final ``done`` (or ``error``) of one generate."""
    tokens = []
    while True:
        msg = client.reply_to(request_id)
        if msg["type"] != "token":
            return tokens, msg
        tokens.append(msg)


def bar(i: int) -> dict[str, Any]:
    return {"t": 1_700_000_000 + i, "o": 100.25, "h": 101.5, "l": 99.75, "c": 100 + i % 7, "v": i}


# ---- basics ---------------------------------------------------------------------------------


def test_hello_ping_and_a_session_round_trip(daemon: DaemonProcess) -> None:
    with TcpClient(daemon.tcp_port) as client:
        welcome = client.request({"type": "hello", "version": 1, "client": "pytest"})
        assert welcome == {
            "type": "welcome",
            "id": welcome["id"],
            "version": 1,
            "server": welcome["server"],
            "model": "demo",
            "max_frame": 16 << 20,
        }
        assert client.request({"type": "ping"})["type"] == "pong"
        sid = new_session(client, format="text")
        ack = client.request({"type": "push", "session_id": sid, "data": ["a 1", "b 2"]})
        assert (ack["type"], ack["seq"], ack["accepted"]) == ("ack", 2, 2)
        status = client.request({"type": "status", "session_id": sid})
        assert (status["type"], status["session_id"], status["data_seq"]) == ("status", sid, 2)
        closed = client.request({"type": "close", "session_id": sid})
        assert closed == {"type": "closed", "id": closed["id"], "session_id": sid}
        gone = client.request({"type": "status", "session_id": sid})
        assert (gone["type"], gone["code"]) == ("error", "unknown_session")


def test_bad_messages_get_errors_naming_the_problem_and_the_connection_stays_usable(
    daemon: DaemonProcess,
) -> None:
    with TcpClient(daemon.tcp_port) as client:
        sid = new_session(client)
        cases = [
            (
                {"type": "generate", "session_id": sid, "prompt": "q", "max_tokens": "x"},
                "invalid_request",
                "$.max_tokens",
            ),
            (
                {"type": "push", "session_id": sid, "data": "not a list"},
                "invalid_request",
                "$.data",
            ),
            ({"type": "teleport"}, "invalid_request", "$.type"),
            ({"type": "push", "session_id": "s_missing", "data": ["x"]}, "unknown_session", ""),
            ({"type": "push", "session_id": sid, "data": []}, "invalid_request", "empty"),
            (
                {"type": "generate", "session_id": sid, "prompt": "q", "max_tokens": 0},
                "invalid_request",
                "max_tokens",
            ),
            ({"type": "hello", "version": 2}, "invalid_request", "version"),
        ]
        for message, code, words in cases:
            reply = client.request(message)
            assert (reply["type"], reply["code"]) == ("error", code), reply
            assert words in reply["message"]
        client.send_raw(encode_frame(b"\xc1"))  # never valid MessagePack: no id to echo
        reply = client.recv()
        assert (reply["type"], reply["code"], "id" in reply) == ("error", "invalid_request", False)
        client.send_raw(encode_frame(msgspec.msgpack.encode([1, 2])))
        assert client.recv()["code"] == "invalid_request"
        assert client.request({"type": "ping"})["type"] == "pong"
        assert client.request({"type": "push", "session_id": sid, "data": ["ok"]})["seq"] == 1
        # values nested past Python's recursion limit: an error, not a dropped connection
        marker = msgspec.msgpack.encode("@deep@")
        push = msgspec.msgpack.encode({"type": "push", "id": 9, "session_id": sid,
                                       "data": ["@deep@"]})
        deep = b"\x91" * 5000 + msgspec.msgpack.encode("x")  # 5000 one-item arrays around "x"
        client.send_raw(encode_frame(push.replace(marker, deep)))
        reply = client.recv()  # without its id: reading that far would recurse as deep
        assert reply["code"] == "invalid_request" and "nested too deeply" in reply["message"]
        # a MessagePack ext value has no text form: refused, named by its entry
        json_sid = new_session(client, format="json")
        ext = {"type": "push", "session_id": json_sid,
               "data": ["fine", {"k": msgspec.msgpack.Ext(5, b"raw")}]}
        reply = client.request(ext)
        assert reply["code"] == "invalid_request" and "data[1]" in reply["message"], reply
        assert client.request({"type": "push", "session_id": sid, "data": ["ok"]})["seq"] == 2


def test_oversized_length_prefix_gets_too_large_then_close(daemon: DaemonProcess) -> None:
    with TcpClient(daemon.tcp_port) as client:
        sid = new_session(client)
        push = {"id": 9, "type": "push", "session_id": sid, "data": ["kept"]}
        # a whole push, then a header of 16 MiB + 1 with no body: refused at once
        client.send_raw(
            encode_frame(msgspec.msgpack.encode(push)) + ((16 << 20) + 1).to_bytes(4, "big")
        )
        ack, error = client.wait_closed()
        assert (ack["type"], ack["seq"]) == ("ack", 1)
        assert (error["type"], error["code"]) == ("error", "too_large")
    with TcpClient(daemon.tcp_port) as other:
        assert other.request({"type": "status", "session_id": sid})["data_seq"] == 1


def test_zero_length_frame_is_a_bad_frame(daemon: DaemonProcess) -> None:
    with TcpClient(daemon.tcp_port) as client:
        client.send_raw(b"\x00" * HEADER_BYTES)
        [error] = client.wait_closed()
        assert (error["type"], error["code"]) == ("error", "bad_frame")


def test_half_close_gets_every_reply_before_the_daemon_closes(daemon: DaemonProcess) -> None:
    with TcpClient(daemon.tcp_port) as client:
        sid = new_session(client)
        for i in range(20):
            client.send({"type": "push", "id": i, "session_id": sid, "data": [f"e{i}"]})
        client.send(
            {"type": "generate", "id": 99, "session_id": sid, "prompt": "q", "max_tokens": 4}
        )
        client.sock.shutdown(socket.SHUT_WR)
        replies = client.wait_closed()
    assert [m["seq"] for m in replies if m["type"] == "ack"] == list(range(1, 21))
    assert replies[-1]["type"] == "done" and replies[-1]["data_seq"] == 20


# ---- multiplexing ---------------------------------------------------------------------------


def test_multiplexed_generates_each_stream_a_complete_answer(daemon: DaemonProcess) -> None:
    prompts = {11: "First?", 12: "Second?", 13: "Third?", 14: "Fourth?"}
    with TcpClient(daemon.tcp_port) as client:
        sid = new_session(client, format="ohlcv")
        assert (
            client.request({"type": "push", "session_id": sid, "data": [bar(i) for i in range(5)]})[
                "seq"
            ]
            == 5
        )
        alone = {}
        for rid, prompt in prompts.items():  # one at a time: the reference answers
            client.send(
                {
                    "type": "generate",
                    "id": rid,
                    "session_id": sid,
                    "prompt": prompt,
                    "max_tokens": 12,
                    "stream": False,
                }
            )
            alone[rid] = client.reply_to(rid)
        for rid, prompt in prompts.items():  # all in flight on one connection
            client.send(
                {
                    "type": "generate",
                    "id": rid,
                    "session_id": sid,
                    "prompt": prompt,
                    "max_tokens": 12,
                }
            )
        done: dict[int, dict] = {}
        tokens: dict[int, list[dict]] = {rid: [] for rid in prompts}
        while len(done) < len(prompts):
            msg = client.recv()
            assert msg["id"] in prompts and msg["id"] not in done, msg
            if msg["type"] == "token":
                tokens[msg["id"]].append(msg)
            else:
                done[msg["id"]] = msg
    for rid in prompts:
        assert done[rid]["type"] == "done", done[rid]
        assert done[rid]["text"] == "".join(t["text"] for t in tokens[rid])
        assert done[rid]["tokens"] == [t["token"] for t in tokens[rid] if t["token"] is not None]
        assert done[rid]["tokens"] == alone[rid]["tokens"]  # greedy: same answer either way
        assert done[rid]["data_seq"] == 5


def test_a_generate_id_still_streaming_cannot_be_reused(daemon: DaemonProcess) -> None:
    with TcpClient(daemon.tcp_port) as client:
        sid = new_session(client)
        request = {"type": "generate", "id": 5, "session_id": sid, "prompt": "q", "max_tokens": 400}
        client.send(request)
        client.send(request)
        messages = []
        while not messages or messages[-1]["type"] != "done":
            messages.append(client.recv())
        errors = [m for m in messages if m["type"] == "error"]
        assert len(errors) == 1 and "already used" in errors[0]["message"]


def test_disconnect_mid_generate_cancels_that_query_only(daemon: DaemonProcess) -> None:
    long_tokens = 4000
    with TcpClient(daemon.tcp_port) as other:
        sid = new_session(other)
        other.request({"type": "push", "session_id": sid, "data": ["x y z"]})
        before = metric(daemon, "tokens_generated_total")
        leaving = TcpClient(daemon.tcp_port)
        leaving.send(
            {
                "type": "generate",
                "id": 1,
                "session_id": sid,
                "prompt": "Go on",
                "max_tokens": long_tokens,
            }
        )
        assert leaving.recv()["type"] == "token"  # it runs
        leaving.send_raw(b"\x00\x00\x01")  # and the client vanishes mid-frame
        leaving.close()
        other.send(
            {"type": "generate", "id": 2, "session_id": sid, "prompt": "Short", "max_tokens": 6}
        )
        _, done = collect_answer(other, 2)
        assert done["type"] == "done" and done["usage"]["completion_tokens"] == 6
        while metric(daemon, "queries_inflight") > 0:
            assert other.request({"type": "ping"})["type"] == "pong"
        cancelled_tokens = metric(daemon, "tokens_generated_total") - before - 6
        assert cancelled_tokens < long_tokens


def test_a_flood_of_pipelined_pushes_pauses_reading_and_loses_nothing(
    daemon: DaemonProcess,
) -> None:
    pushes = 3000
    pauses_before = metric(daemon, 'wire_read_pauses_total{transport="tcp"}')
    with TcpClient(daemon.tcp_port) as client:
        sid = new_session(client)
        frames = b"".join(
            encode_frame(
                msgspec.msgpack.encode(
                    {"type": "push", "id": n, "session_id": sid, "data": [f"p{n}"]}
                )
            )
            for n in range(1, pushes + 1)
        )
        client.send_raw(frames)  # far more than the daemon queues before it stops reading
        acks = [client.recv() for _ in range(pushes)]
        assert [(a["type"], a["id"], a["seq"]) for a in acks] == [
            ("ack", n, n) for n in range(1, pushes + 1)
        ]
        assert client.request({"type": "status", "session_id": sid})["data_seq"] == pushes
    assert metric(daemon, 'wire_read_pauses_total{transport="tcp"}') > pauses_before


# ---- many producers -------------------------------------------------------------------------


async def produce(port: int, index: int) -> tuple[str, list[int], list[int]]:
    """One producer: a session, then every push pipelined; returns the acks' and pushes' seqs."""
    client = await AsyncTcpClient.connect(port)
    init = {
        "type": "init",
        "id": 0,
        "prompt": "Bars.",
        "format": "ohlcv",
        "template": "raw",
        "window": LOAD_WINDOW,
    }
    sid = (await client.request(init))["session_id"]
    first = index * RECORDS_EACH
    expected, pushes, done = [], [], 0
    while done < RECORDS_EACH:
        size = min(PUSH_SIZES[len(pushes) % len(PUSH_SIZES)], RECORDS_EACH - done)
        pushes.append([bar(first + done + i) for i in range(size)])
        done += size
        expected.append(done)

    async def send_all() -> None:
        for n, data in enumerate(pushes, start=1):
            await client.send({"type": "push", "id": n, "session_id": sid, "data": data})

    sending = asyncio.create_task(send_all())
    acks = []
    while len(acks) < len(pushes):
        msg = await client.recv()
        assert msg["type"] == "ack" and msg["id"] == len(acks) + 1, msg
        acks.append(msg["seq"])
    await sending
    status = await client.request({"type": "status", "id": -1, "session_id": sid})
    while status["ingested_seq"] < RECORDS_EACH:  # the worker catches up with what is accepted
        await asyncio.sleep(0.1)
        status = await client.request({"type": "status", "id": -1, "session_id": sid})
    assert status["data_seq"] == RECORDS_EACH
    assert status["entries"] + status["dropped_entries"] == RECORDS_EACH
    await client.request({"type": "close", "id": -2, "session_id": sid})
    await client.close()
    return sid, acks, expected


def test_eight_producers_push_100k_records_and_none_is_lost(daemon: DaemonProcess) -> None:
    async def run_all() -> list[tuple[str, list[int], list[int]]]:
        return await asyncio.gather(*(produce(daemon.tcp_port, i) for i in range(PRODUCERS)))

    frames_before = metric(daemon, 'wire_frames_in_total{transport="tcp"}')
    results = asyncio.run(run_all())
    assert len({sid for sid, _, _ in results}) == PRODUCERS
    for _, acks, expected in results:
        assert acks == expected  # strictly increasing, each push's last seq, none twice
        assert acks[-1] == RECORDS_EACH
    pushes = sum(len(acks) for _, acks, _ in results)
    assert metric(daemon, 'wire_frames_in_total{transport="tcp"}') - frames_before >= pushes


# ---- fuzzing --------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)  # what MessagePack holds
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
TYPES = ["hello", "init", "push", "generate", "flash", "subscribe", "status", "close", "ping", "x"]
KEYS = [
    "id",
    "session_id",
    "data",
    "prompt",
    "max_tokens",
    "version",
    "api_key",
    "events",
    "window",
]
# messages of every type with fields of any type (random session ids name no real session)
wrong_messages = st.fixed_dictionaries(
    {"type": st.sampled_from(TYPES)}, optional={k: json_values for k in KEYS}
)

# one step of a fuzzing client: (kind, argument)
steps = st.one_of(
    st.tuples(st.just("push"), st.integers(min_value=1, max_value=5)),
    st.tuples(st.just("message"), wrong_messages),
    st.tuples(st.just("payload"), st.binary(min_size=1, max_size=40)),  # framed, not MessagePack
    st.tuples(st.just("ping"), st.integers(min_value=0, max_value=1 << 40)),
)
endings = st.one_of(
    st.tuples(st.just("half_close"), st.just(b"")),
    st.tuples(st.just("abrupt"), st.just(b"")),
    st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=40)),  # raw, may break framing
    st.tuples(st.just("oversized"), st.integers(min_value=(16 << 20) + 1, max_value=(1 << 32) - 1)),
    st.tuples(st.just("mid_frame"), st.binary(min_size=1, max_size=3)),
)


class Witness:
    """A connection opened before the fuzzing, and the entries the fuzzers got acknowledged."""

    def __init__(self, port: int) -> None:
        self.client = TcpClient(port)
        self.session = new_session(self.client)
        self.acked = 0  # entries acknowledged to fuzzing clients
        self.sent = 0  # entries in well-formed pushes that fuzzing clients sent


def fuzz_once(
    port: int, witness: Witness, script: list[tuple[str, Any]], ending: tuple[str, Any]
) -> None:
    sent = 0
    with TcpClient(port) as client:
        for kind, arg in script:
            if kind == "push":
                data = [f"fuzz {i}" for i in range(arg)]
                client.send({"type": "push", "session_id": witness.session, "data": data})
                sent += arg
                witness.sent += arg
            elif kind == "message":
                client.send(arg)
            elif kind == "payload":
                client.send_raw(encode_frame(arg))
            else:
                client.send({"type": "ping", "id": arg})
        how, arg = ending
        if how == "garbage":
            client.send_raw(arg)
        elif how == "oversized":
            client.send_raw(arg.to_bytes(HEADER_BYTES, "big"))
        elif how == "mid_frame":
            client.send_raw(encode_frame(b"\x80")[: len(arg)])
        if how == "abrupt":
            return
        client.sock.shutdown(socket.SHUT_WR)
        replies = client.wait_closed()
    for reply in replies:
        assert reply["type"] in (
            "ack",
            "error",
            "pong",
            "welcome",
            "session",
            "status",
            "closed",
            "flash_registered",
            "subscribed",
            "token",
            "done",
        ), reply
        if reply["type"] == "error":
            assert reply["code"] != "internal", reply
    acks = [r for r in replies if r["type"] == "ack" and r["session_id"] == witness.session]
    witness.acked += sum(r["accepted"] for r in acks)
    if how in ("half_close", "garbage", "mid_frame"):
        # every well-formed push before the end was applied and acknowledged
        assert sum(r["accepted"] for r in acks) == sent
    if how == "oversized":
        assert replies[-1]["code"] == "too_large"
    if how == "mid_frame":
        assert replies[-1]["code"] == "bad_frame"


def test_fuzzed_connections_never_hurt_the_daemon_or_other_connections(
    daemon: DaemonProcess,
) -> None:
    witness = Witness(daemon.tcp_port)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(steps, max_size=8), endings)
    def fuzz(script: list[tuple[str, Any]], ending: tuple[str, Any]) -> None:
        fuzz_once(daemon.tcp_port, witness, script, ending)
        status = witness.client.request({"type": "status", "session_id": witness.session})
        assert witness.acked <= status["data_seq"] <= witness.sent
        assert status["entries"] + status["dropped_entries"] == status["data_seq"]

    try:
        fuzz()
        assert witness.client.request({"type": "ping"})["type"] == "pong"
        assert daemon.alive()
        assert "Traceback" not in daemon.log_text()  # no request failed unexpectedly
    except Closed as exc:
        raise AssertionError(f"the witness connection was closed\n{daemon.log_text()}") from exc
    finally:
        witness.client.close()


# ---- API keys, a small max_frame, and the drain -------------------------------------------


def test_api_keys_max_frame_and_drain(tmp_path) -> None:
    env = {"LIVELM_API_KEYS": "key-one,key-two", "LIVELM_MAX_FRAME": "4096"}
    args = ["--model", "demo", "--cache-dir", str(tmp_path), "--log-format", "text"]
    with start_daemon(args, env=env, log_dir=tmp_path) as keyed:
        with TcpClient(keyed.tcp_port) as client:
            for message in ({"type": "ping"}, {"type": "init", "prompt": "p"}):
                reply = client.request(message)
                assert (reply["type"], reply["code"]) == ("error", "unauthorized"), reply
            for hello in ({"type": "hello"}, {"type": "hello", "api_key": "key-three"}):
                assert client.request(hello)["code"] == "unauthorized"
            welcome = client.request({"type": "hello", "version": 1, "api_key": "key-two"})
            assert (welcome["type"], welcome["max_frame"]) == ("welcome", 4096)
            sid = new_session(client)
            assert client.request({"type": "push", "session_id": sid, "data": ["a"]})["seq"] == 1
            too_big = msgspec.msgpack.encode(
                {"type": "push", "session_id": sid, "data": ["x" * 5000]}
            )
            client.send_raw(encode_frame(too_big))
            [error] = client.wait_closed()
            assert (error["code"], "4096" in error["message"]) == ("too_large", True)

        with TcpClient(keyed.tcp_port) as client:
            client.request({"type": "hello", "api_key": "key-one"})
            assert client.request({"type": "status", "session_id": sid})["data_seq"] == 1
            client.send(
                {"type": "generate", "id": 7, "session_id": sid, "prompt": "Go", "max_tokens": 300}
            )
            assert client.recv()["type"] == "token"
            keyed.proc.terminate()  # SIGTERM: the query in flight still finishes
            replies = client.wait_closed()
            assert replies[-1]["type"] == "done" and replies[-1]["id"] == 7, replies[-1]
            assert keyed.proc.wait(timeout=30) == 0
