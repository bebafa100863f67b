"""The Python client (``livelm.client``) against a real daemon on loopback: every transport,
multiplexing, typed errors, connection loss, API keys, events with resume, the sync wrapper."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from livelm.client import (
    ClientBase,
    ConnectionLost,
    DaemonUnreachable,
    DataUpdated,
    EventStream,
    FlashAnswer,
    HttpClient,
    InvalidRequest,
    SyncClient,
    TooLarge,
    Unauthorized,
    UnknownSession,
    connect_tcp,
    connect_ws,
)
from livelm.client.sse import SseEvent, SseParser
from tests.daemon_process import DaemonProcess, free_port, start_daemon

T = TypeVar("T")
TRANSPORTS = ["tcp", "ws", "wsjson", "http"]
EVENT_TIMEOUT = 60.0
API_KEY = "client-test-key"
SMALL_FRAME = 4096


def run(work: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(work)


async def connect(daemon: DaemonProcess, transport: str, **options: Any) -> ClientBase:
    if transport == "tcp":
        return await connect_tcp("127.0.0.1", daemon.tcp_port, **options)
    if transport in ("ws", "wsjson"):
        return await connect_ws(daemon.url, binary=transport == "ws", **options)
    return HttpClient(daemon.url, **options)


async def within(work: Awaitable[T]) -> T:
    return await asyncio.wait_for(work, EVENT_TIMEOUT)


async def data_event_reaching(events: EventStream, seq: int) -> list[DataUpdated]:
    """Data events until one says ``seq`` is in the KV cache (several pushes may share one)."""
    seen: list[DataUpdated] = []
    async for event in events:
        assert isinstance(event, DataUpdated), event
        seen.append(event)
        if event.data_seq >= seq:
            return seen
    raise AssertionError(f"the event stream ended before data_seq {seq}: {seen}")


@pytest.fixture(scope="module")
def keyed_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A demo daemon that wants an API key and takes frames of at most 4 KiB."""
    cache = tmp_path_factory.mktemp("client-keyed")
    args = ["--model", "demo", "--cache-dir", str(cache), "--log-format", "text"]
    env = {"LIVELM_API_KEYS": API_KEY, "LIVELM_MAX_FRAME": str(SMALL_FRAME)}
    with start_daemon(args, env=env, log_dir=cache) as daemon:
        yield daemon


# ---- every transport, the same operations -------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_session_round_trip(demo_daemon: DaemonProcess, transport: str) -> None:
    async def scenario() -> None:
        async with await connect(demo_daemon, transport) as client:
            session = await client.init("Lines of a log.", template="raw", format="text")
            sid = session.session_id
            assert await client.push(sid, ["boot", "disk ok", "net ok"]) == 3
            assert await client.push(sid, ["user login", "user logout"]) == 5
            status = await client.status(sid)
            assert (status.session_id, status.data_seq, status.entries) == (sid, 5, 5)

            done = await client.generate(sid, "What happened last?", max_tokens=6)
            assert done.data_seq == 5 and not done.cached
            assert 1 <= done.usage.completion_tokens <= 6
            stream = client.stream_generate(sid, "What happened last?", max_tokens=6)
            texts = [text async for text in stream]
            assert stream.done is not None
            assert stream.done.tokens == done.tokens  # greedy: the same answer either way
            assert "".join(texts) == stream.done.text == done.text

            await client.ping()
            await client.close_session(sid)
            with pytest.raises(UnknownSession, match=sid):
                await client.status(sid)

    run(scenario())


def test_transports_agree_on_one_session(demo_daemon: DaemonProcess) -> None:
    async def scenario() -> None:
        async with HttpClient(demo_daemon.url) as http:
            sid = (await http.init("Prices.", template="raw", format="ohlcv")).session_id
            bars = [
                {"t": f"09:3{i}", "o": 10 + i, "h": 11 + i, "l": 9, "c": 10.5, "v": 100}
                for i in range(4)
            ]
            await http.push(sid, bars)
            answers = {}
            for transport in TRANSPORTS:
                async with await connect(demo_daemon, transport) as client:
                    answers[transport] = (await client.generate(sid, "Trend?", max_tokens=8)).tokens
            await http.close_session(sid)
        assert len({tuple(tokens) for tokens in answers.values()}) == 1, answers

    run(scenario())


