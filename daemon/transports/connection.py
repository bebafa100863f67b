"""One client connection, whatever carries it: decoded messages in, reply messages out.

Requests are applied one at a time in the order received (so pushes land in order and a
``status`` sees the pushes sent before it); a ``generate`` or ``subscribe`` only starts in that
order and then streams from a task of its own, so replies of different ids interleave. A bad
message gets an ``error`` echoing its ``id`` and the connection stays usable; a broken frame gets
an ``error`` and the connection closes.

Backpressure: while many received messages wait to be applied (a push waits while the engine's
ring is full) the transport stops reading, and reads again once they drained: nothing is
dropped. When the transport goes away, its queries and subscriptions are cancelled; state
changes already received (init, push, flash, close) are still applied.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import TYPE_CHECKING, Protocol

from livelm import __version__
from livelm.daemon.engine.events import UNSUBSCRIBED
from livelm.daemon.logs import get_logger
from livelm.daemon.transports.auth import KeyCheck
from livelm.daemon.transports.requests import Requests
from livelm.daemon.transports.streams import stream_answer, stream_events
from livelm.protocol.errors import InternalError, InvalidRequest, LiveLMError, Unauthorized
from livelm.protocol.messages import GenerateRequest
from livelm.protocol.wire import (
    MSGPACK,
    PROTOCOL_VERSION,
    ClientMessage,
    CloseMsg,
    Codec,
    ErrorMsg,
    FlashMsg,
    GenerateMsg,
    HelloMsg,
    InitMsg,
    PingMsg,
    PongMsg,
    PushMsg,
    ServerMessage,
    StatusMsg,
    SubscribedMsg,
    SubscribeMsg,
    UnsubscribedMsg,
    UnsubscribeMsg,
    WelcomeMsg,
    as_request,
    error_msg,
)

if TYPE_CHECKING:
    from collections.abc import Coroutine
    from typing import Any

    from livelm.daemon.http.server import ServerState
    from livelm.daemon.metrics import WireCounters

log = get_logger(__name__)

SERVER_NAME = f"livelm/{__version__}"
# stop reading when this many received messages (or bytes) wait; read again below the low marks
PAUSE_MESSAGES, RESUME_MESSAGES = 64, 16
MAX_SUBSCRIPTIONS = 1024  # per connection; each sends every event of its session
PAUSE_BYTES, RESUME_BYTES = 8 << 20, 2 << 20
# applied even after the client went away: they change state the client may rely on later
STATE_CHANGES = (InitMsg, PushMsg, FlashMsg, CloseMsg)


class Link(Protocol):
    """What a transport does for its connection."""

    async def send(self, data: bytes, binary: bool) -> None:
        """Writes one message; waits while the peer reads slowly; a no-op once closed."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...


class Inbound:
    """A received message waiting to be applied, or the error to answer it with."""

    __slots__ = ("codec", "message", "error", "size", "close_after", "wait_answers")

    def __init__(
        self,
        codec: Codec,
        size: int,
        message: ClientMessage | None = None,
        error: ErrorMsg | None = None,
        close_after: bool = False,
        wait_answers: bool = False,
    ) -> None:
        self.codec, self.size, self.message, self.error = codec, size, message, error
        self.close_after = close_after  # close the connection once this item is handled
        self.wait_answers = wait_answers  # ... after the generates streaming then are done


