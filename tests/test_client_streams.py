"""The client's streams and connections against a real daemon on loopback: closing a stream
ends the daemon's subscription, a cancelled read loses nothing, an HTTP stream resumes from
where it opened, a draining daemon loses the stream, and peers that are no daemon (silent, or
another protocol) are ``DaemonUnreachable`` on every transport."""

from __future__ import annotations

import asyncio
import signal
import warnings
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import pytest

from livelm.client import (
    ClientBase,
    ConnectionLost,
    DaemonUnreachable,
    HttpClient,
    InvalidRequest,
    Status,
    SyncClient,
    connect_tcp,
    connect_ws,
)
from livelm.client.replies import decode_reply
from livelm.client.sse import SseEvent, SseParser
from tests.daemon_process import DaemonProcess, start_daemon
from tests.test_client import CutProxy, connect, data_event_reaching, within

T = TypeVar("T")
MAX_SUBSCRIPTIONS = 1024  # the daemon's limit per connection


def run(work: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(work)


async def never_answering_server() -> AsyncIterator[int]:
    """A loopback port that accepts connections and never says a word (a hung daemon)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.transport.abort()
        server.close()


@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_closing_event_streams_ends_their_subscriptions(
    demo_daemon: DaemonProcess, transport: str
) -> None:
    async def scenario() -> None:
        async with await connect(demo_daemon, transport) as client:
            sid = (await client.init("", template="raw")).session_id
            for _ in range(MAX_SUBSCRIPTIONS + 10):
                await (await client.subscribe(sid)).aclose()
            events = await client.subscribe(sid, ["data"])  # the daemon holds none of them
            seq = await client.push(sid, ["still subscribed"])
            await within(data_event_reaching(events, seq))
            await events.aclose()
            await events.aclose()  # again: nothing left to end
            await client.close_session(sid)

    run(scenario())


@pytest.mark.parametrize("transport", ["tcp", "ws", "http"])
def test_a_cancelled_read_loses_nothing(demo_daemon: DaemonProcess, transport: str) -> None:
    async def scenario() -> None:
        async with await connect(demo_daemon, transport) as client:
            sid = (await client.init("Feed.", template="raw")).session_id
            events = await client.subscribe(sid, ["data"])
            with pytest.raises(asyncio.TimeoutError):  # nothing was pushed: nothing comes
                await asyncio.wait_for(anext(events), 0.05)
            seq = await client.push(sid, ["after the timeout"])
            updates = await within(data_event_reaching(events, seq))
            assert updates[-1].data_seq == seq

            whole = await client.generate(sid, "What came?", max_tokens=8)
            stream = client.stream_generate(sid, "What came?", max_tokens=8)
            texts = [await within(anext(stream))]
            for _ in range(3):  # each read is cut short, or returns a token: none is lost
                try:
                    texts.append(await asyncio.wait_for(anext(stream), 0))
                except asyncio.TimeoutError:
                    pass
                except StopAsyncIteration:
                    break
            texts += [text async for text in stream]
            assert "".join(texts) == whole.text and stream.done is not None
            await events.aclose()
            await client.close_session(sid)

    run(scenario())


def test_http_stream_dropped_before_its_first_event_resumes_where_it_opened(
    demo_daemon: DaemonProcess,
) -> None:
    async def scenario() -> None:
        proxy = CutProxy(demo_daemon.port)
        proxy_url = await proxy.start()
        async with HttpClient(demo_daemon.url) as direct, HttpClient(proxy_url) as watcher:
            sid = (await direct.init("", template="raw")).session_id
            await direct.push(sid, ["before"])  # its event may come before or after: no matter
            probe = await direct.subscribe(sid, ["data"])
            await within(data_event_reaching(probe, 1))
            events = await watcher.subscribe(sid, ["data"])
            opened_at = events.last_event_id
            assert opened_at is not None  # the stream's opening id, known before any event

            proxy.cut()  # no event read yet; this one is published while it is down
            seq = await direct.push(sid, ["while down"])
            await within(data_event_reaching(probe, seq))
            updates = await within(data_event_reaching(events, seq))
            assert proxy.connections >= 2
            assert [u.data_seq for u in updates] == [seq]
            await events.aclose()
            await probe.aclose()
            await direct.close_session(sid)
        await proxy.close()

    run(scenario())


def test_a_draining_daemon_loses_tcp_and_ws_streams(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    cache = tmp_path_factory.mktemp("client-drain")
    args = ["--model", "demo", "--cache-dir", str(cache), "--log-format", "text"]
    daemon = start_daemon(args, log_dir=cache)

    async def scenario() -> None:
        clients = [await connect(daemon, "tcp"), await connect(daemon, "ws")]
        sid = (await clients[0].init("", template="raw")).session_id
        streams = [await client.subscribe(sid) for client in clients]
        daemon.proc.send_signal(signal.SIGTERM)
        for events in streams:
            with pytest.raises(ConnectionLost, match="shutting down"):
                await within(anext(events))
        for client in clients:
            await client.aclose()

    try:
        run(scenario())
        assert daemon.proc.wait(60) == 0  # the SIGTERM above: a clean drain
    finally:
        daemon.stop()


def test_sse_parser_reports_an_id_only_block_and_sets_ids_when_a_block_ends() -> None:
    parser = SseParser()
    assert parser.feed(b"id: 41\n\n") == [SseEvent("", "", "41")]
    assert parser.feed(b"event: x\nid: 42\n") == [] and parser.last_id == "41"
    assert parser.feed(b"data: {}\n\n") == [SseEvent("x", "{}", "42")]
    assert parser.feed(b": keep-alive\n\n") == [] and parser.last_id == "42"


def test_status_carries_the_session_error(demo_daemon: DaemonProcess) -> None:
    fields = {
        "session_id": "s",
        "data_seq": 3,
        "ingested_seq": 2,
        "context_tokens": 10,
        "pending_tokens": 4,
        "window": 100,
        "error": "computing the session's data failed: boom",
    }
    assert decode_reply(fields, Status).error == fields["error"]

    async def scenario() -> None:
        for transport in ("tcp", "http"):
            async with await connect(demo_daemon, transport) as client:
                sid = (await client.init("", template="raw")).session_id
                assert (await client.status(sid)).error is None
                await client.close_session(sid)

    run(scenario())


def test_unencodable_values_are_refused_before_sending(demo_daemon: DaemonProcess) -> None:
    async def scenario() -> None:
        async with await connect(demo_daemon, "tcp") as client:
            sid = (await client.init("", template="raw")).session_id
            with pytest.raises(InvalidRequest, match="MessagePack"):
                await client.push(sid, [str(2**64), 2**64])
            assert await client.push(sid, [str(2**64)]) == 1  # the connection lives
            await client.close_session(sid)

    run(scenario())


# ---- lifecycles ---------------------------------------------------------------------------------


def test_sync_client_close_is_idempotent_and_later_calls_fail(demo_daemon: DaemonProcess) -> None:
    for client in (
        SyncClient.tcp("127.0.0.1", demo_daemon.tcp_port),
        SyncClient.http(demo_daemon.url),
    ):
        client.ping()
        client.close()
        client.close()
        with pytest.raises(ConnectionLost, match="closed"):
            client.ping()


def test_an_unclosed_sync_client_leaves_no_pending_task(demo_daemon: DaemonProcess) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client = SyncClient.tcp("127.0.0.1", demo_daemon.tcp_port)
        sid = client.init("", template="raw").session_id
        client.subscribe(sid)
        client.close_session(sid)
        del client  # its finalizer closes the connection and the loop
    assert not [w for w in caught if "destroyed" in str(w.message)]


def test_http_client_refuses_calls_after_aclose(demo_daemon: DaemonProcess) -> None:
    async def scenario() -> None:
        client = HttpClient(demo_daemon.url)
        await client.ping()
        await client.aclose()
        with pytest.raises(ConnectionLost, match="closed"):
            await client.ping()

    run(scenario())


# ---- peers that are no daemon ---------------------------------------------------------------------


async def connect_to(transport: str, port: int, **options: Any) -> ClientBase:
    if transport == "tcp":
        return await connect_tcp("127.0.0.1", port, **options)
    if transport == "ws":
        return await connect_ws(f"http://127.0.0.1:{port}", **options)
    client = HttpClient(f"http://127.0.0.1:{port}", **options)
    await client.status("any")  # HTTP says nothing until asked
    return client


@pytest.mark.parametrize("transport", ["tcp", "ws", "http"])
def test_a_silent_peer_is_unreachable(transport: str) -> None:
    async def scenario() -> None:
        options = {"connect_timeout": 0.3}
        if transport == "http":
            options["read_timeout"] = 0.3
        async for port in never_answering_server():
            with pytest.raises(DaemonUnreachable):
                await connect_to(transport, port, **options)

    run(scenario())


@pytest.mark.parametrize("transport", ["tcp", "ws", "http"])
def test_a_peer_of_another_protocol_is_unreachable(
    demo_daemon: DaemonProcess, transport: str
) -> None:
    # the daemon's other port: HTTP where TCP frames are spoken, and the reverse
    port = demo_daemon.port if transport == "tcp" else demo_daemon.tcp_port

    async def scenario() -> None:
        with pytest.raises(DaemonUnreachable):
            await connect_to(transport, port, connect_timeout=5.0)

    run(scenario())