def test_tcp_multiplexes_many_requests_in_flight(demo_daemon: DaemonProcess) -> None:
    async def scenario() -> None:
        async with await connect(demo_daemon, "tcp") as client:
            sid = (await client.init("Counter.", template="raw")).session_id
            # 40 pushes in flight at once: each awaits its own ack; the daemon applies them in order
            seqs = await asyncio.gather(*(client.push(sid, [f"tick {i}"]) for i in range(40)))
            assert seqs == list(range(1, 41))
            prompts = ["First?", "Last?", "How many?"]
            alone = [(await client.generate(sid, p, max_tokens=5)).tokens for p in prompts]
            together = await asyncio.gather(
                *(client.generate(sid, p, max_tokens=5) for p in prompts), client.ping()
            )
            assert [done.tokens for done in together[:3]] == alone
            await client.close_session(sid)

    run(scenario())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_errors_are_typed_and_the_connection_stays_usable(
    demo_daemon: DaemonProcess, transport: str
) -> None:
    async def scenario() -> None:
        async with await connect(demo_daemon, transport) as client:
            with pytest.raises(UnknownSession):
                await client.push("no-such-session", ["x"])
            sid = (await client.init("", template="raw")).session_id
            with pytest.raises(InvalidRequest, match="max_tokens"):
                await client.generate(sid, "hello", max_tokens=0)
            with pytest.raises(InvalidRequest):
                await client.init("", template="bogus")
            assert await client.push(sid, ["still fine"]) == 1
            await client.close_session(sid)

    run(scenario())


# ---- events -------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_subscribe_gets_data_and_flash_events(demo_daemon: DaemonProcess, transport: str) -> None:
    async def scenario() -> None:
        async with await connect(demo_daemon, transport) as client:
            sid = (await client.init("Feed.", template="raw")).session_id
            data = await client.subscribe(sid, ["data"])
            flash = await client.subscribe(sid, ["flash"])
            query_id = await client.flash(sid, "What is new?", max_tokens=4)
            seq = await client.push(sid, ["alpha", "beta"])
            updates = await within(data_event_reaching(data, seq))
            assert updates[-1].session_id == sid and updates[-1].tokens > 0
            answer = await within(anext(flash))
            assert isinstance(answer, FlashAnswer)
            assert (answer.session_id, answer.query_id, answer.query) == (
                sid,
                query_id,
                "What is new?",
            )
            assert flash.last_event_id is not None and data.last_event_id is not None
            await data.aclose()
            await flash.aclose()
            await client.close_session(sid)

    run(scenario())


def test_http_event_stream_ends_when_the_session_closes(demo_daemon: DaemonProcess) -> None:
    async def scenario() -> None:
        async with HttpClient(demo_daemon.url) as client:
            sid = (await client.init("", template="raw")).session_id
            events = await client.subscribe(sid)
            await client.close_session(sid)
            assert [event async for event in events] == []
            with pytest.raises(UnknownSession):
                await client.subscribe(sid)

    run(scenario())


@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_message_subscription_ends_when_the_session_closes(
    demo_daemon: DaemonProcess, transport: str
) -> None:
    async def scenario() -> None:
        async with await connect(demo_daemon, transport) as client:
            sid = (await client.init("", template="raw")).session_id
            events = await client.subscribe(sid)
            await client.close_session(sid)
            assert await asyncio.wait_for(anext(events, None), 3.0) is None

    run(scenario())