class Connection:
    def __init__(
        self,
        state: ServerState,
        link: Link,
        counters: WireCounters,
        *,
        authenticated: bool = False,
    ) -> None:
        self._state = state
        self._link = link
        self._counters = counters
        self._requests = Requests(state.engine_for)
        self._keys = KeyCheck(state.config.api_keys)
        self._authenticated = authenticated or not self._keys.required
        self._inbox: asyncio.Queue[Inbound | None] = asyncio.Queue()
        self._queued_bytes = 0
        self._paused = False
        self._closing = False  # a broken frame: no more reading
        self._gone = False  # the transport is closed: nothing more is sent
        self._streams: set[asyncio.Task[None]] = set()
        self._answers: dict[int, asyncio.Task[None]] = {}  # generates streaming now, by id
        # live subscriptions by id: their stream task and session
        self._subscriptions: dict[int, tuple[asyncio.Task[None], str]] = {}
        counters.opened()
        self._runner = asyncio.get_running_loop().create_task(self._run())

    # ---- called by the transport -------------------------------------------------------------
    def receive(self, payload: bytes, codec: Codec) -> None:
        """A complete message as received; applied later, in order."""
        self._counters.frames_in_total += 1
        try:
            item = Inbound(codec, len(payload), message=codec.decode(payload))
        except InvalidRequest as exc:
            item = Inbound(codec, len(payload), error=error_msg(exc, codec.request_id(payload)))
        self._enqueue(item)

    def fail(self, exc: LiveLMError, codec: Codec) -> None:
        """The byte stream broke: answer ``exc`` after what is queued, then close."""
        self._closing = True
        self._link.pause_reading()
        self._enqueue(Inbound(codec, 0, error=error_msg(exc), close_after=True))

    def end(self) -> None:
        """The peer sent everything it will send: answer it all, then close."""
        self._enqueue(Inbound(MSGPACK, 0, close_after=True, wait_answers=True))

    def lost(self) -> None:
        """The transport closed: cancel the streams; queued state changes still apply."""
        if self._gone:
            return
        self._gone = True
        self._counters.closed()
        for task in list(self._streams):
            task.cancel()
        self._inbox.put_nowait(None)

    async def answers_sent(self, timeout: float) -> None:
        """Waits (up to ``timeout``) for the generates streaming now to send their last message."""
        if self._answers:
            await asyncio.wait(list(self._answers.values()), timeout=timeout)

    # ---- applying messages in order -----------------------------------------------------------
    def _enqueue(self, item: Inbound) -> None:
        self._queued_bytes += item.size
        self._inbox.put_nowait(item)
        busy = self._inbox.qsize() >= PAUSE_MESSAGES or self._queued_bytes >= PAUSE_BYTES
        if busy and not self._paused:
            self._paused = True
            self._counters.read_pauses_total += 1
            self._link.pause_reading()

    def _dequeued(self, item: Inbound) -> None:
        self._queued_bytes -= item.size
        calm = self._inbox.qsize() <= RESUME_MESSAGES and self._queued_bytes <= RESUME_BYTES
        if calm and self._paused:
            self._paused = False
            if not self._closing:
                self._link.resume_reading()

    async def _run(self) -> None:
        try:
            while (item := await self._inbox.get()) is not None:
                self._dequeued(item)
                if item.error is not None:
                    await self._send(item.error, item.codec)
                elif item.message is not None:
                    await self._apply(item.message, item.codec)
                if item.close_after:
                    if item.wait_answers and self._answers:
                        await asyncio.wait(list(self._answers.values()))
                    self._link.close()
                    return
        except Exception:
            log.exception("connection failed; closing it")
            self._link.close()

    async def _apply(self, msg: ClientMessage, codec: Codec) -> None:
        if self._gone and not isinstance(msg, STATE_CHANGES):
            return
        try:
            answer = await self._answer(msg, codec)
        except LiveLMError as exc:
            answer = error_msg(exc, getattr(msg, "id", None))
        except Exception:
            log.exception("request failed", extra={"type": type(msg).__name__})
            failure = InternalError("the request failed; see the daemon log")
            answer = error_msg(failure, getattr(msg, "id", None))
        if answer is not None:
            await self._send(answer, codec)

    async def _answer(self, msg: ClientMessage, codec: Codec) -> ServerMessage | None:
        """The reply to ``msg``; ``None`` when a stream task answers it."""
        if isinstance(msg, HelloMsg):
            return self._hello(msg)
        if not self._authenticated:
            raise Unauthorized("this server requires an API key: send hello with api_key first")
        if isinstance(msg, PingMsg):
            return PongMsg(id=msg.id)
        if isinstance(msg, GenerateMsg):
            await self._start_answer(msg, codec)
            return None
        if isinstance(msg, SubscribeMsg):
            await self._subscribe(msg, codec)
            return None
        if isinstance(msg, UnsubscribeMsg):
            return await self._unsubscribe(msg)
        return await self._single_reply(msg)

    async def _single_reply(self, msg: ClientMessage) -> ServerMessage:
        if isinstance(msg, PushMsg):
            return await self._requests.push(msg)
        if isinstance(msg, InitMsg):
            return await self._requests.init(msg)
        if isinstance(msg, StatusMsg):
            return await self._requests.status(msg)
        if isinstance(msg, FlashMsg):
            return await self._requests.flash(msg)
        if isinstance(msg, CloseMsg):
            return await self._requests.close(msg)
        raise InvalidRequest(f"unexpected message type {type(msg).__name__}")

    def _hello(self, msg: HelloMsg) -> WelcomeMsg:
        if msg.version != PROTOCOL_VERSION:
            raise InvalidRequest(
                f"protocol version {msg.version} is not supported; this server speaks "
                f"version {PROTOCOL_VERSION}"
            )
        if self._keys.required:
            if msg.api_key is not None and not self._keys.matches(msg.api_key):
                raise Unauthorized("invalid api_key")
            if msg.api_key is None and not self._authenticated:
                raise Unauthorized("this server requires an API key: send it as api_key")
            self._authenticated = True
        return WelcomeMsg(
            version=PROTOCOL_VERSION,
            server=SERVER_NAME,
            model=self._state.model,
            max_frame=self._state.config.max_frame,
            id=msg.id,
        )

    # ---- streams --------------------------------------------------------------------------------
    async def _start_answer(self, msg: GenerateMsg, codec: Codec) -> None:
        if msg.id in self._answers:
            raise InvalidRequest(f"id {msg.id} is already used by a generate still streaming")
        engine = self._state.engine_for()
        handle = await engine.ask(msg.session_id, as_request(msg, GenerateRequest))
        task = self._spawn(stream_answer(handle, msg, partial(self._send, codec=codec)))
        self._answers[msg.id] = task
        task.add_done_callback(lambda _: self._answers.pop(msg.id, None))

    async def _subscribe(self, msg: SubscribeMsg, codec: Codec) -> None:
        if msg.id in self._subscriptions:
            raise InvalidRequest(f"id {msg.id} is already used by a live subscription")
        if len(self._subscriptions) >= MAX_SUBSCRIPTIONS:
            raise InvalidRequest(f"a connection holds at most {MAX_SUBSCRIPTIONS} subscriptions")
        engine = self._state.engine_for()
        subscription = engine.subscribe(msg.session_id, frozenset(msg.events), msg.last_event_id)
        topics = msg.events or ["flash", "data"]
        confirm = SubscribedMsg(
            id=msg.id, session_id=msg.session_id, events=topics, last_event_id=subscription.cursor
        )
        try:
            await self._send(confirm, codec)
        finally:
            if self._gone:  # the transport closed meanwhile: no one to stream to
                subscription.close()
        if not self._gone:
            task = self._spawn(stream_events(subscription, msg, partial(self._send, codec=codec)))
            self._subscriptions[msg.id] = (task, msg.session_id)
            task.add_done_callback(lambda _: self._forget_subscription(msg.id, task))

    def _forget_subscription(self, request_id: int, task: asyncio.Task[None]) -> None:
        live = self._subscriptions.get(request_id)
        if live is not None and live[0] is task:
            del self._subscriptions[request_id]

    async def _unsubscribe(self, msg: UnsubscribeMsg) -> UnsubscribedMsg:
        """Ends the subscription made by the subscribe with ``msg.id``; its last message."""
        live = self._subscriptions.pop(msg.id, None)
        if live is None:
            raise InvalidRequest(f"no live subscription has id {msg.id}")
        task, session_id = live
        task.cancel()
        await asyncio.wait([task])  # none of its events can follow the reply
        return UnsubscribedMsg(id=msg.id, session_id=session_id, reason=UNSUBSCRIBED)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._streams.add(task)
        task.add_done_callback(self._streams.discard)
        return task

    # ---- sending ----------------------------------------------------------------------------------
    async def _send(self, msg: ServerMessage, codec: Codec) -> None:
        if self._gone:
            return
        data = codec.encode(msg)
        self._counters.frames_out_total += 1
        await self._link.send(data, codec.binary)
