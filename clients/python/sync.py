"""Blocking wrappers: any async client driven by a private event loop in a daemon thread.

with SyncClient.tcp("127.0.0.1", 8081) as client:
    sid = client.init("You watch a feed.", template="raw").session_id
    client.push(sid, ["a", "b"])
    print(client.generate(sid, "What came last?", max_tokens=8).text)
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from livelm.client.base import ClientBase, TokenStream
from livelm.client.errors import ConnectionLost
from livelm.client.http import DEFAULT_URL, HttpClient
from livelm.client.replies import DoneReply, Event, SessionInfo, Status
from livelm.client.tcp import DEFAULT_PORT, connect_tcp
from livelm.client.ws import connect_ws

T = TypeVar("T")


class _LoopThread:
    """An event loop running in a daemon thread; ``run`` blocks on one coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    @property
    def stopped(self) -> bool:
        return self.loop.is_closed()

    def run(self, work: Awaitable[T]) -> T:
        """``work``'s result; ``ConnectionLost`` once the client is closed."""
        if self.stopped:
            if asyncio.iscoroutine(work):
                work.close()  # never to run: no "never awaited" warning
            raise ConnectionLost("the client is closed")
        future: Future[T] = asyncio.run_coroutine_threadsafe(_await(work), self.loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise

    def iterate(self, items: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self.run(anext(items))
                except StopAsyncIteration:
                    return
        finally:
            if not self.stopped:  # else the client is closed, and its streams with it
                self.run(items.aclose())  # type: ignore[attr-defined]

    def stop(self) -> None:
        if self.stopped:
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _await(work: Awaitable[T]) -> T:
    return await work


class SyncClient:
    """The operations of ``ClientBase``, blocking. Build with ``tcp``, ``ws`` or ``http``."""

    def __init__(self, loop: _LoopThread, client: ClientBase) -> None:
        self._loop = loop
        self.client = client
        # closes the connection even if close() is never called (at garbage collection or
        # exit), so no task of the loop is destroyed while pending; runs at most once
        self._closer = weakref.finalize(self, _shut_down, loop, client)

    @classmethod
    def tcp(cls, host: str = "127.0.0.1", port: int = DEFAULT_PORT, **options: Any) -> SyncClient:
        return cls._open(lambda: connect_tcp(host, port, **options))

    @classmethod
    def ws(cls, url: str = DEFAULT_URL, **options: Any) -> SyncClient:
        return cls._open(lambda: connect_ws(url, **options))

    @classmethod
    def http(cls, url: str = DEFAULT_URL, **options: Any) -> SyncClient:
        return cls._open(lambda: _http(url, options))

    @classmethod
    def _open(cls, connect: Callable[[], Awaitable[ClientBase]]) -> SyncClient:
        loop = _LoopThread()
        try:
            return cls(loop, loop.run(connect()))
        except BaseException:
            loop.stop()
            raise

    def init(self, prompt: str = "", **options: Any) -> SessionInfo:
        return self._loop.run(self.client.init(prompt, **options))

    def push(self, session_id: str, data: Sequence[Any]) -> int:
        return self._loop.run(self.client.push(session_id, data))

    def generate(self, session_id: str, prompt: str, **options: Any) -> DoneReply:
        return self._loop.run(self.client.generate(session_id, prompt, **options))

    def stream_generate(self, session_id: str, prompt: str, **options: Any) -> SyncTokenStream:
        return SyncTokenStream(
            self._loop, self.client.stream_generate(session_id, prompt, **options)
        )

    def flash(self, session_id: str, query: str, max_tokens: int | None = None) -> int:
        return self._loop.run(self.client.flash(session_id, query, max_tokens))

    def subscribe(self, session_id: str, events: Sequence[str] | None = None) -> Iterator[Event]:
        """Subscribed when this returns; iterate for the events."""
        return self._loop.iterate(self._loop.run(self.client.subscribe(session_id, events)))

    def status(self, session_id: str) -> Status:
        return self._loop.run(self.client.status(session_id))

    def close_session(self, session_id: str) -> None:
        self._loop.run(self.client.close_session(session_id))

    def ping(self) -> None:
        self._loop.run(self.client.ping())

    def close(self) -> None:
        """Closes the connection and the loop; again is a no-op, a later call raises
        ``ConnectionLost``."""
        self._closer()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SyncTokenStream:
    """``for text in stream``; then ``stream.done`` holds the final reply."""

    def __init__(self, loop: _LoopThread, stream: TokenStream) -> None:
        self._loop = loop
        self._stream = stream

    def __iter__(self) -> Iterator[str]:
        return self._loop.iterate(self._stream)

    @property
    def done(self) -> DoneReply | None:
        return self._stream.done


def _shut_down(loop: _LoopThread, client: ClientBase) -> None:
    try:
        if loop.loop.is_running():
            loop.run(client.aclose())
    finally:
        loop.stop()


async def _http(url: str, options: dict[str, Any]) -> ClientBase:
    return HttpClient(url, **options)  # built on the loop thread, where its session lives