class CutProxy:
    """A loopback TCP forwarder whose connections the test can cut, as a network would."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()


def test_http_events_resume_after_a_dropped_connection(demo_daemon: DaemonProcess) -> None:
    async def scenario() -> None:
        proxy = CutProxy(demo_daemon.port)
        proxy_url = await proxy.start()
        async with HttpClient(demo_daemon.url) as direct, HttpClient(proxy_url) as watcher:
            sid = (await direct.init("", template="raw")).session_id
            events = await watcher.subscribe(sid, ["data"])
            first = await within(data_event_reaching(events, await direct.push(sid, ["one"])))
            cursor = events.last_event_id
            assert cursor is not None

            proxy.cut()  # the stream breaks; these events are published meanwhile
            await direct.push(sid, ["two"])
            seq = await direct.push(sid, ["three"])
            later = await within(data_event_reaching(events, seq))

            assert proxy.connections >= 2  # it reconnected
            seqs = [event.data_seq for event in first + later]
            assert seqs == sorted(set(seqs)), "an event was delivered twice"
            assert events.last_event_id is not None and events.last_event_id > cursor
            await events.aclose()
            await direct.close_session(sid)
        await proxy.close()

    run(scenario())


# ---- connections ----------------------------------------------------------------------------------


def test_closing_the_client_fails_pending_requests(demo_daemon: DaemonProcess) -> None:
    async def scenario() -> None:
        client = await connect(demo_daemon, "tcp")
        sid = (await client.init("", template="raw")).session_id
        events = await client.subscribe(sid)
        waiting = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0)
        await client.aclose()
        with pytest.raises(ConnectionLost, match="closed"):
            await within(waiting)
        with pytest.raises(ConnectionLost):
            await client.ping()
        async with HttpClient(demo_daemon.url) as http:
            await http.close_session(sid)

    run(scenario())


def test_daemon_death_fails_pending_requests(tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = tmp_path_factory.mktemp("client-death")
    args = ["--model", "demo", "--cache-dir", str(cache), "--log-format", "text"]
    daemon = start_daemon(args, log_dir=cache)

    async def scenario() -> None:
        clients = [await connect(daemon, "tcp"), await connect(daemon, "ws")]
        sid = (await clients[0].init("", template="raw")).session_id
        pending = [asyncio.ensure_future(anext(await c.subscribe(sid))) for c in clients]
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        for waiting in pending:
            with pytest.raises(ConnectionLost):
                await within(waiting)
        for client in clients:
            with pytest.raises(ConnectionLost):
                await client.push(sid, ["lost"])
            await client.aclose()
        with pytest.raises(DaemonUnreachable):
            await connect(daemon, "tcp")
        async with HttpClient(daemon.url) as http:
            with pytest.raises(DaemonUnreachable):
                await http.status(sid)

    try:
        run(scenario())
    finally:
        daemon.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_api_key_is_required_and_accepted(keyed_daemon: DaemonProcess, transport: str) -> None:
    async def scenario() -> None:
        for wrong in (None, "wrong-key"):
            with pytest.raises(Unauthorized):
                client = await connect(keyed_daemon, transport, api_key=wrong)
                await client.init("")  # HTTP connects lazily: the first request is refused
        async with await connect(keyed_daemon, transport, api_key=API_KEY) as client:
            sid = (await client.init("", template="raw")).session_id
            assert await client.push(sid, ["in"]) == 1
            await client.close_session(sid)

    run(scenario())


@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_message_over_max_frame_is_refused_and_the_connection_lives(
    keyed_daemon: DaemonProcess, transport: str
) -> None:
    async def scenario() -> None:
        async with await connect(keyed_daemon, transport, api_key=API_KEY) as client:
            assert client.welcome.max_frame == SMALL_FRAME  # type: ignore[attr-defined]
            sid = (await client.init("", template="raw")).session_id
            with pytest.raises(TooLarge, match="max_frame"):
                await client.push(sid, ["x" * SMALL_FRAME])
            assert await client.push(sid, ["small"]) == 1
            await client.close_session(sid)

    run(scenario())


def test_sync_client(demo_daemon: DaemonProcess) -> None:
    with SyncClient.tcp("127.0.0.1", demo_daemon.tcp_port) as client:
        sid = client.init("Sync.", template="raw").session_id
        events = client.subscribe(sid, ["data"])
        assert client.push(sid, ["a", "b"]) == 2
        update = next(events)
        assert isinstance(update, DataUpdated) and update.session_id == sid
        done = client.generate(sid, "Which?", max_tokens=4)
        stream = client.stream_generate(sid, "Which?", max_tokens=4)
        assert "".join(stream) == done.text and stream.done is not None
        with pytest.raises(UnknownSession):
            client.status("nope")
        client.close_session(sid)
    with pytest.raises(DaemonUnreachable):
        SyncClient.tcp("127.0.0.1", free_port())


# ---- the SSE parser ----------------------------------------------------------------------------


def test_sse_parser_handles_every_line_ending_and_chunking() -> None:
    stream = (
        b": keep-alive\n\n"
        b'event: token\nid: 7\ndata: {"text": "a"}\n\n'
        b"event: done\r\ndata: line one\r\ndata: line two\r\n\r\n"
        b"data: plain\r\rid: 9\nevent: x\ndata:no space\n\n"
    )
    expected = [
        SseEvent("token", '{"text": "a"}', "7"),
        SseEvent("done", "line one\nline two", "7"),
        SseEvent("message", "plain", "7"),
        SseEvent("x", "no space", "9"),
    ]
    for size in (1, 2, 5, len(stream)):
        parser = SseParser()
        events = []
        for start in range(0, len(stream), size):
            events += parser.feed(stream[start : start + size])
        assert events == expected, size
        assert parser.last_id == "9"
